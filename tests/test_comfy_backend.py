"""The ComfyUI denoiser backend (nodes/comfy_denoiser.py) on real ComfyUI objects, in-process.

Tiny SD1.5- and SDXL-architecture MODEL/CLIP/VAE triples are built with ComfyUI's own classes inside
``torch.inference_mode()``, as ComfyUI's executor builds the models of a graph, and every test drives the
backend from inside inference mode, as a node would.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from comfyui_support import (assert_same_state, backend_module, diffusion_state, import_comfy, requires_comfyui,
                             tiny_sd15, tiny_sdxl)
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.denoiser.loading import DiffusersComponents
from safetydpo_core.denoiser.protocol import AdapterHandle, Conditioning, Denoiser
from safetydpo_core.lora.io import load_lora, save_lora
from safetydpo_core.utils.fingerprint import module_fingerprint

pytestmark = requires_comfyui

PROMPTS = ["a photo of a cat", "a red house at night"]


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = {"sd15": lambda: tiny_sd15(seed=1), "sdxl": lambda: tiny_sdxl(seed=2),
                           "sd15-v": lambda: tiny_sd15(seed=3, v_prediction=True, with_vae=False)}[kind]()
        return built[kind]

    return get


@pytest.fixture(scope="module")
def cd():
    return backend_module("comfy_denoiser")


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    import_comfy().comfy.model_management.unload_all_models()


def _denoiser(cd, triple, **kw):
    mp, clip, vae = triple
    return cd.ComfyDenoiser(mp, clip, vae, **kw)


def _batch(d, cond, seed=0, b=2, size=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, size, size, generator=g)
    noise = torch.randn(b, 4, size, size, generator=g)
    t = torch.tensor([17, 640][:b] + [300] * max(0, b - 2))
    return x0, noise, t, d.add_noise(x0, noise, t)


def _comfy_eps(mp, x_t, t, cond):
    """Epsilon from the untouched graph MODEL, through ComfyUI's own apply_model (as a sampler calls it)."""
    comfy = import_comfy().comfy
    comfy.model_management.load_models_gpu([mp])
    sigma = mp.model.model_sampling.sigmas[t.long()].float()
    x = x_t * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
    kw = {k: v for k, v in cond.tensors.items() if k in ("c_crossattn", "y")}
    with torch.no_grad():
        den = mp.model.apply_model(x, sigma, **kw)
    return (x - den) / sigma.view(-1, 1, 1, 1)


def _dpo_loss(d, adapter, x_w, x_l, noise, t, cond, beta=200.0):
    """A Diffusion-DPO step in the shape the trainer uses: reference first (adapters off, no grad)."""
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


# -- protocol and construction ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_protocol_and_model_facts(models, cd, kind):
    mp, clip, vae = models(kind)
    assert next(mp.model.diffusion_model.parameters()).is_inference()  # the executor's trap is reproduced
    with torch.inference_mode():
        d = _denoiser(cd, models(kind))
        assert isinstance(d, Denoiser)
        assert d.naming == "ldm" and d.prediction_type == "epsilon" and d.num_train_timesteps == 1000
        assert d.base_model_version == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[kind]
        assert d.device == torch.device("cpu") and d.compute_dtype == torch.float32  # no bf16 on the CPU
        layers = d.layers("attn")
        assert layers and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in layers)
        assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in layers or kind == "sdxl"
        shapes = d.weight_shapes()
        assert all(shapes[n] == tuple(m.weight.shape) for n, m in layers.items())
        names = d.names()
        assert set(names.names("ldm")) <= set(shapes)
        assert d.latent_shape(64, 48) == (4, 8, 6)
        with pytest.raises(Exception, match="multiple of 8"):
            d.latent_shape(60, 64)
        cond = d.encode_prompts(PROMPTS)
    ctx = {"sd15": 32, "sdxl": 48}[kind]
    assert cond.tensors["c_crossattn"].shape == (2, 77, ctx)
    if kind == "sdxl":
        assert cond.tensors["y"].shape == (2, mp.model.adm_channels)
        assert cond.tensors["pooled_output"].shape == (2, 32)
        assert cond.tensors["size"][0].tolist() == [1024, 1024, 0, 0, 1024, 1024]
        # the size conditioning is really in y
        with torch.inference_mode():
            other = d.encode_prompts(PROMPTS, size=(512, 768))
        assert torch.equal(other.tensors["y"][:, :32], cond.tensors["y"][:, :32])
        assert not torch.equal(other.tensors["y"], cond.tensors["y"])
    else:
        assert set(cond.tensors) == {"c_crossattn"}
    assert not torch.equal(cond.tensors["c_crossattn"][0], cond.tensors["c_crossattn"][1])
    # prompts longer than one CLIP window batch with short ones as ComfyUI batches them (repeat to the LCM)
    with torch.inference_mode():
        mixed = d.encode_prompts([PROMPTS[0], " ".join(["a red house"] * 40)])
    assert mixed.tensors["c_crossattn"].shape == (2, 154, ctx)
    torch.testing.assert_close(mixed.tensors["c_crossattn"][0], cond.tensors["c_crossattn"][0].repeat(2, 1))


