"""``safetydpo train`` end to end on a tiny model: outputs, metrics, resume, and its error messages."""

import csv
import json

import pytest
from safetensors import safe_open

from conftest import make_dataset
from safetydpo_core.cli.main import main
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser


@pytest.fixture(scope="module")
def data(tiny_sd15, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli") / "data", DiffusersDenoiser.from_pretrained(tiny_sd15))


def test_train_writes_lora_metrics_config(tiny_sd15, data, tmp_path):
    out = tmp_path / "violence.safetensors"
    args = ["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(out), "--category", "violence",
            "--steps", "3", "--rank", "2", "--beta", "2500", "--lr", "1e-3", "--seed", "7", "--checkpoint-every", "2"]
    assert main(args) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert meta["safetydpo_category"] == "violence" and meta["safetydpo_beta"] == "2500"
    assert meta["safetydpo_steps"] == "3" and meta["safetydpo_seed"] == "7" and meta["ss_network_dim"] == "2"
    rows = list(csv.DictReader(open(tmp_path / "violence.metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and abs(float(rows[0]["loss"]) - 0.6931) < 1e-3
    assert json.loads((tmp_path / "violence.config.json").read_text())["beta"] == 2500
    assert main(args) == 2  # refuses to overwrite
    # resume with more steps continues from the last checkpoint
    assert main(args[:-6] + ["--steps", "4", "--rank", "2", "--beta", "2500", "--lr", "1e-3", "--seed", "7",
                             "--checkpoint-every", "2", "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "violence.metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]


def test_train_from_a_config_file(tiny_sd15, data, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('category = "sexual"\nsteps = 1\nrank = 3\nobjective = "mapo"\n')
    out = tmp_path / "x.safetensors"
    assert main(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(out), "--config", str(cfg)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["safetydpo_objective"] == "mapo" and f.metadata()["ss_network_dim"] == "3"


@pytest.mark.parametrize("extra,message", [
    (["--rank", "0"], "--rank: must be an integer >= 1"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--beta", "-1"], "--beta: must be a finite number > 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm: must be a finite number >= 0; got nan"),
    (["--category", "hate"], "no pairs for hate"),
    (["--targets", "nothing_here"], "do not exist in this model")])
def test_train_errors(tiny_sd15, data, tmp_path, capsys, extra, message):
    rc = main(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(tmp_path / "o.safetensors"),
               "--steps", "1", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_train_bad_paths(tiny_sd15, data, tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(tmp_path / "o.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    assert main(["train", "--model", str(tmp_path / "model.ckpt"), "--data", str(data), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "refused" in capsys.readouterr().err


def test_flags_win_over_the_config_file_in_process(tiny_sd15, data, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 1\nrank: 3\n")
    out = tmp_path / "y.safetensors"
    assert main(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(out), "--config", str(cfg),
                 "--rank", "2"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "2" and f.metadata()["safetydpo_steps"] == "1"
