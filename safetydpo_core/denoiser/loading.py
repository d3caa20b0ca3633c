"""Loading a diffusers text-to-image model from local disk into its parts.

MODEL may be a diffusers pipeline folder (``model_index.json`` with ``unet/``, ``scheduler/``,
``text_encoder/``, ``tokenizer/`` and optionally ``vae/``, ``text_encoder_2/``, ``tokenizer_2/``), a
single-file SD1.5/SDXL ``.safetensors`` checkpoint (see :mod:`.single_file`), or a hub id already in the
local Hugging Face cache. Nothing is downloaded, and weights are read from ``.safetensors`` only
(``use_safetensors=True``): a component that has only pickled ``.bin`` weights is refused, so no torch
version ever unpickles a model file. A folder without ``vae/`` is a pixel-space model (the
built-in concept world ships one). An optional ``safetydpo.json`` in the folder carries the pack's own
facts about the model (for example its ``base_model_version``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError


@dataclasses.dataclass
class DiffusersComponents:
    unet: Any
    scheduler: Any
    tokenizers: list
    text_encoders: list
    vae: Any | None
    source: str
    info: dict


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not os.path.exists(s) and not s.startswith((".", "/", "~"))


def load_components(model: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, config: str | os.PathLike | None = None) -> DiffusersComponents:
    """Load the parts of a local diffusers model (or single-file checkpoint) for the diffusers backend.

    ``config``: for a single-file checkpoint, a diffusers folder whose configs and tokenizers describe it
    (default: the SD1.5/SDXL configs shipped with this package and a CLIP tokenizer found on this machine).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    src = str(model)
    p = Path(src).expanduser()
    if p.is_file():
        from .single_file import load_single_file

        return load_single_file(p, device=device, dtype=dtype, config=config)
    kw: dict[str, Any] = {}
    if p.is_dir():
        if not (p / "unet" / "config.json").exists():
            raise ModelError(f"MODEL {p} is not a diffusers pipeline folder: it has no unet/config.json. "
                             f"Give a diffusers folder (with model_index.json) or a single-file .safetensors checkpoint.")
        root: str = str(p)
    elif _looks_like_hub_id(src):
        root, kw = src, {"local_files_only": True}
    else:
        raise ModelError(f"MODEL {src} does not exist. Give a local diffusers pipeline folder or a .safetensors checkpoint "
                         f"(nothing is downloaded).")
    w = {**kw, "use_safetensors": True}  # weights: safetensors only, never a pickle
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **w)
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw)
        tokenizers, encoders = [], []
        tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
        tokenizers.append(tok)
        encoders.append(CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype, **w))
        if p.is_dir() and (p / "text_encoder_2").exists() or (not p.is_dir() and "text_encoder_2" in _model_index(root, kw)):
            tokenizers.append(AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", torch_dtype=dtype,
                                                                        **w))
        vae = None
        if (p.is_dir() and (p / "vae" / "config.json").exists()) or (not p.is_dir() and "vae" in _model_index(root, kw)):
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **w)
    except (OSError, ValueError) as e:
        pickled = _pickled_only(p) if p.is_dir() else []
        if pickled:
            raise ModelError(f"MODEL {src}: {', '.join(pickled)} has only pickled weights (.bin/.pt/.ckpt), which are "
                             f"refused because loading them can run arbitrary code. Convert them to .safetensors "
                             f"(e.g. diffusers' save_pretrained(safe_serialization=True)).") from e
        raise ModelError(f"Cannot load the diffusers model {src}: {e}") from e
    info = {}
    if p.is_dir() and (p / "safetydpo.json").exists():
        info = json.loads((p / "safetydpo.json").read_text(encoding="utf-8"))
    for m in [unet, vae, *encoders]:
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return DiffusersComponents(unet, scheduler, tokenizers, encoders, vae, src, info)


def _pickled_only(folder: Path) -> list[str]:
    """Component folders that hold pickled weight files and no safetensors."""
    found = []
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        d = folder / part
        if d.is_dir() and not list(d.glob("*.safetensors")) and any(
                f.suffix in (".bin", ".pt", ".pth", ".ckpt") for f in d.iterdir()):
            found.append(f"{part}/")
    return found


def _model_index(root: str, kw: dict) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(root, "model_index.json", **kw), encoding="utf-8") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - a missing index just means "no optional parts"
        return {}
