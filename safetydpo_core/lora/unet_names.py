"""Module names of a UNet in diffusers and in LDM (ComfyUI / original Stable Diffusion) style, and the map.

ComfyUI and SDXL kohya files name layers the LDM way (``input_blocks.4.1.transformer_blocks.0.attn2.to_k``),
diffusers and SD1.5 kohya files the diffusers way (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``).
:class:`UNetNames` lists every weight-carrying module of one UNet architecture in both styles and converts
names between them. It is built from a diffusers ``UNet2DConditionModel`` config (the model is instantiated
on the meta device, so this costs no memory) or from the names of a live module.

The mapping follows the layout of ``UNet2DConditionModel`` with the standard block types
(``CrossAttnDownBlock2D``, ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, ...), which is the layout of
SD1.x, SD2.x and SDXL.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Mapping

import torch

from ..errors import LoraError

_RESNET_SUB = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def flat(name: str) -> str:
    """The kohya form of a module path: dots replaced by underscores."""
    return name.replace(".", "_")


def weight_modules(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and weight shapes of every submodule that owns a ``weight`` parameter."""
    out = {}
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if name and isinstance(w, torch.Tensor) and not hasattr(m, "base_layer"):
            out[name] = tuple(w.shape)
    return out


class UNetNames:
    """Every weight-carrying module of one UNet, in diffusers and LDM naming, with shapes."""

    def __init__(self, diffusers_shapes: Mapping[str, tuple[int, ...]], config: Mapping):
        self.config = dict(config)
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {"diffusers": dict(diffusers_shapes)}
        self.to_ldm: dict[str, str] = {n: diffusers_to_ldm(n, self.config) for n in diffusers_shapes}
        self.to_diffusers: dict[str, str] = {v: k for k, v in self.to_ldm.items()}
        if len(self.to_diffusers) != len(self.to_ldm):
            dupes = sorted({v for v in self.to_ldm.values() if list(self.to_ldm.values()).count(v) > 1})
            raise LoraError(f"UNet layout not understood: several layers map to {dupes[:3]} in LDM naming.")
        self.shapes["ldm"] = {self.to_ldm[n]: s for n, s in diffusers_shapes.items()}
        self._flat = {}
        for naming in ("diffusers", "ldm"):
            for n in self.shapes[naming]:
                self._flat.setdefault(flat(n), (naming, n))

    @classmethod
    def from_config(cls, config: Mapping) -> "UNetNames":
        """Build from a diffusers ``UNet2DConditionModel`` config (dict or path to ``config.json``)."""
        if not isinstance(config, Mapping):
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        return _from_config_json(json.dumps(_clean_config(config), sort_keys=True))

    @classmethod
    def from_module(cls, unet: torch.nn.Module) -> "UNetNames":
        """Build from a live diffusers UNet (its config and its module names)."""
        return cls(weight_modules(unet), dict(unet.config))

    def names(self, naming: str) -> list[str]:
        return list(self.shapes[naming])

    def convert(self, name: str, to: str) -> str:
        """Convert one module name into ``to`` naming (a name already in that naming is returned as is)."""
        if name in self.shapes[to]:
            return name
        table = self.to_ldm if to == "ldm" else self.to_diffusers
        if name not in table:
            raise LoraError(f"Layer {name!r} does not exist in this UNet (in either naming).")
        return table[name]

    def mapping(self, src: str, dst: str) -> dict[str, str]:
        if src == dst:
            return {n: n for n in self.shapes[src]}
        return dict(self.to_ldm) if dst == "ldm" else dict(self.to_diffusers)

    def convert_lora(self, lora, naming: str):
        """``lora`` (a :class:`~.lora_set.LoraSet`) renamed into ``naming`` (one layer to one layer in a UNet)."""
        if lora.naming == naming:
            return lora
        return lora.renamed(self.mapping(lora.naming, naming), naming)

    def resolve_flat(self, flat_name: str) -> tuple[str, str]:
        """Undo kohya's dot-to-underscore: ``(naming, dotted name)`` for a flat module name."""
        hit = self._flat.get(flat_name)
        if hit is None:
            raise LoraError(f"LoRA key 'lora_unet_{flat_name}' names no layer of this UNet; the LoRA was made for another architecture.")
        return hit


def _clean_config(config: Mapping) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@functools.lru_cache(maxsize=8)
def _from_config_json(config_json: str) -> UNetNames:
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return UNetNames(weight_modules(unet), config)


def _per_level(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def diffusers_to_ldm(name: str, config: Mapping) -> str:
    """Map one diffusers UNet module path to its LDM path (see the module docstring)."""
    for k, v in _TOP.items():
        if name == k or name.startswith(k + "."):
            return v + name[len(k):]
    n_levels = len(config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = _per_level(config.get("layers_per_block", 2), n_levels)
    up_types = config.get("up_block_types", ())

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + sum(layers[l] + 1 for l in range(i))
        if kind == "downsamplers":
            rest = "op" + rest[len("conv"):] if rest.startswith("conv") else rest
            return f"input_blocks.{base + layers[i]}.0.{rest}"
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{_resnet_sub(rest)}"
        return f"input_blocks.{base + j}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if j == 0 else 2}.{_resnet_sub(rest)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        up_layers = list(reversed(layers))
        base = sum(up_layers[l] + 1 for l in range(i))
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{_resnet_sub(rest)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{rest}"
        has_attn = "CrossAttn" in (up_types[i] if i < len(up_types) else "")
        return f"output_blocks.{base + up_layers[i]}.{2 if has_attn else 1}.{rest}"
    raise LoraError(f"No LDM name is known for the diffusers layer {name!r}.")


def _resnet_sub(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head in _RESNET_SUB:
        return _RESNET_SUB[head] + ("." + tail if tail else "")
    return rest