def test_unsupported_models_are_refused_clearly(models, cd):
    from safetydpo_core.errors import ModelError

    comfy = import_comfy().comfy
    mp, _, _ = models("sd15")
    with pytest.raises(ModelError, match="Expected a ComfyUI MODEL"):
        cd.ComfyDenoiser(object())
    edm = mp.clone()  # what ComfyUI's ModelSamplingContinuousEDM node does
    sampling = type("EDMSampling", (comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EDM), {})
    edm.add_object_patch("model_sampling", sampling(mp.model.model_config))
    with pytest.raises(ModelError, match="not supported yet"):
        cd.ComfyDenoiser(edm)
    with torch.inference_mode():
        cfg = comfy.supported_models.SD15({"disable_unet_model_creation": True, "in_channels": 4})
        cfg.set_inference_dtype(torch.float32, None)
        bare = comfy.model_patcher.ModelPatcher(cfg.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ModelError, match="not supported yet"):
        cd.ComfyDenoiser(bare)


# -- the reference pass ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_adapter_off_prediction_equals_the_untouched_model(models, cd, kind):
    mp = models(kind)[0]
    with torch.inference_mode():
        d = _denoiser(cd, models(kind))
        cond = d.encode_prompts(PROMPTS)
        x0, noise, t, x_t = _batch(d, cond)
        expected = _comfy_eps(mp, x_t, t, cond)
        with d.session():
            plain = d.predict(x_t, t, cond)
            adapter = d.attach_lora(4, targets="attn")
            assert isinstance(adapter, AdapterHandle)
            torch.manual_seed(0)
            for p in adapter.parameters():  # a LoRA that changes the output when on
                p.data.normal_(0, 0.3)
            with adapter.disabled(), torch.no_grad():
                off = d.predict(x_t, t, cond)
            on = d.predict(x_t, t, cond)
            adapter.remove()
    assert torch.equal(plain, expected)
    assert torch.equal(off, expected)
    assert not off.requires_grad and on.requires_grad  # the reference pass builds no graph
    assert (on - expected).abs().max() > 1e-3


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_dpo_steps_train_and_leave_the_loaded_model_untouched(models, cd, kind):
    comfy = import_comfy().comfy
    mp = models(kind)[0]
    before = diffusion_state(mp)
    flags = [p.requires_grad for p in mp.model.diffusion_model.parameters()]
    wrappers, uuid = dict(mp.weight_wrapper_patches), mp.patches_uuid
    with torch.inference_mode():  # as in a ComfyUI node
        d = _denoiser(cd, models(kind))
        cond = d.encode_prompts(PROMPTS[:1])
        x_w, noise, t, _ = _batch(d, cond, seed=1, b=1)
        x_l = torch.randn_like(x_w)
        expected = _comfy_eps(mp, d.add_noise(x_w, noise, t), t, cond)
        with d.session():
            adapter = d.attach_lora(4, targets="attn")
            params = adapter.parameters()
            assert all(p.dtype == torch.float32 and p.requires_grad and not p.is_inference() for p in params)
            opt = torch.optim.AdamW(params, lr=3e-3)
            losses = []
            for _ in range(4):
                loss = _dpo_loss(d, adapter, x_w, x_l, noise, t, cond)
                loss.backward()
                grads = [p.grad for p in params]
                assert all(g is not None and torch.isfinite(g).all() for g in grads)
                assert sum(float(g.abs().sum()) for g in grads) > 0
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
            lora = adapter.export()
            adapter.remove()
        assert not any(lm.model is d._mp for lm in comfy.model_management.current_loaded_models)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert losses[-1] < losses[0]
    assert lora.naming == "ldm" and len(lora) == len(d.layers("attn"))
    assert all(l.up.abs().max() > 0 for l in lora.layers.values())
    # the graph's MODEL: same weights, flags, wrappers, patches; nothing left on the shared modules
    assert_same_state(before, mp)
    assert [p.requires_grad for p in mp.model.diffusion_model.parameters()] == flags
    assert mp.weight_wrapper_patches == wrappers and mp.patches_uuid == uuid
    assert _wrappers_on_modules(mp) == 0
    with torch.inference_mode():
        assert torch.equal(_comfy_eps(mp, d.add_noise(x_w, noise, t), t, cond), expected)


