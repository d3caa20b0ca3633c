"""LoRA files: safetensors with metadata, atomic writes, refusal of pickles, and interop with diffusers'
``load_lora_weights`` (same outputs as this pack's own weight patching), for SD1.5- and SDXL-style models."""

import re

import pytest
import torch
from safetensors import safe_open

from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import LoraError, SafetyDPOError
from safetydpo_core.lora import LoraLayer, LoraSet, load_lora, save_lora
from safetydpo_core.lora.apply import lora_applied


def _random_lora(den, rank=3, alpha=1.5, seed=0) -> LoraSet:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in den.layers("attn").items():
        layers[name] = LoraLayer(0.3 * torch.randn(rank, mod.in_features, generator=g),
                                 0.3 * torch.randn(mod.out_features, rank, generator=g), alpha)
    return LoraSet(layers, "diffusers", {"ss_base_model_version": den.base_model_version})


def _pred(den, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, den.latent_channels, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    cond = den.encode_prompts(["a red cat", "a dog on the street"])
    with torch.no_grad():
        return den.predict(x, t, cond)


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl"])
def test_save_and_reload_roundtrip_with_metadata(model, request, tmp_path):
    den = DiffusersDenoiser.from_pretrained(request.getfixturevalue(model))
    lora = _random_lora(den)
    path = save_lora(lora, tmp_path / "expert.safetensors", names=den.names(),
                     metadata={"safetydpo_category": "violence", "safetydpo_beta": 5000})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert meta["safetydpo_category"] == "violence" and meta["safetydpo_beta"] == "5000"
    assert meta["safetydpo_version"]
    assert all(k.startswith("lora_unet_") for k in keys)
    if model == "tiny_sdxl":  # kohya writes SDXL with LDM names
        assert meta["safetydpo_key_format"] == "kohya/ldm" and any("input_blocks" in k for k in keys)
    else:
        assert meta["safetydpo_key_format"] == "kohya/diffusers" and any("down_blocks" in k for k in keys)
    back = load_lora(path, names=den.names())
    back_d = back.renamed(den.names().mapping(back.naming, "diffusers"), "diffusers")
    assert back_d.allclose(lora, rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl"])
def test_diffusers_load_lora_weights_gives_identical_outputs(model, request, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(model)
    den = DiffusersDenoiser.from_pretrained(folder)
    lora = _random_lora(den, rank=2, alpha=4.0)
    path = save_lora(lora, tmp_path / "expert.safetensors", names=den.names())
    base = _pred(den)
    with lora_applied(den.unet, [(lora, 0.7)]):
        ours = _pred(den)
    assert not torch.allclose(base, ours, atol=1e-4)
    assert torch.equal(_pred(den), base)  # patching is undone exactly

    cls = StableDiffusionXLPipeline if model == "tiny_sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False) if model == "tiny_sd15" \
        else cls.from_pretrained(folder)
    pipe.load_lora_weights(str(path), adapter_name="expert")
    pipe.set_adapters(["expert"], adapter_weights=[0.7])
    den2 = DiffusersDenoiser(den.parts, device="cpu")
    den2.unet = pipe.unet
    theirs = _pred(den2)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_pickles_are_refused(tmp_path):
    p = tmp_path / "expert.ckpt"
    torch.save({"x": torch.zeros(1)}, p)
    with pytest.raises(LoraError, match="not a .safetensors file"):
        load_lora(p)
    q = tmp_path / "fake.safetensors"
    q.write_bytes(b"not really safetensors")
    with pytest.raises(LoraError, match="cannot be read as safetensors"):
        load_lora(q)
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")


def test_lora_for_another_model_is_refused(tiny_sd15, tiny_sdxl, tmp_path):
    a = DiffusersDenoiser.from_pretrained(tiny_sd15)
    b = DiffusersDenoiser.from_pretrained(tiny_sdxl)
    path = save_lora(_random_lora(b), tmp_path / "xl.safetensors", names=b.names())
    with pytest.raises(LoraError, match="another architecture"):
        load_lora(path, names=a.names())
    # same names, wrong shapes: name the layer and both shapes
    lora = _random_lora(a)
    name = next(iter(lora.layers))
    bad = LoraSet({name: LoraLayer(torch.zeros(2, 7), torch.zeros(5, 2), 2.0)}, "diffusers")
    pattern = f"{re.escape(name)}.*{re.escape('(5, 7)')}.*{re.escape(str(tuple(a.weight_shapes()[name])))}"
    with pytest.raises(LoraError, match=pattern):
        bad.check_fits(a.weight_shapes())


def test_unwritable_output_is_refused_and_nothing_is_half_written(tiny_sd15, tmp_path):
    den = DiffusersDenoiser.from_pretrained(tiny_sd15)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SafetyDPOError, match="Cannot create"):
        save_lora(_random_lora(den), blocker / "out.safetensors", names=den.names())
    # an existing file survives a failed write
    target = tmp_path / "keep.safetensors"
    save_lora(_random_lora(den, seed=1), target, names=den.names())
    before = target.read_bytes()
    with pytest.raises(LoraError):
        save_lora(LoraSet({}, "diffusers"), target, names=den.names())
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "keep.safetensors"]
