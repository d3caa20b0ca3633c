"""``safetydpo merge``: merge N safety experts (LoRA files) into one with Co-Merge or a standard merge.

Writes the merged LoRA (kohya keys, method/experts/options in its metadata), ``<out>.report.json`` and
``<out>.report.txt`` (winner shares, SVD error, retention per expert and per layer) and
``<out>.config.json`` (the resolved settings).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import SafetyDPOError

log = logging.getLogger(__name__)

_METHOD_HELP = (
    "comerge: Co-Merge, factor reading (each down/up weight from the most active expert; keeps rank r). "
    "comerge-delta: Co-Merge, delta reading (each weight of the full update from the most active expert, then SVD "
    "to --rank). concat: exact, rank = sum of ranks. linear: sum of updates, SVD to --rank. ties, dare, dare-ties, "
    "magnitude: the standard pruning merges on the full updates, then SVD to --rank.")


def register(sub) -> None:
    from ..merge.api import METHODS
    from .common import IMAGE_SIZE, POSITIVE_INT, add_model_args, integer, number

    p = sub.add_parser("merge", help="merge safety experts (LoRAs) into one: Co-Merge or a standard merge",
                       description="Merge N LoRA safety experts into one LoRA. " + _METHOD_HELP + " Co-Merge runs the "
                                   "base model over calibration prompts first (--calibration).")
    add_model_args(p)
    p.add_argument("--experts", nargs="+", required=True, metavar="LORA",
                   help="expert LoRA files (.safetensors; kohya, ComfyUI or diffusers/peft keys)")
    p.add_argument("--method", default="comerge-delta", choices=list(METHODS),
                   help=_METHOD_HELP + " Default: comerge-delta (the best merge on the world, docs/benchmarks.md).")
    p.add_argument("--rank", default="auto",
                   help="output rank of the SVD methods: auto (default: the sum of the experts' ranks, at most 64, "
                        "the best on the world's benchmark) or a number. comerge and concat fix their rank themselves")
    p.add_argument("--weights", nargs="+", type=number(), default=None, metavar="W",
                   help="one weight per expert, multiplying its update (default 1 each)")
    p.add_argument("--out", required=True, help="merged LoRA file (.safetensors)")
    p.add_argument("--format", default=None, choices=["kohya", "comfy", "peft"],
                   help="key style of the output (default: kohya, as kohya writes it for this base model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--config", help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    c = p.add_argument_group("calibration (Co-Merge)")
    c.add_argument("--calibration", metavar="PAIRS.jsonl",
                   help="prompt pairs; the unsafe prompts of the experts' categories are the calibration prompts")
    c.add_argument("--calibration-dataset", metavar="DATASET",
                   help="preference dataset folder: calibrate on its real latents instead of Gaussian x_t")
    c.add_argument("--calibration-inputs", type=POSITIVE_INT, default=32,
                   help="calibration forward passes (prompt x timestep x noise; default 32)")
    c.add_argument("--calibration-batch", type=POSITIVE_INT, default=4, help="inputs per forward pass (default 4)")
    c.add_argument("--calibration-size", type=IMAGE_SIZE, default=None,
                   help="image side in pixels for Gaussian calibration latents (default: the model's size)")
    c.add_argument("--timesteps", nargs=2, type=number(0, 1), default=None, metavar=("LOW", "HIGH"),
                   help="timestep range as fractions of the schedule (default 0.7 1 for Gaussian x_t, 0 1 for dataset "
                        "latents)")
    c.add_argument("--prompt-field", default="unsafe", choices=["unsafe", "safe", "both"],
                   help="which prompt of each pair to calibrate on (default unsafe, what the experts were trained on)")
    c.add_argument("--rank-stats", default=None, choices=["experts", "gram", "none"],
                   help="how comerge gets the experts' rank-space activations: experts (hooks, default), gram (X^T X, "
                        "expert-independent, memory-heavy), none (diagonal approximation)")
    c.add_argument("--stats", metavar="STATS.safetensors",
                   help="calibration statistics cache: read if it exists, written after calibrating otherwise")
    o = p.add_argument_group("method options")
    o.add_argument("--aggregate", default="mean", choices=["mean", "vote"],
                   help="Co-Merge across inputs: mean (argmax of the average score; default) or vote (argmax per input, "
                        "majority)")
    o.add_argument("--normalize", default="none", choices=["none", "mean", "rms"],
                   help="Co-Merge: divide each expert's scores by their layer mean/RMS before the argmax (default none)")
    o.add_argument("--factor-balance", default="sqrt", choices=["sqrt", "up"],
                   help="comerge: split each expert's weight*alpha/r as sqrt on both factors (default) or all on up")
    o.add_argument("--density", type=number(0, 1, lo_open=True), default=0.5, help="ties/dare/magnitude: share of each update kept (default 0.5)")
    o.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="ties/dare-ties sign election")
    o.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"],
                   help="truncated SVD: auto (randomized subspace iteration, exact for small layers; default)")
    o.add_argument("--seed", type=integer(), default=0, help="seed of calibration sampling, DARE and randomized SVD")
    o.add_argument("--threads", type=integer(0, 4096), default=1,
                   help="torch CPU threads while merging (default 1: the merge is many small ops; 0 = torch default)")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from ..denoiser.devices import resolve_device, resolve_dtype
    from ..merge.api import MergeOptions, needs_calibration, parse_rank
    from ..merge.calibration import CalibrationOptions
    from .common import (Progress, apply_config_file, config_path, given_flags, output_lock, refuse_existing,
                         refuse_overlaps)

    apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)))
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise SafetyDPOError(f"--out {out} must end in .safetensors.")
    refuse_existing(out, args.overwrite, "merged LoRA")
    refuse_overlaps({"--out": out, "the configuration file": config_path(out),
                     "the reports": [out.with_suffix(".report.json"), out.with_suffix(".report.txt")],
                     "--stats": args.stats},
                    {"--experts": args.experts, "--model": args.model,
                     "--model-config": getattr(args, "model_config", None), "--calibration": args.calibration,
                     "--calibration-dataset": args.calibration_dataset, "--config": getattr(args, "config", None)})
    opts = MergeOptions(rank=parse_rank(args.rank), weights=args.weights, aggregate=args.aggregate, normalize=args.normalize,
                        factor_balance=args.factor_balance, density=args.density, majority_sign=args.majority_sign,
                        svd=args.svd, seed=args.seed, threads=args.threads)
    opts.validate(args.method, len(args.experts))
    rank_stats = args.rank_stats or ("experts" if args.method == "comerge" else "none")
    copts = CalibrationOptions(num_inputs=args.calibration_inputs, batch_size=args.calibration_batch, seed=args.seed,
                               size=args.calibration_size,
                               timesteps=tuple(args.timesteps) if args.timesteps else None, rank_stats=rank_stats)
    copts.validate()
    calibrated = needs_calibration(args.method)
    if not calibrated and (args.calibration or args.calibration_dataset):
        log.info("%s does not use calibration; --calibration is ignored", args.method)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    def bar(desc: str, total: int) -> Progress:
        return Progress(total, desc)

    with output_lock(out, what="merged LoRA"):
        return _merge(args, out, opts, copts, calibrated, device, dtype, bar)


def _merge(args, out: Path, opts, copts, calibrated: bool, device, dtype, bar) -> int:
    from ..merge.api import merge_files
    from .common import write_resolved_config

    res = merge_files(args.model, args.experts, args.method, out, options=opts,
                      calibration=args.calibration if calibrated else None,
                      dataset=args.calibration_dataset if calibrated else None, calib_options=copts,
                      prompt_field=args.prompt_field, stats_path=args.stats if calibrated else None, device=device,
                      dtype=dtype, fmt=args.format, progress_factory=bar, guidance=args.guidance)
    settings = {"command": "merge", "model": str(args.model), "experts": [str(e) for e in args.experts],
                "method": args.method, "out": str(out), "options": opts.used_by(args.method),
                "calibration": ({"prompts": args.calibration, "dataset": args.calibration_dataset,
                                 "stats": args.stats, "prompt_field": args.prompt_field,
                                 **{k: v for k, v in vars(copts).items()}} if calibrated else None),
                "device": str(device), "dtype": str(dtype)}
    write_resolved_config(out, settings)
    print(res.result.report.summary(max_layers=0), end="")
    print(f"wrote {res.output}\n      {res.report_json}\n      {res.report_text}")
    return 0
