"""Layer names of the flow-matching transformers (SD3 / SD3.5 MMDiT and Flux.1) in both namings, with the
fused layers mapped, and LoRA conversion between the namings.

* ``"diffusers"``: the module paths of diffusers' ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``,
  with separate ``to_q`` / ``to_k`` / ``to_v`` (and Flux's single-block ``proj_mlp``);
* ``"ldm"``: the original checkpoints' paths, which ComfyUI's ``diffusion_model`` uses and kohya's sd-scripts
  writes (``joint_blocks.3.x_block.attn.qkv``, ``double_blocks.3.img_attn.qkv``, ``single_blocks.7.linear1``),
  where q, k and v (and in Flux's single blocks also the MLP input) are one fused linear layer.

The map follows ComfyUI's own (``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``; checked against it in
the tests, on the full SD3.5 and Flux.1-dev layer lists): a fused ldm layer is a stack of row blocks, one per
diffusers layer (``q, k, v`` each as many rows as the layer's input width; Flux's ``linear1`` then the MLP
rows). The final (and SD3's last context) adaLN layers hold ``(shift, scale)`` in ldm order and
``(scale, shift)`` in diffusers order, so their rows are swapped on the way.

LoRA conversion (:meth:`TransformerNames.convert_lora`) is exact both ways:

* ldm -> diffusers: a fused layer's ``up`` is cut into the parts' rows, each part keeping the shared
  ``down`` (same rank);
* diffusers -> ldm: when the parts share one ``down`` and alpha (a LoRA that came from a fused one) their
  ``up`` matrices are stacked (same rank); otherwise the ``down`` matrices are stacked and the ``up``
  matrices placed block-diagonally with their scales folded in (rank = the sum of the parts' ranks). A part
  that the LoRA lacks contributes zero rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import LoraError
from .lora_set import LoraLayer, LoraSet
from .unet_names import flat

FAMILIES = ("sd3", "flux")
BASE_MODEL_VERSIONS = {"sd3": "sd3", "flux": "flux1"}  # kohya's ss_base_model_version (sd-scripts writes "flux1")

# (ldm suffix, diffusers parts, swap rows) per block kind; "{pre_only}" swaps only in SD3's context-pre-only block
_SD3_BLOCK = [
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), False),
    ("x_block.attn.proj", ("attn.to_out.0",), False),
    ("x_block.attn2.proj", ("attn2.to_out.0",), False),
    ("context_block.attn.proj", ("attn.to_add_out",), False),
    ("x_block.mlp.fc1", ("ff.net.0.proj",), False),
    ("x_block.mlp.fc2", ("ff.net.2",), False),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",), False),
    ("context_block.mlp.fc2", ("ff_context.net.2",), False),
    ("x_block.adaLN_modulation.1", ("norm1.linear",), False),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",), "pre_only"),
]
_SD3_TOP = [
    ("context_embedder", ("context_embedder",), False),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), False),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), False),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), False),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), False),
    ("x_embedder.proj", ("pos_embed.proj",), False),
    ("final_layer.linear", ("proj_out",), False),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
]
_FLUX_DOUBLE = [
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    ("img_attn.proj", ("attn.to_out.0",), False),
    ("txt_attn.proj", ("attn.to_add_out",), False),
    ("img_mlp.0", ("ff.net.0.proj",), False),
    ("img_mlp.2", ("ff.net.2",), False),
    ("txt_mlp.0", ("ff_context.net.0.proj",), False),
    ("txt_mlp.2", ("ff_context.net.2",), False),
    ("img_mod.lin", ("norm1.linear",), False),
    ("txt_mod.lin", ("norm1_context.linear",), False),
]
_FLUX_SINGLE = [
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), False),
    ("linear2", ("proj_out",), False),
    ("modulation.lin", ("norm.linear",), False),
]
_FLUX_TOP = [
    ("img_in", ("x_embedder",), False),
    ("txt_in", ("context_embedder",), False),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), False),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), False),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), False),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), False),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), False),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), False),
    ("final_layer.linear", ("proj_out",), False),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
]
# (ldm block prefix regex, diffusers block prefix format, rules)
_BLOCKS = {
    "sd3": [(r"joint_blocks\.(\d+)\.", "transformer_blocks.{}.", _SD3_BLOCK)],
    "flux": [(r"double_blocks\.(\d+)\.", "transformer_blocks.{}.", _FLUX_DOUBLE),
             (r"single_blocks\.(\d+)\.", "single_transformer_blocks.{}.", _FLUX_SINGLE)],
}
_TOP = {"sd3": _SD3_TOP, "flux": _FLUX_TOP}

# LoRA target presets per family and naming: the attention projections of both streams (Flux: the single
# blocks' fused q/k/v + MLP-input layer and its output layer too); "attn+ff" adds the MLPs.
PRESETS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "sd3": {
        "ldm": {"attn": ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")},
        "diffusers": {"attn": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                               "to_add_out")},
    },
    "flux": {
        "ldm": {"attn": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "single_blocks.*.linear1",
                         "single_blocks.*.linear2")},
        "diffusers": {"attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                               "single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out")},
    },
}
_FF = {"sd3": {"ldm": ("mlp.fc1", "mlp.fc2"),
               "diffusers": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")},
       "flux": {"ldm": ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"),
                "diffusers": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")}}
for _fam, _by_naming in PRESETS.items():
    for _naming, _p in _by_naming.items():
        _p["attn+ff"] = _p["attn"] + _FF[_fam][_naming]


def presets(family: str, naming: str) -> dict[str, tuple[str, ...]]:
    return PRESETS[family][naming]


@dataclasses.dataclass(frozen=True)
class Relation:
    """One ldm layer and the diffusers layers that make it up (row blocks, in order)."""

    ldm: str
    parts: tuple[tuple[str, int], ...]   # (diffusers name, rows)
    swap: bool                           # (shift, scale) <-> (scale, shift) rows

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def family_of_config(config: Mapping) -> str:
    """``sd3`` or ``flux`` from a diffusers transformer config."""
    cls = str(config.get("_class_name", ""))
    if cls.startswith("SD3") or "caption_projection_dim" in config:
        return "sd3"
    if cls.startswith("Flux") or "num_single_layers" in config:
        return "flux"
    raise LoraError(f"Transformer config not understood (class {cls or '?'}): only SD3/SD3.5 (SD3Transformer2DModel) and "
                    f"Flux.1 (FluxTransformer2DModel) transformers are supported.")


def _swap(up: torch.Tensor) -> torch.Tensor:
    a, b = up.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class TransformerNames:
    """Every linear/conv layer of one SD3 or Flux transformer, in diffusers and ldm naming, with shapes, the
    fused layers mapped (see the module docstring)."""

    def __init__(self, family: str, shapes: Mapping[str, tuple[int, ...]], naming: str = "diffusers"):
        if family not in FAMILIES:
            raise LoraError(f"Unknown transformer family {family!r}; known: {', '.join(FAMILIES)}.")
        self.family = family
        self.base_model_version = BASE_MODEL_VERSIONS[family]
        shapes = {n: tuple(s) for n, s in shapes.items() if len(s) >= 2}
        self.relations: list[Relation] = _relations(family, shapes, naming)
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {"diffusers": {}, "ldm": {}}
        self.to_part: dict[str, tuple[Relation, int]] = {}     # diffusers name -> (relation, row offset)
        self.by_ldm: dict[str, Relation] = {}
        for rel in self.relations:
            first = rel.parts[0][0]
            inner = _inner(shapes, naming, rel, first)
            offset = 0
            for name, rows in rel.parts:
                self.shapes["diffusers"][name] = (rows, *inner)
                self.to_part[name] = (rel, offset)
                offset += rows
            self.shapes["ldm"][rel.ldm] = (offset, *inner)
            self.by_ldm[rel.ldm] = rel
        unmapped = sorted(set(shapes) - set(self.shapes[naming]))
        if unmapped:
            raise LoraError(f"{family} transformer layout not understood: no {('ldm' if naming == 'diffusers' else 'diffusers')} "
                            f"name is known for {unmapped[0]!r} ({len(unmapped)} such layers).")
        self._flat: dict[str, tuple[str, str]] = {}
        for nm in ("ldm", "diffusers"):
            for n in self.shapes[nm]:
                self._flat.setdefault(flat(n), (nm, n))

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping) -> "TransformerNames":
        """From a diffusers transformer config (dict or path to ``config.json``); built on the meta device."""
        if not isinstance(config, Mapping):
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        return _from_config_json(json.dumps(dict(config), sort_keys=True, default=list))

    @classmethod
    def from_module(cls, module: torch.nn.Module, family: str | None = None, naming: str = "diffusers") -> "TransformerNames":
        from .unet_names import weight_modules

        if family is None:
            family = family_of_config(dict(getattr(module, "config", {})) | {"_class_name": type(module).__name__})
        return cls(family, weight_modules(module), naming)

    # -- the UNetNames interface --------------------------------------------------------------------
    def names(self, naming: str) -> list[str]:
        return list(self.shapes[naming])

    def convert(self, name: str, to: str) -> str:
        """One layer's name in ``to`` naming; a name already in it is returned as is. A diffusers part of a fused
        ldm layer has no ldm name of its own (convert whole LoRAs with :meth:`convert_lora`)."""
        if name in self.shapes[to]:
            return name
        if to == "diffusers":
            rel = self.by_ldm.get(name)
            if rel is None:
                raise LoraError(f"Layer {name!r} does not exist in this {self.family} transformer (in either naming).")
            if rel.fused:
                raise LoraError(f"The ldm layer {name!r} is fused from {[p for p, _ in rel.parts]}; convert whole LoRAs.")
            return rel.parts[0][0]
        hit = self.to_part.get(name)
        if hit is None:
            raise LoraError(f"Layer {name!r} does not exist in this {self.family} transformer (in either naming).")
        rel, _ = hit
        if rel.fused:
            raise LoraError(f"The diffusers layer {name!r} is one part of the fused ldm layer {rel.ldm!r}; convert whole LoRAs.")
        return rel.ldm

    def resolve_flat(self, flat_name: str) -> tuple[str, str]:
        """Undo kohya's dot-to-underscore: ``(naming, dotted name)`` for a flat module name."""
        hit = self._flat.get(flat_name)
        if hit is None:
            raise LoraError(f"LoRA key 'lora_unet_{flat_name}' names no layer of this {self.family} transformer; the LoRA "
                            f"was made for another architecture.")
        return hit

    def convert_lora(self, lora: LoraSet, naming: str) -> LoraSet:
        """``lora`` in ``naming`` (exact; see the module docstring)."""
        if lora.naming == naming:
            return lora
        if naming == "diffusers":
            return self._split(lora)
        return self._fuse(lora)

    def _split(self, lora: LoraSet) -> LoraSet:
        out: dict[str, LoraLayer] = {}
        for name, layer in lora.items():
            rel = self.by_ldm.get(name)
            if rel is None:
                raise LoraError(f"LoRA layer {name!r} has no counterpart in this {self.family} transformer; is this LoRA "
                                f"for a different model architecture?")
            up = _swap(layer.up) if rel.swap else layer.up
            if up.shape[0] != sum(r for _, r in rel.parts):
                raise LoraError(f"LoRA layer {name!r} has {up.shape[0]} output rows; the model's layer has "
                                f"{sum(r for _, r in rel.parts)}. The LoRA was trained on a different base model.")
            offset = 0
            for part, rows in rel.parts:
                out[part] = LoraLayer(layer.down.clone(), up[offset:offset + rows].clone(), layer.alpha)
                offset += rows
        return LoraSet(out, "diffusers", dict(lora.metadata))

    def _fuse(self, lora: LoraSet) -> LoraSet:
        groups: dict[str, dict[str, LoraLayer]] = {}
        for name, layer in lora.items():
            hit = self.to_part.get(name)
            if hit is None:
                raise LoraError(f"LoRA layer {name!r} has no counterpart in this {self.family} transformer; is this LoRA "
                                f"for a different model architecture?")
            groups.setdefault(hit[0].ldm, {})[name] = layer
        out: dict[str, LoraLayer] = {}
        for ldm, have in groups.items():
            rel = self.by_ldm[ldm]
            layers = list(have.values())
            total = sum(r for _, r in rel.parts)
            first = layers[0]
            shared = all(l.down.shape == first.down.shape and torch.equal(l.down, first.down) and l.alpha == first.alpha
                         for l in layers)
            if shared:
                up = first.up.new_zeros((total, first.rank) + tuple(first.up.shape[2:]))
                offset = 0
                for part, rows in rel.parts:
                    if part in have:
                        up[offset:offset + rows] = have[part].up
                    offset += rows
                down, alpha = first.down.clone(), first.alpha
            else:
                rank = sum(l.rank for l in layers)
                down = torch.cat([have[p].down for p, _ in rel.parts if p in have], dim=0)
                up = first.up.new_zeros((total, rank) + tuple(first.up.shape[2:]))
                offset, col = 0, 0
                for part, rows in rel.parts:
                    if part in have:
                        l = have[part]
                        up[offset:offset + rows, col:col + l.rank] = l.up * l.scale
                        col += l.rank
                    offset += rows
                alpha = float(rank)
            out[ldm] = LoraLayer(down, _swap(up) if rel.swap else up, alpha)
        return LoraSet(out, "ldm", dict(lora.metadata))

    def parts_of(self, ldm_name: str) -> list[str]:
        """The diffusers layers that one ldm layer is made of."""
        return [p for p, _ in self.by_ldm[ldm_name].parts]


