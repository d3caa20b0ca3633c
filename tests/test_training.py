"""The DPO trainer on tiny diffusers models: the official objective, reference = adapters off, learning on a
fixed preference set, base weights untouched, resume == uninterrupted, divergence and cancel handling."""

import math

import pytest
import torch

from conftest import GradCallHook, make_dataset
from safetydpo_core.data import PreferenceDataset
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import ConfigError, Interrupted, TrainingDiverged
from safetydpo_core.training import TrainConfig, train_expert
from safetydpo_core.training.checkpoint import list_checkpoints
from safetydpo_core.training.evaluate import preference_stats
from safetydpo_core.training.objectives import diffusion_dpo, mapo


@pytest.fixture(scope="module")
def data(sd15, tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data") / "pairs", sd15)
    return PreferenceDataset(root, categories="violence", expect_fingerprint=sd15.fingerprint())


def test_objective_matches_hand_computation():
    target = torch.zeros(4, 1, 1, 1)
    pred = torch.tensor([1.0, 2.0, 3.0, 1.0]).view(4, 1, 1, 1)   # m = [1, 4 | 9, 1]
    ref = torch.tensor([2.0, 1.0, 1.0, 1.0]).view(4, 1, 1, 1)    # r = [4, 1 | 1, 1]
    out = diffusion_dpo(pred, ref, target, beta=0.1)
    inside = -0.5 * 0.1 * (torch.tensor([1.0 - 9.0, 4.0 - 1.0]) - torch.tensor([4.0 - 1.0, 1.0 - 1.0]))
    assert math.isclose(float(out.loss), float(-torch.nn.functional.logsigmoid(inside).mean()), rel_tol=1e-6)
    assert out.stats["implicit_acc"] == 0.5
    assert math.isclose(out.stats["margin"], float(inside.mean()), rel_tol=1e-6)
    m = mapo(pred, target, beta=0.1, snr_value=0.5, num_train_timesteps=1000)
    s = lambda x: 0.5 * x / (math.exp(0.5 * x) - 1)
    ratio = [math.log(1 / (1 + math.exp(-1000 * (s(a) - s(b))))) for a, b in ((1, 9), (4, 1))]
    assert math.isclose(float(m.loss), (1 + 4) / 2 - 0.1 * sum(ratio) / 2, rel_tol=1e-5)


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl", "tiny_vpred"])
def test_adapter_off_is_the_untouched_model(model, request):
    den = DiffusersDenoiser.from_pretrained(request.getfixturevalue(model))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, den.latent_channels, 8, 8, generator=g)
    t = torch.tensor([3, 900])
    cond = den.encode_prompts(["a red cat", "a dog"])
    with torch.no_grad():
        base = den.predict(x, t, cond)
    adapter = den.attach_lora(rank=4, targets="attn")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5, generator=g)
        on = den.predict(x, t, cond)
        with adapter.disabled():
            off = den.predict(x, t, cond)
    adapter.remove()
    assert not torch.allclose(on, base, atol=1e-4)
    assert torch.equal(off, base)
    with torch.no_grad():
        assert torch.equal(den.predict(x, t, cond), base)


def test_step_zero_loss_is_ln2(sd15, data):
    res = train_expert(sd15, data, TrainConfig(steps=1, seed=3))
    assert abs(res.history[0]["loss"] - math.log(2)) < 1e-6
    assert res.history[0]["implicit_acc"] == 0.0 and res.history[0]["margin"] == 0.0


def test_training_learns_the_preference_and_leaves_the_base_untouched(sd15, data):
    before = {k: v.clone() for k, v in sd15.unet.state_dict().items()}
    cfg = TrainConfig(steps=40, lr=1e-2, beta=500, batch_size=4, seed=0, timestep_range=(200, 800))
    res = train_expert(sd15, data, cfg)
    after = sd15.unet.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    stats = preference_stats(sd15, data, res.lora, beta=500, draws=3, timesteps=(200, 800))
    base = preference_stats(sd15, data, None, beta=500, draws=3, timesteps=(200, 800))
    assert stats["implicit_acc"] == 1.0
    assert stats["margin"] > base["margin"] + 1.0
    assert res.lora.metadata["safetydpo_category"] == "violence"
    assert res.lora.metadata["safetydpo_model_fingerprint"] == sd15.fingerprint()
    assert {"loss", "implicit_acc", "margin", "m_w", "m_l", "r_w", "r_l", "lr", "grad_norm"} <= set(res.history[-1])


