"""Which layers of a denoiser get LoRA adapters.

The paper (and the official code) adapts every attention projection of the UNet: ``to_q, to_k, to_v,
to_out.0`` in self- and cross-attention. Other presets add the transformer feed-forward and projection
layers. A target spec is a preset name or a comma-separated list of module-name suffixes.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError

PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-cross": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "attn+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}
DEFAULT_TARGETS = "attn"
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def parse_targets(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """A preset name, a comma-separated string of suffixes, or a list of suffixes -> suffixes."""
    if spec is None or spec == "":
        spec = DEFAULT_TARGETS
    if isinstance(spec, str):
        if spec in PRESETS:
            return PRESETS[spec]
        items = tuple(s.strip() for s in spec.split(",") if s.strip())
    else:
        items = tuple(spec)
    out: list[str] = []
    for s in items:
        out.extend(PRESETS.get(s, (s,)))
    return tuple(dict.fromkeys(out))


def matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_layers(modules: Mapping[str, torch.nn.Module], spec: str | Sequence[str] | None,
                  adaptable: tuple[type, ...] = _ADAPTABLE) -> dict[str, torch.nn.Module]:
    """The adaptable modules whose names end in one of the target suffixes.

    Raises a :class:`ConfigError` that lists the suffixes that do exist when nothing matches.
    """
    suffixes = parse_targets(spec)
    chosen = {n: m for n, m in modules.items() if isinstance(m, adaptable) and matches(n, suffixes)}
    missing = [s for s in suffixes if not any(matches(n, (s,)) for n in chosen)]
    if not chosen or missing:
        avail = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                        for n, m in modules.items() if isinstance(m, adaptable)})
        what = missing if missing else list(suffixes)
        raise ConfigError(f"Target layers {what} do not exist in this model. Layers that can be adapted end in: "
                          f"{', '.join(avail[:40])}{' ...' if len(avail) > 40 else ''}. Presets: {', '.join(PRESETS)}.")
    return chosen


def max_rank(module: torch.nn.Module) -> int:
    """The largest useful LoRA rank of a layer: the smaller of its output and (flattened) input sizes."""
    w = module.weight
    return int(min(w.shape[0], w[0].numel()))


def check_rank_fits(layers: Mapping[str, torch.nn.Module], rank: int) -> None:
    """Refuse a rank above a layer's smaller dimension (its update could not use it, and the file would be
    needlessly huge), naming the layer that limits it."""
    if not layers:
        return
    name, module = min(layers.items(), key=lambda kv: (max_rank(kv[1]), kv[0]))
    limit = max_rank(module)
    if rank > limit:
        shape = "x".join(str(s) for s in module.weight.shape)
        raise ConfigError(f"LoRA rank {rank} is larger than the layer {name} ({shape}) allows: a rank above a layer's "
                          f"smaller dimension ({limit}) adds nothing. Choose a rank of at most {limit} for these "
                          f"targets.")
