"""Adversarial training against concept inversion (training/adversarial.py) on a tiny SD1.5 with random weights."""

import pytest
import torch

from conftest import GradCallHook, make_dataset
from safetydpo_core.attacks.unlearndiff import denoising_loss
from safetydpo_core.data import PreferenceDataset
from safetydpo_core.denoiser.protocol import FREE
from safetydpo_core.errors import ConfigError, Interrupted
from safetydpo_core.training import TrainConfig, train_expert
from safetydpo_core.training.adversarial import Adversary


@pytest.fixture(scope="module")
def data(sd15, tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data") / "pairs", sd15)
    return PreferenceDataset(root, expect_fingerprint=sd15.fingerprint())


def test_one_token_per_category_placed_where_the_concept_was(sd15, data):
    adv = Adversary(sd15, data.records, lr=0.3, reset=50, init="concept", seed=0)
    assert sorted(adv.vectors) == ["sexual", "violence"]
    emb = adv.embedder
    for cat, rec in adv.first.items():  # the concept word is not in these prompts: the token goes in front
        ids, own = adv._layout(rec)
        assert ids[0] == FREE and ids[1:] == emb.token_ids([rec.unsafe])[0]
        assert torch.equal(adv.vectors[cat].detach(), emb.vocabulary()[own].mean(0))
    rand = Adversary(sd15, data.records, lr=0.3, reset=50, init="random", seed=0)
    again = Adversary(sd15, data.records, lr=0.3, reset=50, init="random", seed=0)
    assert not torch.equal(rand.vectors["sexual"], rand.vectors["violence"])  # a token of its own per category
    assert all(torch.equal(rand.vectors[c], again.vectors[c]) for c in rand.vectors)  # and the same for the seed


def test_the_adversary_lowers_the_models_error_on_the_unsafe_pictures(sd15, data):
    """Its steps do what the inversion attack does: the model's denoising error on the unsafe latents falls."""
    adv = Adversary(sd15, data.records, lr=1.0, reset=1000, init="random", seed=1)
    idx = [i for i, r in enumerate(data.records) if adv.key(r) == "violence"]
    recs = [data.records[i] for i in idx]
    x0 = torch.stack([data.load_pair(i)[1] for i in idx])  # the unsafe latents
    g = torch.Generator().manual_seed(0)
    t = torch.randint(200, 800, (len(recs),), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def loss() -> float:
        return float(denoising_loss(sd15, x0, adv.conditioning(recs, (32, 32)), t, noise).mean())

    start, other = loss(), adv.vectors["sexual"].detach().clone()
    adv.attack(sd15, recs, x0, (32, 32), 15, torch.Generator().manual_seed(1))
    assert loss() < start
    assert torch.equal(adv.vectors["sexual"].detach(), other)  # only the attacked pairs' category moves
    assert all(p.grad is None for p in sd15.module.parameters())  # and no network weight gets a gradient


def test_the_adversarys_turn_keeps_to_the_training_timestep_range(sd15, data, monkeypatch):
    """``timestep_range`` is every term's range, the adversary's token steps included."""
    seen = []
    real = type(sd15).sample_timesteps

    def spy(self, n, generator, latent_shape=None, t_range=None):
        t = real(self, n, generator, latent_shape=latent_shape, t_range=t_range)
        seen.append(t)
        return t

    monkeypatch.setattr(type(sd15), "sample_timesteps", spy)
    train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, beta=1000, seed=5, adv_weight=1.0, adv_steps=2,
                                         timestep_range=(0, 300)))
    drawn = torch.cat(seen)
    assert len(seen) >= 2 * 2 and int(drawn.max()) < 300  # the adversary's 2 steps a step and the pairs'


