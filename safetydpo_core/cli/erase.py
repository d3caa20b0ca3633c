"""``safetydpo erase``: concept-erasure baselines as LoRAs — ESD-u, ESD-x (trained) and UCE (closed form).

    safetydpo erase --model M --method uce --concepts "gun, rifle" --guide "wrench" --preserve "tool" --out uce.safetensors
    safetydpo erase --model M --method esd-x --concepts "gun, rifle" --steps 200 --out esd.safetensors

ESD runs the pack's trainer without a dataset (its data are the concept prompts): it checkpoints, resumes
(``--resume``), shows progress and writes ``<out>.metrics.csv/.jsonl``. UCE takes seconds. Both write a LoRA
with kohya keys (``--full-diff``: full-rank ``.diff`` weights, which ComfyUI and A1111 load) and
``<out>.config.json``; UCE prints the relative error of the chosen ``--rank`` (0, the default: exact).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SafetyDPOError
from .common import (Progress, add_model_args, apply_config_file, given_flags, load_denoiser, refuse_existing,
                     write_resolved_config)


def register(sub) -> None:
    p = sub.add_parser("erase", help="erase concepts with ESD-u, ESD-x or UCE (baselines), as a LoRA",
                       description="Concept erasure as a LoRA: ESD-u / ESD-x (Gandikota et al. 2023, trained with "
                                   "negative guidance against the untouched model) or UCE (Gandikota et al. 2024, "
                                   "a closed-form edit of the cross-attention keys and values).")
    add_model_args(p)
    p.add_argument("--method", required=True, choices=["esd-u", "esd-x", "uce"],
                   help="esd-u: layers outside cross-attention (broad concepts); esd-x: cross-attention (specific "
                        "concepts); uce: closed-form cross-attention edit in seconds")
    p.add_argument("--concepts", required=True, help='concepts to erase, separated by commas: "gun, rifle"')
    p.add_argument("--guide", default=None,
                   help="uce: what each concept becomes (one per concept in order, or one for all; default: the "
                        "unconditional)")
    p.add_argument("--preserve", default=None, help="uce: concepts to keep unchanged, separated by commas")
    p.add_argument("--out", required=True, help="output LoRA file (.safetensors)")
    p.add_argument("--config", help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank (esd: default 4; uce: default 0 = the exact update, else its best rank-N part)")
    p.add_argument("--full-diff", action="store_true",
                   help="write full-rank .diff weights instead of LoRA factors (ComfyUI and A1111 load them; "
                        "diffusers' load_lora_weights does not)")
    p.add_argument("--lamb", type=float, default=0.5, help="uce: regularisation towards the original weights "
                                                           "(default 0.5, as the official code)")
    p.add_argument("--erase-scale", type=float, default=1.0, help="uce: weight of the erase terms (default 1)")
    p.add_argument("--preserve-scale", type=float, default=1.0, help="uce: weight of the preserve terms (default 1)")
    p.add_argument("--steps", type=int, default=200, help="esd: optimiser steps (default 200)")
    p.add_argument("--lr", type=float, default=1e-4, help="esd: learning rate (default 1e-4)")
    p.add_argument("--esd-eta", type=float, default=1.0, help="esd: negative guidance eta (default 1)")
    p.add_argument("--esd-sample-steps", type=int, default=50,
                   help="esd: DDIM steps of the partial generation x_t comes from (default 50, as ESD)")
    p.add_argument("--esd-guidance", type=float, default=3.0, help="esd: its guidance scale (default 3, as ESD)")
    p.add_argument("--batch-size", type=int, default=1, help="esd: concept prompts per step")
    p.add_argument("--size", type=int, default=None, help="esd: picture size in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="esd: save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="esd: continue from the newest checkpoint of this output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from ..erase import EraseSettings, erase_concepts, save_erasure

    apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)))
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise SafetyDPOError(f"--out {out} must end in .safetensors.")
    refuse_existing(out, args.overwrite or args.resume, "output LoRA", "--overwrite (or --resume)")
    settings = EraseSettings(method=args.method, concepts=args.concepts, guide=args.guide, preserve=args.preserve,
                             rank=args.rank, full_diff=args.full_diff, lamb=args.lamb, erase_scale=args.erase_scale,
                             preserve_scale=args.preserve_scale, steps=args.steps, lr=args.lr, esd_eta=args.esd_eta,
                             esd_sample_steps=args.esd_sample_steps, esd_guidance=args.esd_guidance,
                             batch_size=args.batch_size, size=args.size, seed=args.seed,
                             checkpoint_every=args.checkpoint_every)
    denoiser = load_denoiser(args)
    if settings.method == "uce":
        bar = Progress(1, "uce")
        result = erase_concepts(denoiser, settings, progress=lambda d, n: bar(d, n))
        bar.close()
    else:
        bar = Progress(settings.steps, settings.method)
        try:
            result = erase_concepts(denoiser, settings, checkpoint_dir=out.with_suffix(".checkpoints"),
                                    metrics_path=out.with_suffix(".metrics"), resume=args.resume,
                                    progress=lambda d, n, row: bar(d, n, {"loss": row.get("loss")}))
        except KeyboardInterrupt:
            print("Stopped. Run the same command with --resume to continue from the last checkpoint.")
            raise
        finally:
            bar.close()
    save_erasure(result, out, names=denoiser.names(), full_diff=settings.full_diff)
    write_resolved_config(out, {"command": "erase", "model": str(args.model), "out": str(out),
                                **settings.to_dict(), "report": result.report})
    r = result.report
    if settings.method == "uce":
        kind = "full-rank .diff weights" if args.full_diff else f"rank {r['rank']}"
        print(f"wrote {out} ({r['layers']} layers, {kind}) "
              f"in {r['seconds']:.2f} s; the update has rank {r['update_rank']}, relative error of the export "
              f"{0.0 if args.full_diff else r['max_rel_error']:.3g} (max over layers)")
    else:
        print(f"wrote {out} ({r['layers']} layers, rank {r['rank']}, {r['steps']} steps); final loss "
              f"{r['final_loss'] if r['final_loss'] is not None else float('nan'):.4g}; metrics in "
              f"{out.with_suffix('.metrics.csv')}")
    print(json.dumps(r))
    return 0
