"""The demo's worker pool (world/parallel.py): a job that waits for others starts once they are done, on the
first free worker and ahead of the jobs after it, with its parent-side step run in between."""

from __future__ import annotations

import time

import pytest

from safetydpo_core.world.parallel import Job, run_jobs


def _stamp(path, name: str, seconds: float) -> str:
    """A job: sleep ``seconds``, then add ``name start end`` to the file ``path``."""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{name} {start} {time.time()}\n")
    return name


def test_a_waiting_job_starts_when_its_jobs_are_done_ahead_of_later_ones(tmp_path):
    log = tmp_path / "log"
    prepared: list[float] = []
    others = [f"other{k}" for k in range(12)]
    jobs = [Job(_stamp, (log, "long", 1.0)), (_stamp, (log, "short", 0.1)),
            Job(_stamp, (log, "after", 0.1), after=(0, 1), prepare=lambda: prepared.append(time.time())),
            *[(_stamp, (log, name, 0.3)) for name in others]]
    said = []
    assert run_jobs(jobs, 2, 1, said.append) == ["long", "short", "after", *others]
    t = {name: (float(a), float(b)) for name, a, b in (line.split() for line in log.read_text().splitlines())}
    assert len(prepared) == 1
    assert prepared[0] >= max(t["long"][1], t["short"][1]) and t["after"][0] >= prepared[0]
    assert min(t[n][0] for n in others) < t["long"][1]  # the other worker did not wait idle for the long job
    assert t["after"][0] < max(t[n][0] for n in others)  # once ready, ahead of the jobs still waiting


def test_a_job_can_only_wait_for_jobs_before_it(tmp_path):
    with pytest.raises(ValueError, match="Job 0 waits for jobs"):
        run_jobs([Job(_stamp, (tmp_path / "log", "a", 0.0), after=(1,)), (_stamp, (tmp_path / "log", "b", 0.0))],
                 2, 1, print)
