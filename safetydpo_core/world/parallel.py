"""The demo's jobs (the seven experts, the joint fine-tunes, the evaluation of each model, and the preservation
pictures of the adversarial fine-tune) in worker processes.

Why: the world model's layers are small, so torch's second thread adds little to one training step or one
sampling batch (its parallel regions are short and each ends in a barrier), while two processes of one
thread each keep both cores busy. The demo's experts do not depend on each other, nor do its evaluations
but the merged LoRA's, which waits for the fine-tunes; so they run side by side (docs/benchmarks.md, "The
demo's time").

How:

* :func:`plan` decides the processes and the torch threads of each: ``workers`` 0 (auto) takes one process a
  core, at most one a job; ``threads`` 0 shares the cores among them.
* :func:`run_jobs` runs the jobs in a ``spawn`` process pool, each once the jobs it waits for (a :class:`Job`'s
  ``after``) are done, the earliest ready job first. Each worker loads the world model (and the
  judge) once. A job's result is a file written by the same functions as the one-process path (an expert's
  LoRA and its checkpoints, an evaluation's cache), so a run stopped anywhere resumes from whatever finished,
  and the parent reads the files afterwards. Progress lines come back through a queue and the parent prints
  them with its own clock; a job's error is raised in the parent.

Public API: :func:`plan`, :class:`Job`, :func:`run_jobs`, :func:`train_job`, :func:`pictures_job`,
:func:`eval_job`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue as queue_mod
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

LogFn = Callable[[str], None]

_worker: dict[str, Any] = {}


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def plan(workers: int, threads: int, jobs: int) -> tuple[int, int]:
    """``(processes, torch threads of each)`` for ``jobs`` independent jobs. ``workers`` 0: one process a core,
    at most one a job; ``threads`` 0: the cores shared among the processes (at least 1)."""
    cores = cpu_count()
    n = workers or cores
    n = max(1, min(n, jobs))
    return n, (threads or max(1, cores // n))


def _init(messages, threads: int, model_path: str | None) -> None:
    import torch

    torch.set_num_threads(threads)
    _worker.update(messages=messages, model_path=model_path)


def _say(msg: str) -> None:
    _worker["messages"].put(msg)


def _model():
    if "den" not in _worker:
        from .model import load_world_model

        _worker["den"] = load_world_model(path=_worker["model_path"])
    return _worker["den"]


def _judge():
    if "judge" not in _worker:
        from .judge import load_judge

        _worker["judge"] = load_judge()
    return _worker["judge"]


def train_job(dataset: Path, cfg, path: Path, label: str, init: Path | None = None) -> Path:
    """One LoRA (:func:`~.demo.train_lora`) in a worker."""
    from .demo import train_lora

    return train_lora(_model(), dataset, cfg, path, say=_say, label=label, init=init)


def pictures_job(dataset: Path, cfg, label: str) -> Path:
    """A training run's preservation pictures (:func:`~.demo.render_preservation_pictures`) in a worker, ahead of
    the run."""
    from .demo import render_preservation_pictures

    return render_preservation_pictures(_model(), dataset, cfg, say=_say, label=label)


def eval_job(job, steps: int, cfg: float, label: str) -> Path:
    """One model's evaluation (a :class:`~.lora_eval.ModelEvaluation`) in a worker, kept in its file."""
    _say(f"evaluating {label}")
    job.run(_model(), _judge(), steps=steps, cfg=cfg)
    _say(f"  evaluated {label}")
    return job.file


def _interrupt(procs: list, grace: float = 30.0) -> None:
    """Stop the workers now, as Ctrl-C would: SIGINT lets a training run save its step as a checkpoint (every
    file a job writes is written whole or not at all), then whatever is still running after ``grace`` seconds
    is terminated."""
    for proc in procs:
        if proc.is_alive():
            with contextlib.suppress(OSError, AttributeError):
                os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()


@dataclasses.dataclass(frozen=True)
class Job:
    """One job of :func:`run_jobs`: ``fn(*args)`` in a worker. It starts once the jobs at the indices ``after`` (all
    earlier in the list) have finished and then ``prepare()``, where given, has run here in the parent (a step
    that needs their files, such as summing two fine-tuned LoRAs into the one it evaluates)."""

    fn: Callable
    args: tuple = ()
    after: tuple[int, ...] = ()
    prepare: Callable[[], Any] | None = None


def run_jobs(jobs: Sequence[Job | tuple[Callable, tuple]], processes: int, threads: int, say: LogFn,
             model_path: str | os.PathLike | None = None) -> list:
    """Run jobs (a :class:`Job`, or a ``(function, args)`` pair: one that waits for nothing) in ``processes``
    worker processes of ``threads`` torch threads each; their results in the jobs' order. A job goes to a worker
    when one is free, the earliest ready job in the list first, so a job that waits for others starts as soon as
    they are done, ahead of those after it. Progress lines of the workers go to ``say``. The first error stops
    the rest (jobs not started never start) and is raised here."""
    jobs = [j if isinstance(j, Job) else Job(*j) for j in jobs]
    for i, job in enumerate(jobs):
        if any(not 0 <= k < i for k in job.after):
            raise ValueError(f"Job {i} waits for jobs {job.after}; a job can only wait for jobs before it.")
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                say(messages.get_nowait())
            except queue_mod.Empty:
                return

    pool = ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_init,
                               initargs=(messages, threads, None if model_path is None else str(model_path)))
    try:
        futures: dict[int, Future] = {}
        finished: set[int] = set()
        while len(finished) < len(jobs):
            running = [i for i in futures if i not in finished]
            for i, job in enumerate(jobs):
                if len(running) >= processes:
                    break
                if i not in futures and finished.issuperset(job.after):
                    if job.prepare is not None:
                        job.prepare()
                    futures[i] = pool.submit(job.fn, *job.args)
                    running.append(i)
            wait([futures[i] for i in running], timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for i in running:
                if futures[i].done():
                    if futures[i].exception() is not None:
                        raise futures[i].exception()
                    finished.add(i)
        drain()
        return [futures[i].result() for i in range(len(jobs))]
    except BaseException:
        _interrupt(list((getattr(pool, "_processes", None) or {}).values()))
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        drain()  # what the workers said last, once they have exited
