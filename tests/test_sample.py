"""``safetydpo sample`` and :mod:`safetydpo_core.sampling` on a tiny SD1.5: per-row seeds and guidance from I2P
columns, LoRA strengths as paired variants, the manifest that ``eval`` reads, resume, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from safetydpo_core.cli.main import main
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import ConfigError, DatasetError, Interrupted, SafetyDPOError
from safetydpo_core.eval import read_run
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.prompts.i2p import EvalPrompt
from safetydpo_core.sampling import SampleSettings, load_prompts, sample_prompts, variant_name

CSV = ('prompt,categories,sd_seed,sd_guidance_scale,sd_image_width\n'
       '"a photo of a cat at night",sexual,42,7,512\n'
       '"a red dog","violence, hate",,,512\n'
       '"a woman holding a house",sexual,7,3.5,512\n')


@pytest.fixture(scope="module")
def den(tiny_sd15):
    return DiffusersDenoiser.from_pretrained(tiny_sd15)


@pytest.fixture(scope="module")
def lora_file(den, tmp_path_factory):
    from safetydpo_core.lora.io import save_lora

    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, mod in den.layers("attn").items():
        out_f, in_f = mod.weight.shape[:2]
        layers[name] = LoraLayer(torch.randn(2, in_f, generator=g) * 0.5, torch.randn(out_f, 2, generator=g) * 0.5, 2.0)
    path = tmp_path_factory.mktemp("lora") / "expert.safetensors"
    save_lora(LoraSet(layers, "diffusers"), path, names=den.names())
    return path


@pytest.fixture()
def csv_file(tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text(CSV)
    return p


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_rows_keep_their_seed_and_guidance_and_match_a_direct_render(den, csv_file, tmp_path):
    from safetydpo_core.data.render import initial_noise, pair_seed, to_pil

    prompts = load_prompts(csv_file)
    out = tmp_path / "run"
    s = SampleSettings(steps=3, seed=11, batch_size=2)
    summary = sample_prompts(den, prompts, out, s)
    assert summary.written == 3 and summary.variants == {"base": 3}
    run = read_run(out)
    recs = {r.id: r for r in run.records}
    assert [recs[p.id].seed for p in prompts] == [42, pair_seed(11, prompts[1].id), 7]
    assert [recs[p.id].guidance for p in prompts] == [7.0, 7.5, 3.5]
    assert recs[prompts[1].id].categories == ["violence", "hate"] and recs[prompts[0].id].extra["width"] == 32
    # the image of row 3 is exactly what the denoiser gives for seed 7 at guidance 3.5
    cond = den.encode_prompts([prompts[2].prompt], size=(32, 32))
    unc = den.encode_prompts([""], size=(32, 32))
    lat = den.sample(cond, unc, initial_noise(7, den.latent_shape(32, 32))[None], steps=3, cfg=3.5, sampler="ddim")
    want = np.asarray(to_pil(den.decode_latents(lat))[0], dtype=np.int16)
    assert np.abs(_pixels(run.path(recs[prompts[2].id])) - want).max() <= 1
    # ignoring the rows' columns derives every seed from --seed and uses --cfg
    s2 = SampleSettings(steps=1, seed=11, cfg=5.0, row_seed=False, row_guidance=False)
    sample_prompts(den, prompts[:1], tmp_path / "run2", s2)
    [r] = read_run(tmp_path / "run2").records
    assert r.seed == pair_seed(11, prompts[0].id) and r.guidance == 5.0


def test_strengths_are_paired_variants_and_the_model_is_restored(den, csv_file, lora_file, tmp_path):
    fp = den.fingerprint()
    out = tmp_path / "cmp"
    from safetydpo_core.lora.io import load_lora
    from safetydpo_core.merge.experts import align_experts

    lora = align_experts([load_lora(lora_file, names=den.names())], naming=den.naming, names=den.names())[0]
    prompts = load_prompts(csv_file)
    summary = sample_prompts(den, prompts, out, SampleSettings(steps=2), lora=lora, lora_name="expert",
                             strengths=[0, 1.0, 0.5])
    assert summary.variants == {"base": 3, "expert@1": 3, "expert@0.5": 3}
    assert den.fingerprint() == fp  # weights restored bit for bit
    run = read_run(out)
    assert run.variants == ["base", "expert@1", "expert@0.5"]
    by = {(r.variant, r.id): r for r in run.records}
    pid = prompts[0].id
    assert by[("base", pid)].seed == by[("expert@1", pid)].seed == 42
    assert by[("expert@1", pid)].lora == "expert" and by[("expert@1", pid)].strength == 1.0
    assert by[("base", pid)].lora is None and by[("base", pid)].strength == 0.0
    base = _pixels(run.path(by[("base", pid)]))
    assert np.abs(_pixels(run.path(by[("expert@1", pid)])) - base).max() > 3  # the LoRA changes the image
    # strength 0 is the base model exactly
    sample_prompts(den, prompts[:1], tmp_path / "plain", SampleSettings(steps=2))
    assert np.array_equal(_pixels(read_run(tmp_path / "plain").path(read_run(tmp_path / "plain").records[0])), base)


def test_interrupt_and_resume_give_the_same_run(den, csv_file, tmp_path):
    prompts = load_prompts(csv_file)
    s = SampleSettings(steps=2, batch_size=1)
    full = tmp_path / "full"
    sample_prompts(den, prompts, full, s)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    part = tmp_path / "part"
    with pytest.raises(Interrupted, match="after 2 of 3"):
        sample_prompts(den, prompts, part, s, should_stop=stop)
    assert len(read_run(part).records) == 2
    with pytest.raises(SafetyDPOError, match=r"resume \(--resume\) to continue"):
        sample_prompts(den, prompts, part, s)
    with pytest.raises(ConfigError, match=r"other settings \(steps\)"):
        sample_prompts(den, prompts, part, SampleSettings(steps=3, batch_size=1), resume=True)
    res = sample_prompts(den, prompts, part, s, resume=True)
    assert res.written == 1 and res.skipped == 2
    a, b = read_run(full), read_run(part)
    assert [r.to_json() for r in a.records] == [r.to_json() for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert np.array_equal(_pixels(a.path(ra)), _pixels(b.path(rb)))
    # overwrite starts anew
    assert sample_prompts(den, prompts[:1], part, s, overwrite=True).written == 1
    assert len(read_run(part).records) == 1


def test_prompt_sources_and_errors(tmp_path, csv_file):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "x1", "category": ["violence"], "concept": "knife", "unsafe": "a man with a knife",
                                 "safe": "a man with a spoon"}) + "\n")
    both = load_prompts(pairs, field="both")
    assert [(p.id, p.prompt) for p in both] == [("x1.unsafe", "a man with a knife"), ("x1.safe", "a man with a spoon")]
    assert [p.prompt for p in load_prompts(pairs, field="safe")] == ["a man with a spoon"]
    assert len(load_prompts(csv_file, categories="sexual")) == 2 and len(load_prompts(csv_file, limit=1)) == 2
    dup = tmp_path / "dup.csv"
    dup.write_text("prompt,id\na,x\nb,x\n")
    with pytest.raises(DatasetError, match="id 'x' occurs more than once"):
        load_prompts(dup)
    with pytest.raises(DatasetError, match="does not exist"):
        load_prompts(tmp_path / "nope.csv")
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ConfigError, match="must be an I2P-style .csv or a prompt-pair .jsonl"):
        load_prompts(tmp_path / "p.txt")
    assert variant_name(None, 1.0) == "base" and variant_name("a b", 0) == "base" and variant_name("a b", 0.25) == "a_b@0.25"


def test_cli_sample_writes_manifest_and_config(tiny_sd15, csv_file, lora_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sample", "--model", str(tiny_sd15), "--prompts", str(csv_file), "--out", str(out), "--device", "cpu",
            "--steps", "1", "--lora", str(lora_file), "--strength", "0", "1", "--categories", "sexual"]
    assert main(args) == 0
    run = read_run(out)
    assert run.variants == ["base", "expert@1"] and len(run.records) == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "sample" and cfg["strengths"] == [0.0, 1.0] and cfg["variants"] == ["base", "expert@1"]
    assert cfg["steps"] == 1 and cfg["lora"] == str(lora_file)
    assert main(args) == 2
    assert "already holds a sampled run" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_sd15), "--prompts", str(csv_file), "--out", str(tmp_path / "o"),
                 "--strength", "0.5"]) == 2
    assert "--strength needs --lora" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert main(["sample", "--model", str(tiny_sd15), "--prompts", str(csv_file), "--out", str(tmp_path / "o2"),
                 "--lora", str(bad)]) == 2
    assert "cannot be read as safetensors" in capsys.readouterr().err
    # --lora-start: the LoRA from a later step; one that leaves it no step is refused by name
    assert main(args[:-2] + ["--steps", "3", "--lora-start", "2", "--out", str(tmp_path / "late")]) == 0
    assert {r.extra.get("lora_start") for r in read_run(tmp_path / "late").records} == {None, 2}
    assert main(args[:-2] + ["--lora-start", "1", "--out", str(tmp_path / "never")]) == 2
    assert "lora_start (1) must be below the number of sampling steps (1)" in capsys.readouterr().err


def test_sdxl_model_samples(tiny_sdxl, csv_file, tmp_path):
    assert main(["sample", "--model", str(tiny_sdxl), "--prompts", str(csv_file), "--out", str(tmp_path / "xl"),
                 "--device", "cpu", "--steps", "1", "--limit", "1", "--sampler", "euler"]) == 0
    run = read_run(tmp_path / "xl")
    assert len(run.records) == 2 and all(Image.open(run.path(r)).size == (32, 32) for r in run.records)
    assert json.loads((tmp_path / "xl" / "config.json").read_text())["sampler"] == "euler"


def test_lora_from_a_later_step_switches_per_sampling_call(den, csv_file, lora_file, tmp_path):
    """``lora_start`` N: every sampling call runs its first N steps on the untouched model and the rest with the
    LoRA; the result matches a direct two-phase render, lies between the base model's and the LoRA's pictures,
    and the weights are restored."""
    from safetydpo_core.data.render import initial_noise, render_latents
    from safetydpo_core.lora.apply import lora_applied, lora_applied_from
    from safetydpo_core.lora.io import load_lora
    from safetydpo_core.merge.experts import align_experts

    lora = align_experts([load_lora(lora_file, names=den.names())], naming=den.naming, names=den.names())[0]
    fp = den.fingerprint()
    name = next(iter(lora.layers))
    weight = den.layers([name])[name].weight
    before = weight.detach().clone()
    # the switch itself: off until step 2 of each call, on after it, off again after the last step
    with lora_applied_from(den.module, [(lora, 1.0)], 2) as switch:
        for _ in range(2):  # two sampling calls in one block
            switch(1, 4)
            assert torch.equal(weight, before)
            switch(2, 4)
            assert not torch.equal(weight, before)
            switch(4, 4)
            assert torch.equal(weight, before)
        switch(2, 4)  # interrupted mid-call: the block's exit restores the weights
    assert torch.equal(weight, before) and den.fingerprint() == fp
    with lora_applied_from(den.module, [(lora, 1.0)], 0) as switch:
        assert switch is None and not torch.equal(weight, before)  # start 0: on from the first step
    with pytest.raises(Exception, match="start step must be >= 0"):
        with lora_applied_from(den.module, [(lora, 1.0)], -1):
            pass

    prompts = load_prompts(csv_file)[:2]
    s = SampleSettings(steps=4, lora_start=2, row_guidance=False, cfg=5.0)
    sample_prompts(den, prompts, tmp_path / "late", s, lora=lora, lora_name="expert", strengths=[0, 1.0])
    run = read_run(tmp_path / "late")
    by = {(r.variant, r.id): r for r in run.records}
    rec = by[("expert@1", prompts[1].id)]
    assert rec.extra["lora_start"] == 2 and "lora_start" not in by[("base", prompts[1].id)].extra
    assert den.fingerprint() == fp
    # the same picture by hand: two steps without the LoRA, then the LoRA in for the last two
    noise_seed = rec.seed
    cond, unc = den.encode_prompts([rec.prompt], size=(32, 32)), den.encode_prompts([""], size=(32, 32))
    calls = []

    def by_hand(step, steps):
        calls.append(step)
        if step == 2:
            ctx.__enter__()

    ctx = lora_applied(den.module, [(lora, 1.0)])
    try:
        lat = den.sample(cond, unc, initial_noise(noise_seed, den.latent_shape(32, 32))[None], steps=4, cfg=5.0,
                         sampler="ddim", callback=by_hand)
    finally:
        ctx.__exit__(None, None, None)
    from safetydpo_core.data.render import to_pil

    want = np.asarray(to_pil(den.decode_latents(lat))[0], dtype=np.int16)
    got = _pixels(run.path(rec))
    assert calls == [1, 2, 3, 4] and np.abs(got - want).max() <= 1
    full = render_latents
    with lora_applied(den.module, [(lora, 1.0)]):
        lat_full = full(den, [rec.prompt], [noise_seed], size=(32, 32), steps=4, cfg=5.0)
    full_px = np.asarray(to_pil(den.decode_latents(lat_full))[0], dtype=np.int16)
    base_px = _pixels(run.path(by[("base", prompts[1].id)]))
    assert np.abs(got - full_px).max() > 0 and np.abs(got - base_px).max() > 0
    # the start must leave the LoRA some steps, and it is part of the resume check
    with pytest.raises(ConfigError, match=r"lora_start \(4\) must be below the number of sampling steps \(4\)"):
        SampleSettings(steps=4, lora_start=4)
    with pytest.raises(ConfigError, match="other settings .*lora_start"):
        sample_prompts(den, prompts, tmp_path / "late", SampleSettings(steps=4, lora_start=1, row_guidance=False,
                                                                       cfg=5.0), lora=lora, lora_name="expert",
                       strengths=[0, 1.0], resume=True)
