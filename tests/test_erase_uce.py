"""UCE (closed-form cross-attention edit) on the diffusers backend, full-rank ``.diff`` LoRA files, and the
bad inputs of every erasure method (the CLI included): each a clear error naming the input, nothing written."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from safetydpo_core.cli.main import main as cli
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.erase import EraseSettings, erase_concepts, save_erasure, uce_edit
from safetydpo_core.errors import ConfigError
from safetydpo_core.lora.apply import lora_applied
from safetydpo_core.lora.io import load_lora

CONCEPTS, GUIDE, PRESERVE = "cat, dog", "house, street", "man, woman, red"


@pytest.fixture(scope="module")
def den(tiny_sd15):
    return DiffusersDenoiser.from_pretrained(tiny_sd15)


def _last_token_embedding(den, text: str) -> torch.Tensor:
    """As the official uce_sd_erase.py: the text encoder output at index attention_mask.sum() - 2."""
    tok = den.parts.tokenizers[0]
    mask = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").attention_mask
    return den.encode_prompts([text]).tensors["encoder_hidden_states"][0, int(mask.sum()) - 2].double()


def _official(den, w_old, erase, guide, preserve, lamb=0.5, se=1.0, sp=1.0):
    """The official closed form: (lamb W + sum v* c^T + sum W c c^T) (lamb I + sum c c^T + sum c c^T)^-1."""
    mat1 = lamb * w_old
    mat2 = lamb * torch.eye(w_old.shape[1], dtype=torch.float64)
    for e, g in zip(erase, guide):
        c, v = _last_token_embedding(den, e)[:, None], w_old @ _last_token_embedding(den, g)[:, None]
        mat1 = mat1 + se * v @ c.T
        mat2 = mat2 + se * c @ c.T
    for p in preserve:
        c = _last_token_embedding(den, p)[:, None]
        mat1 = mat1 + sp * (w_old @ c) @ c.T
        mat2 = mat2 + sp * c @ c.T
    return mat1 @ torch.inverse(mat2)


def test_uce_is_the_official_closed_form_exactly_at_the_update_rank(den):
    res = uce_edit(den, CONCEPTS, GUIDE, PRESERVE, lamb=0.7, erase_scale=1.5, preserve_scale=0.5)
    layers = den.layers("attn2.to_k,attn2.to_v")
    assert set(res.lora.layers) == set(layers) and res.lora.naming == "diffusers"
    assert res.update_rank == 2 and res.rank == 2 and res.max_rel_error == 0.0
    for name, m in layers.items():
        w_old = m.weight.detach().double()
        want = _official(den, w_old, ["cat", "dog"], ["house", "street"], ["man", "woman", "red"], 0.7, 1.5, 0.5)
        got = w_old + res.lora[name].delta(torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    meta = res.lora.metadata
    assert meta["safetydpo_method"] == "uce" and meta["safetydpo_uce_update_rank"] == "2"
    assert meta["safetydpo_concepts"] == '["cat", "dog"]' and meta["safetydpo_guide"] == '["house", "street"]'


def test_the_edit_maps_each_concept_to_its_guide_and_keeps_the_preserved(den):
    res = uce_edit(den, "cat", "house", "dog", lamb=1e-3, preserve_scale=10.0)
    name, m = sorted(den.layers("attn2.to_v").items())[0]
    w_new = m.weight.detach().double() + res.lora[name].delta(torch.float64)
    c, g, p = (_last_token_embedding(den, t) for t in ("cat", "house", "dog"))
    w_old = m.weight.detach().double()
    before = (w_old @ c - w_old @ g).norm()
    assert (w_new @ c - w_old @ g).norm() < 0.05 * before          # the concept's value is now the guide's
    assert (w_new @ p - w_old @ p).norm() < 0.05 * (w_old @ p).norm()  # the preserved concept's is kept


def test_an_empty_guide_is_the_start_token_and_one_guide_serves_all(den):
    res = uce_edit(den, CONCEPTS)
    assert res.guide == ["", ""]
    layers = den.layers("attn2.to_k")
    name = sorted(layers)[0]
    w_old = layers[name].weight.detach().double()
    start = den.encode_prompts([""]).tensors["encoder_hidden_states"][0, 0].double()
    c = _last_token_embedding(den, "cat")
    w_new = w_old + res.lora[name].delta(torch.float64)
    assert (w_new @ c - w_old @ start).norm() < (w_old @ c - w_old @ start).norm()
    assert uce_edit(den, CONCEPTS, "house").guide == ["house", "house"]


def test_a_chosen_rank_is_the_best_approximation_with_its_error_reported(den):
    exact = uce_edit(den, "cat, dog, man", "house, street, woman")
    r1 = uce_edit(den, "cat, dog, man", "house, street, woman", rank=1)
    r5 = uce_edit(den, "cat, dog, man", "house, street, woman", rank=5)
    assert exact.update_rank == 3 and r1.rank == 1 and r5.rank == 5
    for name in exact.lora.layers:
        full = exact.lora[name].delta(torch.float64)
        s = torch.linalg.svdvals(full)
        want_err = float(s[1:].norm() / s.norm())
        assert abs(r1.rel_errors[name] - want_err) < 1e-6
        assert abs(float((r1.lora[name].delta(torch.float64) - full).norm() / full.norm()) - want_err) < 1e-4
        torch.testing.assert_close(r5.lora[name].delta(torch.float64), full, rtol=1e-4, atol=1e-6)  # padded, exact
        assert r5.rel_errors[name] < 1e-9


def test_full_diff_files_round_trip_and_apply_as_the_exact_edit(den, tmp_path):
    res = uce_edit(den, CONCEPTS, GUIDE, PRESERVE)
    path = save_erasure(res, tmp_path / "uce_diff.safetensors", names=den.names(), full_diff=True)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert keys and all(k.startswith("lora_unet_") and k.endswith(".diff") for k in keys)
    weights = {n.replace(".", "_"): tuple(m.weight.shape) for n, m in den.layers("attn2.to_k,attn2.to_v").items()}
    assert {k[len("lora_unet_"):-len(".diff")]: s for k, s in shapes.items()} == weights
    assert meta["safetydpo_key_kind"] == "diff" and meta["safetydpo_method"] == "uce"
    back = load_lora(path, names=den.names())
    assert back.allclose(res.lora, rtol=1e-5, atol=1e-6)
    # and a .diff file of a conv weight (ESD-u layers) reads back exactly too
    from safetydpo_core.lora.keys import exact_factors
    d = torch.randn(8, 4, 3, 3)
    assert torch.allclose(exact_factors(d).delta().reshape(d.shape), d)
    d2 = torch.randn(40, 3, 1, 1)
    assert torch.allclose(exact_factors(d2).delta().reshape(d2.shape), d2)


def test_diffusers_load_lora_weights_gives_the_same_effect(den, tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    res = uce_edit(den, CONCEPTS, GUIDE, PRESERVE, lamb=0.05)
    path = save_erasure(res, tmp_path / "uce.safetensors", names=den.names())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, den.latent_channels, 8, 8, generator=g), torch.tensor([200, 700])
    cond = den.encode_prompts(["a photo of a cat", "a dog on the street"])
    with torch.no_grad():
        base = den.predict(x, t, cond)
        with lora_applied(den.unet, [(res.lora, 1.0)]):
            ours = den.predict(x, t, cond)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(path), adapter_name="uce")
        other = DiffusersDenoiser(den.parts, device="cpu")
        other.unet = pipe.unet
        theirs = other.predict(x, t, cond)
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(concepts=" , ;\n"), r"^concepts: the list of concepts is empty"),
    (dict(concepts="cat, ™"), r"^concepts: '™' turns into no tokens"),
    (dict(concepts="cat", guide="™"), r"^guide: '™' turns into no tokens"),
    (dict(concepts="cat", preserve="dog, ™"), r"^preserve: '™' turns into no tokens"),
    (dict(concepts="cat, dog, man", guide="house, street"), r"^guide: 2 guide concepts for 3 concepts"),
    (dict(concepts="cat", rank=100000), r"^rank 100000 is above the size of layer '.*attn2\.to_[kv]'"),
    (dict(concepts="cat", rank=-1), r"^rank must be"),
    (dict(concepts="cat", lamb=0.0), r"^lamb must be a positive number"),
    (dict(concepts="cat", erase_scale=-1.0), r"^erase_scale must be a positive number"),
])
def test_uce_bad_input_names_the_input(den, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        uce_edit(den, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="esd-x", concepts="cat", esd_eta=0.0), r"^esd_eta must be a positive number"),
    (dict(method="esd-u", concepts="cat", esd_eta=-1.0), r"^esd_eta must be a positive number"),
    (dict(method="esd-x", concepts=""), r"^concepts: the list of concepts is empty"),
    (dict(method="esd-x", concepts="cat", guide="dog"), r"^guide: only UCE uses guide concepts"),
    (dict(method="esd-u", concepts="cat", preserve="dog"), r"^preserve: only UCE uses preserve concepts"),
    (dict(method="esd-x", concepts="cat", rank=0), r"^rank must be a positive integer"),
    (dict(method="uce", concepts="cat", rank=2, full_diff=True), r"^rank: full_diff writes UCE's exact update"),
    (dict(method="nope", concepts="cat"), r"^method must be one of esd-u, esd-x, uce"),
])
def test_erase_settings_bad_input_names_the_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EraseSettings(**kwargs)


def test_esd_bad_input_found_on_the_model_names_the_input(den):
    with pytest.raises(ConfigError, match=r"^concepts: '™' turns into no tokens"):
        erase_concepts(den, EraseSettings(method="esd-x", concepts="cat, ™", steps=1))
    with pytest.raises(ConfigError, match=r"^rank 100000 is above the size of every esd-x layer"):
        erase_concepts(den, EraseSettings(method="esd-x", concepts="cat", steps=1, rank=100000))


@pytest.mark.parametrize("args, match", [
    (["--method", "uce", "--concepts", ","], "concepts: the list of concepts is empty"),
    (["--method", "uce", "--concepts", "cat, ™"], "concepts: '™' turns into no tokens"),
    (["--method", "uce", "--concepts", "cat, dog", "--guide", "a, b, c"], "guide: 3 guide concepts for 2 concepts"),
    (["--method", "uce", "--concepts", "cat", "--rank", "99999"], "rank 99999 is above the size of layer"),
    (["--method", "esd-x", "--concepts", "cat", "--esd-eta", "0"], "esd_eta must be a positive number"),
    (["--method", "esd-x", "--concepts", "cat", "--rank", "99999"], "rank 99999 is above the size of every"),
])
def test_cli_bad_input_is_a_clear_error_and_nothing_is_written(tiny_sd15, tmp_path, capsys, args, match):
    out = tmp_path / "erased.safetensors"
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"keep me")
    rc = cli(["erase", "--model", str(tiny_sd15), *args, "--out", str(out)])
    assert rc == 2 and match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"] and old.read_bytes() == b"keep me"


def test_cli_uce_writes_the_lora_and_its_config(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "uce.safetensors"
    assert cli(["erase", "--model", str(tiny_sd15), "--method", "uce", "--concepts", CONCEPTS, "--guide", GUIDE,
                "--preserve", PRESERVE, "--rank", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relative error of the export" in printed
    den = DiffusersDenoiser.from_pretrained(tiny_sd15)
    lora = load_lora(out, names=den.names())
    assert lora.max_rank == 1 and lora.metadata["safetydpo_method"] == "uce"
    assert (tmp_path / "uce.config.json").exists()
    assert cli(["erase", "--model", str(tiny_sd15), "--method", "uce", "--concepts", "cat", "--out", str(out)]) == 2
    full = tmp_path / "full.safetensors"
    assert cli(["erase", "--model", str(tiny_sd15), "--method", "uce", "--concepts", CONCEPTS, "--full-diff",
                "--out", str(full)]) == 0
    with safe_open(str(full), "pt") as f:
        assert all(k.endswith(".diff") for k in f.keys())

