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

from ..errors import SafetyDPOError
from .common import (POSITIVE_INT, Progress, add_model_args, apply_config_file, config_path, given_flags, integer,
                     load_denoiser, number, output_lock, refuse_existing, refuse_overlaps, write_resolved_config)

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
    p.add_argument("--category", help="train on this category's pairs (comma-separated for several; default: all)")
    p.add_argument("--steps", type=POSITIVE_INT, default=500, help="optimiser steps (default 500)")
    p.add_argument("--rank", type=POSITIVE_INT, default=4, help="LoRA rank (default 4, as the paper)")
    p.add_argument("--alpha", type=number(0, lo_open=True), default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--targets", default="attn", help="layers to adapt: attn (the attention projections, default: "
                                                      "to_q,to_k,to_v,to_out.0 in UNets; both streams in SD3/Flux), "
                                                      "attn-cross, attn+ff, transformer, esd-x, esd-u, or comma-separated suffixes")
    p.add_argument("--objective", default="dpo", choices=["dpo", "mapo", "esd"],
                   help="dpo (default), reference-free mapo, or esd: the ESD erasure baseline on the dataset's unsafe "
                        "prompts (with --targets esd-u or esd-x; see `safetydpo erase`)")
    p.add_argument("--esd-eta", type=number(0, lo_open=True), default=1.0, help="esd: negative guidance eta (default 1)")
    p.add_argument("--esd-sample-steps", type=POSITIVE_INT, default=50,
                   help="esd: DDIM steps of the partial generation x_t comes from (default 50)")
    p.add_argument("--esd-guidance", type=number(1), default=3.0, help="esd: its guidance scale (default 3)")
    p.add_argument("--beta", type=number(0, lo_open=True), default=5000.0, help="DPO beta (default 5000, as the official code)")
    p.add_argument("--mapo-beta", type=number(0, lo_open=True), default=0.1, help="MaPO beta (default 0.1)")
    p.add_argument("--sft-weight", type=number(0), default=0.0, help="weight of an extra SFT term on the safe image")
    p.add_argument("--preserve-weight", type=number(0), default=0.0,
                   help="output preservation (DUO): weight of the squared distance between the expert's and the "
                        "untouched model's predictions on preservation prompts (default 0: off)")
    p.add_argument("--preserve-prompts", default="auto",
                   help="preservation prompts: auto (others + neutral; default), others (safe prompts of the dataset's "
                        "other categories), neutral (everyday prompts), or a .txt / .jsonl file")
    p.add_argument("--condition", default="unsafe", choices=["unsafe", "safe", "both"],
                   help="prompt that conditions both images (default unsafe)")
    p.add_argument("--lr", type=number(0, lo_open=True), default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=integer(0), default=0)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1, help="pairs per micro-step")
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-steps per optimiser step")
    p.add_argument("--max-grad-norm", type=number(0), default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--prompt-dropout", type=number(0, 1, hi_open=True), default=0.0, help="probability of an empty prompt (official: 0.2)")
    p.add_argument("--seed", type=integer(), default=0)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast precision (auto: accelerate's --mixed_precision under accelerate launch, else bf16/fp16 "
                        "on GPUs and no on CPUs)")
    p.add_argument("--tensorboard", default="auto", choices=["auto", "off"],
                   help="also log to <out>.tensorboard/ when the tensorboard package is installed (default auto)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=integer(0), default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file and start afresh (the old run's checkpoints are removed)")
    p.add_argument("--format", default=None, choices=["kohya", "comfy", "peft"],
                   help="key format of the LoRA file: kohya (default; what kohya's trainers write for the model), comfy "
                        "(ComfyUI's own keys) or peft (diffusers' keys: what diffusers loads for SD3)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="train even if the dataset was rendered by another model (warns instead of refusing)")
    p.set_defaults(func=run, _parser=p)


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
                     "--config": getattr(args, "config", None)})
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
    cfg = TrainConfig(category=args.category, steps=args.steps, rank=args.rank, alpha=args.alpha, targets=args.targets,
                      objective=args.objective, esd_eta=args.esd_eta, esd_sample_steps=args.esd_sample_steps,
                      esd_guidance=args.esd_guidance, beta=args.beta, mapo_beta=args.mapo_beta, sft_weight=args.sft_weight,
                      preserve_weight=args.preserve_weight, preserve_prompts=args.preserve_prompts,
                      condition=args.condition, lr=args.lr, optimizer=args.optimizer, lr_schedule=args.lr_schedule,
                      warmup_steps=args.warmup_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_grad_norm=args.max_grad_norm, prompt_dropout=args.prompt_dropout, seed=args.seed,
                      mixed_precision=resolve_mixed_precision(mixed, denoiser.device),
                      gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every)
    world = env.group.world_size
    settings = {"command": "train", "model": str(args.model), "data": str(args.data), "out": str(out),
                "device": str(denoiser.device), "dtype": str(denoiser.dtype), "processes": world,
                "micro_steps_per_step": cfg.grad_accum * world,
                "pairs_per_step": cfg.batch_size * cfg.grad_accum * world, "guidance": denoiser.guidance,
                **cfg.to_dict()}
    if not main_process:
        train_expert(denoiser, args.data, cfg, checkpoint_dir=ckpt_dir, resume=args.resume,
                     allow_model_mismatch=args.allow_model_mismatch, group=env.group)
        env.close()
        return 0
    with output_lock(out, what="output LoRA"):
        _prepare_checkpoints(args, out, ckpt_dir)
        return _train(args, out, ckpt_dir, denoiser, cfg, env, settings)


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


def _train(args, out: Path, ckpt_dir: Path, denoiser, cfg, env, settings: dict) -> int:
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
                              metrics_path=out.with_suffix(".metrics"), resume=args.resume, progress=progress,
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
