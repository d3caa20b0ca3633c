"""Issue #13, data loss and silent wrong results: no command loses data, writes over its inputs, runs twice on
one output, accepts NaN or an out-of-range number, or answers a full disk with a traceback. One test per
item of the issue, named after it, on the tiny SD1.5 model built from its config."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, make_dataset
from safetydpo_core.cli.main import main
from safetydpo_core.data import PreferenceDataset
from safetydpo_core.data.render import RenderSettings, render_pairs
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import SafetyDPOError
from safetydpo_core.prompts.pairs import PromptPair, write_pairs

PAIRS = [PromptPair(id=f"p{i}", category=[c], concept="knife", unsafe=f"a man holding a knife {i}",
                    safe=f"a man holding a cat {i}") for i, c in enumerate(["violence", "violence", "hate", "sexual"])]
FAST = RenderSettings(steps=2, cfg=2.0, seed=3, batch_pairs=2)
NO_SPACE = "No space left on device"


def cli(*args) -> int:
    """``safetydpo ARGS`` in-process; argparse's own refusals (SystemExit) give their exit code too."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def den(tiny_sd15):
    return DiffusersDenoiser.from_pretrained(tiny_sd15)


@pytest.fixture(scope="module")
def data(den, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("rel") / "data", den)


@pytest.fixture(scope="module")
def expert(tiny_sd15, data, tmp_path_factory):
    """One trained expert LoRA for the tests that need a good one (copy it before changing it)."""
    out = tmp_path_factory.mktemp("expert") / "expert.safetensors"
    assert _train(tiny_sd15, data, out) == 0
    return out


@pytest.fixture()
def pairs_file(tmp_path):
    write_pairs(PAIRS, tmp_path / "pairs.jsonl")
    return tmp_path / "pairs.jsonl"


def _train(model, data, out, *extra):
    return cli("train", "--model", model, "--data", data, "--out", out, "--steps", "2", "--rank", "2",
               "--lr", "1e-3", "--tensorboard", "off", *extra)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, NO_SPACE)


# -- 1. pairs --rejects ----------------------------------------------------------------------------------
def test_pairs_rejects_same_as_out_is_refused(tmp_path, capsys):
    out = tmp_path / "rj.jsonl"
    rc = cli("pairs", "--categories", "violence", "--per-category", "3", "--out", out, "--rejects", out,
             "--no-progress")
    assert rc == 2
    assert "--rejects" in capsys.readouterr().err
    assert not out.exists()


def test_pairs_existing_rejects_file_is_kept_without_overwrite(tmp_path, capsys):
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text('{"reason": "kept from an earlier run"}\n')
    rc = cli("pairs", "--categories", "violence", "--per-category", "2", "--out", tmp_path / "p.jsonl",
             "--rejects", rejects, "--no-progress")
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert rejects.read_text() == '{"reason": "kept from an earlier run"}\n'
    assert not (tmp_path / "p.jsonl").exists()
    assert cli("pairs", "--categories", "violence", "--per-category", "2", "--out", tmp_path / "p.jsonl",
               "--rejects", rejects, "--no-progress", "--overwrite") == 0


# -- 2. render --overwrite builds beside the old dataset -------------------------------------------------
class _FailingSampler:
    """The denoiser, whose sampler fails on call ``fail_at`` (a crash or Ctrl-C half-way through)."""

    def __init__(self, den, fail_at: int, exc=KeyboardInterrupt):
        self.den, self.fail_at, self.calls, self.exc = den, fail_at, 0, exc

    def __getattr__(self, name):
        return getattr(self.den, name)

    def sample(self, *a, **k):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc()
        return self.den.sample(*a, **k)


