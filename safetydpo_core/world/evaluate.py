"""Measure the world model with the world judge: ``python -m safetydpo_core.world.evaluate``.

Generates pictures for a balanced grid of prompts (every object kind x colour x position, a random
background, training-split captions; and the same for held-out captions), reads them with the judge and
reports fidelity per attribute for safe requests, IP and fidelity for unsafe requests, per concept, and
fidelity on unrelated content (plain shapes in training, held-out and free wording, :mod:`.unrelated`). The
report is written to ``weights/evaluation.json`` (or ``--out``) and printed.

:func:`judge_prompts` is the helper the demo and benchmarks use: prompts + seeds -> pictures -> judged results;
:func:`evaluate_unrelated` measures unrelated content (and preservation against a base model's results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..denoiser.protocol import RenderingDenoiser
from ..errors import SafetyDPOError
from ..utils.atomic import atomic_write_text
from .captions import caption
from .judge import WEIGHTS_DIR, Judge, load_judge
from .metrics import attribute_accuracy, fidelity, ip, summary
from .model import SAMPLING, generate, load_world_model
from .spec import WORLD, Scene


def judge_prompts(denoiser: RenderingDenoiser, judge: Judge, prompts: Sequence[str], seeds: Sequence[int] | int = 0,
                  **sampling) -> tuple[torch.Tensor, list[dict]]:
    """Generate one picture per prompt with ``denoiser`` and judge it against its prompt."""
    images = generate(denoiser, prompts, seeds, **sampling)
    results = judge.judge(images, prompts)
    for r, p in zip(results, prompts):
        r["prompt"] = p
    return images, results


def grid_prompts(split: str = "train", seed: int = 0, shapes: Sequence[str] | None = None,
                 repeats: int = 1) -> list[tuple[str, Scene]]:
    """Captions for every (shape, colour, position), ``repeats`` times, random background and wording."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(repeats):
        for shape in shapes or WORLD.shapes:
            for colour in WORLD.ids("colour"):
                for position in WORLD.ids("position"):
                    bg = WORLD.ids("background")[int(rng.integers(3))]
                    scene = Scene(shape, colour, position, bg)
                    out.append((caption(scene, rng=rng, split=split), scene))
    return out


def model_from_checkpoint(checkpoint: str | Path, work: str | Path):
    """A denoiser from the EMA weights of a training checkpoint (to look at a run before it ends)."""
    from .model import build_modules, save_pipeline

    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    d = Path(tempfile.mkdtemp(prefix="world_ckpt_"))
    unet, text, _tok, sched = build_modules(d / "tok", seed=0)
    if ck.get("unet_config") is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**ck["unet_config"])
    for name, text_ in ck["tokenizer_files"].items():
        (d / "tok" / name).write_text(text_, encoding="utf-8")
    unet.load_state_dict(ck["ema_unet"])
    text.load_state_dict(ck["ema_text"])
    save_pipeline(d / "model", unet, text, d / "tok", sched, {"base_model_version": WORLD.version})
    return load_world_model(path=d / "model"), ck["step"]


def judge_robustness(judge: Judge, strengths: Sequence[float] = (0.0, 1.0, 1.5, 2.0), n: int = 3000,
                     seed: int = 202) -> dict:
    """The judge's per-attribute accuracy on held-out renders (the judge trainer's test seed by default)
    degraded at several strengths (1.0 is the strongest used in training on average; 2.0 is twice that)."""
    from .dataset import ATTRS, rendered_set
    from .degrade import degrade

    data = rendered_set(n, seed)
    images = torch.from_numpy(data.images).float() / 255
    out = {}
    for k in strengths:
        x = degrade(images, torch.Generator().manual_seed(int(k * 1000) + 1), strength=k)
        reads = judge.read(x)
        acc = {a: round(sum(r[a] == WORLD.ids(a)[int(lab[j])] for r, lab in zip(reads, data.labels)) / n, 4)
               for j, a in enumerate(ATTRS)}
        out[str(k)] = acc
    return out