def _stop_after(n: int):
    """A ``should_stop`` that asks to stop from its ``n + 1``-th call on."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > n

    return stop


def test_resume_after_interruption_gives_the_same_lora(sd15, data, tmp_path):
    cfg = TrainConfig(steps=6, lr=1e-3, beta=1000, seed=5, condition="both", prompt_dropout=0.3, checkpoint_every=2)
    full = train_expert(sd15, data, cfg)
    with pytest.raises(Interrupted):
        train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", should_stop=_stop_after(3))
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")][-1] == 3
    resumed = train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert len(resumed.history) == 6
    for name, layer in full.lora.items():
        assert torch.equal(layer.down, resumed.lora[name].down) and torch.equal(layer.up, resumed.lora[name].up)
    # settings that change the run are refused on resume
    with pytest.raises(ConfigError, match="lr"):
        train_expert(sd15, data, TrainConfig(**{**cfg.to_dict(), "lr": 2e-3}), checkpoint_dir=tmp_path / "ck", resume=True)


def _poisoned(den, after: int) -> GradCallHook:
    """NaN predictions from the policy's ``after + 1``-th call on."""
    return GradCallHook(den, lambda out, k: out * float("nan") if k > after else out)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(sd15, data, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step 3.*last good state.*checkpoint-0000002"):
        train_expert(_poisoned(sd15, 2), data, TrainConfig(steps=5, lr=1e-3), checkpoint_dir=tmp_path / "ck")
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2]
    # the denoiser is left clean: no adapters remain
    assert not any("lora" in n for n, _ in sd15.unet.named_modules())


@pytest.mark.parametrize("opts", [
    {"objective": "mapo"}, {"condition": "safe", "sft_weight": 0.5}, {"batch_size": 2, "grad_accum": 2},
    {"optimizer": "adafactor", "lr_schedule": "cosine", "warmup_steps": 1}, {"gradient_checkpointing": True},
    {"targets": "attn+ff", "rank": 2, "alpha": 1.0}, {"targets": "attn-self+ff"}])
def test_training_options_run(sd15, data, opts):
    res = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, **opts))
    assert len(res.history) == 2 and all(math.isfinite(r["loss"]) for r in res.history)
    if "targets" in opts:
        assert any(n.endswith("ff.net.2") for n in res.lora.layers)
        assert {l.alpha for l in res.lora.layers.values()} == {float(opts.get("alpha", opts.get("rank", TrainConfig().rank)))}
        assert (".attn2." in " ".join(res.lora.layers)) == (opts["targets"] == "attn+ff")


def test_gradient_checkpointing_gives_the_same_step(sd15, data):
    a = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, seed=1))
    b = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, seed=1, gradient_checkpointing=True))
    assert a.lora.allclose(b.lora, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    ({"rank": 0}, "rank must be a positive integer"), ({"lr": -1e-4}, "lr must be a positive number"),
    ({"beta": 0}, "beta must be a positive number"), ({"category": "violance"}, "Unknown category 'violance'"),
    ({"condition": "neither"}, "condition must be one of"), ({"steps": 0}, "steps must be a positive integer")])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_missing_target_layers_list_what_exists(sd15, data):
    with pytest.raises(ConfigError, match=r"\['to_qkv'\] do not exist.*to_q.*Presets"):
        train_expert(sd15, data, TrainConfig(steps=1, targets="to_qkv"))


def test_resume_past_the_requested_steps_is_refused(sd15, data, tmp_path):
    cfg = TrainConfig(steps=3, lr=1e-3, seed=2)
    train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ConfigError, match="already at step 3, past the 2 steps"):
        train_expert(sd15, data, TrainConfig(**{**cfg.to_dict(), "steps": 2}), checkpoint_dir=tmp_path / "ck", resume=True)


# -- output preservation (DUO) -------------------------------------------------------------------------------


def _drift(den, lora, prompts, seed=0):
    """Mean squared distance between the adapted and the untouched prediction on ``prompts``."""
    from safetydpo_core.lora.apply import lora_applied

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), den.latent_channels, 4, 4, generator=g)
    t = torch.randint(100, 900, (len(prompts),), generator=g)
    cond = den.encode_prompts(prompts)
    with torch.no_grad():
        ref = den.predict(x, t, cond)
        with lora_applied(den.module, [(lora, 1.0)]):
            pred = den.predict(x, t, cond)
    return float((pred - ref).pow(2).mean())