def test_render_overwrite_keeps_the_old_dataset_until_the_new_one_is_done(den, tmp_path):
    out = tmp_path / "data"
    render_pairs(den, PAIRS, out, FAST)
    before = _snapshot(out)
    new = RenderSettings(steps=3, cfg=3.0, seed=4, batch_pairs=2)
    with pytest.raises(KeyboardInterrupt):
        render_pairs(_FailingSampler(den, fail_at=2), PAIRS, out, new, overwrite=True)
    assert _snapshot(out) == before  # the old dataset is whole
    assert len(PreferenceDataset(out)) == 4
    summary = render_pairs(den, PAIRS, out, new, overwrite=True)
    assert summary.rendered == 4
    ds = PreferenceDataset(out)
    assert len(ds) == 4 and ds.header["settings"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging or backup folder left


# -- 3. no command writes over its inputs ----------------------------------------------------------------
def test_train_out_inside_its_dataset_is_refused(tiny_sd15, data, capsys):
    shard = sorted((data / "shards").glob("*.safetensors"))[0]
    before = shard.read_bytes()
    rc = _train(tiny_sd15, data, shard, "--overwrite")
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data" in err and "input" in err
    assert shard.read_bytes() == before
    assert not shard.with_suffix(".config.json").exists()


@pytest.mark.parametrize("command", ["merge", "sample", "render", "dataset", "eval"])
def test_no_command_writes_over_its_inputs(tiny_sd15, expert, pairs_file, tmp_path, command, capsys):
    lora = tmp_path / "expert.safetensors"
    shutil.copy(expert, lora)
    before = lora.read_bytes()
    if command == "dataset":  # the CSV inside the dataset folder that --overwrite replaces
        ds = tmp_path / "ds"
        ds.mkdir()
        (ds / "pairs.csv").write_text("prompt_unsafe,prompt_safe,image_safe,image_unsafe,category\n")
        rc = cli("dataset", "from-images", "--model", tiny_sd15, "--csv", ds / "pairs.csv", "--out", ds, "--overwrite")
        assert (ds / "pairs.csv").exists()
    elif command == "eval":  # the report folder is the run it reads
        run = tmp_path / "run"
        run.mkdir()
        (run / "manifest.jsonl").write_text("")
        rc = cli("eval", run, "--out", run, "--nudenet", "off", "--q16", "off", "--overwrite")
        assert sorted(p.name for p in run.iterdir()) == ["manifest.jsonl"]
    elif command == "merge":
        rc = cli("merge", "--model", tiny_sd15, "--experts", lora, "--method", "concat", "--out", lora, "--overwrite")
    elif command == "sample":  # the prompts are the manifest that --overwrite replaces
        run = tmp_path / "run"
        run.mkdir()
        shutil.copy(pairs_file, run / "manifest.jsonl")
        rc = cli("sample", "--model", tiny_sd15, "--prompts", run / "manifest.jsonl", "--out", run, "--steps", "1",
                 "--overwrite")
        assert (run / "manifest.jsonl").read_bytes() == pairs_file.read_bytes()
    else:  # the pairs file inside the dataset folder that --overwrite replaces
        ds = tmp_path / "ds"
        ds.mkdir()
        shutil.copy(pairs_file, ds / "pairs.jsonl")
        rc = cli("render", "--model", tiny_sd15, "--pairs", ds / "pairs.jsonl", "--out", ds, "--steps", "1",
                 "--overwrite")
    assert rc == 2
    assert "input" in capsys.readouterr().err
    assert lora.read_bytes() == before


# -- 4. locks --------------------------------------------------------------------------------------------
def test_concurrent_train_to_the_same_out_is_refused(tiny_sd15, data, tmp_path, capsys, caplog):
    out = tmp_path / "busy.safetensors"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [sys.executable, "-m", "safetydpo_core.cli", "train", "--model", str(tiny_sd15), "--data", str(data),
         "--out", str(out), "--steps", "100000", "--rank", "2", "--tensorboard", "off", "--checkpoint-every", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while not out.with_suffix(".metrics.csv").exists() or len(out.with_suffix(".metrics.csv").read_text().splitlines()) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.5)
        rc = _train(tiny_sd15, data, out, "--overwrite")
        err = capsys.readouterr().err
        assert rc == 2
        assert "busy.safetensors.lock" in err and str(first.pid) in err
    finally:
        first.send_signal(signal.SIGKILL)  # a killed run leaves its lock behind
        first.wait(30)
        log.close()
    # the killed run's lock is stale: the next run takes it over (and --overwrite starts afresh)
    caplog.set_level("WARNING")
    assert _train(tiny_sd15, data, out, "--overwrite") == 0
    assert "stale lock" in caplog.text
    assert not Path(str(out) + ".lock").exists()


def test_render_into_a_dataset_being_rendered_is_refused(den, tmp_path):
    out = tmp_path / "data"
    started, release = threading.Event(), threading.Event()
    errors = []

    def progress(done, total, info):
        started.set()
        release.wait(60)

    def first():
        try:
            render_pairs(den, PAIRS, out, FAST, progress=progress)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert started.wait(120)
        with pytest.raises(SafetyDPOError, match=r"data\.lock.*(in use|locked)|(in use|locked).*data\.lock"):
            render_pairs(den, PAIRS, out, FAST, resume=True)
    finally:
        release.set()
        t.join(120)
    assert not errors and len(PreferenceDataset(out)) == 4


# -- 5. train --resume without a checkpoint ---------------------------------------------------------------
def test_train_resume_without_checkpoint_keeps_the_finished_lora(tiny_sd15, data, tmp_path, capsys):
    out = tmp_path / "done.safetensors"
    assert _train(tiny_sd15, data, out, "--steps", "3") == 0
    before = out.read_bytes()
    shutil.rmtree(out.with_suffix(".checkpoints"))
    assert _train(tiny_sd15, data, out, "--resume") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


# -- 6. --overwrite clears the old run's checkpoints ----------------------------------------------------
def test_overwrite_clears_old_checkpoints_so_resume_works(tiny_sd15, data, tmp_path, monkeypatch, capsys):
    from safetydpo_core.training import metrics

    out = tmp_path / "x.safetensors"
    assert _train(tiny_sd15, data, out, "--steps", "4", "--checkpoint-every", "2") == 0
    real_append = metrics.MetricsLog.append

    def interrupt_at_step_2(self, row):
        real_append(self, row)
        if row["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(metrics.MetricsLog, "append", interrupt_at_step_2)
    assert _train(tiny_sd15, data, out, "--steps", "3", "--lr", "5e-4", "--overwrite") == 130
    monkeypatch.setattr(metrics.MetricsLog, "append", real_append)
    capsys.readouterr()
    assert _train(tiny_sd15, data, out, "--steps", "3", "--lr", "5e-4", "--resume") == 0, capsys.readouterr().err
    lines = out.with_suffix(".metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]


# -- 7. configs only with the result -----------------------------------------------------------------------
def test_refused_or_failed_runs_write_no_config(tiny_sd15, data, pairs_file, tmp_path, capsys):
    # render refuses an existing dataset without --resume: its config stays as it was
    ds = tmp_path / "ds"
    assert cli("render", "--model", tiny_sd15, "--pairs", pairs_file, "--out", ds, "--steps", "1") == 0
    config = (ds / "config.json").read_bytes()
    assert cli("render", "--model", tiny_sd15, "--pairs", pairs_file, "--out", ds, "--steps", "2") == 2
    assert (ds / "config.json").read_bytes() == config
    # train fails on its data: no <out>.config.json
    assert _train(tiny_sd15, data, tmp_path / "o.safetensors", "--category", "hate") == 2
    assert not (tmp_path / "o.config.json").exists()
    # pairs fails on a dead endpoint: no <out>.config.json
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert cli("pairs", "--writer", "llm", "--llm", f"http://127.0.0.1:{port}/v1", "--llm-model", "m",
               "--llm-retries", "0", "--categories", "violence", "--per-category", "1", "--out", tmp_path / "p.jsonl",
               "--no-progress") == 2
    assert not (tmp_path / "p.config.json").exists()
    capsys.readouterr()


def test_failed_eval_writes_no_config(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import safetydpo_core.eval as ev
    from safetydpo_core.eval import ImageRecord, write_manifest

    run = tmp_path / "run"
    run.mkdir()
    Image.new("RGB", (8, 8)).save(run / "a.png")
    write_manifest(run, [ImageRecord(file="a.png", prompt="x")])

    def fail(*a, **k):
        raise SafetyDPOError("the detector failed")

    class Evaluator:  # the detectors are not what is tested here; they fail below, during the evaluation
        notes, active, weights_dir, inception_path = [], ["nudenet"], tmp_path / "w", None

        def __init__(self, settings):
            self.settings = settings

    monkeypatch.setattr(ev, "Evaluator", Evaluator)
    monkeypatch.setattr(ev, "plan_evaluation", lambda runs, evaluator, **k: types.SimpleNamespace(baseline="run"))
    monkeypatch.setattr(ev, "run_evaluation", fail)
    rc = cli("eval", run, "--out", tmp_path / "r", "--nudenet", "off", "--q16", "off", "--weights-dir", tmp_path / "w")
    assert rc == 2 and "the detector failed" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.json").exists()
    assert not (tmp_path / "r.lock").exists()


# -- 8. NaN and non-finite values ------------------------------------------------------------------------
def test_render_cfg_nan_is_refused(tiny_sd15, pairs_file, tmp_path, capsys):
    rc = cli("render", "--model", tiny_sd15, "--pairs", pairs_file, "--out", tmp_path / "ds", "--steps", "1",
             "--cfg", "nan")
    assert rc == 2
    err = capsys.readouterr().err
    assert "cfg" in err and "nan" in err.lower()
    assert not (tmp_path / "ds" / "manifest.jsonl").exists()


def test_config_file_nan_is_refused(tiny_sd15, pairs_file, tmp_path, capsys):
    (tmp_path / "s.toml").write_text("cfg = nan\n")
    rc = cli("sample", "--model", tiny_sd15, "--prompts", pairs_file, "--out", tmp_path / "run", "--steps", "1",
             "--config", tmp_path / "s.toml")
    assert rc == 2
    err = capsys.readouterr().err
    assert "cfg" in err and "nan" in err.lower() and "s.toml" in err
    assert not (tmp_path / "run" / "manifest.jsonl").exists()


@pytest.mark.parametrize("flag,value", [("--cfg", "nan"), ("--strength", "nan"), ("--cfg", "inf"),
                                        ("--strength", "-inf")])
def test_sample_nan_cfg_and_strength_are_refused(tiny_sd15, expert, pairs_file, tmp_path, capsys, flag, value):
    lora = expert
    rc = cli("sample", "--model", tiny_sd15, "--prompts", pairs_file, "--out", tmp_path / "run", "--steps", "1",
             "--lora", lora, flag, value)
    assert rc == 2
    assert flag.lstrip("-") in capsys.readouterr().err
    assert not (tmp_path / "run" / "manifest.jsonl").exists()


def _nan_copy(lora: Path, target: Path) -> str:
    tensors = load_file(str(lora))
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(target), metadata=meta)
    return key


def test_nan_lora_is_refused_naming_file_and_key(tiny_sd15, expert, pairs_file, tmp_path, capsys):
    from safetydpo_core.errors import LoraError
    from safetydpo_core.lora.io import load_lora

    good = expert
    bad = tmp_path / "bad.safetensors"
    key = _nan_copy(good, bad)
    with pytest.raises(LoraError) as e:
        load_lora(bad)
    assert str(bad) in str(e.value) and key in str(e.value)
    rc = cli("sample", "--model", tiny_sd15, "--prompts", pairs_file, "--out", tmp_path / "run", "--steps", "1",
             "--lora", bad)
    assert rc == 2 and key in capsys.readouterr().err


def test_merge_with_a_nan_expert_is_refused(tiny_sd15, expert, tmp_path, capsys):
    good = expert
    bad = tmp_path / "bad.safetensors"
    key = _nan_copy(good, bad)
    out = tmp_path / "merged.safetensors"
    rc = cli("merge", "--model", tiny_sd15, "--experts", good, bad, "--method", "concat", "--out", out)
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad) in err and key in err
    assert not out.exists()


def test_training_on_a_nan_dataset_names_the_shard_and_key(tiny_sd15, den, tmp_path, capsys):
    ds = make_dataset(tmp_path / "nan", den)
    shard = sorted((ds / "shards").glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    tensors[key][0, 0, 0] = float("nan")
    save_file(tensors, str(shard))
    rc = _train(tiny_sd15, ds, tmp_path / "o.safetensors")
    assert rc == 2
    err = capsys.readouterr().err
    assert shard.name in err and key in err and "learning rate" not in err


def test_dataset_writer_refuses_non_finite_latents(den, tmp_path):
    from safetydpo_core.data import PreferenceDatasetWriter

    c, h, w = den.latent_shape(32, 32)
    bad = torch.zeros(c, h, w)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(SafetyDPOError, match="p0"):
        with PreferenceDatasetWriter(tmp_path / "d", previews=False) as wr:
            wr.add(id="p0", category="violence", concept="x", unsafe="u", safe="s", safe_latent=torch.zeros(c, h, w),
                   unsafe_latent=bad)


@pytest.mark.parametrize("args", [
    ["demo", "--steps", "nan"], ["demo", "--pairs", "0"], ["demo", "--threads", "-1"], ["demo", "--lora-strength", "nan"],
    ["demo", "--lora-strength", "0"],
    ["eval", "run", "--out", "r", "--batch-size", "0"], ["eval", "run", "--out", "r", "--nudenet-resolution", "nan"],
    ["dataset", "from-images", "--csv", "c.csv", "--out", "d", "--size", "nan"],
    ["merge", "--experts", "a.safetensors", "--out", "m.safetensors", "--threads", "-1"],
    ["pairs", "--out", "p.jsonl", "--per-category", "nan"]])
def test_every_command_refuses_nan_and_out_of_range_numbers(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert args[-2] in err and "must be" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,value", [("max_grad_norm", float("nan")), ("alpha", float("nan")),
                                         ("prompt_dropout", float("nan")), ("lr", float("inf"))])
def test_train_settings_refuse_nan(field, value):
    from safetydpo_core.errors import ConfigError
    from safetydpo_core.training import TrainConfig

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


# -- 9. --limit, identical pairs ---------------------------------------------------------------------------
def test_render_limit_below_one_is_refused(tiny_sd15, pairs_file, tmp_path, capsys):
    rc = cli("render", "--model", tiny_sd15, "--pairs", pairs_file, "--out", tmp_path / "ds", "--steps", "1",
             "--limit", "-1")
    assert rc == 2 and "limit" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_identical_pairs_are_counted_and_dropped_from_training(den, tiny_sd15, tmp_path, caplog):
    same = [PromptPair(id=f"same{i}", category=["violence"], concept="x", unsafe=f"a red cube {i}",
                       safe=f"a red cube {i}") for i in range(2)]
    summary = render_pairs(den, PAIRS + same, tmp_path / "ds", FAST)
    assert summary.to_json()["identical"] == 2
    assert PreferenceDataset(tmp_path / "ds").header["identical_pairs"] == 2
    caplog.set_level("WARNING")
    out = tmp_path / "o.safetensors"
    assert _train(tiny_sd15, tmp_path / "ds", out, "--category", "violence") == 0
    assert "2 pairs" in caplog.text and "identical" in caplog.text
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["safetydpo_dataset_pairs"] == "2"  # the two real violence pairs


# -- 10. rank above a layer's dimension ----------------------------------------------------------------
def test_rank_above_every_layer_dimension_is_refused_naming_the_largest_layer(tiny_sd15, data, tmp_path, capsys):
    """A rank above only some layers' sizes is capped there (test_init_lora.py); above all of them it is a
    mistake (a needlessly huge full-rank file) and refused."""
    rc = _train(tiny_sd15, data, tmp_path / "big.safetensors", "--rank", "1000")
    assert rc == 2
    err = capsys.readouterr().err
    assert "rank 1000" in err and "takes at most 64" in err
    assert any(name in err for name in ("to_q", "to_k", "to_v", "to_out"))
    assert not (tmp_path / "big.safetensors").exists()


# -- 11. tracebacks instead of errors: sizes, an existing file as folder, a full disk ------------------------
@pytest.mark.parametrize("size", ["-32", "100000", "0"])
def test_render_size_out_of_range_is_refused(tiny_sd15, pairs_file, tmp_path, capsys, size):
    rc = cli("render", "--model", tiny_sd15, "--pairs", pairs_file, "--out", tmp_path / "ds", "--steps", "1",
             "--size", size)
    assert rc == 2 and "size" in capsys.readouterr().err


def test_sample_size_negative_is_refused(pairs_file, tmp_path, capsys):
    rc = cli("sample", "--model", "world", "--prompts", pairs_file, "--out", tmp_path / "run", "--steps", "1",
             "--size", "-16")
    assert rc == 2 and "size" in capsys.readouterr().err


def test_sample_out_an_existing_file_is_refused(tiny_sd15, pairs_file, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    rc = cli("sample", "--model", tiny_sd15, "--prompts", pairs_file, "--out", f, "--steps", "1")
    assert rc == 2 and "file.txt" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def _one_line_naming(err: str, path) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and NO_SPACE.lower() in lines[0].lower() and str(path) in lines[0], err


def test_full_disk_in_pairs_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.jsonl"
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name.startswith(".p.jsonl"):
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    rc = cli("pairs", "--categories", "violence", "--per-category", "2", "--out", out, "--no-progress")
    assert rc == 2
    _one_line_naming(capsys.readouterr().err, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_in_train_is_one_line_and_the_next_run_resumes(tiny_sd15, data, tmp_path, monkeypatch, capsys):
    from safetydpo_core.lora import io

    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(io, "save_file", _enospc)
    assert _train(tiny_sd15, data, out, "--steps", "3") == 2
    _one_line_naming(capsys.readouterr().err, out)
    assert not out.exists()
    monkeypatch.undo()
    assert _train(tiny_sd15, data, out, "--steps", "3", "--resume") == 0
    rows = out.with_suffix(".metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3"]  # nothing trained twice


def test_full_disk_in_render_is_one_line_leaves_no_empty_preview_and_resumes(tiny_sd15, pairs_file, tmp_path,
                                                                               monkeypatch, capsys):
    from PIL import Image

    out = tmp_path / "ds"
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3:  # the second pair's first preview: the file is created, then the disk is full
            open(fp, "wb").close()
            _enospc()
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    args = ["render", "--model", tiny_sd15, "--pairs", pairs_file, "--out", out, "--steps", "1", "--batch-pairs", "2"]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and NO_SPACE.lower() in err.lower()
    previews = list(out.rglob("*.png")) if out.exists() else []
    assert all(p.stat().st_size > 0 for p in previews)
    monkeypatch.undo()
    assert cli(*args, "--resume") == 0
    ds = PreferenceDataset(out)
    assert len(ds) == 4
    assert all(p.stat().st_size > 0 for p in out.rglob("*.png"))


def test_full_disk_in_a_dataset_shard_names_the_shard(den, tmp_path, monkeypatch):
    from safetydpo_core.data import preference_dataset

    monkeypatch.setattr(preference_dataset, "save_file", _enospc)
    with pytest.raises(SafetyDPOError, match=NO_SPACE) as e:
        render_pairs(den, PAIRS, tmp_path / "ds", FAST, previews=False)
    assert "shard-00000.safetensors" in str(e.value)
