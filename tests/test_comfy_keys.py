"""Our diffusers <-> LDM layer maps against ComfyUI's own: ``UNetNames`` for the full SD1.5 and SDXL UNets,
``TransformerNames`` for the full SD3.5-medium, SD3.5-large and Flux.1-dev transformers.

ComfyUI converts diffusers UNet keys with ``comfy.utils.unet_to_diffusers`` (and SD3 / Flux keys, slices of
the fused q/k/v layers included, with ``mmdit_to_diffusers`` / ``flux_to_diffusers``); every LoRA file that
the pack writes for ComfyUI depends on our map agreeing with it layer for layer. The ComfyUI configs come
from ComfyUI's own detection of the diffusers models (meta tensors, no weights), and the LDM side is checked
against the modules of ComfyUI's network built for that config. For the transformers, every key of the
files we write (kohya, ComfyUI-native and diffusers/peft, every layer) is in ComfyUI's LoRA key map: zero
keys dropped by ``LoraLoader``.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_support import backend_module, import_comfy, requires_comfyui
from safetydpo_core.lora.keys import to_state_dict
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.lora.transformer_names import TransformerNames, build_transformer
from safetydpo_core.lora.unet_names import UNetNames, weight_modules
from safetydpo_core.tiny_models import (FLUX1_DEV_TRANSFORMER_CONFIG, SD15_UNET_CONFIG, SD35_LARGE_TRANSFORMER_CONFIG,
                                        SD35_MEDIUM_TRANSFORMER_CONFIG, SDXL_UNET_CONFIG)

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


TRANSFORMERS = {"sd3.5-medium": SD35_MEDIUM_TRANSFORMER_CONFIG, "sd3.5-large": SD35_LARGE_TRANSFORMER_CONFIG,
                "flux1-dev": FLUX1_DEV_TRANSFORMER_CONFIG}


def _comfy_transformer(diffusers_config: dict):
    """ComfyUI's model for a diffusers SD3 / Flux transformer config, detected from the converted state dict and
    built on the meta device, with ComfyUI's model config."""
    comfy = import_comfy().comfy
    sd = comfy.model_detection.convert_diffusers_mmdit(build_transformer(diffusers_config, meta=True).state_dict(), "")
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    assert model_config is not None, "ComfyUI did not recognise the transformer"
    model_config.set_inference_dtype(torch.bfloat16, None)
    return model_config.get_model(sd, "", device=torch.device("meta")), model_config


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_transformer_names_agree_with_comfyui_and_every_key_loads(kind):
    config = TRANSFORMERS[kind]
    comfy = import_comfy().comfy
    ct = backend_module("comfy_transformers")
    model, model_config = _comfy_transformer(config)
    family = "sd3" if kind.startswith("sd3") else "flux"
    assert ct.architecture(model) == family
    # ComfyUI's side (checked against comfy.utils' map inside) and the diffusers side give the same layers
    theirs = ct.transformer_names(family, model.diffusion_model, model_config.unet_config)
    ours = TransformerNames.from_config(config)
    assert theirs.shapes == ours.shapes
    assert [(r.ldm, r.parts, r.swap) for r in theirs.relations] == [(r.ldm, r.parts, r.swap) for r in ours.relations]
    # the ComfyUI config maps back to the diffusers config it came from
    derived = ct.diffusers_transformer_config(family, model_config.unet_config)
    assert TransformerNames.from_config(derived).shapes == ours.shapes
    # every key of every file format, for every layer, is in ComfyUI's LoRA key map
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    lora = LoraSet({n: LoraLayer(torch.zeros(1, *s[1:2]) if len(s) == 2 else torch.zeros(1, *s[1:]),
                                 torch.zeros(s[0], 1, *([1] * (len(s) - 2))), 1.0)
                    for n, s in ours.shapes["ldm"].items()}, "ldm")
    common = backend_module("common")
    for fmt in ("kohya", "comfy", "peft"):
        sd = to_state_dict(lora, fmt, names=ours)
        dropped = [k for k in sd if common.lora_base_name(k) not in key_map and
                   k.rsplit(".lora_", 1)[0] not in key_map]
        assert not dropped, f"{fmt}: {len(dropped)} keys would not load, e.g. {dropped[:3]}"
        written = ours.convert_lora(lora, "diffusers") if fmt == "peft" else lora
        assert len(sd) == (2 if fmt == "peft" else 3) * len(written)
    # ComfyUI's own loader agrees (it logs each key it leaves out)
    loaded = comfy.lora.load_lora(to_state_dict(lora, "kohya", names=ours), key_map, log_missing=False)
    assert len(loaded) == len(lora)
