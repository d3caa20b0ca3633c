"""Scale-out of render, sample and eval (``safetydpo_core.scaleout``): 2 gloo processes under ``accelerate launch``
write exactly the files of 1 process; parts of another run are refused by name; a process killed mid-item loses
only that item and the next launch (of any size) finishes the run; more processes than batches still works.

Both sides run as one-thread subprocesses with ``MKL_CBWR=COMPATIBLE`` (see tests/test_distributed.py), on the
built-in world model with few pairs and steps.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed import _accelerate_launch, _env
from safetydpo_core.scaleout import PARTS, owners

pytest.importorskip("accelerate", reason="accelerate is needed for the multi-process tests")


def _one(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safetydpo_core.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=420)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _same_tree(a: Path, b: Path, ignore=("config.json", "summary.json")) -> None:
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.name not in ignore)
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name not in ignore)
    assert fa == fb
    for f in fa:
        assert filecmp.cmp(a / f, b / f, shallow=False), f


def _killed_midway(args: list[str], cwd: Path, lines_file: Path) -> int:
    """Run the command in its own process group, SIGKILL it once ``lines_file`` has 2 lines; its line count."""
    proc = subprocess.Popen([sys.executable, "-m", "safetydpo_core.cli", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (lines_file.exists() and lines_file.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return lines_file.read_text().count("\n")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from safetydpo_core.prompts.pairs import write_pairs
    from safetydpo_core.world.pairs import world_pairs

    p = tmp_path_factory.mktemp("scale") / "pairs.jsonl"
    write_pairs(world_pairs(1), p)  # 7 pairs, one per concept
    return p


RENDER = ["--steps", "2", "--batch-pairs", "2"]


def test_owners_are_balanced_disjoint_and_keyed_by_id():
    keys = [f"id{i}" for i in range(11)]
    own = owners(keys, 3)
    assert sorted(own.count(r) for r in range(3)) == [3, 4, 4]
    assert owners(list(reversed(keys)), 3) == list(reversed(own))  # the input order does not matter
    assert owners(keys[:2], 4) in ([0, 1], [1, 0])  # more processes than units: some get none


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(pairs, tmp_path):
    _ok(_one(["render", "--pairs", str(pairs), "--out", "r1", *RENDER], tmp_path))
    _ok(_accelerate_launch(["render", "--pairs", str(pairs), "--out", "r2", *RENDER], tmp_path))
    _same_tree(tmp_path / "r1", tmp_path / "r2")
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("r1", "r2"))
    assert {**s1, "out": ""} == {**s2, "out": ""} and s2["rendered"] == 7
    assert not (tmp_path / "r2" / PARTS).exists()

    _ok(_one(["sample", "--prompts", str(pairs), "--out", "s1", "--steps", "2", "--batch-size", "2"], tmp_path))
    _ok(_accelerate_launch(["sample", "--prompts", str(pairs), "--out", "s2", "--steps", "2", "--batch-size", "2"],
                           tmp_path))
    _same_tree(tmp_path / "s1", tmp_path / "s2")

    pytest.importorskip("nudenet", reason="eval scores with NudeNet (the [eval] extra)")
    ev = ["--batch-size", "2", "--q16", "off", "--clipscore", "off", "--fid", "off"]
    _ok(_one(["eval", "s1", "--out", "e1", *ev], tmp_path))
    _ok(_accelerate_launch(["eval", "s1", "--out", "e2", *ev], tmp_path))
    _same_tree(tmp_path / "e1", tmp_path / "e2", ignore=("config.json",))


@pytest.mark.slow
def test_parts_of_another_run_are_refused_and_a_killed_process_is_redone(pairs, tmp_path):
    out = tmp_path / "r"
    # a one-process render in split mode (an empty .parts folder makes it one), killed once it has a pair on disk
    (out / PARTS).mkdir(parents=True)
    args = ["render", "--pairs", str(pairs), "--out", str(out), "--steps", "2", "--batch-pairs", "1", "--resume"]
    manifest = out / PARTS / "p0" / "manifest.jsonl"
    lines = _killed_midway(args, tmp_path, manifest)
    assert 2 <= lines < 7, "the render was not killed midway"
    with open(manifest, "a") as f:  # the process died writing the next manifest line
        f.write('{"id": "world-')

    # other settings: the parts are refused, named
    res = _one(["render", "--pairs", str(pairs), "--out", str(out), "--steps", "3", "--batch-pairs", "1", "--resume"],
               tmp_path)
    assert res.returncode != 0 and str(out / PARTS / "p0") in res.stderr and "--overwrite" in res.stderr
    res = _one(args[:-1], tmp_path)  # the same settings without --resume: refused too
    assert res.returncode != 0 and "--resume" in res.stderr

    # the next launch (2 processes) finishes; the result is the one-process render
    _ok(_accelerate_launch(args, tmp_path))
    assert not (out / PARTS).exists()
    _ok(_one(args[:-1][:4] + [str(tmp_path / "fresh"), *args[5:-1]], tmp_path))
    _same_tree(tmp_path / "fresh", out)


@pytest.mark.slow
def test_more_processes_than_batches(pairs, tmp_path):
    from safetydpo_core.prompts.pairs import read_pairs, write_pairs

    one = tmp_path / "one.jsonl"
    write_pairs(read_pairs(pairs)[:1], one)
    res = _accelerate_launch(["render", "--pairs", str(one), "--out", "r", *RENDER], tmp_path)
    _ok(res)
    assert "2 processes for 1 batches" in res.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["rendered"] == 1


ATTACK = ["--sample-steps", "2", "--budget", "1", "--seed", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["wording", "unlearndiff"])
def test_two_processes_attack_like_one(pairs, tmp_path, attack):
    """The chunks of an attack are shared out; the white-box targets are drawn in one process's batches; the
    joined folder is the one-process folder (records equal but for their timings)."""
    args = ["attack", "--attack", attack, "--prompts", str(pairs), *ATTACK, "--batch-size", "2"]
    if attack == "unlearndiff":
        args += ["--steps", "2"]
    _ok(_one([*args, "--out", "a1"], tmp_path))
    _ok(_accelerate_launch([*args, "--out", "a2"], tmp_path))
    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    assert not (a2 / PARTS).exists()
    _same_tree(a1, a2, ignore=("config.json", "attack.json", "records.jsonl", "report.md"))

    def records(d):
        rows = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
        for r in rows:
            r.pop("seconds", None)
            r["info"] = {k: v for k, v in r.get("info", {}).items() if "seconds" not in k}
        return rows

    assert records(a1) == records(a2) and len(records(a1)) >= 7
    s1, s2 = (json.loads((d / "attack.json").read_text()) for d in (a1, a2))
    assert s1["complete"] and s2["complete"] and s1["state"] == s2["state"]
    assert {v: s["asr"] for v, s in s1["summary"].items()} == {v: s["asr"] for v, s in s2["summary"].items()}
    if attack == "unlearndiff":
        assert (a2 / "targets.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_attack_process_loses_only_its_chunk(pairs, tmp_path):
    out = tmp_path / "a"
    (out / PARTS).mkdir(parents=True)  # an empty .parts folder makes a one-process run a split one
    args = ["attack", "--attack", "wording", "--prompts", str(pairs), *ATTACK, "--batch-size", "2", "--out", str(out)]
    lines = _killed_midway(args, tmp_path, out / PARTS / "p0" / "run" / "records.jsonl")
    assert 2 <= lines < 7, "the attack was not killed midway"
    _ok(_accelerate_launch(args, tmp_path))  # the next launch, of another size, finishes the run
    assert not (out / PARTS).exists()
    _ok(_one([*args[:-1], str(tmp_path / "fresh")], tmp_path))
    _same_tree(tmp_path / "fresh", out, ignore=("config.json", "attack.json", "records.jsonl", "report.md"))
    strip = lambda d: sorted((r["id"], r["variant"], r["adversarial"], r["success"]) for r in  # noqa: E731
                             map(json.loads, (d / "records.jsonl").read_text().splitlines()))
    assert strip(out) == strip(tmp_path / "fresh")
