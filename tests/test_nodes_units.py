"""Pieces of the node pack that need no ComfyUI: safe names and paths, never-overwriting writes, the
LORA_MODEL dict with metadata, and the loss plot."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "safetydpo_pack_units"


def _mod(name):
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PACK}.{name}")


paths = _mod("nodes.paths")
types_ = _mod("nodes.types")
plot = _mod("nodes.plot_node")
errors = _mod("safetydpo_core.errors")


@pytest.mark.parametrize("value,sub,expected", [
    ("my_set", False, "my_set"), ("  spaced name  ", False, "spaced name"), ("a/b/c", True, "a/b/c"),
    ("sub\\win", True, "sub/win"), ("ünïcode-ok.v2", False, "ünïcode-ok.v2"),
])
def test_check_name_accepts_plain_relative_names(value, sub, expected):
    assert paths.check_name(value, "x", subfolders=sub) == expected


@pytest.mark.parametrize("value,sub", [
    ("", False), ("   ", False), ("../up", True), ("a/../../b", True), ("/etc/passwd", True), ("C:evil", True),
    ("c:\\windows", True), ("a//b", True), ("./a", True), ("a/b", False), ("nul\x00byte", False), ("tab\there", False),
    ("what?", False), ("pipe|x", False), ("trailing.", False), ("x" * 201, False),
])
def test_check_name_refuses_names_that_could_escape_or_break(value, sub):
    with pytest.raises(errors.ConfigError, match="my_input"):
        paths.check_name(value, "my_input", subfolders=sub)


def test_inside_follows_links_and_refuses_what_leaves_the_folder(tmp_path):
    base = tmp_path / "base"
    (base / "ok").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, base / "link")
    assert paths.inside(base, "ok/file.txt", "f") == (base / "ok" / "file.txt").resolve()
    with pytest.raises(errors.ConfigError, match="leads outside"):
        paths.inside(base, "link/file.txt", "f")
    with pytest.raises(errors.ConfigError, match="leads outside"):
        paths.inside(base, "", "f")
    with pytest.raises(errors.ConfigError, match="leads outside"):
        paths.safe_join(base, "link", "f")


def test_numbered_writes_never_overwrite(tmp_path):
    base = tmp_path / "out"
    made = [paths.write_new(base, "sub/run", ".txt", lambda p, i=i: p.write_text(str(i))) for i in range(3)]
    assert [p.name for p in made] == ["run_00001_.txt", "run_00002_.txt", "run_00003_.txt"]
    assert [p.read_text() for p in made] == ["0", "1", "2"]
    (base / "sub" / "run_00009_.txt").write_text("kept")
    assert paths.write_new(base, "sub/run", ".txt", lambda p: p.write_text("new")).name == "run_00010_.txt"

    def racing(p):  # another process takes the chosen name while we write
        target = p.parent / "race_00001_.txt"
        if not target.exists():
            target.write_text("theirs")
        p.write_text("ours")

    got = paths.write_new(base, "race", ".txt", racing)
    assert got.name == "race_00002_.txt" and got.read_text() == "ours"
    assert (base / "race_00001_.txt").read_text() == "theirs"
    assert not [f for f in base.rglob(".*")]  # no temporary file left
    with pytest.raises(errors.ConfigError, match="filename_prefix"):
        paths.write_new(base, "../evil", ".txt", lambda p: p.write_text("x"))
    with pytest.raises(ZeroDivisionError):
        paths.write_new(base, "fails", ".txt", lambda p: (p.write_text("half"), 1 / 0))
    assert not list(base.glob("fails*")) and not [f for f in base.rglob(".*")]


def test_lora_model_is_a_plain_dict_with_metadata_alongside(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = types_.LoraModel({"diffusion_model.a.lora_up.weight": torch.ones(2, 1)}, {"safetydpo_category": "hate", "n": 3})
    assert isinstance(lm, dict) and lm.metadata == {"safetydpo_category": "hate", "n": "3"}
    assert types_.metadata_of(lm) == lm.metadata and types_.metadata_of({"k": torch.zeros(1)}) == {}
    save_file(lm, str(tmp_path / "x.safetensors"))  # what core SaveLoRA does with a LORA_MODEL
    assert set(load_file(str(tmp_path / "x.safetensors"))) == set(lm)
    assert dict(lm) == {"diffusion_model.a.lora_up.weight": lm["diffusion_model.a.lora_up.weight"]}


def test_moving_average_and_loss_plot():
    assert plot.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert plot.moving_average([1, float("nan"), 3], 3) == [1, 1, 2]
    hist = [{"step": i + 1, "loss": 0.7 * math.exp(-i / 20) + 0.01 * (i % 3), "implicit_acc": min(1, i / 30),
             "margin": i / 10} for i in range(60)]
    for log_scale in (False, True):
        img = plot.draw_plot(hist, smoothing=5, log_scale=log_scale, width=400, height=240)
        assert img.size == (400, 240) and img.mode == "RGB"
        colours = {c for _, c in img.getcolors(400 * 240)}
        assert plot.SMOOTH in colours and plot.ACC in colours and plot.MARGIN in colours
    # degenerate histories still draw (one step, zero or negative loss on a log scale, nothing at all)
    for h in ([{"step": 1, "loss": 0.69}], [{"step": 1, "loss": 0.0}, {"step": 2, "loss": -1.0}], []):
        assert plot.draw_plot(h, log_scale=True, width=300, height=200).size == (300, 200)


def test_dataset_socket_path_must_lie_in_the_pack_datasets_folder(tmp_path, monkeypatch):
    out = tmp_path / "output"
    root = out / "safetydpo" / "datasets"
    (root / "mine").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    monkeypatch.setattr(paths, "output_dir", lambda: out)
    assert paths.dataset_folder({"path": str(root / "mine")}, "dataset") == (root / "mine").resolve()
    for value in ({"path": str(tmp_path / "elsewhere")}, {"path": str(root / "link")}, {"path": str(root)},
                  {"path": str(root / ".." / "..")}, {"path": None}, {}, "/etc", None):
        with pytest.raises(errors.ConfigError, match="dataset"):
            paths.dataset_folder(value, "dataset")


def test_node_numeric_inputs_refuse_nan_and_out_of_range():
    lora_nodes = _mod("nodes.lora_nodes")
    node = lora_nodes.ApplySafetyLoRA()
    for bad in (float("nan"), float("inf"), 11.0):
        with pytest.raises(errors.ConfigError, match="strength"):
            node.apply(model=None, lora={}, strength=bad)
