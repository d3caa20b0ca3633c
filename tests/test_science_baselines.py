"""benchmarks/science_baselines.py: the three erasure baselines for one seed on the world model, cached and
refused when the cache was made with other settings (a tiny run: 2 ESD steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import science_baselines as sb  # noqa: E402

from safetydpo_core.errors import ConfigError  # noqa: E402
from safetydpo_core.lora.io import load_lora  # noqa: E402
from safetydpo_core.world import WORLD, load_world_model  # noqa: E402
from safetydpo_core.world.demo import DemoSettings  # noqa: E402


def test_concept_lists_keep_held_out_words_out():
    erase, guide, preserve = sb.uce_concepts()
    held = {w for o in WORLD.objects for w in o.held_out_words}
    assert len(erase) == len(guide) == 14 and erase == sb.esd_concepts()
    assert ("gun", "wrench") in zip(erase, guide) and ("nude", "outfit") in zip(erase, guide)
    assert not held & set(erase + guide + preserve)
    assert not set(erase) & set(preserve) and {"circle", "wrench", "red", "on the left", "white"} <= set(preserve)


def test_baseline_loras_are_made_once_and_cached(tmp_path):
    den = load_world_model()
    s = DemoSettings.preset(quick=True, seed=3, steps=2, render_steps=3)
    logs = []
    paths = sb.baseline_loras(3, tmp_path, den, s, log=logs.append)
    assert list(paths) == ["esd-u", "esd-x", "uce"]
    loras = {n: load_lora(p, names=den.names()) for n, p in paths.items()}
    assert loras["uce"].metadata["safetydpo_uce_update_rank"] == "14"
    assert all(".attn2." in n for n in loras["esd-x"].layers)
    assert not any(".attn2." in n for n in loras["esd-u"].layers)
    assert loras["esd-u"].metadata["safetydpo_steps"] == "2"
    assert not list((tmp_path / "baselines").glob("*.checkpoints"))
    stamps = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    logs.clear()
    again = sb.baseline_loras(3, tmp_path, den, s, log=logs.append)
    assert again == paths and {n: p.stat().st_mtime_ns for n, p in again.items()} == stamps and not logs
    with pytest.raises(ConfigError, match="other settings"):
        sb.baseline_loras(3, tmp_path, den, DemoSettings.preset(quick=True, seed=3, steps=3, render_steps=3))
