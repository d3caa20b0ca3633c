"""Data-parallel training through ``accelerate launch``: two CPU processes (gloo) with gradient accumulation 1
must train the same LoRA as one process with accumulation 2, and only the main process writes outputs.

Tolerance: both runs see exactly the same data, noise and timesteps, and summing two per-process gradients
is the same floating-point addition the single process does when it accumulates, so with the same number
of CPU threads per process the LoRAs are bit-identical (measured: largest difference 0). Both runs are
subprocesses with one thread and ``MKL_CBWR=COMPATIBLE``: without that mode MKL rounds differently with the
memory alignment of its inputs (measured: 3.6e-7 on the LoRA, 5e-5 on the step-3 loss at beta 2000, once the
preservation term adds forwards of another batch size). The test allows ``rtol=1e-5, atol=1e-6`` per tensor. With different thread counts the CPU kernels reduce in another order;
then we measured differences up to 2e-6 on weights of size ~0.5 after 3 Adam steps of lr 1e-3.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_dataset
from safetydpo_core.cli.main import main
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser

pytest.importorskip("accelerate", reason="accelerate is needed for the multi-process test")

STEPS = ["--steps", "3", "--rank", "2", "--lr", "1e-3", "--beta", "2000", "--seed", "3", "--condition", "both",
         "--prompt-dropout", "0.3", "--category", "violence", "--preserve-weight", "2", "--preserve-prompts", "others",
         "--adv-weight", "1",  # the adversary (training/adversarial.py) too: its tokens step on gradients summed over processes
         "--ema-decay", "0.5"]  # and the weight average (training/ema.py): each process keeps its own, a checkpoint holds it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_launch(args: list[str], tmp_path, timeout: int = 420) -> subprocess.CompletedProcess:
    exe = shutil.which("accelerate")
    launcher = [exe] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
    if exe:
        launcher.append("launch")
    cmd = [*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "safetydpo_core.cli", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout)


def _env() -> dict:
    """One thread per process, and MKL in its conditional-reproducibility mode: without it MKL's kernels round
    differently with the memory alignment of their inputs, which depends on each process's history."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


@pytest.fixture(scope="module")
def data(tiny_sd15, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dist") / "data", DiffusersDenoiser.from_pretrained(tiny_sd15))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_accumulation(tiny_sd15, data, tmp_path):
    one = tmp_path / "one.safetensors"
    res = subprocess.run([sys.executable, "-m", "safetydpo_core.cli", "train", "--model", str(tiny_sd15), "--data", str(data),
                          "--out", str(one), "--device", "cpu", "--grad-accum", "2", *STEPS],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = tmp_path / "two.safetensors"
    res = _accelerate_launch(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(two),
                              "--grad-accum", "1", "--checkpoint-every", "2", *STEPS], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert set(a) == set(b) and len(a) > 0
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"largest difference between the 1-process and 2-process LoRA: {worst:.3g}")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, worst)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_up" in k), "training did not move the LoRA"
    # the main process alone wrote the metrics (one row per step), the config and the checkpoints
    rows = list(csv.DictReader(open(tmp_path / "two.metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    ref = list(csv.DictReader(open(tmp_path / "one.metrics.csv")))
    for r1, r2 in zip(ref, rows):
        assert abs(float(r1["loss"]) - float(r2["loss"])) < 1e-5
        assert abs(float(r1["implicit_acc"]) - float(r2["implicit_acc"])) < 1e-9
    cfg = json.loads((tmp_path / "two.config.json").read_text())
    assert cfg["processes"] == 2 and cfg["micro_steps_per_step"] == 2 and cfg["grad_accum"] == 1
    assert sorted(p.name for p in (tmp_path / "two.checkpoints").iterdir()) == ["checkpoint-0000002.pt", "checkpoint-0000003.pt"]
    from safetensors import safe_open

    with safe_open(str(two), "pt") as f:
        assert f.metadata()["safetydpo_processes"] == "2"

    # a two-process checkpoint resumes in one process with the same micro-steps per step (1 x 2)
    (tmp_path / "two.checkpoints" / "checkpoint-0000003.pt").unlink()
    resumed = tmp_path / "two.safetensors"
    # in a process of its own under the same environment as both sides above (MKL_CBWR: see _env)
    res = subprocess.run([sys.executable, "-m", "safetydpo_core.cli", "train", "--model", str(tiny_sd15), "--data",
                          str(data), "--out", str(resumed), "--device", "cpu", "--grad-accum", "2", "--resume", *STEPS],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    c = load_file(str(resumed))
    for k in a:
        assert torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-6), k


def test_resume_with_other_micro_steps_is_refused(tiny_sd15, data, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    base = ["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--steps", "1", "--rank", "2", "--category", "violence"]
    assert main(base + ["--grad-accum", "2"]) == 0
    assert main([*base[:-6], "--steps", "2", "--rank", "2", "--category", "violence", "--grad-accum", "1", "--resume"]) == 2
    assert "2 micro-steps per optimiser step" in capsys.readouterr().err


def test_single_process_environment_is_detected(monkeypatch):
    from safetydpo_core.training.distributed import SingleProcess, from_environment, launched_distributed

    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    env = from_environment("cpu")
    assert isinstance(env.group, SingleProcess) and env.is_main and env.mixed_precision == "bf16"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_distributed()


def test_tensorboard_logging_when_installed(tiny_sd15, data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is optional)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb.safetensors"
    assert main(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--steps", "2", "--rank", "2", "--category", "violence"]) == 0
    acc = EventAccumulator(str(tmp_path / "tb.tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    rows = list(csv.DictReader(open(tmp_path / "tb.metrics.csv")))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    out2 = tmp_path / "off.safetensors"
    assert main(["train", "--model", str(tiny_sd15), "--data", str(data), "--out", str(out2), "--device", "cpu",
                 "--steps", "1", "--rank", "2", "--category", "violence", "--tensorboard", "off"]) == 0
    assert not (tmp_path / "off.tensorboard").exists()
