"""``safetydpo dataset``: build and inspect preference datasets (``from-images``, ``info``)."""

from __future__ import annotations

import argparse
import json

from .common import IMAGE_SIZE, Progress, add_model_args


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build or inspect a preference dataset")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    fi = dsub.add_parser("from-images", help="encode existing image pairs listed in a CSV into a preference dataset",
                         description="CSV columns: prompt_unsafe,prompt_safe,image_safe,image_unsafe,category "
                                     "(image paths relative to the CSV). The model's VAE encodes the images.")
    add_model_args(fi)
    fi.add_argument("--csv", required=True, help="the pairs CSV")
    fi.add_argument("--out", required=True, help="output dataset folder")
    fi.add_argument("--size", type=IMAGE_SIZE, default=None, help="image side in pixels (default: the model's native size)")
    fi.add_argument("--resume", action="store_true", help="continue an interrupted build (finished pairs are skipped)")
    fi.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    fi.set_defaults(func=run_from_images)
    info = dsub.add_parser("info", help="print a dataset's header and per-category counts")
    info.add_argument("data", help="dataset folder")
    info.set_defaults(func=run_info)
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])


def run_from_images(args: argparse.Namespace) -> int:
    from ..data.from_images import build_from_images
    from .common import load_denoiser, refuse_overlaps

    # the dataset folder may be replaced (--overwrite): the CSV (and the images beside it) may not lie in it
    refuse_overlaps({"--out": args.out}, {"--csv": args.csv, "--model": args.model})
    den = load_denoiser(args)
    bar = Progress(0, "encode")
    try:
        out = build_from_images(den, args.csv, args.out, size=args.size, resume=args.resume, overwrite=args.overwrite,
                                progress=bar)
    finally:
        bar.close()
    print(f"wrote dataset {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..data import PreferenceDataset

    ds = PreferenceDataset(args.data)
    print(json.dumps({"pairs": len(ds), "per_category": ds.per_category(), "model_fingerprint": ds.model_fingerprint,
                      "settings": ds.header.get("settings", {})}, indent=1))
    return 0
