"""Calibration for activation-aware merging: streaming input statistics of the adapted layers.

Co-Merge scores each weight by ``|weight| x activation``. The activations come from running the **base**
denoiser (no adapters) over calibration inputs with forward hooks on every adapted layer. Nothing is stored
per token: each hook reduces its input at once to

* ``sq[n, j]``: the sum over the tokens of input ``n`` of ``x_j^2`` (per input channel ``j``), and the
  token count of that input. This is all the delta reading (D) and the ``down`` scores of the factor
  reading (F) need: ``||X_j||_2`` (Wanda's norm) is ``sqrt(sum_n sq[n, j])``.
* ``rank_sq[n, k]`` (``rank_stats="experts"``, the default): the experts' own rank-space activations
  ``(A_e x)_k`` for the ``up`` scores of reading F, computed in the same pass from a concatenation of every
  expert's ``down`` matrix: one extra ``tokens x d_in x sum(r_e)`` product per layer (about 4 % of an
  attention projection's cost for seven rank-8 experts) and ``sum(r_e)`` floats per input.
* ``gram = X^T X`` (``rank_stats="gram"``): the input second-moment matrix. It gives the rank-space
  activations of any ``down`` afterwards (``||A x||^2 = a^T X^T X a``), so the statistics do not depend on
  the experts and can be cached and reused; but it costs a ``d_in x d_in`` product per token batch (as much
  as the layer itself) and ``d_in^2`` float64 values per layer: 712 MB measured for SD1.5's attention layers
  and about 10 GB estimated for SDXL's, against a few MB for the per-expert hooks. It cannot be split per input, so the
  per-input vote falls back to the average for the ``up`` scores in this mode.

Calibration inputs. The Denoiser protocol has no image for a prompt, so by default (``x0="noise"``) the
noisy latent is drawn as ``x_t ~ N(0, I)`` at timesteps sampled from the top 30 % of the schedule: latents are
scaled to unit variance and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` has ``abar_t <= 0.08`` there for
the SD schedules, so ``N(0, I)`` is the true marginal of ``x_t`` to within a few percent. For flow-matching
models (``x_t = (1 - s) x_0 + s eps``) the same assumption, unit-variance ``x_0`` independent of the noise,
gives ``x_t ~ N(0, ((1 - s)^2 + s^2) I)`` (the protocol's ``unit_marginal``); the timesteps are the model's
own training draws restricted to the top 30 % of the noise levels. These are the steps
where layout and content, and hence the unsafe concept, are decided. When a preference dataset is given
(``inputs`` with latents), ``x_t`` is the forward process applied to real ``x_0`` at timesteps drawn from the
whole schedule, as in training. The prompts are the experts' unsafe prompts (what DPO conditions on), drawn
round-robin over the experts' categories so that every expert's domain is represented.

Only the Denoiser protocol is used (``layers``, ``encode_prompts``, ``add_noise``, ``predict``,
``num_train_timesteps``, ``latent_shape``), so the ComfyUI backend calibrates the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..denoiser.protocol import Denoiser
from ..errors import ConfigError, DatasetError, Interrupted, LoraError, ModelError
from ..lora.lora_set import LoraSet
from ..utils.atomic import atomic_path
from .experts import expert_fingerprint, layer_union

log = logging.getLogger(__name__)

RANK_STATS = ("experts", "gram", "none")
X0_SOURCES = ("noise", "latents")
PROMPT_FIELDS = ("unsafe", "safe", "both")
STATS_FORMAT = "safetydpo-merge-calibration"

ProgressFn = Callable[[int, int, dict | None], None]
StopFn = Callable[[], bool]


# ------------------------------------------------------------------------------------------------------
# Prompts


def read_pairs_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Prompt pairs from a JSONL file (``id``, ``category``, ``concept``, ``unsafe``, ``safe`` per line), read
    with :func:`safetydpo_core.prompts.pairs.read_pairs` (which names the file and line of a bad entry);
    returned as dicts with ``category`` a list of canonical ids."""
    from ..prompts.pairs import read_pairs

    return [{"id": p.id, "category": list(p.category), "concept": p.concept, "unsafe": p.unsafe, "safe": p.safe}
            for p in read_pairs(path)]


