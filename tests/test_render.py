"""Same-seed rendering of prompt pairs into a preference dataset: shared noise, determinism, resume, judge."""

import json

import pytest
import torch

from safetydpo_core.cli.main import main
from safetydpo_core.data import PreferenceDataset
from safetydpo_core.data.render import RenderSettings, initial_noise, pair_seed, render_pairs
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import Interrupted
from safetydpo_core.prompts.pairs import PromptPair, write_pairs

PAIRS = [PromptPair(id=f"p{i}", category=[c], concept="knife", unsafe=f"a man holding a knife {i}",
                    safe=f"a man holding a cat {i}") for i, c in enumerate(["violence", "violence", "hate", "sexual"])]
FAST = RenderSettings(steps=2, cfg=2.0, seed=3, batch_pairs=2)


@pytest.fixture(scope="module")
def den(tiny_sd15):
    return DiffusersDenoiser.from_pretrained(tiny_sd15)


class _SpySampler:
    """Records the initial noise the renderer hands to the sampler."""

    def __init__(self, den):
        self.den, self.noises = den, []

    def __getattr__(self, name):
        return getattr(self.den, name)

    def sample(self, cond, uncond, noise, **kw):
        self.noises.append(noise.clone())
        return self.den.sample(cond, uncond, noise, **kw)


def test_pairs_share_initial_noise_and_render_deterministically(den, tmp_path):
    spy = _SpySampler(den)
    summary = render_pairs(spy, PAIRS, tmp_path / "a", FAST)
    assert summary.rendered == 4 and summary.per_category == {"hate": 1, "sexual": 1, "violence": 2}
    for noise in spy.noises:  # [safe..., unsafe...] of the same pairs start from the same noise
        n = noise.shape[0] // 2
        assert torch.equal(noise[:n], noise[n:])
    assert torch.equal(spy.noises[0][0], initial_noise(pair_seed(3, "p0"), noise.shape[1:]))
    render_pairs(den, PAIRS, tmp_path / "b", FAST)
    a, b = PreferenceDataset(tmp_path / "a"), PreferenceDataset(tmp_path / "b")
    for i in range(4):
        assert all(torch.equal(x, y) for x, y in zip(a.load_pair(i), b.load_pair(i)))
    s, u = a.load_pair(0)
    assert not torch.equal(s, u)
    rec = a.records[0]
    assert rec.seed == pair_seed(3, "p0") and rec.height == 32 and rec.extra["previews"]
    assert (tmp_path / "a" / rec.extra["previews"][0]).exists()
    assert a.header["settings"]["steps"] == 2 and a.header["settings"]["sampler"] == "ddim"


def test_crash_mid_render_resumes_without_duplicates(den, tmp_path):
    calls = {"n": 0}

    def stop_after_one_batch():
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(Interrupted):
        render_pairs(den, PAIRS, tmp_path / "d", FAST, should_stop=stop_after_one_batch)
    assert [r.id for r in PreferenceDataset(tmp_path / "d").records] == ["p0", "p1"]
    summary = render_pairs(den, PAIRS, tmp_path / "d", FAST, resume=True)
    assert summary.skipped_done == 2 and summary.rendered == 2
    ids = [r.id for r in PreferenceDataset(tmp_path / "d").records]
    assert ids == ["p0", "p1", "p2", "p3"]
    # and identical to an uninterrupted render
    render_pairs(den, PAIRS, tmp_path / "e", FAST)
    x, y = PreferenceDataset(tmp_path / "d"), PreferenceDataset(tmp_path / "e")
    assert all(torch.equal(x.load_pair(3)[k], y.load_pair(3)[k]) for k in (0, 1))


class _DropSexual:
    name = "test-judge"

    def __call__(self, safe, unsafe, pairs):
        return [(False, "unsafe image not unsafe") if "sexual" in p.category else (True, "") for p in pairs]


def test_judge_drops_pairs_and_summary_says_why(den, tmp_path):
    summary = render_pairs(den, PAIRS, tmp_path / "j", FAST, judge=_DropSexual())
    assert summary.rendered == 3 and summary.dropped == {"unsafe image not unsafe": 1}
    saved = json.loads((tmp_path / "j" / "summary.json").read_text())
    assert saved["dropped"] == {"unsafe image not unsafe": 1}


def test_render_cli(tiny_sd15, tmp_path, capsys):
    write_pairs(PAIRS, tmp_path / "pairs.jsonl")
    args = ["render", "--model", str(tiny_sd15), "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "data"),
            "--steps", "2", "--cfg", "1.5", "--categories", "violence"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["rendered"] == 2
    assert json.loads((tmp_path / "data" / "config.json").read_text())["steps"] == 2
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0


def test_karras_schedule_is_recorded_and_changes_the_render(den, tmp_path):
    import dataclasses

    # (with 2 steps both schedules are just their end points, so use 4)
    karras = dataclasses.replace(FAST, steps=4, sampler="euler", scheduler="karras")
    normal = dataclasses.replace(FAST, steps=4, sampler="euler")
    render_pairs(den, PAIRS[:1], tmp_path / "k", karras)
    render_pairs(den, PAIRS[:1], tmp_path / "n", normal)
    k, n = PreferenceDataset(tmp_path / "k"), PreferenceDataset(tmp_path / "n")
    assert k.header["settings"]["scheduler"] == "karras"
    assert not torch.equal(k.load_pair(0)[0], n.load_pair(0)[0])
