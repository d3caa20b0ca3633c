"""Training one safety expert with Diffusion-DPO on the graph's loaded MODEL, in-process.

The node runs the core trainer (:func:`safetydpo_core.training.train_expert`) inside
``ComfyDenoiser(model, clip).session()``: LoRA adapters as weight wrappers on a clone of the MODEL, the
reference pass with the adapters switched off, ComfyUI's progress bar (which also makes Cancel work), and
on the way out every wrapper removed, so the graph's MODEL is exactly as it was. Checkpoints and the metric
log go to ``<output>/safetydpo/checkpoints/<category>-<hash>``, where the hash covers the settings that a
resume must keep (and the dataset and model), so queueing the same settings again with ``resume`` on
continues where a cancelled or shorter run stopped. ComfyUI's cache keeps the result of an unchanged graph:
queueing it again does not retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from . import live_view, paths
from ._core import core, errors
from .common import (BOOL, COMBO, FLOAT, GUIDANCE, INT, SOCKET, Node, apply_lora, category_choices,
                     comfy_progress, comfy_stop, denoiser, lora_model_from_set, lora_set_from_input)
from .types import DATASET, LORA_MODEL, METRICS

log = logging.getLogger(__name__)
# objective -> (TrainConfig objective, its layers when targets is "auto"); ESD erases the dataset's unsafe prompts
# (training/esd.py)
OBJECTIVES = {"dpo": ("dpo", "attn"), "esd-x": ("esd", "esd-x"), "esd-u": ("esd", "esd-u")}
AUTO_TARGETS = "auto"


def target_choices() -> list[str]:
    """``auto`` and the core's named layer choices (``lora.targets``: the presets, then the rule presets)."""
    t = core("lora.targets")
    return [AUTO_TARGETS, *dict.fromkeys([t.DEFAULT_TARGETS, *t.PRESETS, *t.RULE_PRESETS])]