def calibration_prompts(pairs: Sequence[Mapping[str, Any]], categories: Sequence[str] | None, count: int,
                        seed: int = 0, field: str = "unsafe", source: str = "pairs") -> list[str]:
    """Up to ``count`` prompts, drawn round-robin over ``categories`` (all pairs when empty), shuffled by ``seed``.

    ``field``: ``unsafe`` (what the experts were trained on), ``safe`` or ``both``.
    """
    if field not in PROMPT_FIELDS:
        raise ConfigError(f"Unknown prompt field {field!r}; choose one of {', '.join(PROMPT_FIELDS)}.")
    if count <= 0:
        raise ConfigError(f"The number of calibration prompts must be positive; got {count}.")
    rng = random.Random(seed)

    def texts(row) -> list[str]:
        fields = ("unsafe", "safe") if field == "both" else (field,)
        return [row[f] for f in fields if isinstance(row.get(f), str) and row[f].strip()]

    cats = list(categories or [])
    if cats:
        buckets = []
        for c in cats:
            rows = [r for r in pairs if c in (r.get("category") or [])]
            if not rows:
                log.warning("calibration: %s has no prompts for category %r", source, c)
                continue
            items = [t for r in rows for t in texts(r)]
            rng.shuffle(items)
            buckets.append(items)
        if not buckets:
            have = sorted({c for r in pairs for c in (r.get("category") or [])})
            raise DatasetError(f"{source} has no prompts for the experts' categories {', '.join(cats)} "
                               f"(it has: {', '.join(have) or 'no categories'}). Give a prompt file covering them.")
        out: list[str] = []
        i = 0
        while len(out) < count and any(i < len(b) for b in buckets):
            out.extend(b[i] for b in buckets if i < len(b))
            i += 1
        out = list(dict.fromkeys(out))[:count]
    else:
        out = list(dict.fromkeys(t for r in pairs for t in texts(r)))
        rng.shuffle(out)
        out = out[:count]
    if not out:
        raise DatasetError(f"{source} yields no calibration prompts.")
    return out


def dataset_inputs(root: str | os.PathLike, categories: Sequence[str] | None, count: int, seed: int = 0,
                   which: str = "both") -> list[tuple[str, torch.Tensor]]:
    """``(unsafe prompt, x0 latent)`` calibration inputs from a preference dataset folder.

    ``which``: ``both`` (safe and unsafe images), ``safe`` or ``unsafe``. Pairs are drawn round-robin over
    ``categories`` (all categories when empty) and shuffled by ``seed``.
    """
    from ..data import PreferenceDataset

    ds = PreferenceDataset(root, categories=list(categories) if categories else None)
    rng = random.Random(seed)
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(ds.records):
        for c in (r.category or ["?"]):
            if not categories or c in categories:
                by_cat.setdefault(c, []).append(i)
    for v in by_cat.values():
        rng.shuffle(v)
    order: list[int] = []
    j = 0
    while len(order) < len(ds.records) and any(j < len(v) for v in by_cat.values()):
        order.extend(v[j] for v in by_cat.values() if j < len(v))
        j += 1
    order = list(dict.fromkeys(order))
    out: list[tuple[str, torch.Tensor]] = []
    for i in order:
        safe, unsafe = ds.load_pair(i)
        prompt = ds.records[i].unsafe
        if which in ("both", "safe"):
            out.append((prompt, safe))
        if which in ("both", "unsafe"):
            out.append((prompt, unsafe))
        if len(out) >= count:
            break
    return out[:count]


