"""Concept erasure in one call, for the command line (``safetydpo erase``), the nodes and the benchmarks.

:class:`EraseSettings` declares every setting of the three methods once, with checks whose errors name the
setting; :func:`erase_concepts` runs one method on a Denoiser and returns the LoRA with a report;
:func:`save_erasure` writes it (LoRA factors, or full-rank ``.diff`` weights).

* ``esd-u`` / ``esd-x``: ESD trained as a LoRA by the pack's trainer (:mod:`safetydpo_core.training.esd`) on
  the layers outside / inside cross-attention; seeded, resumable from checkpoints, with progress, cancel
  and metrics like any training run.
* ``uce``: the closed-form edit of the cross-attention keys and values (:mod:`.uce`), in seconds.

``guide`` and ``preserve`` are UCE's (ESD has neither: giving them to ESD is an error, not silently ignored).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from ..denoiser.protocol import Denoiser
from ..errors import ConfigError
from ..lora.lora_set import LoraSet
from ..training.concept_prompts import ConceptPrompts, split_concepts

METHODS = ("esd-u", "esd-x", "uce")
ProgressFn = Callable[..., None]


@dataclasses.dataclass
class EraseSettings:
    """One erasure run. ``rank`` None: 4 for ESD (LoRA rank), 0 for UCE (the exact update)."""

    method: str = "uce"
    concepts: str | list[str] = ""
    guide: str | list[str] | None = None
    preserve: str | list[str] | None = None
    rank: int | None = None
    full_diff: bool = False               # write full-rank .diff weights instead of LoRA factors
    # UCE
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    # ESD (the trainer's settings)
    steps: int = 200
    lr: float = 1e-4
    esd_eta: float = 1.0
    esd_sample_steps: int = 50
    esd_guidance: float = 3.0
    batch_size: int = 1
    size: int | None = None               # pixels of ESD's partial generations (None: the model's default)
    seed: int = 0
    checkpoint_every: int = 0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        self.concepts = split_concepts(self.concepts, "concepts")
        if self.method != "uce":
            for name in ("guide", "preserve"):
                if split_concepts(getattr(self, name), name, allow_empty=True):
                    raise ConfigError(f"{name}: only UCE uses {name} concepts; ESD ({self.method}) erases towards the "
                                      f"unconditional prediction. Leave {name} empty, or use method uce.")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0
                                      or (self.rank == 0 and self.method != "uce")):
            raise ConfigError(f"rank must be a positive integer{' (or 0: exact)' if self.method == 'uce' else ''}; "
                              f"got {self.rank!r}.")
        if self.full_diff and self.method == "uce" and self.rank:
            raise ConfigError(f"rank: full_diff writes UCE's exact update as full-rank weights, so a rank ({self.rank}) "
                              f"has no meaning there; leave rank at 0, or turn full_diff off for a rank-{self.rank} LoRA.")
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise ConfigError(f"size must be a positive number of pixels; got {self.size!r}.")
        if self.method != "uce":
            self.train_config()  # checks the ESD settings now (steps, lr, esd_eta, ...)

    @property
    def lora_rank(self) -> int:
        return self.rank if self.rank is not None else (0 if self.method == "uce" else 4)

    def train_config(self):
        from ..training.config import TrainConfig

        return TrainConfig(objective="esd", targets=self.method, steps=self.steps, rank=self.lora_rank, lr=self.lr,
                           esd_eta=self.esd_eta, esd_sample_steps=self.esd_sample_steps,
                           esd_guidance=self.esd_guidance, batch_size=self.batch_size, seed=self.seed,
                           checkpoint_every=self.checkpoint_every, mixed_precision=self.mixed_precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EraseResult:
    lora: LoraSet
    report: dict
    history: list[dict] = dataclasses.field(default_factory=list)
    checkpoint: Path | None = None


def check_rank(denoiser: Denoiser, targets: str, rank: int) -> None:
    """A :class:`ConfigError` naming ``rank`` when it is above the size of every ``targets`` layer (the largest
    ``min(out, in)``), where a LoRA of that rank would be no adapter at all.

    A rank above the size of *some* small layers is allowed: ESD-u includes ``conv_out``, whose 3 or 4 output
    channels are below common ranks; those layers' updates are simply unconstrained.
    """
    layers = denoiser.layers(targets)
    name, m = max(layers.items(), key=lambda kv: min(kv[1].weight.shape[0], kv[1].weight[0].numel()))
    largest = min(int(m.weight.shape[0]), int(m.weight[0].numel()))
    if rank > largest:
        raise ConfigError(f"rank {rank} is above the size of every {targets} layer (the largest, {name!r} with weight "
                          f"{tuple(m.weight.shape)}, holds rank {largest}); choose a rank of at most {largest}.")


def erase_concepts(denoiser: Denoiser, settings: EraseSettings, *, checkpoint_dir: str | os.PathLike | None = None,
                   metrics_path: str | os.PathLike | None = None, resume: bool = False,
                   progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> EraseResult:
    """Run ``settings.method`` on ``denoiser``; ``progress(done, total, ...)`` and ``should_stop()`` as the
    trainer takes them (UCE reports per layer and is too short to stop)."""
    s = settings
    if denoiser.schedule == "flow":
        raise ConfigError(f"{s.method}: the erasure baselines are defined on UNets (UCE edits cross-attention keys and "
                          f"values, ESD guides an epsilon model); SD3 and Flux.1 have joint attention and a flow "
                          f"schedule. Align these models with SafetyDPO (safetydpo train / the train node).")
    if s.method == "uce":
        from .uce import uce_edit

        res = uce_edit(denoiser, s.concepts, s.guide, s.preserve, lamb=s.lamb, erase_scale=s.erase_scale,
                       preserve_scale=s.preserve_scale, rank=s.lora_rank, progress=progress)
        return EraseResult(res.lora, res.report())
    from ..training.esd import train_esd

    cfg = s.train_config()
    check_rank(denoiser, cfg.targets, cfg.rank)
    size = (s.size, s.size) if s.size else None
    concepts = ConceptPrompts(tuple(s.concepts), size)
    res = train_esd(denoiser, concepts, cfg, checkpoint_dir=checkpoint_dir, metrics_path=metrics_path, resume=resume,
                    progress=progress, should_stop=should_stop)
    final = res.history[-1] if res.history else {}
    report = {"method": s.method, "concepts": list(s.concepts), "layers": len(res.lora), "rank": cfg.rank,
              "steps": len(res.history), "esd_eta": cfg.esd_eta, "final_loss": final.get("loss")}
    return EraseResult(res.lora, report, res.history, res.checkpoint)


def save_erasure(result, path: str | os.PathLike, names=None, *, full_diff: bool = False,
                 metadata: dict | None = None) -> Path:
    """Write an erasure result's LoRA (an :class:`EraseResult`, a :class:`~.uce.UceResult` or a
    :class:`LoraSet`) atomically; ``full_diff``: full-rank ``.diff`` weights instead of factors."""
    from ..lora.io import save_lora

    lora = result if isinstance(result, LoraSet) else result.lora
    return save_lora(lora, path, names=names, diff=full_diff, metadata=metadata)

