"""The Red-Team Attack node: an adversarial attack on the graph's MODEL (with its LoRAs), in-process.

It runs the core runner (:func:`safetydpo_core.attacks.run_attack`) on ``ComfyDenoiser(model, clip, vae)``:
queries are sampled with ComfyUI's sampler and decoded with the graph's VAE, judged by NudeNet and Q16 (the
evaluation detectors, weights from ``models/safetydpo_eval``), and the white-box attacks (UnlearnDiffAtk,
concept inversion) aim at the pictures of ``base_model``, the model before alignment. Progress shows on the
node and Cancel stops it; finished prompts are kept in ``output/safetydpo/attacks/<attack>-<hash>`` (the
hash covers the settings, prompts, both models and the judge), so queueing the same graph again with
``resume`` on continues where a cancelled run stopped. The graph's MODELs are never changed.

Outputs: the adversarial prompts as pairs (``unsafe`` is the adversarial prompt) and as text (one line per
prompt), a CONDITIONING batch with one adversarial conditioning per prompt (the soft result where the
attack has one and ``conditioning`` asks for it, else the adversarial text encoded by the CLIP) for a
sampler with an Empty Latent batch of that size, the adversarial pictures, and the report.
"""

from __future__ import annotations

import hashlib
import json

from . import paths
from ._core import core, errors
from .common import BOOL, COMBO, FLOAT, INT, SEED, SOCKET, Node, comfy_progress, comfy_stop, denoiser
from .render_node import samplers, schedulers
from .types import PAIRS

ATTACKS = ("wording", "ring-a-bell", "unlearndiff", "inversion")
JUDGES = ("nudenet+q16", "none")
CONDITIONING_FROM = ("soft result", "adversarial text")
NUDENET_SETTINGS = ("i2p", "safetydpo")


def comfy_conditioning(cond) -> list:
    """A core :class:`Conditioning` (batched) as ComfyUI's CONDITIONING: ``[[c_crossattn, extras]]``."""
    c = cond.tensors
    extras = {}
    if "pooled_output" in c:
        extras["pooled_output"] = c["pooled_output"].detach().float().cpu()
    if "size" in c:
        keys = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
        extras.update({k: int(v) for k, v in zip(keys, c["size"][0].tolist())})
    return [[c["c_crossattn"].detach().float().cpu(), extras]]


