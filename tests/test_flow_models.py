"""Flow-matching transformers (SD3 / SD3.5, Flux.1) in the core, without ComfyUI: the flow schedule, the diffusers
backend against diffusers' own pipelines, the fused-layer LoRA names on the real models' full layer lists (meta
device), training through the protocol, LoRA files that diffusers loads with the same effect, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safetydpo_core.data import PreferenceDataset, PreferenceDatasetWriter
from safetydpo_core.data.render import RenderSettings, render_pairs
from safetydpo_core.denoiser import flow
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.denoiser.diffusers_flow import DiffusersFlowDenoiser
from safetydpo_core.denoiser.protocol import AdapterHandle, Conditioning, Denoiser
from safetydpo_core.errors import ConfigError, DatasetError, LoraError, ModelError
from safetydpo_core.lora.apply import lora_applied
from safetydpo_core.lora.io import load_lora, save_lora
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.lora.transformer_names import TransformerNames, build_transformer
from safetydpo_core.lora.unet_names import weight_modules
from safetydpo_core.tiny_models import (FLUX1_DEV_TRANSFORMER_CONFIG, FLUX1_SCHNELL_TRANSFORMER_CONFIG,
                                        SD3_MEDIUM_TRANSFORMER_CONFIG, SD35_LARGE_TRANSFORMER_CONFIG,
                                        SD35_MEDIUM_TRANSFORMER_CONFIG, build_tiny_flow_pipeline)
from safetydpo_core.training import TrainConfig, train_expert

PROMPTS = ["a photo of a cat", "a red house at night"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = build_tiny_flow_pipeline(tmp_path_factory.mktemp(f"tiny_{kind}") / "model", kind=kind,
                                                   seed={"sd3": 0, "flux": 1, "flux-schnell": 2}[kind])
        return built[kind]

    return get


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(before, module):
    after = module.state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


# -- the schedule -----------------------------------------------------------------------------------------
def test_flow_schedule_draws_follow_the_families_recipes():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    sd3 = flow.FlowSchedule(shift=3.0)
    t = sd3.sample_timesteps(20000, g(0))
    assert t.dtype == torch.float32 and 0 < float(t.min()) and float(t.max()) <= 1000
    assert torch.equal(t, sd3.sample_timesteps(20000, g(0)))  # a pure function of the generator
    # logit-normal median u = 0.5, shifted by 3: sigma = 1.5 / 2 = 0.75
    assert float(t.median()) / 1000 == pytest.approx(0.75, abs=0.01)
    plain = flow.FlowSchedule().sample_timesteps(20000, g(0)) / 1000
    assert float(plain.median()) == pytest.approx(0.5, abs=0.01)
    z = torch.logit(plain.double())  # logit-normal(0, 1)
    assert float(z.mean()) == pytest.approx(0.0, abs=0.03) and float(z.std()) == pytest.approx(1.0, abs=0.03)
    # restricted ranges keep the density's shape inside the range
    top = sd3.sample_timesteps(5000, g(1), t_range=(700, 1000))
    assert float(top.min()) >= 700 - 1e-3 and float(top.max()) <= 1000
    # Flux: the shift grows with the image: exp(0.5) at 256 tokens, exp(1.15) at 4096 tokens
    fx = flow.FlowSchedule(dynamic=True)
    assert fx.shift_for((16, 32, 32)) == pytest.approx(math.exp(0.5))
    assert fx.shift_for((16, 128, 128)) == pytest.approx(math.exp(1.15))
    small = fx.sample_timesteps(20000, g(2), (16, 32, 32)) / 1000
    large = fx.sample_timesteps(20000, g(2), (16, 128, 128)) / 1000
    s = math.exp(1.15)
    assert float(large.median()) == pytest.approx(s * 0.5 / (1 + (s - 1) * 0.5), abs=0.01)
    assert float(small.median()) < float(large.median())
    with pytest.raises(ConfigError, match="latent size"):
        fx.sample_timesteps(2, g(0))
    # the forward process and its target
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    tt = torch.tensor([250.0, 1000.0])
    xt = flow.add_noise(sd3, x0, noise, tt)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(flow.velocity(x0, noise), noise - x0)
    torch.testing.assert_close(flow.unit_marginal(sd3, noise, tt)[0], noise[0] * math.sqrt(0.75 ** 2 + 0.25 ** 2))


# -- the diffusers backend ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_backend_matches_the_diffusers_pipelines(tiny, kind):
    """Conditioning as StableDiffusion3Pipeline / FluxPipeline.encode_prompt builds it; sampling as their __call__."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    d = DiffusersDenoiser.from_pretrained(tiny(kind))
    assert isinstance(d, DiffusersFlowDenoiser) and isinstance(d, Denoiser)
    assert (d.schedule, d.prediction_type, d.naming, d.num_train_timesteps) == ("flow", "flow", "diffusers", 1000)
    assert d.base_model_version == {"sd3": "sd3", "flux": "flux1"}[kind]
    assert d.guidance == (3.5 if kind == "flux" else None) and d.guidance_input == (kind == "flux")
    assert d.latent_shape(32, 32) == (16, 8, 8)
    with pytest.raises(ConfigError, match="multiple of 8"):
        d.latent_shape(36, 32)
    c = d.encode_prompts(PROMPTS)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kind == "sd3":
            pipe = StableDiffusion3Pipeline.from_pretrained(tiny(kind))
            pe, _, pp, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, max_sequence_length=32,
                                              do_classifier_free_guidance=False)
            neg = Conditioning({"encoder_hidden_states": torch.zeros_like(pe), "pooled_projections": torch.zeros_like(pp)})
            theirs = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=neg.tensors["encoder_hidden_states"],
                          negative_pooled_prompt_embeds=neg.tensors["pooled_projections"], latents=noise.clone(),
                          num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
            ours = d.sample(c, neg, noise, steps=3, cfg=2.0)
        else:
            pipe = FluxPipeline.from_pretrained(tiny(kind))
            pe, pp, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=32)
            packed = pipe._pack_latents(noise.clone(), 2, 16, 8, 8)
            out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, latents=packed, num_inference_steps=3,
                       guidance_scale=3.5, output_type="latent", height=32, width=32).images
            theirs = pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
            ours = d.sample(c, None, noise, steps=3, cfg=1.0)
            assert torch.equal(c.tensors["guidance"], torch.full((2,), 3.5))
    torch.testing.assert_close(c.tensors["encoder_hidden_states"], pe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.tensors["pooled_projections"], pp)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    img = d.decode_latents(ours)
    assert img.shape == (2, 3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    torch.testing.assert_close(d.encode_images(img).shape, ours.shape)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_adapter_off_is_the_untouched_transformer_and_peft_restores_it(tiny, kind):
    d = DiffusersDenoiser.from_pretrained(tiny(kind))
    before = _state(d.transformer)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = d.sample_timesteps(2, g, latent_shape=x0.shape[1:])
    x_t = d.add_noise(x0, noise, t)
    cond = d.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = d.predict(x_t, t, cond)
    layers = d.layers("attn")
    adapter = d.attach_lora(4, targets="attn")
    assert isinstance(adapter, AdapterHandle)
    # both streams of the joint attention (and Flux's single blocks) are adapted
    assert any(n.endswith("attn.add_q_proj") for n in layers) and any(n.endswith("attn.to_add_out") for n in layers)
    if kind == "sd3":
        assert any(".attn2.to_q" in n for n in layers)  # SD3.5's second attention
    else:
        assert any(n.startswith("single_transformer_blocks.") and n.endswith("proj_mlp") for n in layers)
        assert "proj_out" not in layers  # the final layer is not attention
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3, generator=g)
        on = d.predict(x_t, t, cond)
        with adapter.disabled():
            off = d.predict(x_t, t, cond)
    adapter.remove()
    assert torch.equal(off, base) and (on - base).abs().max() > 1e-3
    assert _same_state(before, d.transformer)


