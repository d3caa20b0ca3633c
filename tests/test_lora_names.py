"""Layer naming: diffusers <-> LDM (ComfyUI) names and kohya keys, checked on the full SD1.5 and SDXL UNets
(built from their configs on the meta device)."""

import re

import pytest
import torch

from safetydpo_core.lora import LoraLayer, LoraSet
from safetydpo_core.lora.keys import detect_format, from_state_dict, to_state_dict
from safetydpo_core.lora.targets import PRESETS, matches
from safetydpo_core.lora.unet_names import UNetNames, flat
from safetydpo_core.tiny_models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def full_names(request):
    cfg = SD15_UNET_CONFIG if request.param == "sd15" else SDXL_UNET_CONFIG
    return request.param, UNetNames.from_config(cfg)


def _attn(names, naming):
    return [n for n in names.names(naming) if matches(n, PRESETS["attn"])]


def test_every_layer_maps_one_to_one(full_names):
    kind, names = full_names
    d = names.names("diffusers")
    ldm = names.names("ldm")
    assert len(set(ldm)) == len(d)
    for n in d:
        assert names.convert(names.convert(n, "ldm"), "diffusers") == n
    # LDM names only use LDM top-level modules
    tops = {n.split(".")[0] for n in ldm}
    assert tops <= {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}
    # shapes are carried over unchanged
    for n in d:
        assert names.shapes["ldm"][names.to_ldm[n]] == names.shapes["diffusers"][n]


def test_attention_target_counts(full_names):
    kind, names = full_names
    # SD1.5: 16 transformer blocks; SDXL: 2*2 + 2*10 (down) + 10 (mid) + 3*2 + 3*10 (up) = 70; 8 projections each
    expected = {"sd15": 16 * 8, "sdxl": 70 * 8}[kind]
    assert len(_attn(names, "diffusers")) == expected
    assert len(_attn(names, "ldm")) == expected


def test_the_self_attention_and_feed_forward_preset_leaves_cross_attention_out(full_names):
    kind, names = full_names
    blocks = {"sd15": 16, "sdxl": 70}[kind]
    for naming in ("diffusers", "ldm"):
        chosen = [n for n in names.names(naming) if matches(n, PRESETS["attn-self+ff"])]
        assert len(chosen) == blocks * 6  # attn1's four projections and the feed-forward's two layers
        assert not any(".attn2." in n for n in chosen)
        assert sum(n.endswith("ff.net.2") for n in chosen) == blocks


@pytest.mark.parametrize("kind,diffusers_name,ldm_name", [
    ("sd15", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    ("sd15", "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0", "input_blocks.8.1.transformer_blocks.0.attn2.to_out.0"),
    ("sd15", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_k"),
    ("sd15", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v", "output_blocks.11.1.transformer_blocks.0.attn1.to_v"),
    ("sd15", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sd15", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("sd15", "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("sd15", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
    ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q", "input_blocks.8.1.transformer_blocks.9.attn1.to_q"),
    ("sdxl", "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2", "output_blocks.2.1.transformer_blocks.3.ff.net.2"),
    ("sdxl", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sdxl", "add_embedding.linear_1", "label_emb.0.0"),
])
def test_known_names(kind, diffusers_name, ldm_name):
    names = UNetNames.from_config(SD15_UNET_CONFIG if kind == "sd15" else SDXL_UNET_CONFIG)
    assert names.convert(diffusers_name, "ldm") == ldm_name
    assert names.convert(ldm_name, "diffusers") == diffusers_name


def _random_set(names, naming, rank=2, n=6):
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name in _attn(names, naming)[:n]:
        out_f, in_f = names.shapes[naming][name][:2]
        layers[name] = LoraLayer(torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g), 1.0)
    return LoraSet(layers, naming)


def test_kohya_keys_round_trip_in_both_namings(full_names):
    kind, names = full_names
    lora = _random_set(names, "diffusers")
    for naming in ("diffusers", "ldm"):
        sd = to_state_dict(lora, "kohya", naming=naming, names=names)
        assert detect_format(sd) == "kohya"
        for k in sd:
            assert re.match(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$", k), k
        back = from_state_dict(sd, names=names)
        assert back.naming == naming
        assert back.renamed(names.mapping(naming, "diffusers"), "diffusers").allclose(lora)
    assert any(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_mid_block_")
               for k in to_state_dict(lora, "kohya", naming="diffusers", names=names))


def test_comfy_native_keys(full_names):
    kind, names = full_names
    lora = _random_set(names, "diffusers")
    sd = to_state_dict(lora, "comfy", names=names)
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert all(names.to_diffusers[k[len("diffusion_model."):].rsplit(".", 2)[0] if k.endswith("weight") else
                                  k[len("diffusion_model."):].rsplit(".", 1)[0]] for k in sd)
    back = from_state_dict(sd)
    assert back.naming == "ldm"
    assert back.renamed(names.mapping("ldm", "diffusers"), "diffusers").allclose(lora)


def test_peft_keys_are_read(full_names):
    kind, names = full_names
    lora = _random_set(names, "diffusers")
    sd = {}
    for n, l in lora.items():
        sd[f"unet.{n}.lora_A.weight"] = l.down
        sd[f"unet.{n}.lora_B.weight"] = l.up
    back = from_state_dict(sd)
    # no alpha in a peft file means scale 1: the update is up @ down, twice the rank-2, alpha-1 original
    assert back.naming == "diffusers" and back.allclose(lora.scaled(2.0))


def test_flat_names_are_unambiguous(full_names):
    kind, names = full_names
    for naming in ("diffusers", "ldm"):
        for n in names.names(naming):
            assert names.resolve_flat(flat(n)) == (naming, n)