# ------------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class LayerStats:
    """Streaming statistics of one adapted layer's input over ``N`` calibration inputs."""

    sq: torch.Tensor                        # [N, d] sum over tokens of x_j^2, per input
    tokens: torch.Tensor                    # [N] tokens per input
    kernel: int = 1                         # kh * kw of a conv layer (a delta column is (channel, kh, kw))
    rank_sq: torch.Tensor | None = None     # [N, R] sum over tokens of (A_e x)_k^2, experts concatenated
    rank_tokens: torch.Tensor | None = None  # [N] output positions of the rank activations
    rank_index: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # expert -> (start, r)
    gram: torch.Tensor | None = None        # [d, d] sum over all tokens of x x^T (float64)

    @property
    def num_inputs(self) -> int:
        return int(self.sq.shape[0])

    def channel_rms(self) -> torch.Tensor:
        """RMS input activation per delta column over all calibration tokens (``[d * kernel]``)."""
        total = float(self.tokens.sum())
        rms = (self.sq.double().sum(0) / max(total, 1.0)).sqrt().float()
        return rms.repeat_interleave(self.kernel) if self.kernel > 1 else rms

    def channel_rms_inputs(self) -> torch.Tensor:
        """RMS input activation per delta column for each input (``[N, d * kernel]``)."""
        rms = (self.sq / self.tokens.clamp_min(1).unsqueeze(1).to(self.sq.dtype)).sqrt()
        return rms.repeat_interleave(self.kernel, dim=1) if self.kernel > 1 else rms

    def rank_rms(self, expert: int, down: torch.Tensor) -> tuple[torch.Tensor, str]:
        """RMS of ``(down x)_k`` over all tokens for expert ``expert`` (``down`` as stored, ``[r, d*k]``).

        Returns the values and where they came from: ``experts`` (measured in the calibration pass), ``gram``
        (exact, from ``X^T X``) or ``diagonal`` (approximation that ignores correlations between channels).
        """
        down = down.reshape(down.shape[0], -1).float()
        if self.rank_sq is not None and expert in self.rank_index:
            s, r = self.rank_index[expert]
            if r == down.shape[0]:
                total = float(self.rank_tokens.sum()) if self.rank_tokens is not None else float(self.tokens.sum())
                return (self.rank_sq[:, s:s + r].double().sum(0) / max(total, 1.0)).sqrt().float(), "experts"
        if self.gram is not None and self.kernel == 1:
            g = self.gram.double()
            d = down.double()
            val = ((d @ g) * d).sum(1).clamp_min(0) / max(float(self.tokens.sum()), 1.0)
            return val.sqrt().float(), "gram"
        rms = self.channel_rms()
        return ((down ** 2) @ (rms ** 2)).sqrt(), "diagonal"

    def rank_rms_inputs(self, expert: int, down: torch.Tensor) -> torch.Tensor | None:
        """Per-input RMS of ``(down x)_k`` (``[N, r]``), or ``None`` when only aggregate statistics exist."""
        if self.rank_sq is None or expert not in self.rank_index:
            return None
        s, r = self.rank_index[expert]
        if r != down.shape[0]:
            return None
        tok = (self.rank_tokens if self.rank_tokens is not None else self.tokens).clamp_min(1).unsqueeze(1)
        return (self.rank_sq[:, s:s + r] / tok.to(self.rank_sq.dtype)).sqrt()