# -- names on the real models (meta device) -------------------------------------------------------------------
@pytest.mark.parametrize("config,blocks", [
    (SD3_MEDIUM_TRANSFORMER_CONFIG, {"joint": 24, "attn2": 0}),
    (SD35_MEDIUM_TRANSFORMER_CONFIG, {"joint": 24, "attn2": 13}),
    (SD35_LARGE_TRANSFORMER_CONFIG, {"joint": 38, "attn2": 0}),
    (FLUX1_DEV_TRANSFORMER_CONFIG, {"double": 19, "single": 38}),
    (FLUX1_SCHNELL_TRANSFORMER_CONFIG, {"double": 19, "single": 38}),
], ids=["sd3-medium", "sd3.5-medium", "sd3.5-large", "flux1-dev", "flux1-schnell"])
def test_full_layer_lists_map_both_ways(config, blocks):
    names = TransformerNames.from_config(config)
    with torch.device("meta"):
        model = build_transformer(config, meta=True)
    shapes = {n: s for n, s in weight_modules(model).items() if len(s) >= 2}
    assert names.shapes["diffusers"] == shapes  # every linear/conv layer of the real model has an ldm name
    ldm = names.shapes["ldm"]
    hidden = int(config["attention_head_dim"]) * int(config["num_attention_heads"])
    if names.family == "sd3":
        assert sum(n.endswith("x_block.attn.qkv") for n in ldm) == blocks["joint"]
        assert sum(n.endswith("x_block.attn2.qkv") for n in ldm) == blocks["attn2"]
        assert ldm["joint_blocks.0.x_block.attn.qkv"] == (3 * hidden, hidden)
        assert ldm["joint_blocks.0.context_block.attn.qkv"] == (3 * hidden, hidden)
        last = blocks["joint"] - 1
        assert f"joint_blocks.{last}.context_block.attn.proj" not in ldm  # context-pre-only last block
        assert names.by_ldm[f"joint_blocks.{last}.context_block.adaLN_modulation.1"].swap
        assert names.base_model_version == "sd3"
    else:
        assert sum(n.endswith("img_attn.qkv") for n in ldm) == blocks["double"]
        assert sum(n.endswith(".linear1") for n in ldm) == blocks["single"]
        assert ldm["single_blocks.0.linear1"] == (3 * hidden + 4 * hidden, hidden)  # q, k, v and the MLP input
        assert names.parts_of("single_blocks.0.linear1") == [f"single_transformer_blocks.0.{p}" for p in
                                                              ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
        assert ("guidance_in.in_layer" in ldm) == bool(config["guidance_embeds"])
        assert names.base_model_version == "flux1"
    # the ldm "attn" preset adapts exactly the diffusers "attn" preset's weights
    from safetydpo_core.lora.targets import parse_targets, matches
    from safetydpo_core.lora.transformer_names import presets

    ldm_attn = [n for n in ldm if matches(n, parse_targets("attn", presets(names.family, "ldm")))]
    diff_attn = {n for n in shapes if matches(n, parse_targets("attn", presets(names.family, "diffusers")))}
    assert {p for n in ldm_attn for p in names.parts_of(n)} == diff_attn


def _random_lora(shapes, rank, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return {n: LoraLayer(torch.randn(rank, *s[1:], generator=g) * 0.1,
                         torch.randn(s[0], rank, *([1] * (len(s) - 2)), generator=g) * 0.1, alpha or rank)
            for n, s in shapes.items()}


# the real layouts (dual attention, context-pre-only last block, single blocks) at a width that computes quickly
_MID = {"sd3.5": {**SD35_MEDIUM_TRANSFORMER_CONFIG, "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 3,
                  "caption_projection_dim": 48, "joint_attention_dim": 64, "pooled_projection_dim": 32,
                  "dual_attention_layers": [0], "pos_embed_max_size": 16},
        "flux": {**FLUX1_DEV_TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
                 "num_attention_heads": 3, "joint_attention_dim": 64, "pooled_projection_dim": 32,
                 "axes_dims_rope": [4, 6, 6]}}


@pytest.mark.parametrize("kind", ["sd3.5", "flux"])
def test_lora_conversion_is_exact_both_ways(kind):
    names = TransformerNames.from_config(_MID[kind])
    keep = list(names.shapes["ldm"])
    ldm = LoraSet(_random_lora({n: names.shapes["ldm"][n] for n in keep}, 2, 0, alpha=1.0), "ldm")
    diff = names.convert_lora(ldm, "diffusers")
    assert all(diff.layers[p].rank == 2 for p in diff.layers)  # split: same rank, shared down
    back = names.convert_lora(diff, "ldm")
    assert back.allclose(ldm) and all(back.layers[n].rank == 2 for n in back.layers)
    for n in keep:  # the split update equals the fused one's rows (with the adaLN swap)
        rel = names.by_ldm[n]
        full = ldm.layers[n].delta()
        if rel.swap:
            a, b = full.chunk(2)
            full = torch.cat([b, a])
        torch.testing.assert_close(torch.cat([diff.layers[p].delta() for p, _ in rel.parts]), full)
    # a LoRA trained on the split layers (independent ranks and alphas) fuses block-diagonally, exactly
    trained = LoraSet(_random_lora({p: names.shapes["diffusers"][p] for p in diff.layers}, 3, 1, alpha=6.0), "diffusers")
    fused = names.convert_lora(trained, "ldm")
    for n, layer in fused.items():
        rel = names.by_ldm[n]
        want = torch.cat([trained.layers[p].delta() for p, _ in rel.parts])
        if rel.swap:
            a, b = want.chunk(2)
            want = torch.cat([b, a])
        torch.testing.assert_close(layer.delta(), want.reshape(layer.delta().shape), rtol=1e-5, atol=1e-6)
        assert layer.rank == 3 * len(rel.parts)
    assert names.convert_lora(fused, "diffusers").allclose(trained)
    with pytest.raises(LoraError, match="another|different"):
        names.convert_lora(LoraSet({"input_blocks.1.1.transformer_blocks.0.attn1.to_q": LoraLayer(
            torch.zeros(2, 320), torch.zeros(320, 2), 2.0)}, "ldm"), "diffusers")


# -- training and files ------------------------------------------------------------------------------------------
class _Pair:
    def __init__(self, i, cat="violence"):
        self.id, self.category, self.concept = f"p{i}", [cat], "c"
        self.unsafe, self.safe = f"a photo of a dog {i}", f"a photo of a cat {i}"


@pytest.fixture(scope="module")
def flux_data(tiny, tmp_path_factory):
    d = DiffusersDenoiser.from_pretrained(tiny("flux"))
    out = tmp_path_factory.mktemp("flux_pairs") / "ds"
    render_pairs(d, [_Pair(i) for i in range(3)], out, RenderSettings(steps=2, cfg=1.0, sampler="euler", batch_pairs=3),
                 previews=False)
    return out


def test_rendered_pairs_share_noise_and_record_the_model(tiny, flux_data):
    ds = PreferenceDataset(flux_data)
    assert len(ds) == 3 and ds.header["settings"]["model_base"] == "flux1"
    s, u = ds.load_pair(0)
    assert s.shape == (16, 8, 8) and not torch.equal(s, u)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_training_starts_at_ln2_moves_the_margin_and_leaves_the_model(tiny, tmp_path, kind):
    d = DiffusersDenoiser.from_pretrained(tiny(kind))
    before = _state(d.transformer)
    fp = d.fingerprint()
    g = torch.Generator().manual_seed(3)
    root = tmp_path / "ds"
    with PreferenceDatasetWriter(root, model_fingerprint=fp, previews=False, settings={"model_base": d.base_model_version}) as w:
        pattern = torch.randn(16, 8, 8, generator=g)
        for i in range(4):
            jit = 0.1 * torch.randn(16, 8, 8, generator=g)
            w.add(id=f"x{i}", category=["violence"], concept="c", unsafe="a dog at night", safe="a dog",
                  safe_latent=pattern + jit, unsafe_latent=-pattern + jit, seed=i, height=32, width=32)
    cfg = TrainConfig(steps=12, rank=4, beta=2000.0, lr=3e-3, seed=0)
    result = train_expert(d, root, cfg)
    h = result.history
    assert h[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert h[-1]["margin"] > h[0]["margin"] + 0.05 and h[-1]["loss"] < h[0]["loss"]
    assert _same_state(before, d.transformer) and d.fingerprint() == fp
    lora = result.lora
    assert lora.naming == "diffusers" and lora.metadata["ss_base_model_version"] == d.base_model_version
    assert (lora.metadata.get("safetydpo_guidance") == "3.5") == (kind == "flux")
    # kohya file: original (ldm) names, fused q/k/v; reads back to the same update
    path = save_lora(lora, tmp_path / "expert.safetensors", names=d.names())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    fused = "lora_unet_double_blocks_0_img_attn_qkv" if kind == "flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert f"{fused}.lora_down.weight" in keys and meta["safetydpo_key_format"] == "kohya/ldm"
    back = load_lora(path, names=d.names())
    assert back.naming == "ldm" and d.names().convert_lora(back, "diffusers").allclose(lora)


def test_kohya_flux_files_convert_in_diffusers_as_ours():
    """diffusers reads kohya Flux files with its sd-scripts converter, which assumes Flux.1's real widths: on the
    full Flux.1-dev layer list, a kohya file of ours converts to the same update per diffusers layer as our own
    conversion gives (checked on random probe vectors)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from safetydpo_core.lora.keys import to_state_dict
    from safetydpo_core.lora.targets import matches, parse_targets
    from safetydpo_core.lora.transformer_names import presets

    names = TransformerNames.from_config(FLUX1_DEV_TRANSFORMER_CONFIG)
    target = parse_targets("attn+ff", presets("flux", "ldm"))
    shapes = {n: s for n, s in names.shapes["ldm"].items() if matches(n, target)}
    lora = LoraSet(_random_lora(shapes, 1, 5, alpha=0.5), "ldm")
    converted = _convert_kohya_flux_lora_to_diffusers(to_state_dict(lora, "kohya", names=names))
    ours = names.convert_lora(lora, "diffusers")
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == set(ours.layers)
    g = torch.Generator().manual_seed(6)
    for n, layer in ours.items():
        a, b = converted[f"transformer.{n}.lora_A.weight"], converted[f"transformer.{n}.lora_B.weight"]
        v = torch.randn(a.shape[1], 2, generator=g)
        torch.testing.assert_close(b @ (a @ v), layer.scale * (layer.up @ (layer.down @ v)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_exported_files_load_in_diffusers_with_the_same_effect(tiny, tmp_path, kind):
    """diffusers' own pipe.load_lora_weights reads our peft-format files (its format for SD3, which has no kohya
    converter; Flux reads kohya files too, see above) and gives the update we apply."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    d = DiffusersDenoiser.from_pretrained(tiny(kind))
    adapter = d.attach_lora(4, alpha=2.0, targets="attn+ff")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.2, generator=g)
    lora = adapter.export()
    adapter.remove()
    lora.metadata["ss_base_model_version"] = d.base_model_version
    path = save_lora(lora, tmp_path / "e.safetensors", names=d.names(), fmt="peft")
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([900.0, 300.0])
    cond = d.encode_prompts(PROMPTS)
    with torch.no_grad(), lora_applied(d.transformer, [(lora, 1.0)]):
        ours = d.predict(x, t, cond)
    pipe = (FluxPipeline if kind == "flux" else StableDiffusion3Pipeline).from_pretrained(tiny(kind))
    pipe.load_lora_weights(str(path))
    d2 = DiffusersFlowDenoiser(d.parts.__class__(**{**vars(d.parts), "transformer": pipe.transformer}))
    with torch.no_grad():
        theirs = d2.predict(x, t, cond)
        base = d.predict(x, t, cond)
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_guidance_only_for_models_with_a_guidance_input(tiny, tiny_sd15):
    with pytest.raises(ConfigError, match="no guidance input.*Flux.1-dev"):
        DiffusersDenoiser.from_pretrained(tiny("sd3"), guidance=3.5)
    with pytest.raises(ConfigError, match="no guidance input"):
        DiffusersDenoiser.from_pretrained(tiny("flux-schnell"), guidance=2.0)
    with pytest.raises(ConfigError, match="no guidance input"):
        DiffusersDenoiser.from_pretrained(tiny_sd15, guidance=4.0)
    assert DiffusersDenoiser.from_pretrained(tiny("flux-schnell")).guidance is None
    d = DiffusersDenoiser.from_pretrained(tiny("flux"), guidance=2.0)
    assert d.guidance == 2.0 and torch.equal(d.encode_prompts(["x"]).tensors["guidance"], torch.tensor([2.0]))


def test_other_architectures_are_refused_clearly(tiny, tiny_sd15, tmp_path, flux_data):
    # a pipeline folder of a kind the pack cannot train: the error lists what it can
    bad = tmp_path / "video"
    (bad / "transformer").mkdir(parents=True)
    (bad / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ModelError, match="WanTransformer3DModel.*Supported: .*SD3/SD3.5.*Flux.1"):
        DiffusersDenoiser.from_pretrained(bad)
    (bad / "transformer" / "config.json").unlink()
    with pytest.raises(ModelError, match="WanPipeline.*Supported"):
        DiffusersDenoiser.from_pretrained(bad)
    flux = DiffusersDenoiser.from_pretrained(tiny("flux"))
    sd15 = DiffusersDenoiser.from_pretrained(tiny_sd15)
    # an SD1.5 LoRA on Flux, a Flux LoRA on SD3: named, nothing loaded
    sd15_lora = save_lora(LoraSet({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraLayer(
        torch.zeros(2, 32), torch.zeros(32, 2), 2.0)}), tmp_path / "sd15.safetensors", names=sd15.names())
    with pytest.raises(LoraError, match="lora_unet_down_blocks_0.*another architecture"):
        load_lora(sd15_lora, names=flux.names())
    sd3 = DiffusersDenoiser.from_pretrained(tiny("sd3"))
    adapter = flux.attach_lora(2)
    flux_lora = adapter.export()
    adapter.remove()
    flux_file = save_lora(flux_lora, tmp_path / "flux.safetensors", names=flux.names())
    with pytest.raises(LoraError, match="double_blocks.*another architecture"):
        load_lora(flux_file, names=sd3.names())
    # a dataset rendered with Flux cannot train SD3 (same latent channels), not even with a mismatch allowed
    with pytest.raises(DatasetError, match="flux1 model.*sd3.*another architecture"):
        train_expert(sd3, flux_data, TrainConfig(steps=1), allow_model_mismatch=True)
    # ... nor an SD1.5 model (other latent channels)
    with pytest.raises(DatasetError):
        train_expert(sd15, flux_data, TrainConfig(steps=1), allow_model_mismatch=True)
    with pytest.raises(ConfigError, match="not available for flow-matching"):
        flux.make_sampler("dpmpp_2m")


@pytest.mark.parametrize("method", ["uce", "esd-x"])
def test_erasure_baselines_refuse_flow_models_by_name(tiny, method):
    from safetydpo_core.erase.api import EraseSettings, erase_concepts

    flux = DiffusersDenoiser.from_pretrained(tiny("flux"))
    with pytest.raises(ConfigError, match=f"{method}: the erasure baselines are defined on UNets.*SafetyDPO"):
        erase_concepts(flux, EraseSettings(method=method, concepts="gun"))
    with pytest.raises(ConfigError, match="no cross-attention"):
        flux.last_token_embeddings(["a gun"])


@pytest.mark.parametrize("attack", ["ring-a-bell", "unlearndiff", "inversion"])
def test_token_level_attacks_refuse_flow_models_before_writing(tiny, tmp_path, attack):
    """The Denoiser protocol's prompt_embedder() is CLIP token access for UNet models; SD3/Flux (T5 conditioning,
    joint attention) refuse it by name, and the attack runner asks before it writes or renders anything."""
    from safetydpo_core.attacks import AttackPrompt, AttackSettings, run_attack

    flux = DiffusersDenoiser.from_pretrained(tiny("flux"))
    assert isinstance(flux, Denoiser)
    with pytest.raises(ConfigError, match="SD3 and Flux.1 .* not supported"):
        flux.prompt_embedder()
    prompts = [AttackPrompt("a", "a photo of a red gun", ["violence"], "gun", "a photo of a red wrench", 1)]
    with pytest.raises(ConfigError, match="not supported"):
        run_attack(flux, prompts, AttackSettings(attack, queries=1, steps=1), oracle=None, out=tmp_path / "run",
                   world=False)
    assert not (tmp_path / "run").exists()
