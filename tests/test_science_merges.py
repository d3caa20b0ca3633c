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


def test_science_merges_names_the_rows_after_the_demos_fine_tune_stage():
    """The table says what the demo's merged LoRA is made of: with the adversary (the default) the two fine-tunes
    summed, All-single through the same stage, and the plain halves in rows of their own; without it one joint
    fine-tune, and no rows for halves that were not made."""
    from safetydpo_core.world.demo import DemoSettings

    names = ["base", "merged", "finetuned", "all-single", "all-single+ft", "all-single+plain-ft",
             "merge:comerge-delta", "merge:ties"]
    rows = dict((name, label) for label, name in science_merges.table_rows(DemoSettings.preset(seed=0), names))
    assert list(rows) == ["base", "all-single", "all-single+ft", "all-single+plain-ft", "merged", "finetuned",
                          "merge:comerge-delta", "merge:ties"]
    assert rows["merged"] == ("comerge-delta + the plain and the adversarial fine-tunes of 200 steps, summed 0.5 / 0.5 "
                              "(the demo's merged LoRA)")
    assert rows["all-single+ft"].startswith("All-single + the plain and the adversarial fine-tunes")
    plain = DemoSettings.preset(seed=0, adversary=0)
    rows = dict((name, label) for label, name in science_merges.table_rows(
        plain, ["base", "merged", "all-single", "all-single+ft", "merge:comerge-delta"]))
    assert rows["merged"] == "comerge-delta + joint fine-tune, 200 steps (the demo's merged LoRA)"
    assert "finetuned" not in rows and "all-single+plain-ft" not in rows


def test_science_merges_rows_for_all_single_at_other_ranks():
    """``--all-single-ranks 16``: All-single at the merge's rank too, its rows after the experts' rank's, each with
    its fine-tune stage; a rank below 1 is refused by name."""
    from safetydpo_core.world.demo import DemoSettings

    names = ["base", "merged", "all-single", "all-single+ft", "all-single r16", "all-single r16+ft",
             "all-single r16+plain-ft", "all-single r8", "merge:comerge-delta"]
    rows = science_merges.table_rows(DemoSettings.preset(seed=0), names, (16, 8, 4))
    assert [n for _, n in rows] == ["base", "all-single", "all-single+ft", "all-single r8", "all-single r16",
                                    "all-single r16+ft", "all-single r16+plain-ft", "merged", "merge:comerge-delta"]
    labels = dict((n, label) for label, n in rows)
    assert labels["all-single r16"] == "All-single at rank 16"
    assert labels["all-single r16+plain-ft"] == "All-single at rank 16 + the plain joint fine-tune alone"
    with pytest.raises(SystemExit):
        science_merges.main(["--demos", "x", "--all-single-ranks", "0"])
