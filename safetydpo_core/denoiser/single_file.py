"""Single-file SD1.5 / SDXL checkpoints (``.safetensors``) for the diffusers backend.

diffusers converts the original (LDM) layout with ``from_single_file`` given a diffusers-format config.
No hub is reachable, so the configs of SD1.5 and SDXL ship with this package (``configs/``), and the CLIP
tokenizer files are taken from, in order: ``SAFETYDPO_CLIP_TOKENIZER`` (a folder with ``vocab.json`` and
``merges.txt``), or a ComfyUI install at ``COMFYUI_PATH`` (its ``comfy/sd1_tokenizer``). Pickled
checkpoints (``.ckpt``) are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError

CONFIG_DIR = Path(__file__).parent / "configs"


def detect_family(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelError(f"{path} looks like an SD2.x checkpoint; single-file SD2 is not supported yet. "
                         f"Convert it to a diffusers folder and pass that folder as MODEL.")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd15"
    raise ModelError(f"{path} is not a Stable Diffusion checkpoint this pack can read (no model.diffusion_model.* keys).")


def find_tokenizer() -> Path:
    candidates = []
    if os.environ.get("SAFETYDPO_CLIP_TOKENIZER"):
        candidates.append(Path(os.environ["SAFETYDPO_CLIP_TOKENIZER"]))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]) / "comfy" / "sd1_tokenizer")
    for c in candidates:
        if (c / "vocab.json").exists() and (c / "merges.txt").exists():
            return c
    raise ModelError("A single-file checkpoint needs CLIP's tokenizer files, which are not on this machine. Set "
                     "SAFETYDPO_CLIP_TOKENIZER to a folder with vocab.json and merges.txt (any SD1.5 diffusers "
                     "folder's tokenizer/ has them), or COMFYUI_PATH to a ComfyUI install; or pass a diffusers folder.")


def config_folder(family: str, tokenizer: Path) -> Path:
    """A temporary diffusers-format folder with this family's configs and the tokenizer."""
    src = CONFIG_DIR / family
    tmp = Path(tempfile.mkdtemp(prefix=f"safetydpo-{family}-"))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    for sub in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        d = tmp / sub
        d.mkdir(exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer / name, d / name)
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "!" if sub == "tokenizer_2" else "<|endoftext|>", "do_lower_case": True}))
    return tmp


def load_single_file(path: Path, device="cpu", dtype: torch.dtype = torch.float32, config: str | os.PathLike | None = None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .loading import DiffusersComponents

    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"MODEL {path} is not a .safetensors file. Pickled checkpoints (.ckpt, .pt, .bin) are refused "
                         f"because loading them can run arbitrary code; convert it to safetensors first.")
    family = detect_family(path)
    cfg = Path(config) if config else config_folder(family, find_tokenizer())
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"Cannot load the checkpoint {path} as {family}: {e}") from e
    finally:
        if not config:
            shutil.rmtree(cfg, ignore_errors=True)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for m in [pipe.unet, pipe.vae, *encoders]:
        m.to(device).eval().requires_grad_(False)
    return DiffusersComponents(pipe.unet, scheduler, toks, encoders, pipe.vae, str(path), {})
