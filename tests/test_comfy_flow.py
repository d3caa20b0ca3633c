"""The ComfyUI denoiser backend on flow-matching transformers: tiny SD3.5-style (MMDiT) and Flux.1-style MODELs
built from ``comfy.supported_models.SD3`` / ``Flux`` / ``FluxSchnell`` inside ``torch.inference_mode()`` (as the
executor builds them), with ComfyUI's SD3 and Flux text encoders.

The MODEL's own ``model_sampling`` decides the schedule; the reference pass is the untouched model; DPO starts at
ln 2 and trains; the loaded MODEL is bit-identical afterwards; exported files load in ComfyUI (every key) and in
diffusers (``load_lora_adapter`` on the same weights converted with ComfyUI's map) with the same effect.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_support import (assert_same_state, backend_module, diffusion_state, import_comfy, requires_comfyui,
                             tiny_flux, tiny_sd3, tiny_sd15)
from safetydpo_core.denoiser.diffusers_flow import DiffusersFlowDenoiser
from safetydpo_core.denoiser.loading import DiffusersComponents
from safetydpo_core.denoiser.protocol import AdapterHandle, Conditioning, Denoiser
from safetydpo_core.errors import ConfigError, ModelError
from safetydpo_core.lora.io import load_lora, save_lora
from safetydpo_core.lora.transformer_names import build_transformer

pytestmark = requires_comfyui

PROMPTS = ["a photo of a cat", "a red house at night"]
KINDS = ["sd3", "flux"]


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = {"sd3": lambda: tiny_sd3(seed=11), "flux": lambda: tiny_flux(seed=12),
                           "schnell": lambda: tiny_flux(seed=13, guidance=False),
                           "sd15": lambda: tiny_sd15(seed=14, with_vae=False)}[kind]()
        return built[kind]

    return get


@pytest.fixture(scope="module")
def cd():
    return backend_module("comfy_denoiser")


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    import_comfy().comfy.model_management.unload_all_models()


def _batch(d, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 16, 8, 8, generator=g)
    noise = torch.randn(b, 16, 8, 8, generator=g)
    t = d.sample_timesteps(b, g, x0.shape[1:])
    return x0, noise, t, d.add_noise(x0, noise, t)


def _comfy_v(mp, x_t, t, cond):
    """The velocity of the untouched graph MODEL, through ComfyUI's own apply_model (as a sampler calls it)."""
    comfy = import_comfy().comfy
    comfy.model_management.load_models_gpu([mp])
    sigma = (t.double() / 1000).float()
    kw = {k: v for k, v in cond.tensors.items() if k in ("c_crossattn", "y", "guidance")}
    with torch.no_grad():
        den = mp.model.apply_model(x_t, sigma, **kw)
    return (x_t - den) / sigma.view(-1, 1, 1, 1)


def _dpo_loss(d, adapter, x_w, x_l, noise, t, cond, beta=200.0):
    x0 = torch.cat([x_w, x_l])
    n2, t2, c2 = torch.cat([noise, noise]), torch.cat([t, t]), cond.repeat(2)
    x_t = d.add_noise(x0, n2, t2)
    with adapter.disabled(), torch.no_grad():
        ref = d.predict(x_t, t2, c2)
    pol = d.predict(x_t, t2, c2)
    target = d.target(x0, n2, t2)
    mse_p = ((pol - target) ** 2).mean(dim=(1, 2, 3))
    mse_r = ((ref - target) ** 2).mean(dim=(1, 2, 3))
    b = x_w.shape[0]
    inside = -0.5 * beta * ((mse_p[:b] - mse_p[b:]) - (mse_r[:b] - mse_r[b:]))
    return -F.logsigmoid(inside).mean()


def _wrappers_on_modules(mp) -> int:
    return sum(len(m.__dict__.get("weight_function", [])) + len(m.__dict__.get("bias_function", []))
               for m in mp.model.modules())


