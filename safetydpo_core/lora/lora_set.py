"""The framework-neutral LoRA set: layer name -> (down, up, alpha).

A :class:`LoraSet` is what every part of the pack passes around: the trainer exports one, the merger
reads several and writes one, the file I/O turns one into kohya / ComfyUI / diffusers keys and back.
Layer names are module paths of the denoiser in one of two naming styles (``naming``):

* ``"diffusers"``: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
* ``"ldm"``: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` (ComfyUI's ``diffusion_model.*``)

:mod:`.unet_names` converts between the two. Shapes follow kohya: a linear layer has ``down [r, in]`` and
``up [out, r]``; a conv layer ``down [r, in, kh, kw]`` and ``up [out, r, 1, 1]``. The update that a layer
applies at strength 1 is ``(alpha / r) * up @ down``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import torch

from ..errors import LoraError

NAMINGS = ("diffusers", "ldm")


@dataclasses.dataclass
class LoraLayer:
    """One adapted layer: low-rank factors and the alpha that scales them."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() not in (2, 4):
            raise LoraError(f"LoRA factors must be 2-D (linear) or 4-D (conv); got down {tuple(self.down.shape)}, up {tuple(self.up.shape)}")
        if self.down.shape[0] != self.up.shape[1]:
            raise LoraError(f"LoRA rank mismatch: down {tuple(self.down.shape)} has rank {self.down.shape[0]}, up {tuple(self.up.shape)} has {self.up.shape[1]}")
        self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor ``alpha / rank`` that ComfyUI, kohya and peft apply to ``up @ down``."""
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return int(self.down[0].numel())

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this layer adapts (conv kernels taken from ``down``)."""
        if self.is_conv:
            return (self.out_features, self.down.shape[1], self.down.shape[2], self.down.shape[3])
        return (self.out_features, self.in_features)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full update ``scale * up @ down`` as an ``[out, in*k*k]`` matrix."""
        up = self.up.reshape(self.up.shape[0], -1).to(dtype)
        down = self.down.reshape(self.down.shape[0], -1).to(dtype)
        return (up @ down) * self.scale

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoraLayer":
        return LoraLayer(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype), self.alpha)


@dataclasses.dataclass
class LoraSet:
    """A set of LoRA layers for one denoiser, with the naming style of its layer names and metadata."""

    layers: dict[str, LoraLayer]
    naming: str = "diffusers"
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.naming not in NAMINGS:
            raise LoraError(f"Unknown layer naming {self.naming!r}; expected one of {NAMINGS}.")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __getitem__(self, name: str) -> LoraLayer:
        return self.layers[name]

    def items(self):
        return self.layers.items()

    @property
    def ranks(self) -> dict[str, int]:
        return {n: l.rank for n, l in self.layers.items()}

    @property
    def max_rank(self) -> int:
        return max((l.rank for l in self.layers.values()), default=0)

    @property
    def alphas(self) -> set[float]:
        return {l.alpha for l in self.layers.values()}

    def fingerprint(self, bytes_per_tensor: int | None = None) -> str:
        """A short hash of the layer names, factors and alphas (of each factor its first ``bytes_per_tensor``
        bytes as float32, or all of it): which LoRA a run, a cache entry or a checkpoint folder belongs to."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.layers):
            layer = self.layers[name]
            h.update(name.encode())
            for t in (layer.down, layer.up):
                data = t.detach().float().contiguous().cpu().numpy().tobytes()
                h.update(data if bytes_per_tensor is None else data[:bytes_per_tensor])
            h.update(str(layer.alpha).encode())
        return h.hexdigest()[:16]

    def to(self, dtype: torch.dtype | None = None, device=None) -> "LoraSet":
        return LoraSet({n: l.to(dtype, device) for n, l in self.layers.items()}, self.naming, dict(self.metadata))

    def renamed(self, mapping: Mapping[str, str], naming: str) -> "LoraSet":
        """Rename every layer through ``mapping`` into ``naming``; a name missing from it is an error."""
        missing = [n for n in self.layers if n not in mapping]
        if missing:
            raise LoraError(
                f"LoRA layer {missing[0]!r} has no counterpart in {naming} naming "
                f"({len(missing)} such layers); is this LoRA for a different model architecture?")
        return LoraSet({mapping[n]: l for n, l in self.layers.items()}, naming, dict(self.metadata))

    def scaled(self, factor: float) -> "LoraSet":
        """The same set with every update multiplied by ``factor`` (folded into ``up``)."""
        return LoraSet({n: LoraLayer(l.down, l.up * factor, l.alpha) for n, l in self.layers.items()},
                       self.naming, dict(self.metadata))

    def allclose(self, other: "LoraSet", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        """True when both sets have the same layers and the same updates (factors may differ)."""
        if set(self.layers) != set(other.layers):
            return False
        return all(torch.allclose(self.layers[n].delta(), other.layers[n].delta(), rtol=rtol, atol=atol) for n in self.layers)

    def check_fits(self, weight_shapes: Mapping[str, tuple[int, ...]], what: str = "model") -> None:
        """Raise a :class:`LoraError` naming the first layer that is absent or whose shape does not fit."""
        for name, layer in self.layers.items():
            if name not in weight_shapes:
                raise LoraError(f"LoRA layer {name!r} does not exist in the {what}; the LoRA was made for another architecture.")
            want = tuple(weight_shapes[name])
            have = layer.weight_shape()
            flat_want = (want[0], int(torch.Size(want[1:]).numel()))
            if (have[0], int(torch.Size(have[1:]).numel())) != flat_want:
                raise LoraError(
                    f"LoRA layer {name!r} does not fit the {what}: the LoRA expects a weight of shape {have}, "
                    f"the {what}'s weight is {want}. The LoRA was trained on a different base model.")