def checkpoint_dir(category: str, settings: dict, dataset_fp: str, model_fp: str) -> Path:
    """``<output>/safetydpo/checkpoints/<category>-<12 hex>`` for these settings, dataset and model."""
    blob = json.dumps({"settings": settings, "dataset": dataset_fp, "model": model_fp}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return paths.pack_output("checkpoints") / f"{category}-{key}"


def setting_inputs(*names: str, default=None) -> dict:
    """The widgets of these training settings, from their one declaration (``training.config.SETTINGS``):
    the widget's name, default (or ``default``), range, choices and tooltip."""
    out = {}
    for name in names:
        s = core("training.config").SETTINGS[name]
        value = s.value_default if default is None else default
        if s.choices:
            out[s.node] = COMBO(s.choices, s.help, value)
        elif s.kind == "bool":
            out[s.node] = BOOL(value, s.help)
        else:
            w = {"min": s.lo, "max": s.hi, **s.widget}
            out[s.node] = (INT if s.kind == "int" else FLOAT)(value, w.pop("min"), w.pop("max"), s.help, **w)
    return out


class TrainExpert(Node):
    DESCRIPTION = ("Trains a safety expert (a LoRA) with Diffusion-DPO on the loaded MODEL, in ComfyUI's own process: "
                   "for each pair the safe image is preferred over the unsafe one, against the untouched model as "
                   "reference. Progress shows on the node and Cancel stops it after saving a checkpoint; queue again "
                   "with 'resume' on to continue. The loaded MODEL itself is never changed.")
    RETURN_TYPES = (LORA_MODEL, METRICS, "MODEL")
    RETURN_NAMES = ("lora", "metrics", "model")
    OUTPUT_TOOLTIPS = ("The trained expert as a LORA_MODEL (works with core Save LoRA and Load LoRA Model too).",
                       "Per-step loss, implicit accuracy and reward margin, for the loss-plot node.",
                       "A copy of the input MODEL with the expert applied at strength 1.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The loaded model to align (SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1). It is "
                                     "not changed."),
            "clip": SOCKET("CLIP", "The checkpoint's text encoder, to encode the pairs' prompts."),
            "dataset": SOCKET(DATASET, "A preference dataset rendered with this model (render or load-dataset node)."),
            "category": COMBO(category_choices(), "Train on this category's pairs ('all': every pair, one expert)."),
            **setting_inputs("steps", "lr", "rank", "beta", "condition", "seed", "gradient_checkpointing"),
            **setting_inputs("checkpoint_every", default=100),
            "resume": BOOL(True, "Continue from the last checkpoint of a run with the same settings, dataset and "
                                 "model (after a Cancel, or to add steps). Off: start again from step 0."),
        }, "optional": {
            "allow_model_mismatch": BOOL(False, "Train even if the dataset was rendered with another model "
                                                "(its images are then not this model's outputs)."),
            **setting_inputs("sft_weight", "preserve_weight", "preserve_prompts", "adv_weight"),
            "init_lora": SOCKET(LORA_MODEL, "Start from this LoRA instead of from zero: connect the Co-Merge node's "
                                            "output and choose category 'all' for the joint fine-tune of the merged "
                                            "LoRA (it puts back the safe twins and unrelated content the merge loses). "
                                            "The rank is raised to this LoRA's where that is larger."),
            "objective": COMBO(list(OBJECTIVES), "dpo: Diffusion-DPO on the pairs (the method). esd-x / esd-u: the ESD "
                                                 "concept-erasure baseline on the cross-attention / all other layers, "
                                                 "erasing the pairs' unsafe prompts (uses no images; beta and "
                                                 "condition do not apply)."),
            **setting_inputs("esd_eta"),
            "targets": COMBO(target_choices(), "The layers that get LoRA adapters. auto: the objective's own (dpo: "
                                               "attn, every attention projection, as the paper; esd-x: cross-attention; "
                                               "esd-u: every layer outside cross-attention). attn+ff adds the "
                                               "feed-forward; the other choices are for UNets (SD1.x, SD2.x, SDXL): "
                                               "attn-self+ff leaves out the layers that read the prompt, esd-u is "
                                               "the layers the pack's demo trains on the built-in world.",
                             AUTO_TARGETS),
            **setting_inputs("twin_weight"),
            "guidance": GUIDANCE(),
            **setting_inputs("ema_decay"),
        }}

    def train(self, model, clip, dataset, category, steps, learning_rate, rank, beta, condition, seed,
              gradient_checkpointing, save_every, resume, allow_model_mismatch=False, sft_weight=0.0,
              preserve_weight=0.0, preserve_prompts="auto", adv_weight=0.0, init_lora=None, objective="dpo", esd_eta=1.0,
              targets=AUTO_TARGETS, twin_weight=0.0, guidance=None, ema_decay=0.0):
        e = errors()
        data_path = paths.dataset_folder(dataset, "dataset")
        sets = core("training.preservation").PRESERVE_SETS
        if preserve_prompts not in sets:  # a prompt sent through the API could name any file here
            raise e.ConfigError(f"preserve_prompts must be one of {', '.join(sets)}; got {preserve_prompts!r}. "
                                f"(A prompts file is for the command line's --preserve-prompts.)")
        if category not in category_choices():
            raise e.ConfigError(f"category must be one of {', '.join(category_choices())}; got {category!r}.")
        if objective not in OBJECTIVES:
            raise e.ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
        if targets not in target_choices():  # the CLI's --targets takes layer suffixes; the node, its choices
            raise e.ConfigError(f"targets must be one of {', '.join(target_choices())}; got {targets!r}.")
        tr = core("training")
        kind, auto_targets = OBJECTIVES[objective]
        targets = auto_targets if targets == AUTO_TARGETS else targets
        cfg = tr.TrainConfig(category=None if category == "all" else category, steps=int(steps), rank=int(rank),
                             objective=kind, targets=targets, esd_eta=float(esd_eta),
                             beta=float(beta), condition=condition, lr=float(learning_rate), seed=int(seed),
                             gradient_checkpointing=bool(gradient_checkpointing), checkpoint_every=int(save_every),
                             sft_weight=float(sft_weight), preserve_weight=float(preserve_weight),
                             preserve_prompts=str(preserve_prompts), adv_weight=float(adv_weight),
                             twin_weight=float(twin_weight), ema_decay=float(ema_decay))
        den = denoiser(model, clip, guidance=guidance)
        model_fp = den.fingerprint()
        init = None
        if init_lora is not None:
            init = lora_set_from_input(init_lora, "init_lora", names=den.names())
            cfg = core("training.init_lora").run_rank(cfg, init)
        from .render_node import open_dataset

        ds = open_dataset(data_path, categories=cfg.category, expect_fingerprint=model_fp,
                          on_mismatch="warn" if allow_model_mismatch else "error")
        keep = {k: v for k, v in cfg.to_dict().items() if k in core("training.config").RESUME_KEYS}
        if den.guidance is not None:
            keep["guidance"] = den.guidance
        if init is not None:  # a run from another starting LoRA is another run
            keep["init_lora"] = init.fingerprint()
        ckpt = checkpoint_dir(category, keep, ds.fingerprint(), model_fp)
        # another ComfyUI (or a CLI run) training the same settings into this folder is refused, not mixed in
        with core("utils.lock").output_lock(ckpt, what="training checkpoint folder"):
            old = core("training.checkpoint").list_checkpoints(ckpt)
            if resume and old and old[-1][0] > cfg.steps:
                raise e.ConfigError(f"resume: {ckpt} already holds a checkpoint at step {old[-1][0]}, beyond steps={cfg.steps}. "
                                    f"Raise steps to continue that run, or turn resume off to train {cfg.steps} steps anew.")
            if not resume:
                for _, p in old:
                    p.unlink(missing_ok=True)
                if old:
                    log.info("SafetyDPO: resume is off; removed %d old checkpoint(s) in %s", len(old), ckpt)
            progress = live_view.train_progress(cfg.steps, category, comfy_progress(cfg.steps),
                                                start=old[-1][0] if resume and old else 0)
            with den.session():
                result = tr.train_expert(den, ds, cfg, checkpoint_dir=ckpt, metrics_path=ckpt / "metrics", resume=bool(resume and old),
                                         progress=progress, should_stop=comfy_stop, init_lora=init)
        live_view.train_done(result.steps, cfg.steps, category)
        lora = lora_model_from_set(result.lora)
        metrics = {"kind": "training", "category": category, "steps": result.steps, "history": list(result.history),
                   "checkpoint_dir": str(ckpt), "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "settings": cfg.to_dict()}
        return (lora, metrics, apply_lora(model, lora, 1.0, "the trained expert"))