def _graph_facts(mp):
    """What a training run must leave as it found it, beyond the weights' values."""
    dm = mp.model.diffusion_model
    import comfy.ldm.flux.math as fmath

    return {"params": [(n, id(p), p.requires_grad) for n, p in dm.named_parameters()],
            "forwards": sorted(n for n, m in dm.named_modules() if "forward" in m.__dict__),
            "wrappers": dict(mp.weight_wrapper_patches), "uuid": mp.patches_uuid,
            "object_patches": dict(mp.object_patches), "rope": fmath.apply_rope}


# -- facts, conditioning, the schedule ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux", "schnell"])
def test_model_facts_and_conditioning(models, cd, kind):
    mp, clip, vae = models(kind)
    assert next(mp.model.diffusion_model.parameters()).is_inference()  # the executor's trap is reproduced
    with torch.inference_mode():
        d = cd.ComfyDenoiser(mp, clip, vae)
        assert isinstance(d, Denoiser)
        assert (d.schedule, d.prediction_type, d.num_train_timesteps, d.naming) == ("flow", "flow", 1000, "ldm")
        assert d.arch == ("sd3" if kind == "sd3" else "flux")
        assert d.base_model_version == {"sd3": "sd3", "flux": "flux1", "schnell": "flux1"}[kind]
        assert d.guidance == (3.5 if kind == "flux" else None) and d.guidance_input == (kind == "flux")
        # SD3's static shift 3; Flux.1-dev's shift grows with the size; schnell's discrete flow has shift 1
        assert (d.flow.shift, d.flow.dynamic) == {"sd3": (3.0, False), "flux": (1.0, True), "schnell": (1.0, False)}[kind]
        layers = d.layers("attn")
        names = d.names()  # checked against ComfyUI's own map inside
        assert set(layers) <= set(names.shapes["ldm"])
        if kind == "sd3":
            assert {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv",
                    "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.context_block.attn.proj"} <= set(layers)
            assert "joint_blocks.1.context_block.attn.proj" not in layers  # the last block's context is pre-only
        else:
            assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
                    "single_blocks.1.linear2"} <= set(layers)
            assert "final_layer.linear" not in layers
        assert d.latent_shape(64, 32) == (16, 8, 4)
        with pytest.raises(ConfigError, match="multiple of 16"):
            d.latent_shape(72, 64)
        cond = d.encode_prompts(PROMPTS)
        long = d.encode_prompts([PROMPTS[0], " ".join(["a red house"] * 100)])  # longer than a CLIP window / T5's 256
    c = cond.tensors
    if kind == "sd3":
        assert c["c_crossattn"].shape == (2, 77, 4096) and c["y"].shape == (2, 32) and "guidance" not in c
        n = long.tensors["c_crossattn"].shape[1]
        assert n > 77 and n % 77 == 0  # several CLIP windows; the short prompt padded with empty windows
        torch.testing.assert_close(long.tensors["c_crossattn"][0, :77], c["c_crossattn"][0])
    else:
        assert c["c_crossattn"].shape == (2, 256, 32) and c["y"].shape == (2, 16)
        assert ("guidance" in c) == (kind == "flux")
        if kind == "flux":
            assert torch.equal(c["guidance"], torch.tensor([3.5, 3.5]))
        assert long.tensors["c_crossattn"].shape[1] > 256  # T5 padded to the longest prompt
    assert not torch.equal(c["c_crossattn"][0], c["c_crossattn"][1])


