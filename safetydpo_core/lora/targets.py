"""Which layers of a denoiser get LoRA adapters.

The paper (and the official code) adapts every attention projection of the UNet: ``to_q, to_k, to_v,
to_out.0`` in self- and cross-attention. Other presets add the transformer feed-forward and projection
layers. A target spec is a preset name or a comma-separated list of module-name suffixes (a suffix may hold
``*`` wildcards, e.g. ``single_blocks.*.linear1``). Every suffix the user lists must exist; a preset only has
to match something, as its suffixes cover several variants of a family (SD3.5-medium's second attention).

The presets here are the UNets'; the flow-matching transformers have their own, with the same names
(:data:`safetydpo_core.lora.transformer_names.PRESETS`), which their denoisers pass to :func:`select_layers`.

The two ESD presets (Gandikota et al., ICCV 2023; see :mod:`..training.esd`) follow the official code's
parameter choice: ``esd-x`` is every cross-attention projection (``attn2``), ``esd-u`` ("noxattn") every
linear and convolution layer *outside* cross-attention (self-attention, feed-forward, transformer
projections, ResNet convolutions, ``conv_in``) except, as there, the top-level time embedding and the
output layer (LDM ``time_embed``/``out``, diffusers ``time_embedding``/``conv_out``). ``esd-u`` is a rule
over module names rather than a list of suffixes, so it works on diffusers and LDM (ComfyUI) names alike
(UNets only).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError

PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-cross": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    # no layer that sees the prompt's tokens or selects among them: self-attention and the feed-forward only
    "attn-self+ff": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"),
    "attn+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    "esd-x": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
}
# presets chosen by a rule over module names (not suffixes)
_ESD_U_LEFT_OUT = ("time_embed", "time_embedding", "out", "conv_out")  # the official code's 'noxattn' exclusions


def _esd_u(name: str) -> bool:
    """Every adaptable layer outside cross-attention, the time embedding and the output layer."""
    parts = name.split(".")
    if parts[0] == "diffusion_model":
        parts = parts[1:]
    return "attn2" not in parts and parts[0] not in _ESD_U_LEFT_OUT


RULE_PRESETS: dict[str, Callable[[str], bool]] = {"esd-u": _esd_u}
DEFAULT_TARGETS = "attn"
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def parse_targets(spec: str | Sequence[str] | None, presets: Mapping[str, tuple[str, ...]] = PRESETS) -> tuple[str, ...]:
    """A preset name, a comma-separated string of suffixes, or a list of suffixes -> suffixes."""
    if spec is None or spec == "":
        spec = DEFAULT_TARGETS
    if isinstance(spec, str):
        if spec in presets:
            return tuple(presets[spec])
        items = tuple(s.strip() for s in spec.split(",") if s.strip())
    else:
        items = tuple(spec)
    out: list[str] = []
    for s in items:
        out.extend(presets.get(s, (s,)))
    return tuple(dict.fromkeys(out))


def _match(name: str, s: str) -> bool:
    if "*" in s:
        return fnmatch.fnmatchcase(name, s) or fnmatch.fnmatchcase(name, "*." + s)
    return name == s or name.endswith("." + s)


def matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(_match(name, s) for s in suffixes)


def select_layers(modules: Mapping[str, torch.nn.Module], spec: str | Sequence[str] | None,
                  adaptable: tuple[type, ...] = _ADAPTABLE,
                  presets: Mapping[str, tuple[str, ...]] = PRESETS) -> dict[str, torch.nn.Module]:
    """The adaptable modules whose names end in one of the target suffixes.

    Raises a :class:`ConfigError` that lists the suffixes that do exist when nothing matches.
    """
    if isinstance(spec, str) and spec in RULE_PRESETS:
        chosen = {n: m for n, m in modules.items() if n and isinstance(m, adaptable) and RULE_PRESETS[spec](n)}
        if not chosen:
            raise ConfigError(f"Target preset {spec!r} selects no layer of this model.")
        return chosen
    suffixes = parse_targets(spec, presets)
    is_preset = isinstance(spec, str) and spec in presets or spec is None or spec == ""
    chosen = {n: m for n, m in modules.items() if isinstance(m, adaptable) and matches(n, suffixes)}
    missing = [] if is_preset else [s for s in suffixes if not any(matches(n, (s,)) for n in chosen)]
    if not chosen or missing:
        avail = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                        for n, m in modules.items() if isinstance(m, adaptable)})
        what = missing if missing else list(suffixes)
        raise ConfigError(f"Target layers {what} do not exist in this model. Layers that can be adapted end in: "
                          f"{', '.join(avail[:40])}{' ...' if len(avail) > 40 else ''}. Presets: {', '.join([*presets, *RULE_PRESETS])}.")
    return chosen


def shape_max_rank(shape: Sequence[int]) -> int:
    """The largest useful LoRA rank of a weight of this shape: the smaller of its output and flattened input
    sizes (a rank above it cannot add anything to the update)."""
    return int(min(int(shape[0]), math.prod(int(d) for d in shape[1:])))


def max_rank(module: torch.nn.Module) -> int:
    """The largest useful LoRA rank of a layer (:func:`shape_max_rank` of its weight)."""
    return shape_max_rank(tuple(module.weight.shape))


def layer_rank(module: torch.nn.Module, rank: int) -> int:
    """A layer's LoRA rank in a run of rank ``rank``: ``rank``, or the layer's :func:`max_rank` where that is
    smaller (``conv_in`` of a UNet with 4 latent channels and a 3x3 kernel takes at most 36, of the world 16).
    The capped layer keeps the run's scale ``alpha / rank`` (its alpha is scaled with its rank), and its
    update is as expressive as at the full rank, so one rank can be asked of every layer."""
    return min(int(rank), max_rank(module))


def check_rank_useful(layers: Mapping[str, torch.nn.Module], rank: int) -> None:
    """Refuse a rank above what even the largest of ``layers`` can use (every layer would be capped: a
    full-rank LoRA that is needlessly huge, most likely a typo), naming that layer; a rank above only some
    layers' sizes is fine (:func:`layer_rank` caps those)."""
    if not layers:
        return
    name, module = max(layers.items(), key=lambda kv: (max_rank(kv[1]), kv[0]))
    limit = max_rank(module)
    if rank > limit:
        shape = "x".join(str(s) for s in module.weight.shape)
        raise ConfigError(f"LoRA rank {rank} is larger than any adapted layer can use: the largest, {name} ({shape}), "
                          f"takes at most {limit} (a layer's smaller dimension). Choose a rank of at most {limit}.")