def test_preservation_keeps_other_prompts_outputs(sd15, data):
    """The same DPO run with a strong preservation term changes the model's outputs for the other category's
    safe prompts much less, and still learns the preference."""
    base = dict(steps=25, lr=1e-2, beta=500, batch_size=2, seed=0, timestep_range=(200, 800))
    plain = train_expert(sd15, data, TrainConfig(**base))
    kept = train_expert(sd15, data, TrainConfig(**base, preserve_weight=1000.0, preserve_prompts="others"))
    assert kept.history[0]["preserve"] == 0.0            # policy == reference at step 0
    assert abs(kept.history[0]["loss"] - math.log(2)) < 1e-6
    assert any(r["preserve"] > 0 for r in kept.history)
    others = sorted({r.safe for r in data.all_records if "violence" not in r.category})
    assert others and _drift(sd15, kept.lora, others) < 0.5 * _drift(sd15, plain.lora, others)
    stats = preference_stats(sd15, data, kept.lora, beta=500, draws=3, timesteps=(200, 800))
    assert stats["implicit_acc"] == 1.0
    assert kept.lora.metadata["safetydpo_preserve_weight"] == "1000"
    assert plain.lora.metadata.get("safetydpo_preserve_weight") is None


def test_preservation_resumes_exactly_and_is_part_of_the_resume_check(sd15, data, tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-3, beta=1000, seed=5, preserve_weight=3.0, preserve_prompts="others",
                      checkpoint_every=2)
    full = train_expert(sd15, data, cfg)
    with pytest.raises(Interrupted):
        train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", should_stop=_stop_after(2))
    resumed = train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert full.lora.allclose(resumed.lora, rtol=0, atol=0)
    for key, value in (("preserve_weight", 4.0), ("preserve_prompts", "auto"), ("preserve_pictures", 2)):
        with pytest.raises(ConfigError, match=key):
            train_expert(sd15, data, TrainConfig(**{**cfg.to_dict(), key: value}), checkpoint_dir=tmp_path / "ck",
                         resume=True)


def test_preservation_prompt_files(sd15, data, tmp_path):
    from safetydpo_core.training.preservation import preservation_set

    txt = tmp_path / "keep.txt"
    txt.write_text("# everyday prompts\na bowl of fruit\n\na lighthouse at dusk\n", encoding="utf-8")
    items = preservation_set(str(txt), data, sd15)
    assert [i.prompt for i in items] == ["a bowl of fruit", "a lighthouse at dusk"] and items[0].latent is None
    others = preservation_set("others", data, sd15)
    assert others and all(i.latent is not None for i in others)
    assert {i.prompt for i in others} == {r.safe for r in data.all_records if "violence" not in r.category}
    res = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, preserve_weight=1.0, preserve_prompts=str(txt)))
    assert all(math.isfinite(r["preserve"]) for r in res.history)
    assert res.lora.metadata["safetydpo_preserve_prompts"] == "keep.txt"


def test_preservation_on_random_vocabulary_tokens_and_unions_of_sets(sd15, data):
    from safetydpo_core.training.preservation import TOKEN_PROMPTS, preservation_set

    emb = sd15.prompt_embedder()
    toks = preservation_set("tokens", data, sd15, seed=1)
    assert len(toks) == TOKEN_PROMPTS and all(i.latent is None and i.prompt.strip() for i in toks)
    assert len({i.prompt for i in toks}) > 0.9 * TOKEN_PROMPTS  # random text, not one prompt
    assert [i.prompt for i in preservation_set("tokens", data, sd15, seed=1)] == [i.prompt for i in toks]
    assert [i.prompt for i in preservation_set("tokens", data, sd15, seed=2)] != [i.prompt for i in toks]
    special = emb.special_ids()
    lengths = [len(emb.token_ids([i.prompt])[0]) for i in toks]
    assert not any(t in special for i in toks for t in emb.token_ids([i.prompt])[0]) and max(lengths) <= emb.max_tokens
    auto = preservation_set("auto", data, sd15, seed=1)
    union = preservation_set("auto+tokens", data, sd15, seed=1)
    assert [i.prompt for i in union] == [i.prompt for i in auto] + [i.prompt for i in toks]
    assert [i.prompt for i in preservation_set("tokens+tokens", data, sd15, seed=1)] == [i.prompt for i in toks]
    res = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, preserve_weight=1.0, preserve_prompts="auto+tokens"))
    assert all(math.isfinite(r["preserve"]) for r in res.history)
    assert res.lora.metadata["safetydpo_preserve_prompts"] == "auto+tokens"