def test_gradient_checkpointing_gives_the_same_gradients(models, cd):
    with torch.inference_mode():
        d = _denoiser(cd, models("sd15"))
        cond = d.encode_prompts(PROMPTS[:1])
        x_w, noise, t, _ = _batch(d, cond, seed=2, b=1)
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
        assert not any("forward" in b.__dict__ for b in d.module.input_blocks)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_rank_above_a_layer_s_size_caps_that_layer_at_the_run_s_scale(models, cd):
    """As peft's rank_pattern in the diffusers backend: rank 40 on the tiny UNet's attention gives the 32-wide
    layers rank 32 (alpha scaled with it) and the 64-wide ones 40, every layer at the scale alpha / rank."""
    from safetydpo_core.lora.targets import max_rank

    with torch.inference_mode():
        d = _denoiser(cd, models("sd15"))
        layers = d.layers("attn")
        with d.session():
            adapter = d.attach_lora(40, alpha=20.0, targets="attn")
            lora = adapter.export()
            adapter.remove()
    assert {max_rank(m) for m in layers.values()} == {32, 64}
    assert {n: l.rank for n, l in lora.items()} == {n: min(40, max_rank(m)) for n, m in layers.items()}
    assert all(l.scale == pytest.approx(0.5) for l in lora.layers.values())


# -- export: files and LORA_MODEL dicts that ComfyUI loads --------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_export_loads_in_comfyui_with_every_key_and_the_same_effect(models, cd, kind, tmp_path, caplog):
    comfy = import_comfy().comfy
    mp = models(kind)[0]
    before = diffusion_state(mp)
    with torch.inference_mode():
        d = _denoiser(cd, models(kind))
        cond = d.encode_prompts(PROMPTS)
        x0, noise, t, x_t = _batch(d, cond, seed=3)
        base = _comfy_eps(mp, x_t, t, cond)
        with d.session():
            adapter = d.attach_lora(4, alpha=2.0, targets="attn+ff")
            torch.manual_seed(1)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.normal_(0, 0.2)
            ours = d.predict(x_t, t, cond).detach()
            lora = adapter.export()
            adapter.remove()
        path = save_lora(lora, tmp_path / "expert.safetensors", names=d.names())
        files = {"kohya file": comfy.utils.load_torch_file(str(path), safe_load=True),
                 "LORA_MODEL": cd.lora_to_comfy(lora)}
        prefix = {"sd15": "lora_unet_down_blocks_", "sdxl": "lora_unet_input_blocks_"}[kind]
        assert any(k.startswith(prefix) for k in files["kohya file"])
        assert all(k.startswith("diffusion_model.") for k in files["LORA_MODEL"])
        for what, sd in files.items():
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
            unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
            assert not unloaded, f"{what}: {unloaded[:3]}"
            assert len(patched.patches) == len(lora)
            theirs = _comfy_eps(patched, x_t, t, cond)
            assert (theirs - base).abs().max() > 1e-3, what
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=what)
        comfy.model_management.unload_all_models()
    assert_same_state(before, mp)
    # the file and the dict read back to the same LoRA; the adapter resumes from either
    back_file = load_lora(path, names=d.names())
    back_dict = cd.lora_from_comfy(files["LORA_MODEL"])
    assert back_file.naming == {"sd15": "diffusers", "sdxl": "ldm"}[kind] and back_dict.naming == "ldm"
    assert back_dict.allclose(lora) and back_file.renamed(d.names().mapping(back_file.naming, "ldm"), "ldm").allclose(lora)
    with torch.inference_mode():
        with d.session():
            adapter = d.attach_lora(4, targets="attn+ff")
            adapter.load(back_file)
            resumed = d.predict(x_t, t, cond).detach()
            adapter.remove()
    torch.testing.assert_close(resumed, ours, rtol=1e-5, atol=1e-5)