def test_the_models_own_sampling_decides_the_schedule(models, cd):
    """No list of model names: a UNet given flow sampling trains as flow, an MMDiT given EPS sampling as EPS, and a
    ModelSamplingFlux node's shift holds at every size."""
    comfy = import_comfy().comfy
    S = comfy.model_sampling
    sd15, sd3, flux = models("sd15")[0], models("sd3")[0], models("flux")[0]
    flow_ms = type("Flow", (S.ModelSamplingDiscreteFlow, S.CONST), {})(sd15.model.model_config)
    flow_ms.set_parameters(shift=2.0)
    as_flow = sd15.clone()
    as_flow.add_object_patch("model_sampling", flow_ms)
    eps_ms = type("Eps", (S.ModelSamplingDiscrete, S.EPS), {})(sd3.model.model_config)
    as_eps = sd3.clone()
    as_eps.add_object_patch("model_sampling", eps_ms)
    flux_ms = type("FluxMS", (S.ModelSamplingFlux, S.CONST), {})(flux.model.model_config)
    flux_ms.set_parameters(shift=0.9)
    shifted = flux.clone()
    shifted.add_object_patch("model_sampling", flux_ms)
    with torch.inference_mode():
        a, b, c = cd.ComfyDenoiser(as_flow), cd.ComfyDenoiser(as_eps), cd.ComfyDenoiser(shifted)
    assert (a.arch, a.schedule, a.prediction_type, a.flow.shift) == ("unet", "flow", "flow", 2.0)
    assert (b.arch, b.schedule, b.prediction_type, b.num_train_timesteps) == ("sd3", "discrete", "epsilon", 1000)
    assert (c.flow.dynamic, c.flow.shift) == (False, pytest.approx(2.4596, abs=1e-4))  # exp(0.9)
    edm = sd3.clone()
    edm.add_object_patch("model_sampling", type("EDM", (S.ModelSamplingContinuousEDM, S.EDM), {})(sd3.model.model_config))
    with pytest.raises(ModelError, match="not supported yet.*Supported: .*SD3.*Flux"):
        cd.ComfyDenoiser(edm)


def test_unsupported_models_and_guidance_are_refused_clearly(models, cd):
    comfy = import_comfy().comfy
    with pytest.raises(ConfigError, match="guidance=3.5 was given, but the model SD3.*no guidance input"):
        cd.ComfyDenoiser(models("sd3")[0], guidance=3.5)
    with pytest.raises(ConfigError, match="no guidance input"):
        cd.ComfyDenoiser(models("schnell")[0], guidance=2.0)
    with pytest.raises(ConfigError, match="no guidance input"):
        cd.ComfyDenoiser(models("sd15")[0], guidance=7.0)
    assert cd.ComfyDenoiser(models("flux")[0], guidance=2.5).guidance == 2.5
    with torch.inference_mode():
        cfg = comfy.supported_models.SD3({"disable_unet_model_creation": True, "in_channels": 16})
        cfg.set_inference_dtype(torch.float32, None)
        bare = comfy.model_patcher.ModelPatcher(cfg.get_model({}), torch.device("cpu"), torch.device("cpu"))
        fill_cfg = comfy.supported_models.Flux(dict(models("flux")[0].model.model_config.unet_config, in_channels=32))
        fill_cfg.set_inference_dtype(torch.float32, None)
        fill = comfy.model_patcher.ModelPatcher(fill_cfg.get_model({}, device="meta"), torch.device("cpu"),
                                                torch.device("cpu"))
    with pytest.raises(ModelError, match="not supported yet. Supported: SD1.x.*SD3 / SD3.5.*Flux.1"):
        cd.ComfyDenoiser(bare)
    with pytest.raises(ModelError, match="input channels.*Fill"):
        cd.ComfyDenoiser(fill)