def test_the_tokens_set_needs_token_access_and_says_so(sd15, data, monkeypatch):
    from safetydpo_core.training.preservation import preservation_set

    def refuse():
        raise ConfigError("no tokens here.")

    monkeypatch.setattr(sd15, "prompt_embedder", refuse)
    with pytest.raises(ConfigError, match="'tokens' needs token-level access.*Use the preservation prompts 'auto'"):
        preservation_set("auto+tokens", data, sd15)


@pytest.mark.parametrize("spec,match", [
    ("nonsense", "Unknown preservation prompts 'nonsense'"), ("missing.txt", "does not exist"),
    ("empty.txt", "give no prompt"), ("others-all", "Unknown preservation prompts"),
    ("auto+nonsense", "Unknown preservation prompts 'nonsense'"), ("auto+", "empty part")])
def test_bad_preservation_sets_are_named(sd15, data, tmp_path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        train_expert(sd15, data, TrainConfig(steps=1, preserve_weight=1.0, preserve_prompts=spec))


def test_others_is_empty_when_every_category_is_trained(sd15, tmp_path):
    from conftest import make_dataset as make

    root = make(tmp_path / "one", sd15, categories=("violence",))
    ds = PreferenceDataset(root)
    with pytest.raises(ConfigError, match="'others' is empty"):
        train_expert(sd15, ds, TrainConfig(steps=1, preserve_weight=1.0, preserve_prompts="others"))


@pytest.mark.parametrize("bad,match", [
    ({"preserve_weight": -1.0}, "preserve_weight must be a finite number >= 0"),
    ({"preserve_weight": float("nan")}, "preserve_weight must be a finite number >= 0"),
    ({"preserve_weight": float("inf")}, "preserve_weight must be a finite number >= 0"),
    ({"sft_weight": float("nan")}, "sft_weight must be a finite number >= 0"),
    ({"preserve_prompts": ""}, "preserve_prompts must name a preservation set")])
def test_bad_preservation_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_neutral_preservation_prompts_are_not_the_evaluation_prompts(sd15, data):
    """On a real (non-world) model 'neutral' is the pack's neutral-train set, disjoint from the neutral prompts
    that evaluation uses; 'auto' adds the other categories' safe prompts."""
    from safetydpo_core.eval.prompt_sets import load_prompt_set
    from safetydpo_core.training.preservation import preservation_set

    neutral = [i.prompt for i in preservation_set("neutral", data, sd15)]
    assert len(neutral) >= 100 and not set(neutral) & set(load_prompt_set("neutral"))
    auto = preservation_set("auto", data, sd15)
    assert len(auto) == len(neutral) + len(preservation_set("others", data, sd15))
    # 'safe': every safe prompt of the dataset (the trained category's too), with its latent, plus neutral
    safe = preservation_set("safe", data, sd15)
    assert len(safe) == len(neutral) + len(data.all_records) and all(i.latent for i in safe[:len(data.all_records)])
    assert {i.prompt for i in safe[:len(data.all_records)]} == {r.safe for r in data.all_records}
    assert any("violence" in r.category for r in data.all_records)


def test_each_declared_setting_s_range_and_choices_are_what_train_config_accepts():
    """The one declaration (config.SETTINGS) that the CLI and the node build their inputs from agrees with
    TrainConfig's own checks: the ends of each range are accepted, a value just outside is refused."""
    from safetydpo_core.training.config import RESUME_KEYS, SETTINGS

    assert set(SETTINGS) == {f for f in TrainConfig().to_dict()}
    assert "grad_accum" in RESUME_KEYS and "mixed_precision" in RESUME_KEYS and "steps" not in RESUME_KEYS
    for s in SETTINGS.values():
        if s.kind in ("int", "float") and s.name not in ("seed",):
            step = 1 if s.kind == "int" else 1e-9
            if s.lo is not None:
                if not s.lo_open:
                    TrainConfig(**{s.name: s.lo})
                with pytest.raises(ConfigError, match=s.name):
                    TrainConfig(**{s.name: s.lo if s.lo_open else s.lo - step})
            if s.hi is not None:
                with pytest.raises(ConfigError, match=s.name):
                    TrainConfig(**{s.name: s.hi if s.hi_open else s.hi + step})
        if s.choices and s.name not in ("mixed_precision",):  # auto is resolved before TrainConfig
            for c in s.choices:
                TrainConfig(**{s.name: c})
            if s.name != "preserve_prompts":  # anything else names a prompts file, read when training starts
                with pytest.raises(ConfigError, match=s.name):
                    TrainConfig(**{s.name: "nonsense"})


def test_a_full_prompt_cache_never_drops_a_prompt_of_the_batch_it_encodes(sd15, data, monkeypatch):
    """The trainer keeps COND_CACHE prompt embeddings. A batch holding the least recently used one and a new
    prompt (so the cache overflows while the batch is encoded) gets every prompt's own embedding, the cache stays
    within its size, and the batch's prompts are the ones kept. (It raised KeyError once preservation sets and
    pairs together named more than 512 prompts.)"""
    from safetydpo_core.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "COND_CACHE", 3)
    t = trainer_module.ExpertTrainer(sd15, data, TrainConfig(steps=1, rank=2))
    size = (64, 64)

    def alone(p):
        return sd15.encode_prompts([p], size=size).tensors

    t._encode(["a red car", "a blue house", "a green tree"], size)
    for batch in (["a red car", "a yellow boat"], ["a blue house", "a cat", "a dog", "a red car"], ["a dog", "a dog"]):
        got = t._encode(batch, size).tensors
        for k, v in got.items():
            assert torch.equal(v, torch.cat([alone(p)[k] for p in batch])), (batch, k)
        assert len(t._cond_cache) <= 3
        assert set(list(dict.fromkeys(batch))[-3:]) <= {p for p, _ in t._cond_cache}


