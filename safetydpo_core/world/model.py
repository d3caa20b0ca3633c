"""The world's tiny text-to-image model: its architecture, where the shipped weights live, and how to use it.

A pixel-space diffusers ``UNet2DConditionModel`` (3x32x32, no VAE: its "latents" are images in ``[-1, 1]``;
levels at 32, 16, 8 and 4 pixels with 16, 32, 64, 64 channels, cross-attention at 8x8, 4x4 and in the middle
block) conditioned on a small CLIP text encoder (64 wide, 2 layers), v-prediction, both trained from scratch by
the script ``tools/world/train_model.py`` on captioned renders of the world. The saved folder is an ordinary
diffusers pipeline folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``)
with a ``safetydpo.json`` that says ``base_model_version: safetydpo_world_v1`` and the default sampling settings;
the diffusers backend loads it like any other model.

Public API: :data:`UNET_CONFIG`, :data:`TEXT_CONFIG`, :data:`SCHEDULER_CONFIG`, :data:`SAMPLING`,
:func:`world_model_path`, :func:`load_world_model`, :func:`build_modules`, :func:`save_pipeline`,
:func:`generate`, :func:`seed_noise`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..denoiser.protocol import RenderingDenoiser
from ..errors import ConfigError, ModelError
from ..utils.atomic import atomic_write_text
from .spec import IMAGE_SIZE, WORLD

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_DIR = WEIGHTS_DIR / "model"
MAX_TOKENS = 24
TEXT_DIM = 64

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": [16, 32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_DIM, "attention_head_dim": 4, "norm_num_groups": 8,
}
TEXT_CONFIG = {"hidden_size": TEXT_DIM, "intermediate_size": 2 * TEXT_DIM, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                    "prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "trailing"}
SAMPLING = {"steps": 25, "cfg": 3.0, "sampler": "ddim"}


def world_model_path() -> Path:
    """The folder of the shipped world model (a diffusers pipeline folder)."""
    if not (MODEL_DIR / "unet" / "config.json").exists():
        raise ModelError(f"The world model is missing from {MODEL_DIR}. Reinstall the pack, or train it with "
                         f"`python tools/world/train_model.py` in the pack's folder.")
    return MODEL_DIR


def load_world_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     path: str | os.PathLike | None = None) -> RenderingDenoiser:
    """The shipped world model as a :class:`~safetydpo_core.denoiser.diffusers_backend.DiffusersDenoiser`."""
    from ..denoiser.diffusers_backend import DiffusersDenoiser

    return DiffusersDenoiser.from_pretrained(path or world_model_path(), device=device, dtype=dtype)


def write_tokenizer(directory: str | os.PathLike) -> Path:
    """The world's CLIP tokenizer: every caption word is one token."""
    from ..tiny_models import write_word_tokenizer

    return write_word_tokenizer(directory, WORLD.vocabulary(), max_length=MAX_TOKENS)


def build_modules(tokenizer_dir: str | os.PathLike, seed: int = 0, unet_config: dict | None = None):
    """Fresh (random) UNet, text encoder, tokenizer and scheduler of the world model's architecture."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok_dir = write_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = len(json.loads((Path(tok_dir) / "vocab.json").read_text(encoding="utf-8")))
    tcfg = CLIPTextConfig(vocab_size=vocab, projection_dim=TEXT_DIM, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                          pad_token_id=vocab - 1, **TEXT_CONFIG)
    text_encoder = CLIPTextModel(tcfg)
    unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG))
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    return unet, text_encoder, tokenizer, scheduler


def save_pipeline(directory: str | os.PathLike, unet, text_encoder, tokenizer_dir: str | os.PathLike, scheduler,
                  info: dict) -> Path:
    """Write a diffusers pipeline folder (pixel space, no VAE) with ``safetydpo.json`` = ``info``."""
    import shutil

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(d / "unet", safe_serialization=True)
    text_encoder.save_pretrained(d / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(d / "scheduler")
    (d / "tokenizer").mkdir(exist_ok=True)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copyfile(f, d / "tokenizer" / f.name)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    atomic_write_text(d / "model_index.json", json.dumps(index, indent=1))
    atomic_write_text(d / "safetydpo.json", json.dumps(info, indent=1))
    return d


def seed_noise(seeds: Sequence[int], shape: tuple[int, int, int] = (3, IMAGE_SIZE, IMAGE_SIZE)) -> torch.Tensor:
    """Unit Gaussian starting noise, one independent generator per seed: ``[B, *shape]``."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


@torch.no_grad()
def generate(denoiser: RenderingDenoiser, prompts: Sequence[str], seeds: Sequence[int] | int = 0, *,
             steps: int | None = None, cfg: float | None = None, sampler: str | None = None, negative: str = "",
             batch_size: int = 64, size: int = IMAGE_SIZE, callback=None) -> torch.Tensor:
    """Images ``[B, 3, size, size]`` in ``[0, 1]`` for ``prompts`` from any denoiser of the protocol.

    ``seeds`` is one seed per prompt, or an int ``s`` meaning seeds ``s, s+1, ...``. The same (prompt, seed)
    gives the same image, whatever the batch. Defaults follow :data:`SAMPLING`. ``callback(step, steps)`` goes
    to the sampler (e.g. a LoRA switched on from a later step).
    """
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("generate() got no prompts.")
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(len(prompts))]
    seeds = list(seeds)
    if len(seeds) != len(prompts):
        raise ConfigError(f"generate() got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")
    steps = int(steps or SAMPLING["steps"])
    cfg = float(SAMPLING["cfg"] if cfg is None else cfg)
    sampler = sampler or SAMPLING["sampler"]
    shape = denoiser.latent_shape(size, size)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        cond = denoiser.encode_prompts(p)
        uncond = denoiser.encode_prompts([negative] * len(p)) if cfg != 1.0 else None
        lat = denoiser.sample(cond, uncond, seed_noise(s, shape), steps=steps, cfg=cfg, sampler=sampler, callback=callback)
        out.append(denoiser.decode_latents(lat).cpu())
    return torch.cat(out)
