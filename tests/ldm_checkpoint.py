"""Test helper: write a diffusers pipeline folder as an original-layout (LDM) single-file checkpoint.

Only for tests of single-file loading: UNet keys go through this pack's UNetNames map, VAE keys through the
mapping below, CLIP keys get the ``cond_stage_model.transformer.text_model.`` prefix.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def _vae_to_ldm(sd: dict, n_up: int) -> dict:
    out = {}
    for k, v in sd.items():
        n = re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", k)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv", n)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(.*)$", n)
        if m:
            rest = re.sub(r"^resnets\.(\d+)\.", r"block.\1.", m[2])
            rest = re.sub(r"^upsamplers\.0\.conv", "upsample.conv", rest)
            n = f"decoder.up.{n_up - 1 - int(m[1])}.{rest}"
        n = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", n)
        n = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", n)
        n = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", n)
        n = n.replace("conv_shortcut", "nin_shortcut").replace("attn_1.group_norm", "attn_1.norm")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            n = n.replace(f"attn_1.{a}", f"attn_1.{b}")
        if "attn_1." in n and n.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + n] = v
    return out


def write_ldm_checkpoint(folder: Path, out: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from safetydpo_core.lora.unet_names import UNetNames

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    names = UNetNames.from_module(unet)
    sd = {}
    for k, v in unet.state_dict().items():
        mod, _, p = k.rpartition(".")
        sd[f"model.diffusion_model.{names.to_ldm[mod]}.{p}"] = v
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    sd.update(_vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types)))
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    for k, v in te.state_dict().items():
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out
