"""Our diffusers <-> LDM layer map (``UNetNames``) against ComfyUI's own, for the full SD1.5 and SDXL UNets.

ComfyUI converts diffusers UNet keys with ``comfy.utils.unet_to_diffusers``; every LoRA file in diffusers
naming that the pack writes for ComfyUI depends on our map agreeing with it layer for layer. The
ComfyUI configs come from ComfyUI's own detection of the diffusers configs (meta tensors, no weights),
and the LDM side is checked against the modules of ComfyUI's UNet built for that config.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_support import backend_module, import_comfy, requires_comfyui
from safetydpo_core.lora.unet_names import UNetNames
from safetydpo_core.tiny_models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

pytestmark = requires_comfyui

CASES = {"sd15": (SD15_UNET_CONFIG, "SD15"), "sdxl": (SDXL_UNET_CONFIG, "SDXL")}


def _comfy_config(diffusers_config: dict) -> dict:
    from diffusers import UNet2DConditionModel

    comfy = import_comfy().comfy
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(diffusers_config)
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
    assert unet_config is not None, "ComfyUI did not recognise the diffusers UNet config"
    return unet_config


def _comfy_module_map(unet_config: dict, existing: set[str]) -> dict[str, str]:
    """ComfyUI's diffusers -> LDM map at module level, for the diffusers modules that exist."""
    comfy = import_comfy().comfy
    out = {}
    for d_key, l_key in comfy.utils.unet_to_diffusers(unet_config).items():
        d_mod, _, param = d_key.rpartition(".")
        if param == "weight" and d_mod in existing:
            out[d_mod] = l_key.rpartition(".")[0]
    return out


@pytest.mark.parametrize("kind", sorted(CASES))
def test_unet_names_agree_with_comfyui_for_every_layer(kind):
    diffusers_config, arch = CASES[kind]
    comfy = import_comfy().comfy
    unet_config = _comfy_config(diffusers_config)
    names = UNetNames.from_config(diffusers_config)
    ours = names.to_ldm
    theirs = _comfy_module_map(unet_config, set(ours))

    # every weight-carrying diffusers layer is known to ComfyUI's map, and maps to the same LDM layer
    assert set(theirs) == set(ours), sorted(set(ours) ^ set(theirs))[:5]
    wrong = {d: (ours[d], theirs[d]) for d in ours if ours[d] != theirs[d]}
    assert not wrong, f"{len(wrong)} layers map differently, e.g. {list(wrong.items())[:3]}"

    # the LDM side names exactly the weight-carrying modules of ComfyUI's UNet, with the same shapes
    model_config = getattr(comfy.supported_models, arch)(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    dm = model_config.get_model({}, device="meta").diffusion_model
    ldm_shapes = {n: tuple(m.weight.shape) for n, m in dm.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
    assert set(names.shapes["ldm"]) == set(ldm_shapes)
    bad = [n for n, s in names.shapes["ldm"].items() if ldm_shapes[n] != s]
    assert not bad, f"shapes differ for {bad[:3]}"
    # the kohya flat names resolve back for both namings
    for n in list(ours)[::37]:
        assert names.resolve_flat(n.replace(".", "_")) == ("diffusers", n)
        assert names.resolve_flat(ours[n].replace(".", "_")) == ("ldm", ours[n])


@pytest.mark.parametrize("kind", sorted(CASES))
def test_diffusers_config_of_a_comfy_unet_round_trips(kind):
    """The backend derives a diffusers config from ComfyUI's UNet config (for UNetNames); it must be the original."""
    diffusers_config, _ = CASES[kind]
    derived = backend_module("comfy_denoiser").diffusers_unet_config(_comfy_config(diffusers_config))
    for key in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
                "attention_head_dim", "addition_embed_type", "projection_class_embeddings_input_dim"):
        assert derived.get(key) == diffusers_config.get(key), key
    assert derived["layers_per_block"] == diffusers_config["layers_per_block"]
    assert derived["use_linear_projection"] == bool(diffusers_config.get("use_linear_projection", False))
    if "transformer_layers_per_block" in diffusers_config:
        assert derived["transformer_layers_per_block"] == diffusers_config["transformer_layers_per_block"]
    # and the names built from it are the same as from the original
    assert UNetNames.from_config(derived).to_ldm == UNetNames.from_config(diffusers_config).to_ldm
