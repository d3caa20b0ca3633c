"""Settings of one safety-expert training run, validated up front with errors that name the setting."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..categories import normalize_categories
from ..errors import ConfigError
from ..utils.numbers import check_number, check_optional

OBJECTIVES = ("dpo", "mapo", "esd")
CONDITIONS = ("unsafe", "safe", "both")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16", "fp16")


@dataclasses.dataclass
class TrainConfig:
    """Defaults follow the official SafetyDPO code where it is known (beta 5000, rank 4 = alpha,
    attention targets, AdamW with weight decay 1e-2, gradient clipping 1.0)."""

    category: list[str] | str | None = None      # train on these categories' pairs (None: all)
    steps: int = 500
    rank: int = 4
    alpha: float | None = None                   # None: alpha = rank (scale 1), as the official code
    targets: str = "attn"
    objective: str = "dpo"
    beta: float = 5000.0                         # DPO beta (mean-reduced MSE); MaPO uses mapo_beta
    mapo_beta: float = 0.1
    mapo_snr: float = 0.5
    sft_weight: float = 0.0
    preserve_weight: float = 0.0                # output preservation (DUO): weight of mean((pred - ref)^2)
    preserve_prompts: str = "auto"               # the preservation set: auto, others, neutral or a file
    condition: str = "unsafe"                    # which prompt conditions both images
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 1                          # pairs per micro-step
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    prompt_dropout: float = 0.0                  # the official code uses 0.2
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0                    # 0: only at the end / on interruption
    keep_checkpoints: int = 2
    timestep_range: tuple[int, int] | None = None
    # ESD (objective "esd", training/esd.py): negative guidance eta, and the reference's partial generation
    esd_eta: float = 1.0
    esd_sample_steps: int = 50                   # DDIM steps of the generation that x_t is taken from
    esd_guidance: float = 3.0                    # its classifier-free guidance scale

    def __post_init__(self) -> None:
        if self.category is not None and self.category != [] and self.category != "":
            self.category = normalize_categories(self.category)
        else:
            self.category = None
        for name in ("steps", "rank", "batch_size", "grad_accum", "esd_sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {v!r}.")
        for name in ("lr", "beta", "mapo_beta", "mapo_snr", "esd_eta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number; got {v!r}.")
        # every other number: finite and in range (NaN passes a plain ``x < 0`` test, so check_number)
        self.alpha = check_optional(self.alpha, "alpha", 0, None, lo_open=True)
        self.prompt_dropout = check_number(self.prompt_dropout, "prompt_dropout", 0, 1, hi_open=True)
        self.max_grad_norm = check_optional(self.max_grad_norm, "max_grad_norm (0 disables clipping)", 0)
        self.sft_weight = check_number(self.sft_weight, "sft_weight", 0)
        self.preserve_weight = check_number(self.preserve_weight, "preserve_weight", 0)
        self.weight_decay = check_number(self.weight_decay, "weight_decay", 0)
        self.seed = check_number(self.seed, "seed", integer=True)
        if not isinstance(self.preserve_prompts, str) or not self.preserve_prompts.strip():
            raise ConfigError(f"preserve_prompts must name a preservation set (auto, others, neutral) or a prompts "
                              f"file; got {self.preserve_prompts!r}.")
        if not (isinstance(self.esd_guidance, (int, float)) and math.isfinite(self.esd_guidance) and self.esd_guidance >= 1):
            raise ConfigError(f"esd_guidance must be a number >= 1 (1: no classifier-free guidance); got {self.esd_guidance!r}.")
        if self.objective == "esd" and self.preserve_weight:
            raise ConfigError("preserve_weight does not apply to objective esd (ESD has no preference images to "
                              "noise preservation prompts from); set it to 0.")
        for name, allowed in (("objective", OBJECTIVES), ("condition", CONDITIONS), ("optimizer", OPTIMIZERS),
                              ("lr_schedule", SCHEDULES), ("mixed_precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        self.warmup_steps = check_number(self.warmup_steps, "warmup_steps", 0, integer=True)
        self.checkpoint_every = check_number(self.checkpoint_every, "checkpoint_every", 0, integer=True)
        self.keep_checkpoints = check_number(self.keep_checkpoints, "keep_checkpoints", 1, integer=True)
        if self.timestep_range is not None:
            lo, hi = (check_number(v, "timestep_range", 0, integer=True) for v in self.timestep_range)
            if not 0 <= lo < hi:
                raise ConfigError(f"timestep_range must be (lo, hi) with 0 <= lo < hi; got {self.timestep_range!r}.")
            self.timestep_range = (int(lo), int(hi))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown training setting(s) {unknown}; known: {', '.join(sorted(known))}.")
        d = dict(d)
        if d.get("timestep_range") is not None:
            d["timestep_range"] = tuple(d["timestep_range"])
        return cls(**d)
