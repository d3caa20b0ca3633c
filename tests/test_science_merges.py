"""benchmarks/science_merges.py: which demo folders it measures."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import science_merges  # noqa: E402


def test_science_merges_refuses_a_demo_of_other_settings_naming_them(tmp_path):
    """benchmarks/science_merges.py measures the default recipe only: a demo folder made with other settings is
    refused with what differs, named as ``safetydpo demo`` names it."""
    from safetydpo_core.world.demo import DemoSettings

    for f in ("merged.safetensors", "comerge.safetensors"):
        (tmp_path / f).write_bytes(b"")
    preset = DemoSettings.preset(seed=1)
    (tmp_path / "demo.json").write_text(json.dumps({"settings": {**preset.to_dict(), "workers": 2}}))
    assert science_merges.demo_settings(tmp_path) == preset  # how fast it ran is not a difference
    (tmp_path / "demo.json").write_text(json.dumps({"settings": {**preset.to_dict(), "adversary": 0,
                                                                 "adversary_preserve": None}}))
    with pytest.raises(SystemExit, match="settings other than the preset of its seed \\(adversary 0 there, 0.5 here; "
                                         "adversary_preserve None there, auto here\\)"):
        science_merges.demo_settings(tmp_path)