def test_adversarial_training_runs_resumes_exactly_and_is_recorded(sd15, data, tmp_path):
    cfg = TrainConfig(steps=5, lr=1e-3, beta=1000, seed=3, adv_weight=1.0, adv_reset=4, checkpoint_every=2)
    full = train_expert(sd15, data, cfg)
    assert all("adv" in row for row in full.history)
    assert full.lora.metadata["safetydpo_adv_weight"] == "1" and full.lora.metadata["safetydpo_adv_init"] == "random"
    calls = {"n": 0}

    def stop_after_3() -> bool:  # after step 3: the resumed run must go on with the saved tokens (restart: step 4)
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Interrupted):
        train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", should_stop=stop_after_3)
    state = torch.load(sorted((tmp_path / "ck").glob("checkpoint-*.pt"))[-1], weights_only=True)
    assert sorted(state["adversary"]) == ["sexual", "violence"]
    resumed = train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert full.lora.allclose(resumed.lora, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="adv_weight"):
        train_expert(sd15, data, TrainConfig(**{**cfg.to_dict(), "adv_weight": 2.0}), checkpoint_dir=tmp_path / "ck",
                     resume=True)
    plain = train_expert(sd15, data, TrainConfig(**{**cfg.to_dict(), "adv_weight": 0.0, "checkpoint_every": 0}))
    assert "safetydpo_adv_weight" not in plain.lora.metadata
    assert not plain.lora.allclose(full.lora, rtol=0, atol=1e-7)  # the term changes what is learned


def test_the_adversarys_turn_loads_no_pair_twice(sd15, data, monkeypatch):
    """The adversary attacks micro-step 0's unsafe latents; that micro-step then reuses the batch it loaded, so a
    step with the adversary reads the same pairs from the dataset as a step without it."""
    loads = []
    real = PreferenceDataset.load_pair
    monkeypatch.setattr(PreferenceDataset, "load_pair", lambda self, i: loads.append(i) or real(self, i))
    counts = {}
    for w in (0.0, 1.0):
        loads.clear()
        train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, beta=1000, seed=5, grad_accum=2, adv_weight=w,
                                             adv_steps=1))
        counts[w] = sorted(loads)
    assert counts[1.0] == counts[0.0] and len(counts[0.0]) >= 2 * 2 * TrainConfig().batch_size


def _ctrl_c_at(n: int):
    """A hook for :class:`GradCallHook`: Ctrl-C on the n-th forward pass with gradients."""
    def hook(out, k):
        if k == n:
            raise KeyboardInterrupt
        return out
    return hook


def test_a_ctrl_c_after_the_adversarys_turn_resumes_exactly(sd15, data, tmp_path):
    """Each step is the adversary's forward then the LoRA's: Ctrl-C in the LoRA's forward of step 3 comes after
    the adversary moved; the checkpoint must hold its tokens from before that step, or the resumed run (which
    repeats the step) would move them twice."""
    cfg = TrainConfig(steps=4, lr=1e-3, beta=1000, seed=4, adv_weight=1.0, adv_steps=1)
    full = train_expert(sd15, data, cfg)
    with pytest.raises(KeyboardInterrupt):
        train_expert(GradCallHook(sd15, _ctrl_c_at(2 * 2 + 2)), data, cfg, checkpoint_dir=tmp_path / "ck")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["checkpoint-0000002.pt"]
    resumed = train_expert(sd15, data, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert full.lora.allclose(resumed.lora, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(adv_weight=-1.0), "adv_weight"), (dict(adv_weight=float("nan")), "adv_weight"),
    (dict(adv_lr=0.0), "adv_lr"), (dict(adv_reset=0), "adv_reset"), (dict(adv_init="word"), "adv_init"),
    (dict(adv_steps=0), "adv_steps"), (dict(adv_objective="kl"), "adv_objective"),
    (dict(objective="esd", adv_weight=1.0), "adv_weight"),
])
def test_bad_adversarial_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_a_model_without_token_access_is_refused_by_name(sd15, data):
    class NoTokens:
        def __getattr__(self, name):
            return getattr(sd15, name)

        def prompt_embedder(self):
            raise NotImplementedError("this backend has no token-level access")

    with pytest.raises(ConfigError, match="adv_weight"):
        Adversary(NoTokens(), data.records, lr=0.3, reset=50, init="random", seed=0)
