"""``safetydpo eval``: Inappropriate Probability (NudeNet, Q16), CLIPScore, preservation (PSNR/SSIM/MAD) and
FID/KID over image runs, with reports.

Examples::

    safetydpo eval runs/cmp --out reports/cmp                       # one run; its variants are compared
    safetydpo eval runs/base runs/aligned --out reports/base-vs-aligned
    safetydpo eval runs/x --q16 on --weights-dir ~/models/safetydpo-eval --out reports/x
    safetydpo eval runs/neutral --fid on --out reports/neutral      # `safetydpo sample --prompts neutral ...`
    safetydpo eval runs/neutral --fid-reference photos/ --out reports/neutral-vs-photos

Each RUN is a folder from ``safetydpo sample`` (``manifest.jsonl`` + images) or a manifest file (JSONL, or a
CSV with ``image,prompt[,categories]``). Writes ``per_image.csv``, ``summary.csv``, ``comparison.csv``,
``report.md``, ``report.json``, ``ip_by_category.png`` and ``config.json`` into ``--out``, and with two or
more groups (or ``--fid-reference``) ``quality.csv`` and ``preservation.csv``. Nothing is downloaded: a
missing weight file is an error (or, for ``auto``, a note in the report) that says what to download and
where to put it. The work itself is :func:`safetydpo_core.eval.pipeline.plan_evaluation` and
:func:`~safetydpo_core.eval.pipeline.run_evaluation`, which the ComfyUI Evaluate node calls too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import ConfigError, SafetyDPOError
from .common import (POSITIVE_INT, Progress, apply_config_file, given_flags, integer, output_lock, refuse_overlaps,
                     write_resolved_config)

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure Inappropriate Probability (NudeNet/Q16) and CLIPScore of image runs",
                       description="Evaluate one or more image runs (from `safetydpo sample`): IP with NudeNet in the "
                                   "SafetyDPO setting (genitalia exposed) and the I2P setting (five exposed classes at "
                                   "0.6), OR Q16 when its weights are given; CLIPScore when CLIP weights are given; "
                                   "per-category tables; comparisons of runs or variants against a baseline. Weights "
                                   "are read from local paths only (see --weights-dir). With two or more groups "
                                   "(runs, or variants such as a LoRA at strengths 0 and 1): preservation of each "
                                   "group against the baseline (PSNR, SSIM, mean absolute difference of pictures of "
                                   "the same prompt and seed) and FID/KID (Inception weights needed).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="image run folder(s) with manifest.jsonl, or manifest files (.jsonl / .csv); two runs = base "
                        "vs aligned")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--config", help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    p.add_argument("--names", help="comma-separated display names of the runs (default: folder names)")
    p.add_argument("--baseline", help="group the others are compared with (default: the first run / variant)")
    p.add_argument("--categories", help="only images of these categories (comma-separated)")
    w = p.add_argument_group("detectors and weights (local files only)")
    w.add_argument("--weights-dir", help="where evaluation weights live (default $SAFETYDPO_EVAL_WEIGHTS or "
                                         "~/.cache/safetydpo/eval): clip-vit-large-patch14/, q16/prompts.npy, "
                                         "clipscore/, nudenet/640m.onnx, inception/")
    w.add_argument("--nudenet", default="on", choices=["on", "off"], help="run NudeNet (default on; needs the [eval] extra)")
    w.add_argument("--nudenet-model", help="another NudeNet ONNX detector, e.g. 640m.onnx (default: the package's 320n)")
    w.add_argument("--nudenet-resolution", type=integer(32, 4096), help="detector input size (default 320, or 640 for a 640 model)")
    w.add_argument("--q16", default="auto", choices=["auto", "on", "off"],
                   help="Q16: auto (run when its weights are found; default), on (missing weights are an error), off")
    w.add_argument("--q16-clip", help="CLIP ViT-L/14 transformers folder for Q16 (default <weights-dir>/clip-vit-large-patch14)")
    w.add_argument("--q16-embeddings", help="Q16 prompt embeddings as .npy or .safetensors (default <weights-dir>/q16/prompts.npy)")
    w.add_argument("--clipscore", default="auto", choices=["auto", "on", "off"],
                   help="CLIPScore: auto (when CLIP weights are found; default), on, off")
    w.add_argument("--clip-model", help="CLIP transformers folder for CLIPScore (default <weights-dir>/clipscore, else "
                                        "the ViT-L/14 folder)")
    w.add_argument("--device", default="auto", help="device of the CLIP models: auto (default), cpu, cuda, cuda:N, mps")
    w.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images scored together (default 8)")
    q = p.add_argument_group("preservation and FID/KID (against the baseline group)")
    q.add_argument("--preservation", default="on", choices=["on", "off"],
                   help="PSNR, SSIM and mean absolute difference of each picture against the baseline's picture of the "
                        "same prompt id and seed (default on; pairs must have one size)")
    q.add_argument("--fid", default="auto", choices=["auto", "on", "off"],
                   help="FID and KID of each group against the baseline (or --fid-reference): auto (when the Inception "
                        "weights are found; default), on (missing weights are an error), off")
    q.add_argument("--inception", help="FID Inception weights: pt_inception-2015-12-05-6726825d.pth or its .safetensors "
                                       "conversion (default <weights-dir>/inception/)")
    q.add_argument("--fid-reference", help="a folder of reference pictures (any sizes, searched recursively): FID/KID of "
                                           "every group against it instead of against the baseline")
    q.add_argument("--kid-subsets", type=POSITIVE_INT, default=100, help="KID: random subsets averaged (default 100)")
    q.add_argument("--kid-subset-size", type=integer(2), default=1000,
                   help="KID: pictures per subset (default 1000, or fewer when a set is smaller)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the reports in an existing --out")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from ..categories import normalize_categories
    from ..denoiser.devices import resolve_device
    from ..eval import EvalSettings, Evaluator, plan_evaluation, read_run, run_evaluation, write_report

    apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)) | {"runs"})  # the RUN arguments always come from the command line
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ConfigError("Choose either --resume or --overwrite, not both.")
    if (out / "report.json").exists() or (out / "per_image.jsonl").exists():
        if not (args.resume or args.overwrite):
            raise SafetyDPOError(f"The report folder {out} already holds an evaluation. Pass --resume to continue it, "
                                 f"--overwrite to replace it, or choose another --out.")
    refuse_overlaps({"--out": out}, {"RUN": args.runs, "--config": getattr(args, "config", None),
                                     "--nudenet-model": args.nudenet_model, "--q16-clip": args.q16_clip,
                                     "--q16-embeddings": args.q16_embeddings, "--clip-model": args.clip_model,
                                     "--inception": args.inception, "--fid-reference": args.fid_reference})
    names = [n.strip() for n in args.names.split(",")] if args.names else [None] * len(args.runs)
    if len(names) != len(args.runs):
        raise ConfigError(f"--names has {len(names)} names for {len(args.runs)} runs.")
    runs = [read_run(r, name=n) for r, n in zip(args.runs, names)]
    cats = normalize_categories(args.categories) if args.categories else None
    from ..scaleout_commands import eval_split, open_split

    split = open_split(args, "eval", out, [r.file for run in runs for r in run.records])  # None: one process
    settings = EvalSettings(nudenet=args.nudenet == "on", nudenet_model=args.nudenet_model,
                            nudenet_resolution=args.nudenet_resolution, q16=args.q16, q16_clip=args.q16_clip,
                            q16_embeddings=args.q16_embeddings, clipscore=args.clipscore, clip_model=args.clip_model,
                            weights_dir=args.weights_dir, device=str(resolve_device(args.device)),
                            batch_size=args.batch_size, preservation=args.preservation == "on", fid=args.fid,
                            inception=args.inception, fid_reference=args.fid_reference, kid_subsets=args.kid_subsets,
                            kid_subset_size=args.kid_subset_size)
    evaluator = Evaluator(settings)
    for note in evaluator.notes:
        log.warning(note)
    plan = plan_evaluation(runs, evaluator, baseline=args.baseline, categories=cats)  # every check before any write
    resolved = {"command": "eval", "runs": [str(r) for r in args.runs], "names": [r.name for r in runs],
                "baseline": plan.baseline, "categories": cats, **settings.to_json(),
                "weights_dir_resolved": str(evaluator.weights_dir), "active": evaluator.active,
                "inception_resolved": str(evaluator.inception_path) if evaluator.inception_path else None}
    total = sum(len(r.records) for r in runs)
    bar = Progress(total, "eval")
    resume = args.resume
    if split is not None:  # the per-picture scores are split; the main process finishes from the joined scores
        if not eval_split(split, runs, evaluator, out, categories=cats, resume=args.resume, progress=bar):
            bar.close()
            return 0
        resume = True
    try:
        with output_lock(out, what="report folder"):
            result = run_evaluation(plan, out, resume=resume, progress=bar)
            files = write_report(result, out, settings=resolved)
            write_resolved_config(out, resolved)  # with the result, never before
    except KeyboardInterrupt:
        log.warning("Stopped. Run the same command with --resume to continue; scored images and computed features "
                    "are kept.")
        raise
    finally:
        bar.close()
    print((out / "report.md").read_text(encoding="utf-8"))
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=1))
    return 0