@dataclasses.dataclass
class CalibrationStats:
    """Per-layer :class:`LayerStats` in the denoiser's ``naming``, with what produced them."""

    layers: dict[str, LayerStats]
    naming: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_inputs(self) -> int:
        return next(iter(self.layers.values())).num_inputs if self.layers else 0

    def get(self, name: str) -> LayerStats | None:
        return self.layers.get(name)

    def nbytes(self) -> int:
        n = 0
        for s in self.layers.values():
            for t in (s.sq, s.tokens, s.rank_sq, s.rank_tokens, s.gram):
                if t is not None:
                    n += t.numel() * t.element_size()
        return n

    def check_experts(self, experts: Sequence[LoraSet]) -> None:
        """Refuse rank statistics measured for other experts (a stale cache)."""
        want = self.info.get("expert_fingerprints")
        if not want or not any(s.rank_sq is not None for s in self.layers.values()):
            return
        have = [expert_fingerprint(e) for e in experts]
        if list(want) != have:
            raise ConfigError("The calibration statistics hold rank-space activations of other experts (or of the "
                              "same experts in another order). Delete the statistics file to recalibrate, or "
                              "calibrate with rank_stats='gram', which does not depend on the experts.")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to a ``.safetensors`` file atomically (a cache for later merges)."""
        p = Path(path)
        if p.suffix.lower() != ".safetensors":
            raise ConfigError(f"Calibration statistics file {p} must end in .safetensors.")
        tensors: dict[str, torch.Tensor] = {}
        layer_meta = {}
        for name, s in self.layers.items():
            tensors[f"{name}/sq"] = s.sq.contiguous()
            tensors[f"{name}/tokens"] = s.tokens.contiguous()
            for key in ("rank_sq", "rank_tokens", "gram"):
                t = getattr(s, key)
                if t is not None:
                    tensors[f"{name}/{key}"] = t.contiguous()
            layer_meta[name] = {"kernel": s.kernel, "rank_index": {str(k): list(v) for k, v in s.rank_index.items()}}
        meta = {"format": STATS_FORMAT, "naming": self.naming, "info": json.dumps(self.info, default=str),
                "layers": json.dumps(layer_meta)}
        with atomic_path(p, "calibration statistics file") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStats":
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"The calibration statistics file {p} does not exist.")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("format") != STATS_FORMAT:
                    raise ConfigError(f"{p} is not a calibration statistics file written by `safetydpo merge`.")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"The calibration statistics file {p} cannot be read: {e}. Delete it to recalibrate.") from e
        layers = {}
        for name, lm in json.loads(meta["layers"]).items():
            layers[name] = LayerStats(
                sq=tensors[f"{name}/sq"], tokens=tensors[f"{name}/tokens"], kernel=int(lm["kernel"]),
                rank_sq=tensors.get(f"{name}/rank_sq"), rank_tokens=tensors.get(f"{name}/rank_tokens"),
                rank_index={int(k): (int(v[0]), int(v[1])) for k, v in lm["rank_index"].items()},
                gram=tensors.get(f"{name}/gram"))
        return cls(layers, meta["naming"], json.loads(meta["info"]))


# ------------------------------------------------------------------------------------------------------
# The calibration pass


@dataclasses.dataclass
class CalibrationOptions:
    """How many inputs, which timesteps, and which statistics to collect."""

    num_inputs: int = 32
    batch_size: int = 4
    seed: int = 0
    size: int | None = None                  # image side in pixels; default: the denoiser's sample size
    timesteps: tuple[float, float] | None = None  # fractions of the schedule; default (0.7, 1) or (0, 1)
    rank_stats: str = "experts"

    def validate(self) -> None:
        from ..utils.numbers import check_number, check_optional

        self.num_inputs = check_number(self.num_inputs, "The number of calibration inputs", 1, integer=True)
        self.batch_size = check_number(self.batch_size, "The calibration batch size", 1, integer=True)
        self.size = check_optional(self.size, "The calibration image size", 8, 8192, integer=True)
        if self.timesteps is not None:
            self.timesteps = tuple(check_number(v, "Calibration timesteps", 0, 1) for v in self.timesteps)
        if self.rank_stats not in RANK_STATS:
            raise ConfigError(f"Unknown rank statistics {self.rank_stats!r}; choose one of {', '.join(RANK_STATS)}.")
        if self.timesteps is not None:
            lo, hi = self.timesteps
            if not (0.0 <= lo < hi <= 1.0):
                raise ConfigError(f"Calibration timesteps must be fractions 0 <= low < high <= 1; got {self.timesteps}.")
        if self.size is not None and self.size <= 0:
            raise ConfigError(f"The calibration image size must be positive; got {self.size}.")


class _Collector:
    """The forward hook of one layer: reduces the layer's input to per-input sums as it passes."""

    def __init__(self, name: str, module: torch.nn.Module, n: int, downs: list[tuple[int, torch.Tensor]], gram: bool):
        self.name = name
        self.module = module
        self.is_conv = isinstance(module, torch.nn.Conv2d)
        w = module.weight
        self.d = int(w.shape[1])
        self.kernel = int(w.shape[2] * w.shape[3]) if self.is_conv else 1
        self.sq = torch.zeros(n, self.d, dtype=torch.float32)
        self.tokens = torch.zeros(n, dtype=torch.float64)
        self.rank_index: dict[int, tuple[int, int]] = {}
        self.down_cat: torch.Tensor | None = None
        if downs:
            start = 0
            mats = []
            for e, down in downs:
                r = int(down.shape[0])
                self.rank_index[e] = (start, r)
                start += r
                mats.append(down.float())
            self.down_cat = torch.cat(mats, 0).to(w.device)
            self.rank_sq = torch.zeros(n, start, dtype=torch.float32)
            self.rank_tokens = torch.zeros(n, dtype=torch.float64)
        self.gram = torch.zeros(self.d, self.d, dtype=torch.float64) if (gram and self.kernel == 1) else None
        self.slot = 0
        self.batch = 1

    def __call__(self, module, args, output) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        x = x.detach().float()
        b = self.batch
        if self.is_conv:
            if x.dim() != 4 or x.shape[0] != b:
                raise ModelError(f"Calibration: conv layer {self.name!r} saw an input of shape {tuple(x.shape)} for a "
                                 f"batch of {b}.")
            sq = x.pow(2).sum((2, 3))
            tok = x.shape[2] * x.shape[3]
            flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if self.gram is not None else None
        else:
            if x.dim() >= 3 and x.shape[0] == b:
                x = x.reshape(b, -1, x.shape[-1])
            elif x.dim() == 2 and x.shape[0] % b == 0:
                x = x.reshape(b, -1, x.shape[-1])
            else:
                raise ModelError(f"Calibration: layer {self.name!r} saw an input of shape {tuple(x.shape)}, which "
                                 f"cannot be split into a batch of {b}.")
            sq = x.pow(2).sum(1)
            tok = x.shape[1]
            flat = x.reshape(-1, x.shape[-1]) if self.gram is not None else None
        sl = slice(self.slot, self.slot + b)
        self.sq[sl] += sq.cpu()
        self.tokens[sl] += tok
        if self.down_cat is not None:
            if self.is_conv:
                m = self.module
                h = torch.nn.functional.conv2d(x, self.down_cat, stride=m.stride, padding=m.padding,
                                               dilation=m.dilation, groups=m.groups)
                self.rank_sq[sl] += h.pow(2).sum((2, 3)).cpu()
                self.rank_tokens[sl] += h.shape[2] * h.shape[3]
            else:
                h = x @ self.down_cat.reshape(self.down_cat.shape[0], -1).T
                self.rank_sq[sl] += h.pow(2).sum(1).cpu()
                self.rank_tokens[sl] += h.shape[1]
        if self.gram is not None and flat is not None:
            self.gram += (flat.T @ flat).double().cpu()

    def stats(self) -> LayerStats:
        return LayerStats(sq=self.sq, tokens=self.tokens, kernel=self.kernel,
                          rank_sq=getattr(self, "rank_sq", None), rank_tokens=getattr(self, "rank_tokens", None),
                          rank_index=dict(self.rank_index), gram=self.gram)


