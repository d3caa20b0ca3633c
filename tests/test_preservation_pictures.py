"""Preservation pictures (``preserve_pictures``): everyday preservation prompts noised from pictures of their own that
the untouched model renders, as the dataset's pairs were rendered; rendered once per dataset (cached), never with
the adapter on, NaN refused, and part of the resume check."""

import math

import pytest
import torch

from conftest import make_dataset
from safetydpo_core.data import PreferenceDataset
from safetydpo_core.errors import ConfigError, TrainingDiverged
from safetydpo_core.training import TrainConfig, train_expert
from safetydpo_core.training.preservation import PreserveItem, picture_settings, preservation_set, with_pictures


@pytest.fixture()
def data(sd15, tmp_path):
    root = make_dataset(tmp_path / "pairs", sd15)
    return PreferenceDataset(root, categories="violence", expect_fingerprint=sd15.fingerprint())


@pytest.fixture()
def keep(tmp_path):
    txt = tmp_path / "keep.txt"
    txt.write_text("a bowl of fruit\na lighthouse at dusk\n", encoding="utf-8")
    return txt


def _render(den, prompt, seed, s):
    from safetydpo_core.data.render import initial_noise

    h, w = s["height"], s["width"]
    noise = initial_noise(seed, den.latent_shape(h, w))[None]
    with torch.no_grad():
        return den.sample(den.encode_prompts([prompt], size=(h, w)), den.encode_prompts([s["negative"]], size=(h, w)),
                          noise, steps=s["steps"], cfg=s["cfg"], sampler=s["sampler"], scheduler=s["scheduler"])[0]


def test_everyday_prompts_get_pictures_of_their_own_the_others_keep_theirs(sd15, data, keep, tmp_path, monkeypatch):
    from safetydpo_core.data.render import pair_seed

    s = {**picture_settings(data, sd15), "steps": 3}
    assert (s["height"], s["width"]) == (32, 32) and s["cfg"] == 7.5  # the pairs' size; render defaults (no header)
    others = preservation_set("others", data, sd15)
    tokens = preservation_set("tokens", data, sd15)[:3]
    items = preservation_set(str(keep), data, sd15) + others + tokens
    out = with_pictures(items, sd15, 2, seed=7, settings=s, cache_dir=tmp_path / "cache")
    assert len(out) == 2 * 2 + len(others) + len(tokens)
    pictured = [i for i in out if i.picture is not None]
    assert [i.prompt for i in pictured] == ["a bowl of fruit"] * 2 + ["a lighthouse at dusk"] * 2
    assert all(i.source == "file" and i.latent is None for i in pictured)
    assert not torch.allclose(pictured[0].picture, pictured[1].picture)  # two seeds, two pictures
    assert pictured[0].picture.shape == data.load_pair(0)[0].shape
    # each is the model's own picture of its prompt from a seed fixed by the run's seed, the prompt and k
    expect = _render(sd15, "a lighthouse at dusk", pair_seed(7, "preserve:1:a lighthouse at dusk"), s)
    assert torch.allclose(pictured[3].picture, expect, atol=1e-5)
    assert [i for i in out if i.picture is None] == others + tokens  # dataset latents and random tokens unchanged

    # rendered once: a second run reads the cache (the model is not asked again) ...
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def no_render(*a, **k):
        raise AssertionError("rendered again")

    monkeypatch.setattr(sd15, "sample", no_render)
    again = with_pictures(items, sd15, 2, seed=7, settings=s, cache_dir=tmp_path / "cache")
    assert all(torch.equal(a.picture, b.picture) for a, b in zip(pictured, [i for i in again if i.picture is not None]))
    # ... and other settings, seeds or counts are other pictures
    for kw in ({"settings": {**s, "steps": 4}, "seed": 7, "n": 2}, {"settings": s, "seed": 8, "n": 2},
               {"settings": s, "seed": 7, "n": 3}):
        with pytest.raises(AssertionError, match="rendered again"):
            with_pictures(items, sd15, kw["n"], seed=kw["seed"], settings=kw["settings"], cache_dir=tmp_path / "cache")
    assert with_pictures(items, sd15, 0, seed=7, settings=s) == items


def test_non_finite_pictures_are_refused_and_not_cached(sd15, data, keep, tmp_path, monkeypatch):
    items = preservation_set(str(keep), data, sd15)
    monkeypatch.setattr(sd15, "sample", lambda cond, uncond, noise, **k: torch.full_like(noise, float("nan")))
    with pytest.raises(TrainingDiverged, match="non-finite latents for the preservation prompts"):
        with_pictures(items, sd15, 1, seed=0, settings=picture_settings(data, sd15), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))


def test_a_model_that_cannot_render_is_named():
    class NoSampler:
        pass

    with pytest.raises(ConfigError, match="preserve_pictures needs a model that can render"):
        with_pictures([PreserveItem("a cup", source="neutral")], NoSampler(), 1, seed=0, settings={})


def test_training_renders_them_with_the_untouched_model_and_records_it(sd15, data, keep, monkeypatch):
    import safetydpo_core.training.preservation as P

    seen = {}
    real = P.with_pictures

    def spy(items, den, n, **kw):
        seen["adapted"] = any("lora_" in name for name, _ in den.unet.named_parameters())
        out = real(items, den, n, **{**kw, "settings": {**kw["settings"], "steps": 2}})
        seen["pictures"] = sum(i.picture is not None for i in out)
        return out

    monkeypatch.setattr(P, "with_pictures", spy)
    start = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-2, seed=1)).lora
    res = train_expert(sd15, data, TrainConfig(steps=2, lr=1e-3, preserve_weight=1.0, preserve_prompts=str(keep),
                                               preserve_pictures=2), init_lora=start)
    assert seen == {"adapted": False, "pictures": 4}  # before the adapters (and the start LoRA) go in
    assert all(math.isfinite(r["preserve"]) for r in res.history)
    assert res.lora.metadata["safetydpo_preserve_pictures"] == "2"
    assert len(list((data.root / "preservation").glob("*.safetensors"))) == 1  # cached beside the pairs


@pytest.mark.parametrize("bad", [-1, 1.5, 65, float("nan")])
def test_bad_preserve_pictures_is_named(bad):
    with pytest.raises(ConfigError, match="preserve_pictures"):
        TrainConfig(preserve_pictures=bad)