# -- the reference pass and training -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_off_prediction_equals_the_untouched_model(models, cd, kind):
    mp = models(kind)[0]
    with torch.inference_mode():
        d = cd.ComfyDenoiser(*models(kind))
        cond = d.encode_prompts(PROMPTS)
        x0, noise, t, x_t = _batch(d)
        expected = _comfy_v(mp, x_t, t, cond)
        torch.testing.assert_close(d.target(x0, noise, t), noise - x0)
        with d.session():
            plain = d.predict(x_t, t, cond)
            adapter = d.attach_lora(4, targets="attn")
            assert isinstance(adapter, AdapterHandle)
            torch.manual_seed(0)
            for p in adapter.parameters():
                p.data.normal_(0, 0.3)
            with adapter.disabled(), torch.no_grad():
                off = d.predict(x_t, t, cond)
            on = d.predict(x_t, t, cond)
            adapter.remove()
    assert torch.equal(plain, expected) and torch.equal(off, expected)
    assert not off.requires_grad and on.requires_grad
    assert (on - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_dpo_steps_train_and_leave_the_loaded_model_bit_identical(models, cd, kind):
    comfy = import_comfy().comfy
    mp = models(kind)[0]
    before, facts = diffusion_state(mp), _graph_facts(mp)
    with torch.inference_mode():  # as in a ComfyUI node
        d = cd.ComfyDenoiser(*models(kind))
        cond = d.encode_prompts(PROMPTS[:1])
        x_w, noise, t, _ = _batch(d, seed=1, b=1)
        x_l = torch.randn_like(x_w)
        expected = _comfy_v(mp, d.add_noise(x_w, noise, t), t, cond)
        with d.session():
            adapter = d.attach_lora(4, targets="attn")
            assert adapter.unreached  # RMS-norm scales outside ComfyUI's ops: lent out while training
            params = adapter.parameters()
            opt = torch.optim.AdamW(params, lr=3e-3)
            losses = []
            for _ in range(4):
                loss = _dpo_loss(d, adapter, x_w, x_l, noise, t, cond)
                loss.backward()
                assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
                assert sum(float(p.grad.abs().sum()) for p in params) > 0
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
            lora = adapter.export()
            adapter.remove()
        assert not any(lm.model is d._mp for lm in comfy.model_management.current_loaded_models)
    assert losses[0] == pytest.approx(0.6931, abs=1e-4) and losses[-1] < losses[0] - 0.05
    assert lora.naming == "ldm" and set(lora.layers) == set(d.layers("attn"))
    assert_same_state(before, mp)
    assert _graph_facts(mp) == facts and _wrappers_on_modules(mp) == 0
    with torch.inference_mode():
        assert torch.equal(_comfy_v(mp, d.add_noise(x_w, noise, t), t, cond), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(models, cd, kind):
    with torch.inference_mode():
        d = cd.ComfyDenoiser(*models(kind))
        cond = d.encode_prompts(PROMPTS[:1])
        x_w, noise, t, _ = _batch(d, seed=2, b=1)
        x_l = torch.randn_like(x_w)
        grads = []
        with d.session():
            adapter = d.attach_lora(2, targets="attn")
            with torch.no_grad():
                for p in adapter.parameters():
                    p.normal_(0, 0.1)
            for ckpt in (False, True):
                d.set_gradient_checkpointing(ckpt)
                _dpo_loss(d, adapter, x_w, x_l, noise, t, cond).backward()
                grads.append([p.grad.clone() for p in adapter.parameters()])
                for p in adapter.parameters():
                    p.grad = None
            adapter.remove()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# -- files: ComfyUI and diffusers -----------------------------------------------------------------------------
def _as_diffusers(d):
    """The same weights in a diffusers transformer, through ComfyUI's own key map (fused slices, swapped rows)."""
    comfy = import_comfy().comfy
    config = d.diffusers_config()
    model = build_transformer(config)
    unet_config = d.patcher.model.model_config.unet_config
    key_map = (comfy.utils.mmdit_to_diffusers if d.arch == "sd3" else comfy.utils.flux_to_diffusers)(unet_config)
    ours = {k: v.detach().clone() for k, v in d.module.state_dict().items()}
    sd = {}
    for k in model.state_dict():
        src = key_map[k]
        if isinstance(src, str):
            sd[k] = ours[src]
        elif src[1] is not None:
            dim, off, size = src[1]
            sd[k] = ours[src[0]].narrow(dim, off, size)
        else:
            sd[k] = src[2](ours[src[0]])
    model.load_state_dict(sd, strict=True)
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = DiffusersComponents(None, FlowMatchEulerDiscreteScheduler(shift=3.0), [None, None], [None, None], None,
                                "comfy", {}, transformer=model.eval())
    return DiffusersFlowDenoiser(parts)


def _diffusers_cond(cond: Conditioning) -> Conditioning:
    c = {"encoder_hidden_states": cond.tensors["c_crossattn"].clone(), "pooled_projections": cond.tensors["y"].clone()}
    if "guidance" in cond.tensors:
        c["guidance"] = cond.tensors["guidance"].clone()
    return Conditioning(c)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_files_load_in_comfyui_and_diffusers_with_the_same_effect(models, cd, kind, tmp_path, caplog):
    comfy = import_comfy().comfy
    mp = models(kind)[0]
    before = diffusion_state(mp)
    with torch.inference_mode():
        d = cd.ComfyDenoiser(*models(kind))
        cond = d.encode_prompts(PROMPTS)
        x0, noise, t, x_t = _batch(d, seed=3)
        base = _comfy_v(mp, x_t, t, cond)
        with d.session():
            adapter = d.attach_lora(4, alpha=2.0, targets="attn+ff")
            torch.manual_seed(1)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.normal_(0, 0.2)
            ours = d.predict(x_t, t, cond).detach()
            lora = adapter.export()
            adapter.remove()
        names = d.names()
        kohya = save_lora(lora, tmp_path / "expert.safetensors", names=names)
        peft = save_lora(lora, tmp_path / "expert_peft.safetensors", names=names, fmt="peft")
        files = {"kohya file": comfy.utils.load_torch_file(str(kohya), safe_load=True),
                 "peft file": comfy.utils.load_torch_file(str(peft), safe_load=True),
                 "LORA_MODEL": cd.lora_to_comfy(lora)}
        fused = {"sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv", "flux": "lora_unet_single_blocks_0_linear1"}[kind]
        assert f"{fused}.lora_up.weight" in files["kohya file"]
        assert any(".attn.to_q.lora_A.weight" in k for k in files["peft file"])
        for what, sd in files.items():
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
            unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
            assert not unloaded, f"{what}: {unloaded[:3]}"
            assert len(patched.patches) == len(lora), what
            theirs = _comfy_v(patched, x_t, t, cond)
            assert (theirs - base).abs().max() > 1e-3, what
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=what)
        comfy.model_management.unload_all_models()
    assert_same_state(before, mp)
    # diffusers: the same weights in its transformer, the peft file through its own loader
    ref = _as_diffusers(d)
    dcond = _diffusers_cond(cond)
    with torch.no_grad():
        torch.testing.assert_close(ref.predict(x_t.clone(), t, dcond), base, rtol=1e-4, atol=1e-4)
        from safetensors.torch import load_file

        ref.transformer.load_lora_adapter(load_file(str(peft)), prefix="transformer", adapter_name="expert")
        theirs = ref.predict(x_t.clone(), t, dcond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # the files read back into our adapter resume the same LoRA
    back = load_lora(kohya, names=names)
    assert back.naming == "ldm" and back.allclose(lora)
    with torch.inference_mode():
        with d.session():
            adapter = d.attach_lora(4, targets="attn+ff")
            adapter.load(load_lora(peft, names=names))
            resumed = d.predict(x_t, t, cond).detach()
            adapter.remove()
    torch.testing.assert_close(resumed, ours, rtol=1e-5, atol=1e-5)


# -- the core on a ComfyUI transformer, end to end --------------------------------------------------------------
def test_core_renders_trains_calibrates_and_merges_on_the_comfy_flux_model(models, cd, tmp_path):
    """Pairs rendered through ComfyUI's sampler, two experts from the core trainer, Co-Merge calibrated with hooks
    on the transformer's layers, the merged LoRA loaded by ComfyUI with every key, the graph untouched."""
    from safetydpo_core import merge
    from safetydpo_core.data.preference_dataset import PreferenceDataset
    from safetydpo_core.data.render import RenderSettings, render_pairs
    from safetydpo_core.training.config import TrainConfig
    from safetydpo_core.training.trainer import ExpertTrainer

    class Pair:
        def __init__(self, i, cat):
            self.id, self.category, self.concept = f"{cat}{i}", [cat], "c"
            self.unsafe, self.safe = f"a painting of a dog {i}", f"a photo of a cat {i}"

    comfy = import_comfy().comfy
    mp = models("flux")[0]
    before, facts = diffusion_state(mp), _graph_facts(mp)
    with torch.inference_mode():  # as in a ComfyUI node
        d = cd.ComfyDenoiser(*models("flux"))
        pairs = [Pair(i, c) for c in ("violence", "hate") for i in range(2)]
        render_pairs(d, pairs, tmp_path / "ds", RenderSettings(height=64, width=64, steps=2, cfg=1.0, sampler="euler",
                                                                 batch_pairs=2), previews=False)
        experts = []
        for cat in ("violence", "hate"):
            ds = PreferenceDataset(tmp_path / "ds", categories=cat, expect_fingerprint=d.fingerprint())
            with d.session():
                result = ExpertTrainer(d, ds, TrainConfig(steps=3, rank=2, beta=500.0, lr=1e-3, gradient_checkpointing=True,
                                                          category=cat)).run()
            assert result.history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
            experts.append(result.lora)
        rows = [{"id": p.id, "category": p.category, "unsafe": p.unsafe, "safe": p.safe} for p in pairs]
        prompts = merge.calibration_prompts(rows, ["violence", "hate"], 4)
        with d.session(training=False):
            stats = merge.calibrate(d, prompts, experts=experts,
                                    options=merge.CalibrationOptions(num_inputs=4, batch_size=2, size=64))
        assert set(stats.layers) == set(experts[0].layers) and stats.info["timesteps"][0] == 700
        merged = merge.merge_experts(experts, "comerge", stats, merge.MergeOptions())
        assert set(merged.lora.layers) == set(experts[0].layers)
        patched, _ = comfy.sd.load_lora_for_models(mp, None, cd.lora_to_comfy(merged.lora), 1.0, 0)
        assert len(patched.patches) == len(merged.lora)
        lat = d.sample(d.encode_prompts(["a cat"]), None, torch.randn(1, 16, 8, 8), steps=2, cfg=1.0)
        assert torch.isfinite(lat).all()
    assert_same_state(before, mp)
    assert _graph_facts(mp) == facts


def test_training_batches_prompts_of_different_lengths_with_preservation(models, cd, tmp_path):
    """The trainer encodes one prompt per text-encoder call; a batch mixing a short prompt with one longer than a
    CLIP window (more tokens than SD3's 77) still trains (the denoiser pads them together), the preservation term
    draws continuous noise levels and starts at zero, and the graph is left untouched."""
    from safetydpo_core.data import PreferenceDatasetWriter
    from safetydpo_core.data.preference_dataset import PreferenceDataset
    from safetydpo_core.training.config import TrainConfig
    from safetydpo_core.training.trainer import ExpertTrainer

    mp = models("sd3")[0]
    before = diffusion_state(mp)
    long = " ".join(["a red house by the sea"] * 30)
    with torch.inference_mode():
        d = cd.ComfyDenoiser(*models("sd3"))
        g = torch.Generator().manual_seed(5)
        root = tmp_path / "ds"
        with PreferenceDatasetWriter(root, model_fingerprint=d.fingerprint(), previews=False,
                                     settings={"model_base": d.base_model_version}) as w:
            for i, (cat, unsafe) in enumerate([("violence", "a dog"), ("violence", long), ("hate", "a cat"),
                                               ("hate", long + " at night")]):
                lat = torch.randn(16, 8, 8, generator=g)
                w.add(id=f"p{i}", category=[cat], concept="c", unsafe=unsafe, safe=f"a bird {i}",
                      safe_latent=lat, unsafe_latent=-lat, seed=i, height=64, width=64)
        ds = PreferenceDataset(root, categories="violence", expect_fingerprint=d.fingerprint())
        with d.session():
            result = ExpertTrainer(d, ds, TrainConfig(steps=2, rank=2, beta=500.0, lr=1e-3, batch_size=2,
                                                      preserve_weight=1.0, preserve_prompts="auto",
                                                      category="violence")).run()
    h = result.history
    assert h[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and h[0]["preserve"] == pytest.approx(0.0, abs=1e-9)
    assert all(math.isfinite(r["loss"]) for r in h) and result.lora.metadata["safetydpo_preserve_weight"] == "1"
    assert_same_state(before, mp)
