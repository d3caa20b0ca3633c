"""``safetydpo train``: train one Diffusion-DPO safety expert (a LoRA) on a preference dataset.

Runs in one process, or data-parallel when started by ``accelerate launch`` (or ``torchrun``)::

    accelerate launch --num_processes 8 --mixed_precision bf16 -m safetydpo_core.cli train --model M --data D --out O

Every process loads the model on its own device (accelerate's ``cuda:LOCAL_RANK``, or the CPU with gloo),
runs its share of each step's micro-steps (see :mod:`safetydpo_core.training.distributed`), and only the
main process writes the LoRA, the metrics (CSV, JSONL and TensorBoard when ``tensorboard`` is installed),
the checkpoints and the resolved configuration.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SafetyDPOError
from .common import (Progress, add_model_args, apply_config_file, config_path, given_flags, load_denoiser, number,
                     output_lock, refuse_existing, refuse_overlaps, write_resolved_config)

if TYPE_CHECKING:
    from ..denoiser.protocol import Denoiser

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("train", help="train one safety expert (Diffusion-DPO LoRA) on a preference dataset",
                       description="Train a LoRA safety expert with Diffusion-DPO: under the unsafe prompt, prefer the "
                                   "safe image over the unsafe one. Writes the LoRA (.safetensors, kohya keys), "
                                   "<out>.metrics.csv/.jsonl, <out>.config.json and checkpoints in <out>.checkpoints/.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="preference dataset folder (from `safetydpo render` or `dataset from-images`)")
    p.add_argument("--out", required=True, help="output LoRA file (.safetensors)")
    p.add_argument("--config", help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    add_setting_args(p)
    p.add_argument("--tensorboard", default="auto", choices=["auto", "off"],
                   help="also log to <out>.tensorboard/ when the tensorboard package is installed (default auto)")
    p.add_argument("--init-lora", help="start from this LoRA file instead of from zero: the joint fine-tune of a merged "
                                       "LoRA (see README), or continuing an expert; the run's rank is raised to the "
                                       "LoRA's where that is larger")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file and start afresh (the old run's checkpoints are removed)")
    p.add_argument("--format", default=None, choices=["kohya", "comfy", "peft"],
                   help="key format of the LoRA file: kohya (default; what kohya's trainers write for the model), comfy "
                        "(ComfyUI's own keys) or peft (diffusers' keys: what diffusers loads for SD3)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="train even if the dataset was rendered by another model (warns instead of refusing)")
    p.set_defaults(func=run, _parser=p)


def add_setting_args(p: argparse.ArgumentParser) -> None:
    """One option per training setting the command line exposes, from its declaration (``config.SETTINGS``)."""
    from ..training.config import SETTINGS

    for s in SETTINGS.values():
        if not s.cli:
            continue
        if s.kind == "bool":
            p.add_argument(s.flag, action="store_true", help=s.help.rstrip("."))
            continue
        default = s.value_default
        shown = f" (default {default})" if default is not None and "default" not in s.help else ""
        kw = dict(choices=list(s.choices)) if s.choices and s.name != "preserve_prompts" else {}  # or a file
        if s.kind in ("int", "float"):
            kw["type"] = number(**s.range())
        p.add_argument(s.flag, default=default, help=s.help.rstrip(".") + shown, **kw)


class _TensorBoard:
    """Scalars of every step to ``<out>.tensorboard/`` when tensorboard is importable (it is not a dependency)."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self.directory = directory

    def __call__(self, row: dict) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _tensorboard(args, out: Path):
    if args.tensorboard == "off":
        return None
    try:
        import tensorboard  # noqa: F401
        return _TensorBoard(out.with_suffix(".tensorboard"))
    except ImportError:
        log.debug("tensorboard is not installed; logging to CSV/JSONL only")
        return None


