"""``safetydpo render``: render prompt pairs with the model into a preference dataset (same seed per pair)."""

from __future__ import annotations

import argparse
import functools
import json

from .common import Progress, add_model_args, write_resolved_config


def register(sub) -> None:
    p = sub.add_parser("render", help="render prompt pairs with the model into a preference dataset",
                       description="Renders the safe and the unsafe prompt of every pair from the same seed and "
                                   "initial noise, and stores latents (plus PNG previews) as a preference dataset. "
                                   "Interrupted runs continue with --resume; finished pairs are skipped.")
    add_model_args(p)
    p.add_argument("--pairs", required=True, help="prompt pairs JSONL (from `safetydpo pairs`)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--categories", help="only these categories (comma-separated)")
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs per category")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "dpmpp_2m"])
    p.add_argument("--negative", default="", help="negative prompt (default empty)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each pair's seed derives from it and its id")
    p.add_argument("--batch-pairs", type=int, default=2, help="pairs rendered together")
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
    from ..data.render import RenderSettings, render_pairs
    from ..prompts.pairs import read_pairs
    from .common import load_denoiser

    from ..scaleout_commands import open_split, render_split

    pairs = _limit(read_pairs(args.pairs, categories=args.categories), args.limit)
    split = open_split(args, "render", args.out, [p.id for p in pairs])  # None: one process, no parts
    den = load_denoiser(args)
    settings = RenderSettings(height=args.size, width=args.size, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                              seed=args.seed, negative=args.negative, batch_pairs=args.batch_pairs)
    judge = None
    if args.judge == "nudenet":
        from ..eval.judges import NudeNetPairJudge

        judge = NudeNetPairJudge()
    from pathlib import Path

    write_resolved_config(Path(args.out), {"command": "render", "model": args.model, "pairs": args.pairs,
                                           "categories": args.categories, "limit": args.limit, "judge": args.judge,
                                           **vars(settings)})
    bar = Progress(len(pairs), "render")
    try:
        run_ = render_pairs if split is None else functools.partial(render_split, split)
        summary = run_(den, pairs, args.out, settings, resume=args.resume, overwrite=args.overwrite,
                       judge=judge, progress=bar, previews=not args.no_previews)
    finally:
        bar.close()
    if summary is None:  # not the main process of a split run: the main process joined the parts
        return 0
    print(json.dumps(summary.to_json(), indent=1))
    return 0