def test_lora_model_dict_helpers_refuse_what_they_cannot_convert(models, cd):
    from safetydpo_core.errors import LoraError
    from safetydpo_core.lora.lora_set import LoraLayer, LoraSet

    diffusers_named = LoraSet({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                               LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)}, "diffusers")
    with pytest.raises(LoraError, match="names"):
        cd.lora_to_comfy(diffusers_named)
    with torch.inference_mode():
        d = _denoiser(cd, models("sd15"))
        sd = cd.lora_to_comfy(diffusers_named, names=d.names())
    assert set(sd) == {f"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.{s}"
                       for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    with pytest.raises(LoraError):
        cd.lora_from_comfy({"diffusion_model.input_blocks.1.1.norm.diff": torch.zeros(32)})
    with pytest.raises(LoraError, match="dict of tensors"):
        cd.lora_from_comfy({"x": 1})


# -- agreement with the diffusers backend ----------------------------------------------------------------
def _as_diffusers(cd, d):
    """The same weights in a diffusers UNet, through ComfyUI's key map, wrapped by the diffusers backend."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    comfy = import_comfy().comfy
    unet_config = d.patcher.model.model_config.unet_config
    unet = UNet2DConditionModel.from_config(d.diffusers_config())
    ldm = d.module.state_dict()
    sd = {dk: ldm[lk].clone() for dk, lk in comfy.utils.unet_to_diffusers(unet_config).items() if lk in ldm}
    missing, unexpected = unet.load_state_dict({k: v for k, v in sd.items() if k in unet.state_dict()}, strict=False)
    assert not missing, missing[:5]
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=d.model_prediction_type)
    return DiffusersDenoiser(DiffusersComponents(unet.eval(), scheduler, [], [], None, "comfy", {}))


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd15-v"])
def test_predictions_and_fingerprint_agree_with_the_diffusers_backend(models, cd, kind):
    """Same weights, x_t, t and text embeddings: both backends predict the same epsilon (EPS and V models)."""
    with torch.inference_mode():
        d = _denoiser(cd, models(kind))
        cond = d.encode_prompts(PROMPTS)
        x0, noise, t, x_t = _batch(d, cond, seed=4)
        with d.session():
            ours = d.predict(x_t, t, cond)
    assert d.model_prediction_type == ("v_prediction" if kind == "sd15-v" else "epsilon")
    with torch.no_grad():
        ref = _as_diffusers(cd, d)
        c = cond.tensors
        dcond = {"encoder_hidden_states": c["c_crossattn"].clone()}
        if "y" in c:
            dcond.update({"text_embeds": c["pooled_output"].clone(), "time_ids": c["size"].clone()})
        torch.testing.assert_close(ref.add_noise(x0, noise, t), x_t.clone(), rtol=1e-5, atol=1e-5)
        theirs = ref.eps_from_prediction(ref.predict(x_t.clone(), t, Conditioning(dcond)), x_t.clone(), t)
        assert ref.fingerprint() == d.fingerprint()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-4)


def test_fingerprint_tells_a_patched_model_apart(models, cd):
    comfy = import_comfy().comfy
    mp = models("sd15")[0]
    with torch.inference_mode():
        plain = cd.ComfyDenoiser(mp).fingerprint()
        assert cd.ComfyDenoiser(mp.clone()).fingerprint() == plain
        name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
        lora = {f"{name}.lora_up.weight": torch.ones(32, 1), f"{name}.lora_down.weight": torch.ones(1, 32)}
        patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 0.5, 0)
        assert cd.ComfyDenoiser(patched).fingerprint() != plain
        assert module_fingerprint(mp.model.diffusion_model.parameters()) == plain


# -- rendering through ComfyUI ---------------------------------------------------------------------------
def test_vae_round_trip_and_comfy_sampling(models, cd):
    with torch.inference_mode():
        d = _denoiser(cd, models("sd15"))
        images = torch.rand(2, 3, 64, 64)
        lat = d.encode_images(images)
        assert lat.shape == (2, *d.latent_shape(64, 64)) and lat.device.type == "cpu"
        torch.testing.assert_close(lat, d.patcher.model.process_latent_in(d.vae.encode(images.permute(0, 2, 3, 1))))
        img = d.decode_latents(lat)
        assert img.shape == (2, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
        cond, uncond = d.encode_prompts(PROMPTS), d.encode_prompts([""])
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        steps = []
        a = d.sample(cond, uncond, noise, steps=3, cfg=5.0, sampler="euler", callback=lambda i, n: steps.append((i, n)))
        b = d.sample(cond, uncond, noise, steps=3, cfg=5.0, sampler="euler")
        c = d.sample(cond, None, noise, steps=3, sampler="dpmpp_2m", scheduler="karras")
        with pytest.raises(Exception, match="Unknown sampler"):
            d.sample(cond, uncond, noise, steps=2, sampler="nope")
        with d.session():
            adapter = d.attach_lora(2, targets="attn")
            with torch.no_grad():
                for p in adapter.parameters():
                    p.normal_(0, 0.5)
            with_lora = d.sample(cond, uncond, noise, steps=3, cfg=5.0, sampler="euler")
            with adapter.disabled():
                without = d.sample(cond, uncond, noise, steps=3, cfg=5.0, sampler="euler")
            adapter.remove()
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert not torch.equal(a, c) and torch.isfinite(c).all()
    assert torch.equal(without, a) and (with_lora - a).abs().max() > 1e-3


def test_progress_and_cancel_helpers_use_comfyui(cd):
    comfy = import_comfy().comfy
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        progress = cd.comfy_progress(10)
        progress(3, 10)
        progress(5, 10, {"loss": 0.69})  # the trainer's signature
        progress(12)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen == [(3, 10), (5, 10), (10, 10)]
    from nodes.common import comfy_stop  # the nodes' should_stop: Cancel ends the prompt as "interrupted"

    assert comfy_stop() is False
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            comfy_stop()
    finally:
        comfy.model_management.interrupt_current_processing(False)


# -- the core trainer on a ComfyUI MODEL, end to end --------------------------------------------------------
def test_core_trainer_trains_an_expert_on_the_comfy_model(models, cd, tmp_path):
    """Pairs rendered through ComfyUI's sampler, the core ExpertTrainer inside session(), the graph untouched."""
    from safetydpo_core.data.preference_dataset import PreferenceDataset, PreferenceDatasetWriter
    from safetydpo_core.training.config import TrainConfig
    from safetydpo_core.training.trainer import ExpertTrainer

    mp = models("sd15")[0]
    before = diffusion_state(mp)
    flags = [p.requires_grad for p in mp.model.diffusion_model.parameters()]
    with torch.inference_mode():  # as in a ComfyUI node
        d = _denoiser(cd, models("sd15"))
        with PreferenceDatasetWriter(tmp_path / "ds", model_fingerprint=d.fingerprint(), previews=False) as w:
            for i in range(2):
                safe, unsafe = f"a photo of a cat {i}", f"a painting of a dog {i}"
                noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
                lat = d.sample(d.encode_prompts([safe, unsafe]), d.encode_prompts([""]), noise, steps=2, cfg=4.0)
                w.add(id=f"p{i}", category="violence", concept="c", unsafe=unsafe, safe=safe,
                      safe_latent=lat[0], unsafe_latent=lat[1], seed=i, height=64, width=64)
        ds = PreferenceDataset(tmp_path / "ds", expect_fingerprint=d.fingerprint())
        seen = []
        config = TrainConfig(steps=3, rank=2, beta=500.0, lr=1e-3, gradient_checkpointing=True)
        with d.session():
            result = ExpertTrainer(d, ds, config, progress=lambda s, n, m: seen.append((s, n)),
                                   should_stop=lambda: False).run()
    assert result.steps == 3 and seen[-1] == (3, 3)
    assert result.lora.naming == "ldm" and len(result.lora) == len(d.layers("attn"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert any(float(l.up.abs().max()) > 0 for l in result.lora.layers.values())
    assert_same_state(before, mp)
    assert _wrappers_on_modules(mp) == 0
    assert [p.requires_grad for p in mp.model.diffusion_model.parameters()] == flags
