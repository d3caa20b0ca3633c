"""ESD as a trainer objective (training/esd.py): the target arithmetic in epsilon and v space, x_t from the
reference's own partial DDIM generation, the esd-u / esd-x layer presets, training from concept prompts
with the trainer's guarantees (seeded, resumable, cancellable, metrics), from a dataset's unsafe prompts, and
the command line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_dataset
from safetydpo_core.cli.main import main as cli
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import ConfigError, Interrupted
from safetydpo_core.lora import LoraLayer, LoraSet, load_lora, save_lora
from safetydpo_core.lora.apply import lora_applied
from safetydpo_core.training import TrainConfig, train_expert
from safetydpo_core.training.esd import partial_generation, sampling_timesteps, train_esd
from safetydpo_core.training.objectives import esd, esd_target, per_sample_mse

CONCEPTS = "cat, dog"


@pytest.fixture(scope="module")
def den(tiny_sd15):
    return DiffusersDenoiser.from_pretrained(tiny_sd15)


@pytest.fixture(scope="module")
def vden(tiny_vpred):
    return DiffusersDenoiser.from_pretrained(tiny_vpred)


def _cfg(**kw):
    base = dict(objective="esd", targets="esd-x", steps=4, rank=2, lr=5e-3, batch_size=2, esd_sample_steps=4, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_the_target_is_the_same_in_epsilon_and_v_space(vden):
    assert vden.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, vden.latent_channels, 8, 8, generator=g)
    t = torch.tensor([50, 400, 900])
    with torch.no_grad():
        v_c = vden.predict(x_t, t, vden.encode_prompts(["a cat"] * 3))
        v_u = vden.predict(x_t, t, vden.encode_prompts([""] * 3))
    eps = lambda v: vden.eps_from_prediction(v, x_t, t)  # noqa: E731
    for eta in (0.5, 1.0, 3.0):
        torch.testing.assert_close(eps(esd_target(v_c, v_u, eta)), esd_target(eps(v_c), eps(v_u), eta),
                                   rtol=1e-4, atol=1e-5)
    # only the weighting differs: the squared error in v is 1/alpha_bar_t times the one in epsilon
    pred = v_c + 0.1 * torch.randn(v_c.shape, generator=g)
    a = vden.scheduler.alphas_cumprod[t].float()
    mse_v = per_sample_mse(pred, esd_target(v_c, v_u, 1.0))
    mse_e = per_sample_mse(eps(pred), esd_target(eps(v_c), eps(v_u), 1.0))
    torch.testing.assert_close(mse_v, mse_e / a, rtol=1e-3, atol=1e-7)
    out = esd(pred, v_c, v_u, 1.0)
    assert set(out.stats) == {"esd_gap", "concept_shift", "guidance"} and out.loss.item() == pytest.approx(
        float(mse_v.mean()), rel=1e-5)


@pytest.mark.parametrize("model", ["den", "vden"])
def test_x_t_is_the_reference_s_own_partial_ddim_generation(model, request):
    """k steps of our loop equal k steps of diffusers' DDIMScheduler (trailing spacing, eta 0) with CFG."""
    from diffusers import DDIMScheduler

    d = request.getfixturevalue(model)
    n, k, guidance = 10, 4, 3.0
    cond, uncond = d.encode_prompts(["a cat", "a dog"]), d.encode_prompts(["", ""])
    noise = torch.randn(2, d.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    x_t, t, p_u, p_c = partial_generation(d, cond, uncond, noise, n, k, guidance)
    sched = DDIMScheduler.from_config(d.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                      thresholding=False, set_alpha_to_one=False, steps_offset=0)
    sched.set_timesteps(n)
    assert [int(s) for s in sched.timesteps] == sampling_timesteps(d.num_train_timesteps, n)
    x = noise.clone()
    with torch.no_grad():
        for s in sched.timesteps[:k]:
            tt = torch.full((2,), int(s))
            u, c = d.predict(x, tt, uncond), d.predict(x, tt, cond)
            x = sched.step(u + guidance * (c - u), s, x, eta=0.0).prev_sample
        torch.testing.assert_close(x_t, x, rtol=1e-4, atol=1e-5)
        assert t.tolist() == [int(sched.timesteps[k])] * 2
        torch.testing.assert_close(p_c, d.predict(x, t, cond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p_u, d.predict(x, t, uncond), rtol=1e-4, atol=1e-5)
    # stop 0: pure noise at the first timestep
    x0, t0, *_ = partial_generation(d, cond, uncond, noise, n, 0, guidance)
    assert torch.equal(x0, noise) and t0.tolist() == [d.num_train_timesteps - 1] * 2


def test_esd_presets_pick_the_layers_in_both_namings(den):
    x = den.layers("esd-x")
    u = den.layers("esd-u")
    assert x and all(".attn2." in n for n in x) and {n.rsplit("attn2.", 1)[1] for n in x} == {
        "to_q", "to_k", "to_v", "to_out.0"}
    every = {n for n, m in den.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    # as the official code's 'noxattn': no cross-attention, no top-level time embedding, no output layer
    left_out = {n for n in every if ".attn2." in n or n.startswith("time_embedding.") or n == "conv_out"}
    assert left_out > {n for n in every if ".attn2." in n} and "conv_out" in left_out
    assert set(u) == every - left_out and "conv_in" in u and any(".time_emb_proj" in n for n in u)
    assert any(n.endswith("attn1.to_q") for n in u) and any(n.endswith("resnets.0.conv1") for n in u)
    from safetydpo_core.lora.targets import select_layers

    to_ldm = den.names().to_ldm
    ldm_modules = {to_ldm[n]: m for n, m in den.unet.named_modules() if n in to_ldm}
    assert set(select_layers(ldm_modules, "esd-u")) == {to_ldm[n] for n in u}
    assert set(select_layers(ldm_modules, "esd-x")) == {to_ldm[n] for n in x}


def test_esd_trains_towards_the_target_and_resumes_exactly_after_a_cancel(den, tmp_path):
    rows = []
    straight = train_esd(den, CONCEPTS, _cfg(steps=6), checkpoint_dir=tmp_path / "a", metrics_path=tmp_path / "a.metrics",
                         progress=lambda d, n, row: rows.append(row))
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "esd_gap", "concept_shift", "guidance", "timestep", "lr", "grad_norm"} <= set(rows[-1])
    assert (tmp_path / "a.metrics.csv").exists()
    meta = straight.lora.metadata
    assert meta["safetydpo_objective"] == "esd" and meta["safetydpo_method"] == "esd-x"
    assert json.loads(meta["safetydpo_concepts"]) == ["cat", "dog"] and "safetydpo_category" not in meta

    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3  # cancel before step 4

    with pytest.raises(Interrupted):
        train_esd(den, CONCEPTS, _cfg(steps=6), checkpoint_dir=tmp_path / "b", should_stop=stop)
    resumed = train_esd(den, CONCEPTS, _cfg(steps=6), checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.lora.allclose(straight.lora, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="esd_eta"):
        train_esd(den, CONCEPTS, _cfg(steps=6, esd_eta=2.0), checkpoint_dir=tmp_path / "b", resume=True)

    # the trained LoRA lowers ESD's loss on fresh draws of the concept prompts
    more = train_esd(den, CONCEPTS, _cfg(steps=40, lr=2e-2, esd_sample_steps=3))
    cond, uncond = den.encode_prompts(["cat", "dog"] * 2), den.encode_prompts([""] * 4)
    noise = torch.randn(4, den.latent_channels, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        losses = []
        for lora in (None, more.lora):
            total = 0.0
            for k in range(3):
                x_t, t, ref_u, ref_c = partial_generation(den, cond, uncond, noise, 3, k, 3.0)
                with lora_applied(den.unet, [(lora, 1.0)] if lora else []):
                    total += float(esd(den.predict(x_t, t, cond), ref_c, ref_u, 1.0).loss)
            losses.append(total)
    assert losses[1] < 0.8 * losses[0], losses


def test_esd_u_lora_files_load_in_diffusers_with_the_same_effect(den, tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, m in den.layers("esd-u").items():
        w = m.weight
        down = torch.randn(2, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        layers[name] = LoraLayer(down, up, 2.0)
    lora = LoraSet(layers, "diffusers", {"ss_base_model_version": den.base_model_version})
    path = save_lora(lora, tmp_path / "esd_u.safetensors", names=den.names())
    x, t = torch.randn(1, den.latent_channels, 8, 8, generator=g), torch.tensor([300])
    cond = den.encode_prompts(["a cat"])
    with torch.no_grad():
        with lora_applied(den.unet, [(lora, 1.0)]):
            ours = den.predict(x, t, cond)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(path), adapter_name="esd")
        other = DiffusersDenoiser(den.parts, device="cpu")
        other.unet = pipe.unet
        torch.testing.assert_close(other.predict(x, t, cond), ours, rtol=1e-4, atol=1e-5)


def test_objective_esd_on_a_dataset_erases_its_unsafe_prompts(den, tmp_path):
    data = make_dataset(tmp_path / "ds", den, n_per_category=2)
    res = train_expert(den, data, _cfg(steps=2, targets="esd-u", category="violence"))
    meta = res.lora.metadata
    assert json.loads(meta["safetydpo_concepts"]) == ["a photo of a cat at night"]
    assert meta["safetydpo_category"] == "violence" and meta["safetydpo_method"] == "esd-u"
    assert any("resnets" in n for n in res.lora.layers)


def test_esd_settings_are_checked(den):
    with pytest.raises(ConfigError, match="^esd_eta must be a positive number"):
        _cfg(esd_eta=0)
    with pytest.raises(ConfigError, match="^esd_guidance must be a number >= 1"):
        _cfg(esd_guidance=0.5)
    with pytest.raises(ConfigError, match="^preserve_weight does not apply to objective esd"):
        _cfg(preserve_weight=1.0)
    with pytest.raises(ConfigError, match="^esd_sample_steps must be between 1 and the model's 1000"):
        train_esd(den, CONCEPTS, _cfg(esd_sample_steps=5000))
    with pytest.raises(ConfigError, match="^concepts: the list of concepts is empty"):
        train_esd(den, " , ", _cfg())


def test_cli_erase_esd_writes_metrics_and_resumes(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "esd.safetensors"
    args = ["erase", "--model", str(tiny_sd15), "--method", "esd-x", "--concepts", CONCEPTS, "--esd-sample-steps", "3",
            "--checkpoint-every", "1", "--rank", "2", "--out", str(out)]
    assert cli([*args, "--steps", "2"]) == 0
    assert cli([*args, "--steps", "3", "--resume"]) == 0
    assert len((tmp_path / "esd.metrics.jsonl").read_text().splitlines()) == 3
    den = DiffusersDenoiser.from_pretrained(tiny_sd15)
    lora = load_lora(out, names=den.names())
    assert lora.max_rank == 2 and lora.metadata["safetydpo_steps"] == "3"
    config = json.loads((tmp_path / "esd.config.json").read_text())
    assert config["method"] == "esd-x" and config["concepts"] == ["cat", "dog"]


def test_cli_train_objective_esd(tiny_sd15, tmp_path):
    den = DiffusersDenoiser.from_pretrained(tiny_sd15)
    data = make_dataset(tmp_path / "ds", den, n_per_category=1)
    out = tmp_path / "esd.safetensors"
    assert cli(["train", "--model", str(tiny_sd15), "--data", str(data), "--objective", "esd", "--targets", "esd-x",
                "--esd-eta", "2", "--esd-sample-steps", "3", "--steps", "1", "--rank", "2", "--out", str(out)]) == 0
    meta = load_lora(out, names=den.names()).metadata
    assert meta["safetydpo_esd_eta"] == "2" and meta["safetydpo_esd_sample_steps"] == "3"
    assert sorted(json.loads(meta["safetydpo_concepts"])) == ["a photo of a cat at night", "a photo of a dog at night"]
    assert cli(["train", "--model", str(tiny_sd15), "--data", str(data), "--objective", "esd", "--esd-eta", "-1",
                "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert not (tmp_path / "bad.safetensors").exists()
