"""Loading a diffusers text-to-image model from local disk into its parts.

MODEL may be a diffusers pipeline folder (``model_index.json`` with ``unet/``, ``scheduler/``,
``text_encoder/``, ``tokenizer/`` and optionally ``vae/``, ``text_encoder_2/``, ``tokenizer_2/``), a
single-file SD1.5/SDXL ``.safetensors`` checkpoint (see :mod:`.single_file`), or a hub id already in the
local Hugging Face cache. Nothing is downloaded, and weights are read from ``.safetensors`` only
(``use_safetensors=True``): a component that has only pickled ``.bin`` weights is refused, so no torch
version ever unpickles a model file.

Flow-matching pipelines (SD3 / SD3.5: ``StableDiffusion3Pipeline``; Flux.1: ``FluxPipeline``) have a
``transformer/`` instead of ``unet/``: the transformer (``SD3Transformer2DModel`` / ``FluxTransformer2DModel``),
a ``FlowMatchEulerDiscreteScheduler``, the text encoders named in ``model_index.json`` (CLIP-L/CLIP-G/T5 for
SD3, where T5 may be left out; CLIP-L/T5 for Flux) with their tokenizers, and the 16-channel VAE. Any other
diffusers pipeline (a video model, an inpainting UNet, ...) is refused with the list of what can be trained. A folder without ``vae/`` is a pixel-space model (the
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


SUPPORTED = ("SD1.x/SD2.x and SDXL (UNet2DConditionModel pipelines), SD3/SD3.5 (StableDiffusion3Pipeline) and "
             "Flux.1 (FluxPipeline)")
FLOW_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


@dataclasses.dataclass
class DiffusersComponents:
    unet: Any
    scheduler: Any
    tokenizers: list
    text_encoders: list
    vae: Any | None
    source: str
    info: dict
    transformer: Any | None = None      # SD3 / Flux pipelines (then ``unet`` is None)


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
        if (p / "transformer" / "config.json").exists():
            return load_flow_components(p, device=device, dtype=dtype)
        if not (p / "unet" / "config.json").exists():
            what = ""
            if (p / "model_index.json").exists():
                what = f" ({json.loads((p / 'model_index.json').read_text(encoding='utf-8')).get('_class_name', '?')})"
            raise ModelError(f"MODEL {p}{what} is not a pipeline this pack can train: it has neither unet/config.json nor "
                             f"transformer/config.json. Supported: {SUPPORTED}, as diffusers folders, or single-file "
                             f"SD1.5/SDXL .safetensors checkpoints.")
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


def load_flow_components(folder: Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> DiffusersComponents:
    """The parts of a local SD3 / SD3.5 or Flux.1 diffusers folder (see the module docstring)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {}
    tcfg = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    cls_name = tcfg.get("_class_name", "")
    if cls_name not in FLOW_TRANSFORMERS:
        raise ModelError(f"MODEL {folder} has a {cls_name or 'unknown'} transformer, which this pack cannot train. "
                         f"Supported: {SUPPORTED}.")
    try:
        transformer = getattr(diffusers, cls_name).from_pretrained(str(folder), subfolder="transformer", torch_dtype=dtype,
                                                                  use_safetensors=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
        tokenizers, encoders = [], []
        for i, (enc_key, tok_key) in enumerate((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                                                 ("text_encoder_3", "tokenizer_3"))):
            entry = index.get(enc_key)
            present = (folder / enc_key / "config.json").exists()
            if not present or (isinstance(entry, list) and entry and entry[0] is None):
                if i < 2:  # CLIP-L + CLIP-G (SD3) or CLIP-L + T5 (Flux); SD3 runs without its T5
                    raise ModelError(f"MODEL {folder} lacks {enc_key}/, which {cls_name} pipelines need.")
                continue
            enc_cls_name = (entry[1] if isinstance(entry, list) and len(entry) == 2 else None) or \
                json.loads((folder / enc_key / "config.json").read_text(encoding="utf-8")).get("architectures", [""])[0]
            enc_cls = getattr(transformers, enc_cls_name, None)
            if enc_cls is None:
                raise ModelError(f"MODEL {folder}: the text encoder class {enc_cls_name!r} of {enc_key}/ is unknown.")
            tokenizers.append(AutoTokenizer.from_pretrained(str(folder / tok_key)))
            encoders.append(enc_cls.from_pretrained(str(folder), subfolder=enc_key, torch_dtype=dtype, use_safetensors=True))
        vae = None
        if (folder / "vae" / "config.json").exists():
            vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the diffusers model {folder}: {e}") from e
    info = {}
    if (folder / "safetydpo.json").exists():
        info = json.loads((folder / "safetydpo.json").read_text(encoding="utf-8"))
    for m in [transformer, vae, *encoders]:
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return DiffusersComponents(None, scheduler, tokenizers, encoders, vae, str(folder), info, transformer=transformer)