def _inner(shapes: Mapping[str, tuple[int, ...]], naming: str, rel: Relation, first: str) -> tuple[int, ...]:
    return tuple((shapes[first] if naming == "diffusers" else shapes[rel.ldm])[1:])


def _relations(family: str, shapes: Mapping[str, tuple[int, ...]], naming: str) -> list[Relation]:
    """The ldm <-> diffusers relations of the layers in ``shapes`` (given in ``naming``)."""
    names = set(shapes)
    rels: list[Relation] = []
    blocks: set[tuple[str, str]] = set()  # (ldm prefix, diffusers prefix)
    for ldm_re, diff_fmt, _ in _BLOCKS[family]:
        for n in names:
            if naming == "ldm":
                m = re.match(ldm_re, n)
                if m:
                    blocks.add((m.group(0), diff_fmt.format(m[1])))
            else:
                m = re.match(re.escape(diff_fmt).replace(r"\{\}", r"(\d+)"), n)
                if m:
                    blocks.add((ldm_re.replace(r"(\d+)", m[1]).replace("\\", ""), m.group(0)))
    for ldm_pre, diff_pre in sorted(blocks, key=lambda b: (b[0].split(".")[0], int(b[0].split(".")[1]))):
        rules = next(r for lre, dfmt, r in _BLOCKS[family] if re.match(lre, ldm_pre) and diff_pre.startswith(dfmt.split("{")[0]))
        pre_only = (f"{ldm_pre}context_block.attn.proj" not in names if naming == "ldm"
                    else f"{diff_pre}attn.to_add_out" not in names)
        for ldm_suffix, parts, swap in rules:
            rel = _relation(shapes, naming, ldm_pre + ldm_suffix, [diff_pre + p for p in parts],
                            pre_only if swap == "pre_only" else bool(swap))
            if rel is not None:
                rels.append(rel)
    for ldm_name, parts, swap in _TOP[family]:
        rel = _relation(shapes, naming, ldm_name, list(parts), bool(swap))
        if rel is not None:
            rels.append(rel)
    return rels