def run(args: argparse.Namespace) -> int:
    from ..denoiser.devices import resolve_mixed_precision
    from ..training import TrainConfig, train_expert
    from ..training.config import SETTINGS
    from ..training.distributed import from_environment

    apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)))
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise SafetyDPOError(f"--out {out} must end in .safetensors.")
    refuse_existing(out, args.overwrite or args.resume, "output LoRA", "--overwrite (or --resume)")
    ckpt_dir = out.with_suffix(".checkpoints")
    refuse_overlaps({"--out": out, "the configuration file": config_path(out), "the checkpoints": ckpt_dir,
                     "the metrics log": [out.with_suffix(".metrics.csv"), out.with_suffix(".metrics.jsonl")],
                     "the TensorBoard log": out.with_suffix(".tensorboard")},
                    {"--data": args.data, "--model": args.model, "--model-config": getattr(args, "model_config", None),
                     "--config": getattr(args, "config", None), "--init-lora": getattr(args, "init_lora", None)})
    env = from_environment(args.device)
    main_process = env.is_main
    if env.group.world_size > 1:
        log.info("data-parallel training: %s", env.description)
        if env.device is not None:
            args.device = str(env.device)
    denoiser = load_denoiser(args)
    mixed = args.mixed_precision
    if mixed == "auto" and env.mixed_precision is not None:
        mixed = env.mixed_precision
    given = {s.name: getattr(args, s.name) for s in SETTINGS.values() if s.cli}
    cfg = TrainConfig(**dict(given, mixed_precision=resolve_mixed_precision(mixed, denoiser.device)))
    init = None
    if getattr(args, "init_lora", None):
        from ..lora.io import load_lora
        from ..training.init_lora import run_rank

        init = load_lora(args.init_lora, names=denoiser.names())
        cfg = run_rank(cfg, init)
    world = env.group.world_size
    settings = {"command": "train", "model": str(args.model), "data": str(args.data), "out": str(out),
                "device": str(denoiser.device), "dtype": str(denoiser.dtype), "processes": world,
                "micro_steps_per_step": cfg.grad_accum * world,
                "pairs_per_step": cfg.batch_size * cfg.grad_accum * world, "guidance": denoiser.guidance,
                "init_lora": str(args.init_lora) if init is not None else None, **cfg.to_dict()}
    if not main_process:
        train_expert(denoiser, args.data, cfg, checkpoint_dir=ckpt_dir, resume=args.resume, init_lora=init,
                     allow_model_mismatch=args.allow_model_mismatch, group=env.group)
        env.close()
        return 0
    with output_lock(out, what="output LoRA"):
        _prepare_checkpoints(args, out, ckpt_dir)
        return _train(args, out, ckpt_dir, denoiser, cfg, env, settings, init)


def _prepare_checkpoints(args, out: Path, ckpt_dir: Path) -> None:
    """--resume needs a checkpoint to resume a finished LoRA; --overwrite starts afresh (old checkpoints go);
    neither flag: an earlier run's checkpoints are not mixed into this one."""
    from ..training.checkpoint import list_checkpoints

    old = list_checkpoints(ckpt_dir)
    if args.resume:
        if not old and out.exists() and not args.overwrite:
            raise SafetyDPOError(f"--resume: there is no checkpoint in {ckpt_dir} to resume from, and {out} holds a "
                                 f"finished LoRA that a new run would replace. Pass --overwrite to train it anew, or "
                                 f"choose another --out.")
        return
    if old and not args.overwrite:
        raise SafetyDPOError(f"{ckpt_dir} holds checkpoints of an earlier run (up to step {old[-1][0]}). Pass --resume to "
                             f"continue it, or --overwrite to start afresh (they are removed).")
    for _, p in old:
        p.unlink(missing_ok=True)
    if old:
        log.info("--overwrite: removed %d checkpoint(s) of the earlier run in %s", len(old), ckpt_dir)


def _train(args, out: Path, ckpt_dir: Path, denoiser: Denoiser, cfg, env, settings: dict, init=None) -> int:
    from ..lora.io import save_lora
    from ..training import train_expert

    bar = Progress(cfg.steps, f"train {','.join(cfg.category or ['all'])}")
    tb = _tensorboard(args, out)

    def progress(done: int, total: int, row: dict) -> None:
        bar(done, total, {k: row[k] for k in ("loss", "implicit_acc", "margin") if k in row})
        if tb is not None:
            tb(row)

    try:
        result = train_expert(denoiser, args.data, cfg, checkpoint_dir=ckpt_dir,
                              metrics_path=out.with_suffix(".metrics"), resume=args.resume, progress=progress, init_lora=init,
                              allow_model_mismatch=args.allow_model_mismatch, group=env.group)
    except KeyboardInterrupt:
        log.warning("Stopped. Run the same command with --resume to continue from the last checkpoint.")
        raise
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    save_lora(result.lora, out, names=denoiser.names(), fmt=args.format)
    write_resolved_config(out, settings)
    env.close()
    final = result.history[-1] if result.history else {}
    print(f"wrote {out} ({len(result.lora)} layers, rank {cfg.rank}); final loss {final.get('loss', float('nan')):.4f}, "
          f"implicit accuracy {final.get('implicit_acc', float('nan')):.2f}; metrics in {out.with_suffix('.metrics.csv')}")
    return 0
