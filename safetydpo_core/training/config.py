"""Settings of one safety-expert training run, validated up front with errors that name the setting.

Each setting is declared once, in :data:`SETTINGS` (default, range, help, choices, whether a resume must keep
it); ``safetydpo train`` builds its options and the TrainExpert node its widgets from that table, and the
trainer and the node take the settings a resume must keep from :data:`RESUME_KEYS`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..categories import normalize_categories
from ..errors import ConfigError
from ..lora.targets import DEFAULT_TARGETS, PRESETS, RULE_PRESETS
from ..utils.numbers import check_number, check_optional
from .adversarial import ADV_INITS, ADV_OBJECTIVES
from .preservation import PRESERVE_SETS

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
    preserve_prompts: str = "auto"               # the preservation set(s): auto, others, neutral, safe, tokens, a+b, a file
    preserve_pictures: int = 0                   # everyday preservation prompts noised from N pictures of their own
    twin_weight: float = 0.0                     # safe-twin preservation: each pair's safe prompt keeps its output
    adv_weight: float = 0.0                      # adversarial training against concept inversion (adversarial.py)
    adv_lr: float = 0.3                          # the adversary's step, in RMS vocabulary-embedding entries
    adv_steps: int = 6                           # the adversary's steps before each optimiser step
    adv_reset: int = 10                          # restart the adversary's tokens every N steps
    adv_init: str = "random"                     # where they start: a random vocabulary token or the concept word
    adv_objective: str = "dpo"                   # the LoRA's term there: DPO on the pair, or the safe prompt's output
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
    ema_decay: float = 0.0                       # export the weights' moving average (ema.py; 0: the last step's)
    # ESD (objective "esd", training/esd.py): negative guidance eta, and the reference's partial generation
    esd_eta: float = 1.0
    esd_sample_steps: int = 50                   # DDIM steps of the generation that x_t is taken from
    esd_guidance: float = 3.0                    # its classifier-free guidance scale

    def __post_init__(self) -> None:
        if self.category is not None and self.category != [] and self.category != "":
            self.category = normalize_categories(self.category)
        else:
            self.category = None
        for name in ("steps", "rank", "batch_size", "grad_accum", "esd_sample_steps", "adv_reset", "adv_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {v!r}.")
        for name in ("lr", "beta", "mapo_beta", "mapo_snr", "esd_eta", "adv_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number; got {v!r}.")
        # every other number: finite and in range (NaN passes a plain ``x < 0`` test, so check_number)
        self.alpha = check_optional(self.alpha, "alpha", 0, None, lo_open=True)
        self.prompt_dropout = check_number(self.prompt_dropout, "prompt_dropout", 0, 1, hi_open=True)
        self.max_grad_norm = check_optional(self.max_grad_norm, "max_grad_norm (0 disables clipping)", 0)
        self.sft_weight = check_number(self.sft_weight, "sft_weight", 0)
        self.preserve_weight = check_number(self.preserve_weight, "preserve_weight", 0)
        self.preserve_pictures = check_number(self.preserve_pictures, "preserve_pictures", 0, 64, integer=True)
        self.twin_weight = check_number(self.twin_weight, "twin_weight", 0)
        self.adv_weight = check_number(self.adv_weight, "adv_weight", 0)
        self.weight_decay = check_number(self.weight_decay, "weight_decay", 0)
        self.ema_decay = check_number(self.ema_decay, "ema_decay (0 switches the weight average off)", 0, 1,
                                      hi_open=True)
        self.seed = check_number(self.seed, "seed", integer=True)
        if not isinstance(self.preserve_prompts, str) or not self.preserve_prompts.strip():
            raise ConfigError(f"preserve_prompts must name a preservation set (auto, others, neutral, safe, tokens, or "
                              f"sets joined with +) or a prompts file; got {self.preserve_prompts!r}.")
        if not (isinstance(self.esd_guidance, (int, float)) and math.isfinite(self.esd_guidance) and self.esd_guidance >= 1):
            raise ConfigError(f"esd_guidance must be a number >= 1 (1: no classifier-free guidance); got {self.esd_guidance!r}.")
        if self.objective == "esd" and self.preserve_weight:
            raise ConfigError("preserve_weight does not apply to objective esd (ESD has no preference images to "
                              "noise preservation prompts from); set it to 0.")
        if self.objective == "esd" and self.twin_weight:
            raise ConfigError("twin_weight does not apply to objective esd (ESD has no safe pictures to keep); set it "
                              "to 0.")
        if self.objective == "esd" and self.adv_weight:
            raise ConfigError("adv_weight does not apply to objective esd (the adversary's prompts are learned on the "
                              "pairs' unsafe images); set it to 0.")
        for name, allowed in (("objective", OBJECTIVES), ("condition", CONDITIONS), ("optimizer", OPTIMIZERS),
                              ("adv_init", ADV_INITS), ("adv_objective", ADV_OBJECTIVES),
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


_FROM_CONFIG: Any = object()  # Setting.default: TrainConfig's own default


@dataclasses.dataclass(frozen=True)
class Setting:
    """One :class:`TrainConfig` setting as the command line and the TrainExpert node expose it.

    ``lo``/``hi`` (open with ``lo_open``/``hi_open``) are the range :func:`check_number` enforces;
    ``choices`` the allowed words; ``resume`` whether a resumed run must have the same value (it then keys
    the node's checkpoint folder too); ``cli`` whether ``safetydpo train`` has the option (``--<name>`` with
    dashes); ``node`` the node's widget name where the node has one, with ``widget`` its extra bounds
    (min/max/step: a widget needs finite ends where the range is open).
    """

    name: str
    help: str
    resume: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    default: Any = _FROM_CONFIG
    cli: bool = True
    node: str | None = None
    widget: dict = dataclasses.field(default_factory=dict)

    @property
    def value_default(self) -> Any:
        """The default a user sees: the declared one, else :class:`TrainConfig`'s."""
        if self.default is not _FROM_CONFIG:
            return self.default
        f = _FIELDS[self.name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @property
    def kind(self) -> str:
        """``int``, ``float``, ``bool`` or ``str``: how the value is typed (from TrainConfig's annotation)."""
        t = str(_FIELDS[self.name].type)
        for kind in ("bool", "int", "float"):
            if t == kind or t == f"{kind} | None":
                return kind
        return "str"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range(self) -> dict:
        """Keyword arguments of :func:`check_number` for this setting."""
        return dict(lo=self.lo, hi=self.hi, integer=self.kind == "int", lo_open=self.lo_open, hi_open=self.hi_open)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: every TrainConfig setting, in the order ``safetydpo train --help`` lists them
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("category", "Train on this category's pairs (several: comma-separated; unset: all).", resume=True),
    Setting("steps", "Optimiser steps.", resume=False, lo=1, node="steps", widget=dict(max=1000000)),
    Setting("rank", "LoRA rank (4, as the paper; with alpha = rank the update's scale is 1).", resume=True, lo=1,
            node="rank", widget=dict(max=256)),
    Setting("alpha", "LoRA alpha (unset: = rank).", resume=True, lo=0, lo_open=True),
    Setting("targets", "Layers to adapt: attn (the attention projections, default: to_q,to_k,to_v,to_out.0 in UNets; "
                       "both streams in SD3/Flux), "
                       + ", ".join(n for n in [*PRESETS, *RULE_PRESETS] if n != DEFAULT_TARGETS)
                       + ", or comma-separated suffixes.", resume=True),
    Setting("objective", "dpo (default), reference-free mapo, or esd: the ESD erasure baseline on the dataset's unsafe "
                         "prompts (with targets esd-u or esd-x; see `safetydpo erase`).", resume=True, choices=OBJECTIVES),
    Setting("esd_eta", "ESD's negative guidance eta (the esd objectives only).", resume=True, lo=0, lo_open=True,
            node="esd_eta", widget=dict(min=0.01, max=100.0, step=0.1)),
    Setting("esd_sample_steps", "ESD: DDIM steps of the partial generation x_t comes from.", resume=True, lo=1),
    Setting("esd_guidance", "ESD: the partial generation's classifier-free guidance scale (1: none).", resume=True,
            lo=1),
    Setting("beta", "Diffusion-DPO beta: how strongly the expert may move away from the reference (larger = closer "
                    "to the reference; 5000 as the official code).", resume=True, lo=0, lo_open=True, node="beta",
            widget=dict(min=1.0, max=1e7, step=100.0)),
    Setting("mapo_beta", "MaPO beta.", resume=True, lo=0, lo_open=True),
    Setting("mapo_snr", "MaPO's signal-to-noise weighting.", resume=True, lo=0, lo_open=True, cli=False),
    Setting("sft_weight", "Weight of an extra SFT term on the safe image: it asks for the safe twin in place, where "
                          "DPO alone is content with any picture that is not the unsafe one (0 = off; the demo uses "
                          "1).", resume=True, lo=0, node="sft_weight", widget=dict(max=1e6, step=0.1)),
    Setting("preserve_weight", "Output preservation (DUO): weight of the squared distance between the expert's and "
                               "the untouched model's predictions on preservation prompts (0 = off).", resume=True,
            lo=0, node="preserve_weight", widget=dict(max=1e6, step=0.1)),
    Setting("preserve_prompts", "Preservation prompts: auto (the safe prompts of the dataset's other categories plus "
                                "everyday prompts), others, neutral, safe (every safe prompt of the dataset, the "
                                "trained categories' too, plus everyday prompts), tokens (random vocabulary tokens: "
                                "text in general), sets joined with + (auto+tokens, the demo's), or (command line "
                                "only) a .txt / .jsonl prompts file.", resume=True, choices=PRESERVE_SETS, node="preserve_prompts"),
    Setting("preserve_pictures", "Noise each everyday preservation prompt (neutral, a prompts file) from N pictures "
                                 "of its own, rendered by the untouched model when training starts as the dataset's "
                                 "pairs were (and cached in the dataset folder), instead of from the batch's "
                                 "pictures (0 = off, the default).", resume=True, lo=0, hi=64),
    Setting("twin_weight", "Safe-twin preservation: weight of the squared distance between the expert's and the "
                           "untouched model's predictions for each pair's safe prompt, on that pair's noised safe "
                           "picture, in every step (0 = off; the demo's joint fine-tune uses 10). The safe twins keep "
                           "what the model drew for them without taking turns with the preservation prompts, as the "
                           "preservation set safe does.", resume=True, lo=0, node="twin_weight",
            widget=dict(max=1e6, step=0.1)),
    Setting("adv_weight", "Adversarial training against concept inversion (AdvUnlearn-style): weight of the DPO "
                          "term on prompts whose concept word is replaced by an adversary's token, learned against "
                          "the LoRA as training goes (0 = off). Much more robust to inversion and rewording, at a "
                          "cost to safe twins and unrelated content (docs/benchmarks.md).", resume=True, lo=0,
            node="adv_weight", widget=dict(max=1e6, step=0.1)),
    Setting("adv_lr", "The adversary's step size, in root-mean-square entries of the vocabulary's embeddings.",
            resume=True, lo=0, lo_open=True),
    Setting("adv_steps", "The adversary's gradient steps before each optimiser step.", resume=True, lo=1),
    Setting("adv_reset", "Restart the adversary's tokens every N steps (a fresh attack each time).", resume=True, lo=1),
    Setting("adv_init", "Where the adversary's tokens start: a random vocabulary token (where the inversion attack "
                        "starts) or the concept word's own embedding.", resume=True, choices=ADV_INITS),
    Setting("adv_objective", "The LoRA's term on the adversary's prompts: dpo (the pair, safe preferred) or anchor "
                             "(the untouched model's output for the pair's safe prompt).", resume=True,
            choices=ADV_OBJECTIVES),
    Setting("condition", "Which prompt conditions both images of a pair: the unsafe prompt (the method's default), "
                         "the safe one, or either at random.", resume=True, choices=CONDITIONS, node="condition"),
    Setting("lr", "Learning rate of the LoRA.", resume=True, lo=0, lo_open=True, node="learning_rate",
            widget=dict(min=1e-8, max=1.0, step=1e-6, round=False)),
    Setting("optimizer", "Optimiser of the LoRA.", resume=True, choices=OPTIMIZERS),
    Setting("weight_decay", "The optimiser's weight decay.", resume=True, lo=0, cli=False),
    Setting("lr_schedule", "Learning-rate schedule.", resume=True, choices=SCHEDULES),
    Setting("warmup_steps", "Steps of learning-rate warm-up.", resume=True, lo=0),
    Setting("batch_size", "Pairs per micro-step.", resume=True, lo=1),
    # a resume keeps grad_accum x processes (the micro-steps per optimiser step), not grad_accum alone
    Setting("grad_accum", "Micro-steps per optimiser step.", resume=True, lo=1),
    Setting("max_grad_norm", "Gradient clipping (0 disables).", resume=True, lo=0),
    Setting("prompt_dropout", "Probability of an empty prompt (the official code uses 0.2).", resume=True, lo=0, hi=1,
            hi_open=True),
    Setting("seed", "Seed of the pair order, noise and timesteps (a resumed run repeats them exactly).", resume=True,
            node="seed", widget=dict(min=0, max=2 ** 64 - 1)),
    # autocast precision changes every later step's numbers, so a resumed run keeps it (auto is resolved first)
    Setting("mixed_precision", "Autocast precision (auto: accelerate's --mixed_precision under accelerate launch, "
                               "else bf16/fp16 on GPUs and no on CPUs).", resume=True,
            choices=("auto",) + PRECISIONS, default="auto"),
    Setting("gradient_checkpointing", "Recompute activations in the backward pass: much less memory, about a third "
                                      "slower.", resume=False, node="gradient_checkpointing"),
    Setting("checkpoint_every", "Save a resumable checkpoint every N steps (0 = only at the end and when stopped).",
            resume=False, lo=0, node="save_every", widget=dict(max=1000000)),
    Setting("keep_checkpoints", "How many of the newest checkpoints to keep.", resume=False, lo=1, cli=False),
    Setting("ema_decay", "Export the exponential moving average of the LoRA's weights over the steps, with this decay "
                         "(bias-corrected; horizon about 1 / (1 - decay) steps), instead of the last step's weights: "
                         "less of the last batches' noise (0 = off, the default).", resume=True, lo=0, hi=1,
            hi_open=True, node="ema_decay", widget=dict(max=0.9999, step=0.001, round=False)),
    Setting("timestep_range", "Train on timesteps lo..hi only.", resume=True, cli=False),
)}
assert set(SETTINGS) == set(_FIELDS), "every TrainConfig setting is declared in SETTINGS"

#: the settings a resumed run must keep (the rest may change between a run and its resume)
RESUME_KEYS: tuple[str, ...] = tuple(n for n, s in SETTINGS.items() if s.resume)