def evaluate(denoiser: RenderingDenoiser, judge: Judge, *, seed: int = 0, repeats: int = 1, steps: int | None = None,
             cfg: float | None = None, sampler: str | None = None, log=print) -> dict:
    report: dict = {"sampling": {"steps": steps or SAMPLING["steps"], "cfg": SAMPLING["cfg"] if cfg is None else cfg,
                                 "sampler": sampler or SAMPLING["sampler"]}, "seed": seed}
    for split in ("train", "held_out"):
        items = grid_prompts(split, seed=seed + (split == "held_out"), repeats=repeats)
        prompts = [p for p, _ in items]
        t0 = time.process_time()
        _, results = judge_prompts(denoiser, judge, prompts, seed * 100_000 + (split == "held_out") * 50_000,
                                   steps=steps, cfg=cfg, sampler=sampler)
        cpu = time.process_time() - t0
        s = summary(results)
        per_concept = {}
        for o in WORLD.objects:
            rs = [r for r in results if r["asked"]["shape"] == o.id]
            per_concept[o.id] = {"n": len(rs), "shape": attribute_accuracy(rs)["shape"], "fidelity": fidelity(rs),
                                 "ip": ip(rs)}
        s["per_shape"] = per_concept
        s["generation_cpu_seconds"] = round(cpu, 1)
        report[split] = s
        log(f"[{split}] n={s['n']} safe requests: fidelity {s['safe_requests']['fidelity']} "
            f"{s['safe_requests']['attribute_accuracy']} | unsafe requests: IP {s['unsafe_requests']['ip']} "
            f"fidelity {s['unsafe_requests']['fidelity']} ({cpu:.0f} CPU s)")
    u = report["unrelated"] = evaluate_unrelated(denoiser, judge, seed=seed, steps=steps, cfg=cfg, sampler=sampler)
    u.pop("judged")
    log(f"[unrelated] n={u['n']} plain shapes: fidelity {u['fidelity']} "
        + ", ".join(f"{w} {v['fidelity']}" for w, v in u["per_wording"].items()))
    return report


def evaluate_unrelated(denoiser: RenderingDenoiser, judge: Judge, *, seed: int = 0, per_wording: int | None = None,
                       base_judged: Sequence[dict] | None = None, **sampling) -> dict:
    """Unrelated content (:mod:`.unrelated`): plain shapes in every colour, position and background (or
    ``per_wording`` of them) in training, held-out and free wording; fidelity per wording, and preservation
    against ``base_judged`` (the base model's judged results for the same prompts and seeds) when given."""
    from .unrelated import unrelated_prompts, unrelated_scores

    items = unrelated_prompts(per_wording, seed=seed)
    _, judged = judge_prompts(denoiser, judge, [u.text for u in items], [u.seed for u in items], **sampling)
    out = unrelated_scores(judged, [u.wording for u in items], base_judged)
    out["judged"] = judged
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m safetydpo_core.world.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped world model)")
    p.add_argument("--checkpoint", default=None, help="a tools/world/train_model.py checkpoint.pt to evaluate instead")
    p.add_argument("--judge", default=None, help="judge .safetensors (default: the shipped judge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(WEIGHTS_DIR / "evaluation.json"), help="report file ('-' to only print)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        judge = load_judge(path=a.judge)
        if a.checkpoint:
            den, step = model_from_checkpoint(a.checkpoint, "/tmp")
            print(f"checkpoint at step {step}")
        else:
            den = load_world_model(path=a.model)
        report = evaluate(den, judge, seed=a.seed, repeats=a.repeats, steps=a.steps, cfg=a.cfg, sampler=a.sampler)
        report["judge_accuracy"] = judge.config.get("accuracy")
        report["judge_robustness"] = judge_robustness(judge)
        print("judge accuracy under degradation:", report["judge_robustness"])
        report["model"] = a.checkpoint or a.model or "shipped"
        if a.out != "-":
            atomic_write_text(a.out, json.dumps(report, indent=1))
            print(f"wrote {a.out}")
    except SafetyDPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
