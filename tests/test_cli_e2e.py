"""The ``safetydpo`` command line end to end on a tiny SD1.5: pairs -> render -> train (two experts) -> merge ->
sample (base and aligned) -> eval (NudeNet when installed, Q16 and CLIPScore with tiny random CLIP weights),
with every output's resolved configuration beside it, every sub-command's --help, and config files."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from safetydpo_core.cli.main import COMMANDS, build_parser, main

HAS_NUDENET = importlib.util.find_spec("nudenet") is not None


def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    built = set(sub.choices)
    assert {"pairs", "render", "train", "merge", "sample", "eval", "workflow"} <= built
    for name in sorted(built):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: safetydpo {name}" in text
        if name in ("pairs", "train", "merge", "sample", "eval"):
            assert "--config" in text, name
    assert set(built) <= set(COMMANDS)


def test_pairs_reads_a_config_file_and_writes_the_resolved_one(tmp_path):
    cfg = tmp_path / "pairs.toml"
    cfg.write_text('categories = "violence"\nper-category = 3\nseed = 4\nno_progress = true\n')
    out = tmp_path / "p.jsonl"
    assert main(["pairs", "--config", str(cfg), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["category"] == ["violence"] for x in lines)
    resolved = json.loads((tmp_path / "p.config.json").read_text())
    assert resolved["command"] == "pairs" and resolved["per_category"] == 3 and resolved["seed"] == 4
    assert resolved["format"] == "jsonl" and resolved["config"] == str(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_categroy: 3\n")
    assert main(["pairs", "--config", str(bad), "--out", str(tmp_path / "q.jsonl")]) == 2


def test_flags_win_over_the_config_file(tmp_path):
    """Run as a real process, so that the command line is sys.argv (flags given there beat the file)."""
    cfg = tmp_path / "pairs.yaml"
    cfg.write_text("categories: violence\nper_category: 3\nno_progress: true\n")
    out = tmp_path / "p.jsonl"
    res = subprocess.run([sys.executable, "-m", "safetydpo_core.cli", "pairs", "--config", str(cfg), "--per-category",
                          "1", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 1
    assert json.loads((tmp_path / "p.config.json").read_text())["per_category"] == 1


@pytest.mark.slow
def test_pairs_render_train_merge_sample_eval(tiny_sd15, tmp_path, capsys):
    from safetydpo_core.eval.testing import build_tiny_clip, write_q16_embeddings

    m = str(tiny_sd15)
    w = tmp_path
    # 1. prompt pairs, and the evaluation prompts (I2P CSV) made from them
    assert main(["pairs", "--categories", "sexual,violence", "--per-category", "2", "--seed", "1", "--out",
                 str(w / "pairs.jsonl"), "--no-progress"]) == 0
    assert main(["pairs", "--from-jsonl", str(w / "pairs.jsonl"), "--format", "i2p", "--out", str(w / "eval.csv"),
                 "--no-progress"]) == 0
    # 2. same-seed paired renders
    assert main(["render", "--model", m, "--pairs", str(w / "pairs.jsonl"), "--out", str(w / "data"), "--steps", "2",
                 "--device", "cpu", "--no-previews"]) == 0
    # 3. one expert per category
    for cat in ("sexual", "violence"):
        assert main(["train", "--model", m, "--data", str(w / "data"), "--out", str(w / f"{cat}.safetensors"),
                     "--category", cat, "--steps", "2", "--rank", "2", "--lr", "1e-3", "--device", "cpu"]) == 0
    # 4. Co-Merge
    assert main(["merge", "--model", m, "--experts", str(w / "sexual.safetensors"), str(w / "violence.safetensors"),
                 "--calibration", str(w / "pairs.jsonl"), "--calibration-inputs", "4", "--out",
                 str(w / "merged.safetensors"), "--device", "cpu"]) == 0
    # 5. evaluation images: the base model, and base vs aligned in one run
    assert main(["sample", "--model", m, "--prompts", str(w / "eval.csv"), "--out", str(w / "base"), "--steps", "2",
                 "--device", "cpu"]) == 0
    assert main(["sample", "--model", m, "--prompts", str(w / "eval.csv"), "--out", str(w / "aligned"), "--steps", "2",
                 "--lora", str(w / "merged.safetensors"), "--strength", "1", "--device", "cpu"]) == 0
    # 6. evaluation weights: tiny random CLIP + Q16 embeddings laid out as the weights folder expects
    weights = w / "weights"
    build_tiny_clip(weights / "clip-vit-large-patch14")
    write_q16_embeddings(weights / "q16" / "prompts.npy", np.random.default_rng(0).normal(size=(2, 16)))
    capsys.readouterr()
    args = ["eval", str(w / "base"), str(w / "aligned"), "--out", str(w / "report"), "--weights-dir", str(weights),
            "--q16", "on", "--clipscore", "on", "--device", "cpu"]
    if not HAS_NUDENET:
        args += ["--nudenet", "off"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "# Safety evaluation" in printed and "Comparison with `base`" in printed

    # every output has its resolved configuration beside it
    for path in ("pairs.config.json", "data/config.json", "sexual.config.json", "violence.config.json",
                 "merged.config.json", "base/config.json", "aligned/config.json", "report/config.json"):
        assert json.loads((w / path).read_text())["command"] in ("pairs", "render", "train", "merge", "sample", "eval"), path
    rep = w / "report"
    assert {"per_image.csv", "summary.csv", "comparison.csv", "report.md", "report.json", "ip_by_category.png"} <= \
           {p.name for p in rep.iterdir()}
    per = list(csv.DictReader(open(rep / "per_image.csv")))
    assert len(per) == 8 and {r["group"] for r in per} == {"base", "aligned"}
    assert all(r["q16"] in ("True", "False") and r["clip_cos"] for r in per)
    if HAS_NUDENET:
        # random tiny-model renders are not nude: NudeNet flags none of them in either setting
        assert all(r["nudenet_safetydpo"] == "False" and r["nudenet_i2p"] == "False" for r in per)
    report = json.loads((rep / "report.json").read_text())
    assert report["groups"] == ["base", "aligned"] and ("nudenet" in report["info"]) == HAS_NUDENET
    assert {"all", "sexual", "violence"} <= {c["category"] for c in report["comparison"]}
    assert all(c["paired"] > 0 for c in report["comparison"])  # same prompt ids and seeds in both runs
    # manifest/image mismatch is an error naming the file
    (w / "aligned" / "images" / "merged@1" / "stray.png").write_bytes((rep / "ip_by_category.png").read_bytes())
    assert main(["eval", str(w / "aligned"), "--out", str(w / "r2"), "--nudenet", "off", "--weights-dir", str(weights)]) == 2
    assert "stray.png is in the run folder but not in manifest.jsonl" in capsys.readouterr().err
    # an existing report folder is not overwritten without asking
    assert main(args) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    shutil.rmtree(w / "aligned" / "images")
    assert main(["eval", str(w / "aligned"), "--out", str(w / "r3"), "--nudenet", "off", "--weights-dir", str(weights)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_missing_weights_are_explained(tmp_path, capsys):
    from PIL import Image
    from safetydpo_core.eval import ImageRecord, write_manifest

    (tmp_path / "run").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / "a.png")
    write_manifest(tmp_path / "run", [ImageRecord(file="a.png", prompt="x")])
    empty = tmp_path / "w"
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "r"), "--weights-dir", str(empty), "--q16", "on"]) == 2
    err = capsys.readouterr().err
    assert "openai/clip-vit-large-patch14" in err and str(empty / "clip-vit-large-patch14") in err
    assert "data/ViT-L-14/prompts.p" in err and str(empty / "q16" / "prompts.npy") in err
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'q16 = "on"\nweights_dir = "{empty}"\nnudenet = "off"\n')
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "data/ViT-L-14/prompts.p" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(["eval", str(tmp_path / "empty_run"), "--out", str(tmp_path / "r")]) == 2
    assert "is empty" in capsys.readouterr().err
