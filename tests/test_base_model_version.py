"""kohya's ss_base_model_version, derived in one place (lora/base_model.py) for diffusers and ComfyUI models
and for LoRA files loaded without one."""

import torch

from safetydpo_core.denoiser.diffusers_backend import base_model_version_of
from safetydpo_core.lora.base_model import base_model_version, base_model_version_of_lora
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet


def test_each_family_gets_kohya_s_name():
    assert base_model_version(family="sd3") == "sd3" and base_model_version(family="flux") == "flux1"
    assert base_model_version(cross_attention_dim=2048, sdxl=True) == "sdxl_base_v1-0"
    assert base_model_version(cross_attention_dim=1280) == "sdxl_refiner_v1-0"
    assert base_model_version(cross_attention_dim=1024) == "sd_v2"
    assert base_model_version(cross_attention_dim=768) == "sd_v1"
    assert base_model_version(cross_attention_dim=32) == "sd_v1"
    assert base_model_version(cross_attention_dim=32, default="custom") == "custom"


def test_diffusers_unet_configs():
    sd1 = {"cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280]}
    assert base_model_version_of(sd1) == "sd_v1"
    assert base_model_version_of(dict(sd1, block_out_channels=[32, 64])) == "custom"  # a tiny test UNet
    assert base_model_version_of({"cross_attention_dim": 1024}) == "sd_v2"
    assert base_model_version_of({"cross_attention_dim": 1280, "addition_embed_type": "text_time"}) == "sdxl_base_v1-0"
    assert base_model_version_of(sd1, {"base_model_version": "safetydpo_world_v1"}) == "safetydpo_world_v1"


def test_a_lora_s_version_from_its_cross_attention_width():
    def lora(width):
        return LoraSet({"input_blocks.1.1.transformer_blocks.0.attn2.to_k": LoraLayer(torch.zeros(4, width),
                                                                                     torch.zeros(320, 4), 4.0)}, "ldm")

    assert [base_model_version_of_lora(lora(w)) for w in (768, 1024, 1280, 2048)] == [
        "sd_v1", "sd_v2", "sdxl_refiner_v1-0", "sdxl_base_v1-0"]