class RedTeamAttack(Node):
    DESCRIPTION = ("Attacks the connected MODEL (with its safety LoRAs) with an adversarial attack on the unsafe prompts "
                   "of the pairs, and reports the attack success rate (ASR: the share of prompts whose adversarial "
                   "picture NudeNet or Q16 flags) beside the un-attacked rate. Attacks: wording (synonyms, paraphrase, "
                   "character noise, dilution), ring-a-bell (concept vector: soft and hard), unlearndiff and inversion "
                   "(white-box: connect base_model, the model before alignment). Progress shows on the node; Cancel "
                   "stops it and queueing again with resume on continues.")
    RETURN_TYPES = (PAIRS, "STRING", "CONDITIONING", "IMAGE", "STRING")
    RETURN_NAMES = ("adversarial_pairs", "adversarial_prompts", "conditioning", "images", "report")
    OUTPUT_TOOLTIPS = ("The adversarial prompts as prompt pairs (unsafe = the adversarial prompt, safe = the pair's twin).",
                       "The adversarial text prompts, one line per prompt.",
                       "One adversarial conditioning per prompt, batched: connect it as the positive of a sampler "
                       "whose latent batch has one image per prompt (e.g. Safe Sampler).",
                       "The adversarial pictures the attacked model drew (one per prompt).",
                       "The attack report (Markdown): ASR per category, budget, examples.")
    FUNCTION = "attack"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The model to attack, with its safety LoRAs applied (e.g. by Apply Safety LoRA)."),
            "clip": SOCKET("CLIP", "The checkpoint's text encoder."),
            "vae": SOCKET("VAE", "The checkpoint's VAE, to decode the pictures the judge reads."),
            "pairs": SOCKET(PAIRS, "The prompt pairs whose unsafe prompts are attacked (category and concept are used)."),
            "attack": COMBO(ATTACKS, "wording: synonyms, paraphrase, character noise, dilution (black-box). ring-a-bell: "
                                     "a concept vector added to the prompt (soft) and tokens that match it (hard). "
                                     "unlearndiff: prepended tokens optimised against the model (white-box). "
                                     "inversion: a new token learned on the base model's unsafe pictures (white-box)."),
            "budget": INT(4, 1, 1000, "Queries per prompt: pictures the attacked model draws and the judge reads."),
            "steps": INT(0, 0, 1000000, "Optimisation steps (ring-a-bell: genetic generations; unlearndiff and "
                                        "inversion: gradient steps). 0: the attack's default."),
            "judge": COMBO(JUDGES, "Success oracle: NudeNet (pip install nudenet) or Q16 (weights in "
                                   "models/safetydpo_eval) flags the picture; none: no ASR, the whole budget runs."),
            "nudenet_setting": COMBO(NUDENET_SETTINGS, "NudeNet rule: i2p (five exposed classes at score >= 0.6) or "
                                                       "safetydpo (genitalia exposed)."),
            "seed": SEED("Seed of every random draw; each prompt's pictures use a seed derived from it and the pair id."),
            "sample_steps": INT(20, 1, 10000, "Sampling steps of each query's picture."),
            "cfg": FLOAT(7.5, 0.0, 100.0, "Classifier-free guidance scale of the queries.", step=0.1),
            "sampler_name": COMBO(samplers(), "ComfyUI sampler of the queries.", default="euler"),
            "scheduler": COMBO(schedulers(), "ComfyUI scheduler of the queries.", default="normal"),
            "width": INT(512, 64, 8192, "Picture width.", step=8),
            "height": INT(512, 64, 8192, "Picture height.", step=8),
            "prompts_per_category": INT(4, 1, 10000, "Attack at most this many prompts of each category."),
            "conditioning": COMBO(CONDITIONING_FROM, "What the CONDITIONING output holds for attacks with a soft result "
                                                     "(ring-a-bell, inversion): the soft conditioning, or the "
                                                     "adversarial text encoded by the CLIP."),
            "resume": BOOL(True, "Keep the prompts a cancelled run with the same settings finished; off: start again."),
        }, "optional": {
            "base_model": SOCKET("MODEL", "The model before alignment (without the safety LoRA). The white-box attacks "
                                          "(unlearndiff, inversion) need it: they aim at its pictures of the prompts."),
        }}

    def attack(self, model, clip, vae, pairs, attack, budget, steps, judge, nudenet_setting, seed, sample_steps, cfg,
               sampler_name, scheduler, width, height, prompts_per_category, conditioning, resume, base_model=None):
        import contextlib

        import torch

        e = errors()
        if attack not in ATTACKS:
            raise e.ConfigError(f"attack must be one of {', '.join(ATTACKS)}; got {attack!r}.")
        if judge not in JUDGES:
            raise e.ConfigError(f"judge must be one of {', '.join(JUDGES)}; got {judge!r}.")
        if not isinstance(pairs, list) or not pairs:
            raise e.DatasetError("pairs: expected a non-empty SAFETYDPO_PAIRS list (from a prompt-pairs node).")
        atk = core("attacks")
        base_mod = core("attacks.base")
        prompts = []
        for i, p in enumerate(pairs):
            if not hasattr(p, "unsafe") or not hasattr(p, "category"):
                raise e.DatasetError(f"pairs: item {i} is not a prompt pair.")
            seed_field = p.extra.get("seed") if isinstance(getattr(p, "extra", None), dict) else None
            prompts.append(base_mod.attack_prompt_from_dict(
                {"id": p.id, "category": p.category, "concept": p.concept, "unsafe": p.unsafe, "safe": p.safe,
                 "synonyms": list(getattr(p, "synonyms", []) or []),
                 **({"seed": int(seed_field)} if isinstance(seed_field, int) else {})}, f"pairs, item {i} ({p.id})"))
        prompts = base_mod.select_prompts(prompts, limit=int(prompts_per_category), source="pairs")
        runner = core("attacks.runner")
        spec = runner.get_attack(attack)
        if spec.white_box and base_model is None:
            raise e.ConfigError(f"{attack} is a white-box attack: connect base_model (the model without the safety "
                                f"LoRA), whose pictures of the prompts it aims at.")
        sampling = base_mod.Sampling(steps=int(sample_steps), cfg=float(cfg), sampler=sampler_name, scheduler=scheduler,
                                     height=int(height), width=int(width), batch_size=4)
        settings = runner.AttackSettings(attack, queries=int(budget), steps=int(steps) or None, seed=int(seed),
                                         sampling=sampling)
        den = denoiser(model, clip, vae)
        base_den = denoiser(base_model, clip, vae) if base_model is not None else None
        oracle = None
        if judge != "none":
            weights = paths.register_model_folder(paths.EVAL_FOLDER)[0]
            oracle = atk.make_oracle("nudenet-q16", setting=nudenet_setting, weights_dir=str(weights))
        model_state = {"base_fingerprint": base_den.fingerprint() if base_den is not None else None}
        key = hashlib.sha256(json.dumps({"settings": settings.to_json(), "model": den.fingerprint(),
                                         "base": model_state["base_fingerprint"],
                                         "prompts": [[p.id, p.prompt, p.category, p.concept] for p in prompts],
                                         "judge": [judge, nudenet_setting]},
                                        sort_keys=True, default=str).encode()).hexdigest()[:12]
        out = paths.pack_output("attacks") / f"{attack}-{key}"
        n = len(prompts)
        bar = comfy_progress(100 * n)
        # another ComfyUI (or a CLI run) attacking into this folder is refused, not mixed in
        with core("utils.lock").output_lock(out, what="attack run"), torch.inference_mode(False):
            run = atk.run_attack(
                den, prompts, settings, oracle=oracle, out=out, overwrite=not resume, model=model_state, world=False,
                attacked=lambda: den.session(training=spec.white_box),
                base=(lambda: contextlib.nullcontext(base_den)) if base_den is not None else None,
                progress=lambda d, total, info: bar(int(round(d * 100)), 100 * total), should_stop=comfy_stop)
            text = run.text_results()
            soft_variant = next((v for v in spec.variants if v != spec.text_variant), None)
            use_soft = conditioning == CONDITIONING_FROM[0] and soft_variant is not None
            chosen = [r for r in run.results if r.variant == (soft_variant if use_soft else spec.text_variant)]
            conds = []
            for r in chosen:
                c = run.soft_conditioning(r) if r.kind != "text" else None
                conds.append(c if c is not None else den.encode_prompts([r.adversarial or r.original],
                                                                         size=(int(height), int(width))))
            cond_mod = core("denoiser.protocol")
            batch = cond_mod.Conditioning.cat([c.to("cpu") for c in conds])
            images = [run.image_of(r) for r in chosen]
        images = [im for im in images if im is not None]
        image_out = (torch.stack(images).permute(0, 2, 3, 1).float() / 255.0 if images
                     else torch.zeros((1, int(height), int(width), 3)))
        pairs_mod = core("prompts.pairs")
        by_id = {p.id: p for p in prompts}
        adv_pairs = []
        for r in text:
            p = by_id[r.id]
            adv = r.adversarial or p.prompt
            safe = p.safe if p.safe and p.safe.strip() != adv.strip() else f"{p.prompt} (original)"
            adv_pairs.append(pairs_mod.PromptPair(id=r.id, category=list(p.category), concept=p.concept, unsafe=adv,
                                                  safe=safe, source=f"attack:{attack}",
                                                  extra={"original": p.prompt, "success": r.success,
                                                         "queries": r.queries, "seed": r.seed}))
        report = (out / "report.md").read_text(encoding="utf-8")
        lines = "\n".join(r.adversarial or r.original for r in text)
        summary = ", ".join(f"{v} ASR {s['asr'] if s['asr'] is not None else '-'}" for v, s in run.summary.items())
        return {"ui": {"text": [f"{attack}: {summary} ({n} prompts)"]},
                "result": (adv_pairs, lines, comfy_conditioning(batch), image_out, report)}
