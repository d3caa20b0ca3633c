"""``safetydpo render``: render prompt pairs with the model into a preference dataset (same seed per pair)."""

from __future__ import annotations

import argparse
import functools
import json
import logging

from .common import (IMAGE_SIZE, POSITIVE_INT, Progress, add_model_args, integer, number, refuse_overlaps,
                     write_resolved_config)

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("render", help="render prompt pairs with the model into a preference dataset",
                       description="Renders the safe and the unsafe prompt of every pair from the same seed and "
                                   "initial noise, and stores latents (plus PNG previews) as a preference dataset. "
                                   "Interrupted runs continue with --resume; finished pairs are skipped.")
    add_model_args(p)
    p.add_argument("--pairs", required=True, help="prompt pairs JSONL (from `safetydpo pairs`)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--categories", help="only these categories (comma-separated)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="at most this many pairs per category")
    p.add_argument("--size", type=IMAGE_SIZE, default=None,
                   help="image side in pixels, 8 to 8192 (default: the model's native size)")
    p.add_argument("--steps", type=integer(1, 10000), default=20, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=number(0, 100), default=None,
                   help="classifier-free guidance scale (default: the model's usual, 7.5 for SD1/SDXL, 4.5 for SD3, "
                        "1 for Flux.1-dev, whose distilled guidance is --guidance)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "dpmpp_2m"],
                   help="ddim (default), euler or dpmpp_2m; for SD3/Flux ddim and euler both take the flow's Euler step")
    p.add_argument("--negative", default="", help="negative prompt (default empty)")
    p.add_argument("--seed", type=integer(), default=0, help="base seed; each pair's seed derives from it and its id")
    p.add_argument("--batch-pairs", type=integer(1, 1024), default=2, help="pairs rendered together")
    p.add_argument("--no-previews", action="store_true", help="do not write PNG previews")
    p.add_argument("--judge", choices=["none", "nudenet"], default="none",
                   help="drop pairs whose images do not differ in safety (nudenet: sexual category; needs [eval])")
    p.add_argument("--resume", action="store_true", help="continue an interrupted render")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=run)


def _limit(pairs, limit):
    if not limit:
        return pairs
    seen: dict[str, int] = {}
    out = []
    for p in pairs:
        key = p.category[0]
        if seen.get(key, 0) < limit:
            seen[key] = seen.get(key, 0) + 1
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.render import RenderSettings, render_pairs
    from ..errors import DatasetError
    from ..prompts.pairs import read_pairs
    from ..scaleout_commands import open_split, render_split
    from .common import default_cfg, load_denoiser

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; a dataset is a folder. Choose another path.")
    # the whole folder may be replaced (--overwrite), so nothing the run reads may lie in it
    refuse_overlaps({"--out": out}, {"--pairs": args.pairs, "--model": args.model,
                                     "--model-config": getattr(args, "model_config", None)})
    pairs = _limit(read_pairs(args.pairs, categories=args.categories), args.limit)
    if not pairs:
        raise DatasetError(f"{args.pairs} has no pairs" + (f" for {args.categories}" if args.categories else "") +
                           "; nothing to render.")
    split = open_split(args, "render", args.out, [p.id for p in pairs])  # None: one process, no parts
    den = load_denoiser(args)
    settings = RenderSettings(height=args.size, width=args.size, steps=args.steps, cfg=default_cfg(args, den),
                              sampler=args.sampler,
                              seed=args.seed, negative=args.negative, batch_pairs=args.batch_pairs)
    judge = None
    if args.judge == "nudenet":
        from ..eval.judges import NudeNetPairJudge

        judge = NudeNetPairJudge()
    bar = Progress(len(pairs), "render")
    try:
        run_ = render_pairs if split is None else functools.partial(render_split, split)
        summary = run_(den, pairs, out, settings, resume=args.resume, overwrite=args.overwrite,
                       judge=judge, progress=bar, previews=not args.no_previews)
    finally:
        bar.close()
    if summary is None:  # not the main process of a split run: the main process joined the parts
        return 0
    write_resolved_config(out, {"command": "render", "model": args.model, "pairs": args.pairs,
                                "categories": args.categories, "limit": args.limit, "judge": args.judge,
                                "guidance": den.guidance, **vars(settings)})
    if summary.identical:
        log.warning("%d of the rendered pairs have bit-identical safe and unsafe latents: they teach nothing, and "
                    "training leaves them out. Check that their prompts differ in what the model draws.",
                    summary.identical)
    print(json.dumps(summary.to_json(), indent=1))
    return 0