# -- safe-twin preservation (twin_weight) --------------------------------------------------------------------


def test_twin_preservation_keeps_the_trained_category_s_safe_prompts(sd15, data, tmp_path):
    """With twin_weight the same run changes what the model predicts for the trained pairs' own safe prompts
    much less, still learns the preference, writes the weight into the LoRA's metadata, resumes exactly and
    refuses a resume with another weight; on objective esd it is refused with its name."""
    base = dict(steps=25, lr=1e-2, beta=500, batch_size=2, seed=0, timestep_range=(200, 800))
    plain = train_expert(sd15, data, TrainConfig(**base))
    kept = train_expert(sd15, data, TrainConfig(**base, twin_weight=1000.0))
    assert kept.history[0]["twin"] == 0.0 and abs(kept.history[0]["loss"] - math.log(2)) < 1e-6
    assert any(r["twin"] > 0 for r in kept.history) and "twin" not in plain.history[0]
    twins = sorted({r.safe for r in data.records})
    assert twins and _drift(sd15, kept.lora, twins) < 0.5 * _drift(sd15, plain.lora, twins)
    assert preference_stats(sd15, data, kept.lora, beta=500, draws=3, timesteps=(200, 800))["implicit_acc"] == 1.0
    assert kept.lora.metadata["safetydpo_twin_weight"] == "1000"
    assert "safetydpo_twin_weight" not in plain.lora.metadata

    cfg = TrainConfig(steps=4, lr=1e-3, beta=1000, seed=5, twin_weight=3.0, preserve_weight=2.0,
                      preserve_prompts="others", adv_weight=0.5, checkpoint_every=2)
    full = train_expert(sd15, data, cfg)
    assert all({"twin", "preserve", "adv"} <= set(r) for r in full.history)
    with pytest.raises(Interrupted):
        train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", should_stop=_stop_after(2))
    assert full.lora.allclose(train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", resume=True).lora,
                              rtol=0, atol=0)
    with pytest.raises(ConfigError, match="twin_weight"):
        train_expert(sd15, data, TrainConfig(**{**cfg.to_dict(), "twin_weight": 4.0}), checkpoint_dir=tmp_path / "ck",
                     resume=True)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="twin_weight"):
            TrainConfig(twin_weight=bad)
    with pytest.raises(ConfigError, match="twin_weight does not apply to objective esd"):
        TrainConfig(objective="esd", twin_weight=1.0)


