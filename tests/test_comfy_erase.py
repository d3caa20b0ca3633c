"""The erasure baselines on real ComfyUI objects, in-process (COMFYUI_PATH): UCE and ESD on the ComfyUI backend,
every baseline file (UCE exact LoRA, UCE full-rank .diff, ESD-x, ESD-u) loaded by ComfyUI's LoRA loader with no
"lora key not loaded" and the same effect as the pack's own patching of the same weights in diffusers, the
"Erase Concepts (UCE)" node and the train node's ESD objectives."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from comfyui_support import (assert_same_state, backend_module, diffusion_state, import_comfy, requires_comfyui,
                             tiny_sd15, tiny_sdxl)
from test_comfy_backend import _as_diffusers, _comfy_eps
from test_nodes_comfy import _render, comfy_dirs, core_errors, run  # noqa: F401 - comfy_dirs is a fixture
from safetydpo_core.erase import EraseSettings, erase_concepts, save_erasure
from safetydpo_core.lora.apply import lora_applied
from safetydpo_core.lora.io import load_lora
from safetydpo_core.training import TrainConfig
from safetydpo_core.training.concept_prompts import ConceptPrompts
from safetydpo_core.training.esd import train_esd

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def cd():
    return backend_module("comfy_denoiser")


@pytest.fixture(scope="module")
def models():
    return {"sd15": tiny_sd15(seed=21), "sdxl": tiny_sdxl(seed=22)}


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    import_comfy().comfy.model_management.unload_all_models()


def _last_token(d, text: str) -> torch.Tensor:
    n = d.prompt_token_counts([text])[0]
    return d.encode_prompts([text]).tensors["c_crossattn"][0, n].double()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_uce_on_the_comfy_backend_is_the_official_closed_form(models, cd, kind):
    mp, clip, _ = models[kind]
    before = diffusion_state(mp)
    with torch.inference_mode():
        d = cd.ComfyDenoiser(mp, clip)
        assert d.prompt_token_counts(["", "cat", "a photo of a cat", "   "]) == [0, 1, 5, 0]
        with d.session(training=False):
            res = erase_concepts(d, EraseSettings(method="uce", concepts="cat, dog", guide="house, tree",
                                                  preserve="man, red", lamb=0.3))
            layers = d.layers("attn2.to_k,attn2.to_v")
            lam = 0.3
            for name, m in list(layers.items())[:4]:
                w = m.weight.detach().double()
                mat1, mat2 = lam * w, lam * torch.eye(w.shape[1], dtype=torch.float64)
                for e, g in (("cat", "house"), ("dog", "tree")):
                    c, gg = _last_token(d, e)[:, None], _last_token(d, g)[:, None]
                    mat1, mat2 = mat1 + (w @ gg) @ c.T, mat2 + c @ c.T
                for p in ("man", "red"):
                    c = _last_token(d, p)[:, None]
                    mat1, mat2 = mat1 + (w @ c) @ c.T, mat2 + c @ c.T
                torch.testing.assert_close(w + res.lora[name].delta(torch.float64), mat1 @ torch.inverse(mat2),
                                           rtol=1e-4, atol=1e-5)
    assert res.lora.naming == "ldm" and set(res.lora.layers) == set(layers)
    assert_same_state(before, mp)


def _baselines(d, tmp_path):
    """Every kind of baseline file, made on the ComfyUI backend: {label: (path, LoraSet in ldm naming)}."""
    out = {}
    with d.session(training=False):
        uce = erase_concepts(d, EraseSettings(method="uce", concepts="cat, dog", guide="house", preserve="man", lamb=0.05))
    out["uce"] = (save_erasure(uce, tmp_path / "uce.safetensors", names=d.names()), uce.lora)
    out["uce-diff"] = (save_erasure(uce, tmp_path / "uce_diff.safetensors", names=d.names(), full_diff=True), uce.lora)
    for method in ("esd-x", "esd-u"):
        cfg = TrainConfig(objective="esd", targets=method, steps=2, rank=2, lr=0.05, esd_sample_steps=3, seed=1)
        with d.session():
            res = train_esd(d, ConceptPrompts(("cat",), size=(64, 64)), cfg)
        out[method] = (save_erasure(res, tmp_path / f"{method}.safetensors", names=d.names()), res.lora)
    return out


def test_every_baseline_file_loads_in_comfyui_with_every_key_and_the_same_effect(models, cd, tmp_path, caplog):
    comfy = import_comfy().comfy
    mp, clip, _ = models["sd15"]
    before = diffusion_state(mp)
    with torch.inference_mode():
        d = cd.ComfyDenoiser(mp, clip)
        files = _baselines(d, tmp_path)
        cond = d.encode_prompts(["a photo of a cat", "a dog"])
        g = torch.Generator().manual_seed(0)
        x0, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([150, 650])
        x_t = d.add_noise(x0, noise, t)
        base = _comfy_eps(mp, x_t, t, cond)
    ref = _as_diffusers(cd, d)  # the same weights in a diffusers UNet, patched by the pack
    dcond = {"encoder_hidden_states": cond.tensors["c_crossattn"].clone()}
    from safetydpo_core.denoiser.protocol import Conditioning

    for label, (path, lora) in files.items():
        sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        if label == "uce-diff":
            assert all(k.endswith(".diff") for k in sd)
        caplog.clear()
        with torch.inference_mode(), caplog.at_level(logging.WARNING):
            patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
            theirs = _comfy_eps(patched, x_t, t, cond)
        assert not [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()], label
        assert len(patched.patches) == len(lora), label
        assert (theirs - base).abs().max() > 5e-4, label  # an effect 25x the tolerance below
        back = load_lora(path, names=ref.names())
        back_d = back.renamed(ref.names().mapping(back.naming, "diffusers"), "diffusers")
        with torch.no_grad(), lora_applied(ref.unet, [(back_d, 1.0)]):
            ours = ref.eps_from_prediction(ref.predict(x_t.clone(), t, Conditioning(dcond)), x_t.clone(), t)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-5, msg=label)
        import_comfy().comfy.model_management.unload_all_models()
    assert_same_state(before, mp)


def test_the_uce_node_outputs_a_lora_model_and_a_patched_model(models, comfy_dirs, caplog):
    mp, clip, _ = models["sd15"]
    before = diffusion_state(mp)
    args = dict(model=mp, clip=clip, concepts="cat\ndog", guide="house", preserve="man, red", lamb=0.5,
                erase_scale=1.0, preserve_scale=1.0, rank=0, full_diff=False)
    lora, model, report = run("SafetyDPO_EraseConceptsUCE", **args)
    r = json.loads(report)
    assert r["concepts"] == ["cat", "dog"] and r["guide"] == ["house", "house"] and r["update_rank"] == 2
    assert lora and all(k.startswith("diffusion_model.") and ".attn2.to_" in k for k in lora)
    assert lora.metadata["safetydpo_method"] == "uce"
    assert len(model.patches) == r["layers"] and model is not mp
    diff, _, _ = run("SafetyDPO_EraseConceptsUCE", **dict(args, full_diff=True))
    assert all(k.endswith(".diff") for k in diff) and len(diff) == r["layers"]
    (name,) = run("SafetyDPO_SaveLoRA", lora=diff, filename_prefix="safetydpo/uce")
    from safetensors import safe_open

    with safe_open(str(comfy_dirs / "models" / "loras" / name), "pt") as f:
        assert all(k.endswith(".diff") for k in f.keys())
    back, _ = run("SafetyDPO_LoadLoRA", model=mp, lora_name=name)
    with caplog.at_level(logging.WARNING):
        (applied,) = run("SafetyDPO_ApplySafetyLoRA", model=mp, lora=back, strength=1.0)
    assert len(applied.patches) == r["layers"] and not [x for x in caplog.records if "not loaded" in x.getMessage()]
    errs = core_errors()
    for bad, match in ((dict(concepts=" "), "concepts: the list of concepts is empty"),
                       (dict(concepts="cat, dog, man", guide="a, b"), "guide: 2 guide concepts for 3"),
                       (dict(rank=4000), "rank 4000 is above the size of layer"),
                       (dict(rank=2, full_diff=True), "rank: full_diff")):
        with pytest.raises(errs.ConfigError, match=match):
            run("SafetyDPO_EraseConceptsUCE", **dict(args, **bad))
    assert_same_state(before, mp)


def test_the_train_node_trains_esd_on_a_dataset_s_unsafe_prompts_and_dpo_on_the_chosen_targets(models, comfy_dirs):
    mp, clip, vae = models["sd15"]
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="violence", pairs_per_category=2, seed=0)
    dataset, _, _ = _render((mp, clip, vae), pairs, "esd_data")
    before = diffusion_state(mp)
    args = dict(model=mp, clip=clip, dataset=dataset, category="violence", steps=2, learning_rate=1e-3, rank=2,
                beta=500.0, condition="unsafe", seed=0, gradient_checkpointing=False, save_every=1, resume=True,
                objective="esd-x", esd_eta=1.0)
    lora, metrics, model = run("SafetyDPO_TrainExpert", **args)
    assert metrics["settings"]["objective"] == "esd" and metrics["settings"]["targets"] == "esd-x"
    assert {"esd_gap", "concept_shift"} <= set(metrics["history"][-1])
    assert all(".attn2." in k for k in lora) and lora.metadata["safetydpo_method"] == "esd-x"
    assert json.loads(lora.metadata["safetydpo_concepts"]) == [p.unsafe for p in pairs]
    with pytest.raises(core_errors().ConfigError, match="esd_eta"):
        run("SafetyDPO_TrainExpert", **dict(args, esd_eta=0.0))
    # the targets widget: DPO on ESD-u's layers (the demo's choice), on self-attention + feed-forward, and a
    # name that is not a choice
    dpo = dict(args, objective="dpo", steps=1)
    lora, metrics, _ = run("SafetyDPO_TrainExpert", **dict(dpo, targets="esd-u"))
    layers = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    assert metrics["settings"]["targets"] == "esd-u" and metrics["settings"]["objective"] == "dpo"
    assert "diffusion_model.input_blocks.0.0" in layers and any(k.endswith("in_layers.2") for k in layers)
    assert not [k for k in layers if ".attn2." in k or "time_embed" in k or k.startswith("diffusion_model.out.")]
    lora, metrics, _ = run("SafetyDPO_TrainExpert", **dict(dpo, targets="attn-self+ff"))
    layers = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    assert layers and all(".attn1." in k or ".ff.net." in k for k in layers)
    assert any(".ff.net." in k for k in layers)
    with pytest.raises(core_errors().ConfigError, match=r"^targets must be one of auto, attn, .*; got 'to_q'"):
        run("SafetyDPO_TrainExpert", **dict(dpo, targets="to_q"))
    assert_same_state(before, mp)