def _hash_strings(items: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@torch.no_grad()
def calibrate(denoiser: Denoiser, prompts: Sequence[str] | None = None, *, experts: Sequence[LoraSet] | None = None,
              layer_names: Sequence[str] | None = None, options: CalibrationOptions | None = None,
              inputs: Sequence[tuple[str, torch.Tensor]] | None = None, progress: ProgressFn | None = None,
              should_stop: StopFn | None = None) -> CalibrationStats:
    """Run the base ``denoiser`` over calibration inputs and collect per-layer input statistics.

    ``prompts``: calibration prompts (input ``n`` uses prompt ``n mod len(prompts)``), or ``inputs``:
    ``(prompt, x0 latent)`` pairs from a preference dataset. ``experts`` (already in the denoiser's naming,
    see :func:`~.experts.align_experts`) give the layers to hook (their union, unless ``layer_names``) and,
    with ``rank_stats="experts"``, the ``down`` matrices whose rank-space activations are measured.
    ``progress(done, total, info)`` is called after each batch; ``should_stop()`` returning true raises
    :class:`~safetydpo_core.errors.Interrupted`.
    """
    opts = options or CalibrationOptions()
    opts.validate()
    experts = list(experts or [])
    names = list(layer_names) if layer_names is not None else layer_union(experts)
    if not names:
        raise ConfigError("Calibration needs the layers to observe: give experts or layer names.")
    if opts.rank_stats == "experts" and not experts:
        raise ConfigError("rank_stats='experts' measures the experts' rank-space activations; pass the experts "
                          "or use rank_stats='gram' or 'none'.")
    if inputs is None and not prompts:
        raise ConfigError("Calibration needs prompts (or (prompt, latent) inputs from a preference dataset).")
    if inputs is not None and opts.size is not None:
        log.warning("calibration: the image size is ignored when calibrating on dataset latents")
    for e in experts:
        if e.naming != denoiser.naming:
            raise LoraError(f"An expert uses {e.naming} layer names but the model uses {denoiser.naming}; convert the "
                            f"experts with align_experts() first.")
    have = denoiser.weight_shapes()
    missing = [n for n in names if n not in have]
    if missing:
        raise LoraError(f"Layer {missing[0]!r} ({len(missing)} such layers) does not exist in the model; the experts "
                        f"were made for another architecture.")
    modules = denoiser.layers(names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise LoraError(f"Layer {missing[0]!r} is not an adaptable layer of the model ({len(missing)} such layers).")

    n_total = opts.num_inputs
    T = int(denoiser.num_train_timesteps)
    lo_f, hi_f = opts.timesteps or ((0.0, 1.0) if inputs is not None else (0.7, 1.0))
    lo, hi = int(lo_f * T), max(int(lo_f * T) + 1, int(round(hi_f * T)))
    hi = min(hi, T)
    gen = torch.Generator(device="cpu").manual_seed(int(opts.seed))
    size = None
    if inputs is None:
        size = opts.size or int(denoiser.sample_size)
        latent_shape = tuple(denoiser.latent_shape(size, size))
        plist = [prompts[i % len(prompts)] for i in range(n_total)]  # type: ignore[index]
    else:
        if not inputs:
            raise DatasetError("The calibration dataset yields no inputs.")
        plist = [inputs[i % len(inputs)][0] for i in range(n_total)]
        latent_shape = tuple(inputs[0][1].shape)
    timesteps = denoiser.sample_timesteps(n_total, gen, latent_shape=latent_shape, t_range=(lo, hi))

    collectors: dict[str, _Collector] = {}
    handles = []
    try:
        for name in names:
            downs = []
            if opts.rank_stats == "experts":
                for ei, e in enumerate(experts):
                    layer = e.layers.get(name)
                    if layer is not None:
                        downs.append((ei, layer.down))
            c = _Collector(name, modules[name], n_total, downs, gram=opts.rank_stats == "gram")
            collectors[name] = c
            handles.append(modules[name].register_forward_hook(c))
        device = denoiser.device
        done = 0
        while done < n_total:
            if should_stop is not None and should_stop():
                raise Interrupted(f"Calibration stopped after {done} of {n_total} inputs; nothing was merged.")
            b = min(opts.batch_size, n_total - done)
            t = timesteps[done:done + b]
            noise = torch.randn((b, *latent_shape), generator=gen)
            if inputs is None:
                x_t = denoiser.unit_marginal(noise, t)
            else:
                x0 = torch.stack([inputs[(done + i) % len(inputs)][1].float() for i in range(b)])
                if tuple(x0.shape[1:]) != latent_shape:
                    raise DatasetError(f"Calibration latents differ in shape ({tuple(x0.shape[1:])} vs {latent_shape}); "
                                       f"use a dataset rendered at one size.")
                x_t = denoiser.add_noise(x0.to(device), noise.to(device), t.to(device))
            batch_prompts = plist[done:done + b]
            cond = denoiser.encode_prompts(batch_prompts, size=(size, size)) if size else denoiser.encode_prompts(batch_prompts)
            for c in collectors.values():
                c.slot, c.batch = done, b
            denoiser.predict(x_t.to(device), t.to(device), cond)
            done += b
            if progress is not None:
                progress(done, n_total, {"t": round(float(t[0]), 1)})
    finally:
        for h in handles:
            h.remove()
    info = {
        "num_inputs": n_total, "x0": "latents" if inputs is not None else "noise",
        "timesteps": [lo, hi], "latent_shape": list(latent_shape), "seed": opts.seed,
        "rank_stats": opts.rank_stats, "prompts": len(set(plist)), "prompts_hash": _hash_strings(plist),
        "model_fingerprint": _safe_fingerprint(denoiser),
    }
    if opts.rank_stats == "experts":
        info["expert_fingerprints"] = [expert_fingerprint(e) for e in experts]
    return CalibrationStats({n: c.stats() for n, c in collectors.items()}, denoiser.naming, info)


def _safe_fingerprint(denoiser: Denoiser) -> str:
    try:
        return str(denoiser.fingerprint())
    except Exception:  # noqa: BLE001 - a fingerprint is informational only
        return ""