# -- the weight average (ema_decay) --------------------------------------------------------------------------


def test_weight_ema_is_the_bias_corrected_average_of_the_steps_taken():
    """WeightEMA after weights w_1..w_k is sum d^(k-i) (1-d) w_i / (1 - d^k): the starting weights do not count;
    ``applied`` swaps the average in and the weights back; a checkpoint's state round-trips and a mismatched one
    is refused with what to do."""
    from safetydpo_core.training.ema import WeightEMA

    p = torch.nn.Parameter(torch.tensor([10.0, -4.0]))  # the start, which must not be averaged in
    ema = WeightEMA([p], 0.8)
    with ema.applied([p]):  # no step yet: nothing to average, the weights stay
        assert torch.equal(p.detach(), torch.tensor([10.0, -4.0]))
    seen = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 5.0])]
    for w in seen:
        with torch.no_grad():
            p.copy_(w)
        ema.update([p])
    d, k = 0.8, len(seen)
    want = sum(d ** (k - 1 - i) * (1 - d) * w for i, w in enumerate(seen)) / (1 - d ** k)
    assert torch.allclose(ema.averaged()[0], want, atol=1e-6)
    with ema.applied([p]):
        assert torch.allclose(p.detach(), want, atol=1e-6)
    assert torch.equal(p.detach(), seen[-1])
    again = WeightEMA([p], 0.8)
    again.load_state_dict(ema.state_dict())
    assert again.steps == 3 and torch.equal(again.averaged()[0], ema.averaged()[0])
    with pytest.raises(ConfigError, match="holds no weight average"):
        again.load_state_dict(None, where="The checkpoint x.pt")
    with pytest.raises(ConfigError, match="does not match"):
        WeightEMA([torch.zeros(3)], 0.8).load_state_dict(ema.state_dict())


def test_ema_decay_exports_the_average_of_the_steps_and_resumes_exactly(sd15, data, tmp_path):
    """With ema_decay the run trains exactly as without it and exports the bias-corrected average of the LoRA's
    weights after each step (read back from a checkpoint per step), records the decay in the file, resumes to
    the same LoRA after an interruption, refuses a resume with another decay, and refuses bad values by name."""
    from safetydpo_core.training.checkpoint import load_checkpoint

    cfg = TrainConfig(steps=4, lr=1e-2, beta=1000, seed=2, batch_size=2, checkpoint_every=1, keep_checkpoints=10)
    plain = train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "plain")
    avg_cfg = TrainConfig(**{**cfg.to_dict(), "ema_decay": 0.6})
    avg = train_expert(sd15, data, avg_cfg, checkpoint_dir=tmp_path / "avg")
    steps = [load_checkpoint(p) for _, p in list_checkpoints(tmp_path / "plain")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    # the average does not change training: the weights after each step are the plain run's
    for (_, p), s in zip(list_checkpoints(tmp_path / "avg"), steps):
        a = load_checkpoint(p)
        assert all(torch.equal(a["lora_up"][n], s["lora_up"][n]) for n in s["lora_up"])
    d, k = 0.6, len(steps)
    moved = False
    for name, layer in avg.lora.items():
        for part, got in (("lora_down", layer.down), ("lora_up", layer.up)):
            want = sum(d ** (k - 1 - i) * (1 - d) * s[part][name] for i, s in enumerate(steps)) / (1 - d ** k)
            assert torch.allclose(got, want, atol=1e-6), (name, part)
        moved |= not torch.allclose(layer.up, plain.lora[name].up, atol=1e-6)
    assert moved, "the average should differ from the last step's weights"
    assert avg.lora.metadata["safetydpo_ema_decay"] == "0.6" and "safetydpo_ema_decay" not in plain.lora.metadata

    with pytest.raises(Interrupted):
        train_expert(sd15, data, avg_cfg, checkpoint_dir=tmp_path / "ck", should_stop=_stop_after(2))
    resumed = train_expert(sd15, data, avg_cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert avg.lora.allclose(resumed.lora, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="ema_decay"):
        train_expert(sd15, data, TrainConfig(**{**avg_cfg.to_dict(), "ema_decay": 0.9}), checkpoint_dir=tmp_path / "ck",
                     resume=True)
    for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="ema_decay"):
            TrainConfig(ema_decay=bad)
