"""Reading and writing LoRA ``.safetensors`` files, with metadata, atomically.

Files are always safetensors: anything else is refused, so nothing is ever unpickled. Writes go to a
temporary file that is renamed over the target only when complete.

Metadata follows kohya's ``ss_*`` keys (``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``,
``ss_base_model_version``), which A1111/Forge and civitai read, plus this pack's ``safetydpo_*`` keys
(category, objective, beta, steps, seed, dataset and base-model fingerprints, pack version, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..errors import LoraError
from ..utils.atomic import atomic_path
from ..utils.numbers import check_finite_tensors
from .keys import default_key_style, from_state_dict, to_state_dict
from .lora_set import LoraSet
from .unet_names import UNetNames


def check_safetensors_path(path: str | os.PathLike, what: str = "weight file") -> Path:
    """Refuse anything that is not an existing ``.safetensors`` file (no pickles, ever)."""
    p = Path(path)
    if not p.exists():
        raise LoraError(f"The {what} {p} does not exist.")
    if p.is_dir():
        raise LoraError(f"The {what} {p} is a folder; give the .safetensors file inside it.")
    if p.suffix.lower() != ".safetensors":
        raise LoraError(f"The {what} {p} is not a .safetensors file. Pickled formats (.ckpt, .pt, .bin, .pth) are "
                        f"refused because loading them can run arbitrary code; convert it to safetensors first.")
    return p


def read_safetensors(path: str | os.PathLike, what: str = "LoRA file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a clear error when it is not one."""
    p = check_safetensors_path(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"The {what} {p} cannot be read as safetensors: {e}. Is it complete and not corrupted?") from e
    return tensors, meta


def build_metadata(lora: LoraSet, extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` keys plus ``safetydpo_*`` keys; every value a string, as safetensors requires."""
    ranks = sorted(set(lora.ranks.values()))
    alphas = sorted(lora.alphas)
    meta = {k: str(v) for k, v in lora.metadata.items()}
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": (f"{alphas[0]:g}" if len(alphas) == 1 else "dynamic"),
        "safetydpo_version": __version__,
        "safetydpo_layers": str(len(lora)),
    })
    meta.setdefault("ss_base_model_version", "sd_v1")
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_lora(lora: LoraSet, path: str | os.PathLike, names: UNetNames | None = None, fmt: str | None = None,
              naming: str | None = None, dtype: torch.dtype | None = None,
              metadata: Mapping[str, object] | None = None, diff: bool = False) -> Path:
    """Write ``lora`` to ``path`` (``.safetensors``) atomically; returns the path.

    ``fmt``/``naming`` default to what kohya writes for the base model in ``ss_base_model_version``.
    ``diff``: write each layer's update as full-rank ``.diff`` weights instead of LoRA factors
    (:mod:`.keys`; ComfyUI and A1111 load them, diffusers' ``load_lora_weights`` does not).
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA output {p} must end in .safetensors.")
    if len(lora) == 0:
        raise LoraError("Refusing to write an empty LoRA (no layers).")
    meta = build_metadata(lora, metadata)
    family_version = getattr(names, "base_model_version", None)  # the transformers' names know their family
    if family_version and "ss_base_model_version" not in lora.metadata and "ss_base_model_version" not in (metadata or {}):
        meta["ss_base_model_version"] = family_version
    dfmt, dnaming = default_key_style(meta.get("ss_base_model_version", "sd_v1"))
    fmt = fmt or dfmt
    naming = {"comfy": "ldm", "peft": "diffusers"}.get(fmt) or naming or (dnaming if names is not None else lora.naming)
    sd = to_state_dict(lora, fmt=fmt, naming=naming, names=names, dtype=dtype, diff=diff)
    check_finite_tensors(sd, f"Refusing to write the LoRA {p}", LoraError)
    meta["safetydpo_key_format"] = f"{fmt}/{naming}"
    if diff:
        meta["safetydpo_key_kind"] = "diff"
        meta["ss_network_dim"] = "full"
    with atomic_path(p, "LoRA file") as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return p


def load_lora(path: str | os.PathLike, names: UNetNames | None = None) -> LoraSet:
    """Read a LoRA file in kohya, ComfyUI or diffusers/peft format into a :class:`LoraSet`."""
    tensors, meta = read_safetensors(path, "LoRA file")
    if not tensors:
        raise LoraError(f"The LoRA file {path} holds no tensors.")
    check_finite_tensors(tensors, f"The LoRA file {path}", LoraError)
    try:
        lora = from_state_dict(tensors, names=names, metadata=meta, source=f"LoRA file {path}")
    except LoraError as e:
        msg = str(e)
        raise LoraError(msg if str(path) in msg else f"LoRA file {path}: {msg}") from e
    lora.metadata.setdefault("safetydpo_source", str(path))
    return lora