def _relation(shapes, naming: str, ldm: str, parts: Sequence[str], swap: bool) -> Relation | None:
    if naming == "diffusers":
        if not all(p in shapes for p in parts):
            if any(p in shapes for p in parts):
                missing = [p for p in parts if p not in shapes]
                raise LoraError(f"Layer {missing[0]!r} is missing beside {[p for p in parts if p in shapes][0]!r}; "
                                f"the transformer layout is not understood.")
            return None
        return Relation(ldm, tuple((p, int(shapes[p][0])) for p in parts), swap)
    if ldm not in shapes:
        return None
    rows = int(shapes[ldm][0])
    if len(parts) == 1:
        return Relation(ldm, ((parts[0], rows),), swap)
    width = int(shapes[ldm][1])  # q, k and v each have the layer's input width (the hidden size)
    sizes = [width] * 3 + ([rows - 3 * width] if len(parts) == 4 else [])
    if sum(sizes) != rows or any(s <= 0 for s in sizes):
        raise LoraError(f"The fused layer {ldm!r} has {rows} rows, which do not split into {len(parts)} parts of "
                        f"input width {width}.")
    return Relation(ldm, tuple(zip(parts, sizes)), swap)


@functools.lru_cache(maxsize=8)
def _from_config_json(config_json: str) -> TransformerNames:
    from .unet_names import weight_modules

    config = json.loads(config_json)
    family = family_of_config(config)
    module = build_transformer(config, meta=True)
    return TransformerNames(family, weight_modules(module), "diffusers")


def build_transformer(config: Mapping, meta: bool = False):
    """A diffusers SD3 or Flux transformer from its config (on the meta device with ``meta``)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if family_of_config(config) == "sd3" else FluxTransformer2DModel
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    if meta:
        with torch.device("meta"):
            return cls.from_config(clean)
    return cls.from_config(clean)


def family_of_names(names: Iterable[str]) -> str | None:
    """``sd3``, ``flux`` or None from ldm or diffusers layer names."""
    names = list(names)
    if any(n.startswith(("joint_blocks.", "double_blocks.", "single_blocks.", "single_transformer_blocks."))
           for n in names):
        return "sd3" if any(n.startswith("joint_blocks.") for n in names) else "flux"
    return None
