"""The experts of a merge: loading, labels and categories, and bringing N LoRA sets onto one footing.

Experts met in practice differ: ranks, alphas, target layers (one adapts attention only, another also the
feed-forward layers), key styles (kohya ``lora_unet_*``, ComfyUI ``diffusion_model.*``, diffusers/peft
``lora_A/lora_B``) and therefore layer naming (diffusers or LDM). :func:`align_experts` converts every
expert to one naming, checks that every layer fits the model (or, without a model, that experts agree on
each layer's shape), and refuses an expert trained on a different base model, naming the layer and both
shapes. A layer that one expert lacks is that expert's zero update; the merge works on the union.
Alphas are never dropped: every merge folds ``alpha / rank`` into the factors it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..categories import normalize_categories
from ..errors import ConfigError, LoraError
from ..lora.io import load_lora
from ..lora.lora_set import LoraLayer, LoraSet
from ..lora.unet_names import UNetNames

log = logging.getLogger(__name__)

CATEGORY_KEYS = ("safetydpo_category", "safetydpo_categories")


def expert_categories(lora: LoraSet) -> list[str]:
    """Canonical categories an expert declares in its metadata (``safetydpo_category``), or ``[]``.

    The value may be one id, a comma-separated list or a JSON list; unknown spellings are ignored with a
    warning (the file is still usable, only the default calibration prompts cannot be chosen from it).
    """
    out: list[str] = []
    for key in CATEGORY_KEYS:
        raw = lora.metadata.get(key)
        if not raw:
            continue
        value: object = raw
        if raw.strip().startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        try:
            out.extend(normalize_categories(value if isinstance(value, (str, list)) else str(value)))
        except ConfigError as e:
            log.warning("expert %s: %s", lora.metadata.get("safetydpo_source", "?"), e)
    return list(dict.fromkeys(out))


def expert_label(lora: LoraSet, index: int) -> str:
    """A short name for reports: the expert's categories, else its file name, else ``expert<i>``."""
    cats = expert_categories(lora)
    if cats:
        return "+".join(cats)
    src = lora.metadata.get("safetydpo_source")
    if src:
        return Path(src).stem
    return f"expert{index}"


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab}#{n + 1}")
    return out


def load_experts(paths: Sequence[str | os.PathLike], names: UNetNames | None = None) -> list[LoraSet]:
    """Read expert files in any supported key style (kohya keys need ``names``)."""
    if len(paths) == 0:
        raise ConfigError("No expert LoRA files were given; pass at least one (two or more to merge).")
    experts = []
    for p in paths:
        lora = load_lora(p, names=names)
        lora.metadata["safetydpo_source"] = str(p)
        experts.append(lora)
    return experts


def _describe(lora: LoraSet, index: int) -> str:
    src = lora.metadata.get("safetydpo_source")
    return f"expert {index + 1} ({src})" if src else f"expert {index + 1}"


def align_experts(experts: Sequence[LoraSet], naming: str | None = None, names: UNetNames | None = None,
                  weight_shapes: Mapping[str, tuple[int, ...]] | None = None, what: str = "model") -> list[LoraSet]:
    """Convert every expert into ``naming`` and check that they fit the model and each other.

    ``names`` converts between diffusers and LDM naming (needed only when the experts' naming differs from
    ``naming``). ``weight_shapes`` are the model's weight shapes in ``naming``; without them, experts are
    only checked against each other. Returns new :class:`LoraSet` objects (tensors shared, not copied).
    """
    if not experts:
        raise ConfigError("No experts to merge.")
    naming = naming or experts[0].naming
    out: list[LoraSet] = []
    for i, lora in enumerate(experts):
        if len(lora) == 0:
            raise LoraError(f"{_describe(lora, i)} has no layers.")
        if lora.naming != naming:
            if names is None:
                raise LoraError(f"{_describe(lora, i)} uses {lora.naming} layer names but the merge works in {naming} "
                                f"naming; give the model so that names can be converted.")
            try:
                lora = names.convert_lora(lora, naming)
            except LoraError as e:
                raise LoraError(f"{_describe(experts[i], i)}: {e}") from e
        if weight_shapes is not None:
            try:
                lora.check_fits(weight_shapes, what)
            except LoraError as e:
                raise LoraError(f"{_describe(experts[i], i)}: {e} Merge only experts trained on this base model.") from e
        out.append(lora)
    seen: dict[str, tuple[int, tuple[int, ...]]] = {}
    for i, lora in enumerate(out):
        for name, layer in lora.items():
            shape = layer.weight_shape()
            if name in seen and seen[name][1] != shape:
                j, other = seen[name]
                raise LoraError(
                    f"Layer {name!r}: {_describe(experts[i], i)} adapts a weight of shape {shape} but "
                    f"{_describe(experts[j], j)} one of shape {other}; the experts were trained on different base "
                    f"models and cannot be merged.")
            seen.setdefault(name, (i, shape))
    versions = {lora.metadata.get("ss_base_model_version") for lora in experts} - {None}
    if len(versions) > 1:
        log.warning("experts declare different base models %s; their shapes fit, merging anyway", sorted(versions))
    return out


def layer_union(experts: Sequence[LoraSet]) -> list[str]:
    """Every layer adapted by at least one expert, in first-seen order."""
    return list(dict.fromkeys(n for e in experts for n in e.layers))


def layer_group(experts: Sequence[LoraSet], name: str) -> list[LoraLayer | None]:
    """The experts' layers for ``name``; ``None`` where an expert does not adapt it (a zero update)."""
    return [e.layers.get(name) for e in experts]


def expert_fingerprint(lora: LoraSet) -> str:
    """A short hash of an expert's ``down`` matrices (what calibration's rank statistics depend on)."""
    h = hashlib.sha1()
    for name in sorted(lora.layers):
        d = lora.layers[name].down.detach().to(torch.float32).contiguous().cpu()
        h.update(name.encode())
        h.update(d.numpy().tobytes())
    return h.hexdigest()[:16]
