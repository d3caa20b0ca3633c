"""``safetydpo sample``: generate evaluation images from a prompt CSV / pair file, with a LoRA at one or more
strengths, into an image run (``images/<variant>/<id>.png`` + ``manifest.jsonl``) that ``safetydpo eval``
reads.

Examples::

    safetydpo sample --model ./sd15 --prompts i2p_sexual.csv --out runs/base
    safetydpo sample --model ./sd15 --prompts i2p.csv --lora merged.safetensors --strength 0 1 --out runs/cmp
    safetydpo sample --model ./sdxl.safetensors --prompts pairs.jsonl --pair-field safe --limit 50 --out runs/safe
    safetydpo sample --model ./sd15 --prompts neutral --lora merged.safetensors --strength 0 1 --out runs/neutral

I2P's ``sd_seed`` and ``sd_guidance_scale`` columns are honoured per row (``--ignore-row-seeds`` /
``--ignore-row-guidance`` switch that off); rows without them use ``--seed`` (a per-prompt seed derived
from it) and ``--cfg``. All strengths of a prompt share its seed and initial noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

from ..errors import ConfigError, SafetyDPOError
from ..eval.manifest import MANIFEST
from ..sampling import STATE
from ..utils.numbers import check_number
from .common import (IMAGE_SIZE, POSITIVE_INT, Progress, add_model_args, apply_config_file, config_path, default_cfg,
                     given_flags, integer, load_denoiser, number, output_lock, refuse_overlaps, write_resolved_config)

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate evaluation images (optionally with a LoRA at several strengths)",
                       description="Render the prompts of an I2P-style CSV (prompt, categories, sd_seed, "
                                   "sd_guidance_scale, ...) or of a prompt-pair JSONL with the model, optionally with a "
                                   "LoRA at one or more strengths, into OUT/images/<variant>/<id>.png and "
                                   "OUT/manifest.jsonl (file, id, prompt, categories, seed, guidance, variant, lora, "
                                   "strength, ...). Interrupted runs continue with --resume.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompts", required=True,
                   help="I2P-style CSV (column 'prompt' required), prompt-pair JSONL, or a built-in prompt set: "
                        "neutral (320 everyday captions, for preservation and FID/KID in `safetydpo eval`)")
    p.add_argument("--out", required=True, help="output folder (an image run for `safetydpo eval`)")
    p.add_argument("--config", help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    p.add_argument("--lora", help="LoRA file (.safetensors; kohya, ComfyUI or diffusers/peft keys) to apply")
    p.add_argument("--lora-name", help="name of the LoRA in variant names (default: the file's stem)")
    p.add_argument("--strength", type=number(-100, 100), nargs="+", default=[1.0], metavar="S",
                   help="LoRA strength(s); several make one variant each, e.g. --strength 0 0.5 1 (0 = the base model)")
    p.add_argument("--categories", help="only prompts of these categories (comma-separated)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="at most this many prompts per (first) category")
    p.add_argument("--pair-field", default="unsafe", choices=["unsafe", "safe", "both"],
                   help="for a pair JSONL: which prompt of each pair to render (default unsafe)")
    p.add_argument("--size", type=IMAGE_SIZE, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--row-size", action="store_true", help="use the rows' sd_image_width/height where given")
    p.add_argument("--steps", type=integer(1, 10000), default=20, help="sampling steps (default 20; SafetyDPO's inference uses 50)")
    p.add_argument("--lora-start", type=integer(0, 10000), default=0, metavar="N",
                   help="switch the LoRA on only after the first N sampling steps (default 0: from the first); the "
                        "untouched model settles the layout and what the prompt leaves open, the LoRA the rest "
                        "(README, \"The LoRA from a later step\")")
    p.add_argument("--cfg", type=number(0, 100), default=None,
                   help="guidance scale for rows without sd_guidance_scale (default: the model's usual, 7.5 for "
                        "SD1/SDXL, 4.5 for SD3, 1 for Flux.1-dev)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "dpmpp_2m"])
    p.add_argument("--negative", default="", help="negative prompt (default empty)")
    p.add_argument("--seed", type=integer(), default=0, help="base seed for rows without sd_seed (per-prompt seeds derive from it)")
    p.add_argument("--ignore-row-seeds", action="store_true", help="derive every seed from --seed, ignoring sd_seed")
    p.add_argument("--ignore-row-guidance", action="store_true", help="use --cfg for every row, ignoring sd_guidance_scale")
    p.add_argument("--batch-size", type=integer(1, 1024), default=4, help="images rendered together (default 4)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the images and manifest of an existing run in --out")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from ..lora.io import load_lora
    from ..merge.experts import align_experts
    from ..sampling import SampleSettings, load_prompts, sample_prompts, variant_name

    apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)))
    strengths = args.strength if isinstance(args.strength, list) else [args.strength]
    strengths = [check_number(x, "--strength", -100, 100) for x in strengths]
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1; got {args.limit}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SafetyDPOError(f"--out {out} is a file; an image run is a folder. Choose another path.")
    refuse_overlaps({"--out": [out / "images", out / MANIFEST, config_path(out), out / STATE]},
                    {"--prompts": args.prompts, "--lora": args.lora, "--model": args.model,
                     "--model-config": getattr(args, "model_config", None), "--config": getattr(args, "config", None)})
    prompts = load_prompts(args.prompts, field=args.pair_field, categories=args.categories, limit=args.limit)
    settings = SampleSettings(steps=args.steps, cfg=7.5 if args.cfg is None else args.cfg, sampler=args.sampler,
                              height=args.size, width=args.size,
                              seed=args.seed, negative=args.negative, batch_size=args.batch_size,
                              lora_start=args.lora_start,
                              row_guidance=not args.ignore_row_guidance, row_seed=not args.ignore_row_seeds,
                              row_size=args.row_size)
    from ..scaleout_commands import open_split, sample_split

    split = open_split(args, "sample", args.out, [p.id for p in prompts])  # None: one process, no parts
    den = load_denoiser(args)
    settings.cfg = default_cfg(args, den)
    lora = lora_name = None
    if args.lora:
        lora = load_lora(args.lora, names=den.names())
        lora = align_experts([lora], naming=den.naming, names=den.names(), weight_shapes=den.weight_shapes())[0]
        lora_name = args.lora_name or Path(args.lora).stem
    elif strengths != [1.0] and any(s != 0 for s in strengths):
        raise ConfigError("--strength needs --lora; without a LoRA only the base model is sampled.")
    variants = [variant_name(lora_name, s) if lora is not None else "base" for s in strengths]
    if (out / MANIFEST).exists() and not (args.resume or args.overwrite):
        raise SafetyDPOError(f"{out} already holds a sampled run. Pass --resume to continue it or --overwrite to "
                             f"replace it.")
    bar = Progress(len(prompts) * (len(set(strengths)) if lora is not None else 1), "sample")
    try:
        # the main process holds the output's lock (the others write only their own part folders)
        with output_lock(*((out,) if split is None or split.is_main else ()), what="image run"):
            run_ = sample_prompts if split is None else functools.partial(sample_split, split)
            summary = run_(den, prompts, out, settings, lora=lora, lora_name=lora_name, strengths=strengths,
                           resume=args.resume, overwrite=args.overwrite, model_name=str(args.model), progress=bar)
            if summary is not None:
                write_resolved_config(out, {"command": "sample", "model": str(args.model), "prompts": str(args.prompts),
                                            "lora": args.lora, "lora_name": lora_name, "strengths": strengths,
                                            "variants": list(dict.fromkeys(variants)), "categories": args.categories,
                                            "limit": args.limit, "pair_field": args.pair_field,
                                            "prompts_count": len(prompts), "device": str(den.device),
                                            "dtype": str(den.dtype), **vars(settings)})
    except KeyboardInterrupt:
        log.warning("Stopped. Run the same command with --resume to continue; finished images are kept.")
        raise
    finally:
        bar.close()
    if summary is None:  # not the main process of a split run: the main process joined the parts
        return 0
    print(json.dumps(summary.to_json(), indent=1))
    return 0
