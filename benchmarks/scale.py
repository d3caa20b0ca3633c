"""Benchmark: scale-out of render and eval over processes, and a 100,000-pair dataset.

* ``render``: pairs per second of ``safetydpo render`` on the built-in world model with 1 process (the plain
  path) and with 2 processes under ``accelerate launch`` (gloo, one thread each: the scale-out path, join
  included). The clock starts after every process has loaded the model and stops when the joined dataset is
  on disk, so launcher and import time are left out (they are reported separately as the launch's wall time).
* ``eval``: pictures per second of the per-picture scoring of ``safetydpo eval`` (NudeNet) the same way, over
  an image run sampled from the world model.
* ``dataset``: writes a synthetic dataset of 100,000 pairs of SD1.5-shaped latents (4x64x64, float32:
  12.8 GB), then in fresh processes measures the time and added memory to open it the first time (no index:
  the open builds and stores it) and again (the index stored), reads 2,000 random pairs the way training does,
  and iterates every pair (peak memory while reading).

    python benchmarks/scale.py                          # everything (needs ~13 GB of free disk for dataset)
    python benchmarks/scale.py --only render,eval --pairs 16
    python benchmarks/scale.py --only dataset --dataset-pairs 20000
    python benchmarks/scale.py --only dataset --latent-side 8  # 100,000 pairs, 4x8x8 latents (200 MB)

Writes JSON with ``--json``. Goals (issue 17): 2 processes >= 1.7x one process for render and eval; opening
100,000 pairs < 2 s and < 200 MB of added memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(procs: int, args: list[str]) -> tuple[float, str]:
    if procs == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        exe = shutil.which("accelerate")
        launcher = [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
        cmd = [*launcher, "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_port()),
               __file__, *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return wall, res.stdout


def _result(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


# -- workers (run inside the launched processes) -----------------------------------------------------------
def _worker_render(a) -> None:
    import torch

    from safetydpo_core.data.render import RenderSettings, render_pairs
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
    from safetydpo_core.prompts.pairs import read_pairs
    from safetydpo_core.scaleout import Split
    from safetydpo_core.scaleout_commands import render_split
    from safetydpo_core.world.model import world_model_path

    torch.set_num_threads(1)
    pairs = read_pairs(a.input)
    split = Split.open(a.out, key={"bench": "render"}, what="render", resume=False, overwrite=True, device="cpu")
    den = DiffusersDenoiser.from_pretrained(str(world_model_path()), device="cpu")
    settings = RenderSettings(steps=a.steps, seed=0, batch_pairs=2)
    if split is not None:
        split.barrier()
    t = time.perf_counter()
    if split is None:
        render_pairs(den, pairs, a.out, settings, previews=False)
    else:
        if render_split(split, den, pairs, a.out, settings, resume=False, overwrite=False, previews=False) is None:
            return
    dt = time.perf_counter() - t
    print("RESULT " + json.dumps({"items": len(pairs), "seconds": dt, "per_s": len(pairs) / dt}))


def _worker_eval(a) -> None:
    import torch

    from safetydpo_core.eval import EvalSettings, Evaluator, read_run
    from safetydpo_core.eval.evaluate import evaluate_runs
    from safetydpo_core.scaleout import Split
    from safetydpo_core.scaleout_commands import eval_split

    torch.set_num_threads(1)
    run = read_run(a.input)
    split = Split.open(a.out, key={"bench": "eval"}, what="eval", resume=False, overwrite=True, device="cpu")
    ev = Evaluator(EvalSettings(q16="off", clipscore="off", fid="off", preservation=False, batch_size=4))
    ev.score_images([__import__("PIL.Image").Image.new("RGB", (32, 32))])  # load the detector before the clock
    if split is not None:
        split.barrier()
    t = time.perf_counter()
    if split is None:
        evaluate_runs([run], ev, a.out)
    elif not eval_split(split, [run], ev, a.out, resume=False):
        return
    dt = time.perf_counter() - t
    n = len(run.records)
    print("RESULT " + json.dumps({"items": n, "seconds": dt, "per_s": n / dt}))


def _rss_mb(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker_open(a) -> None:
    import torch

    from safetydpo_core.data import PreferenceDataset
    from safetydpo_core.data.manifest_index import INDEX_NAME

    torch.set_num_threads(1)
    if a.steps == 0:  # a cold open: no stored index, so it is built (and stored) by this open
        (Path(a.input) / INDEX_NAME).unlink(missing_ok=True)
    base = _rss_mb()
    t = time.perf_counter()
    ds = PreferenceDataset(a.input)
    open_s = time.perf_counter() - t
    opened = _rss_mb()
    out = {"pairs": len(ds), "open_s": open_s, "open_added_mb": opened - base, "open_peak_added_mb":
           _rss_mb("VmHWM") - base, "shards": len(ds.records.shard_names())}
    if a.steps == 0:
        print("RESULT " + json.dumps(out))
        return
    # What a training step reads: random pairs, each record parsed from the manifest and its latents from a shard.
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    peak = opened
    for k, i in enumerate(torch.randint(len(ds), (2000,), generator=g).tolist()):
        s, u = ds.load_pair(i)
        _ = ds.records[i].unsafe
        if k % 100 == 0:
            peak = max(peak, _rss_mb())
    out.update(random_pairs_per_s=2000 / (time.perf_counter() - t), random_peak_added_mb=peak - base)
    t = time.perf_counter()
    for i in range(len(ds)):
        s, u = ds.load_pair(i)
        if i % 1000 == 0:
            peak = max(peak, _rss_mb())
    iter_s = time.perf_counter() - t
    out.update(iterate_s=iter_s, pairs_per_s=len(ds) / iter_s, iterate_peak_added_mb=peak - base)
    print("RESULT " + json.dumps(out))


# -- driver ------------------------------------------------------------------------------------------------
def bench_render(work: Path, pairs: int, steps: int) -> dict:
    from safetydpo_core.prompts.pairs import write_pairs
    from safetydpo_core.world.pairs import world_pairs

    allp = world_pairs(max(1, -(-pairs // 7)))[:pairs]
    write_pairs(allp, work / "pairs.jsonl")
    out = {}
    for procs in (1, 2):
        dst = work / f"render{procs}"
        wall, stdout = _launch(procs, ["--worker", "render", "--input", str(work / "pairs.jsonl"), "--out", str(dst),
                                       "--steps", str(steps)])
        out[procs] = {**_result(stdout), "launch_wall_s": wall}
        print(f"render, {procs} process(es): {out[procs]['per_s']:.3f} pairs/s ({out[procs]['items']} pairs in "
              f"{out[procs]['seconds']:.1f} s; launch wall {wall:.1f} s)", flush=True)
    same = all((work / "render1" / f).read_bytes() == (work / "render2" / f).read_bytes()
               for f in ("manifest.jsonl", "dataset.json"))
    out["speedup"] = out[2]["per_s"] / out[1]["per_s"]
    out["identical_manifest"] = same
    return out


def bench_eval(work: Path, images: int) -> dict:
    run = work / "run"
    from safetydpo_core.cli.main import main

    from safetydpo_core.prompts.pairs import write_pairs
    from safetydpo_core.world.pairs import world_pairs

    write_pairs(world_pairs(max(1, -(-images // 7)))[:images], work / "eval_pairs.jsonl")
    if main(["sample", "--prompts", str(work / "eval_pairs.jsonl"), "--out", str(run), "--steps", "4"]) != 0:
        raise SystemExit("sampling the evaluation run failed")
    out = {}
    for procs in (1, 2):
        wall, stdout = _launch(procs, ["--worker", "eval", "--input", str(run), "--out", str(work / f"eval{procs}")])
        out[procs] = {**_result(stdout), "launch_wall_s": wall}
        print(f"eval (NudeNet), {procs} process(es): {out[procs]['per_s']:.2f} images/s ({out[procs]['items']} in "
              f"{out[procs]['seconds']:.1f} s)", flush=True)
    out["speedup"] = out[2]["per_s"] / out[1]["per_s"]
    out["identical_per_image"] = ((work / "eval1" / "per_image.jsonl").read_bytes()
                                  == (work / "eval2" / "per_image.jsonl").read_bytes())
    return out


def make_dataset(root: Path, n: int, side: int = 64) -> float:
    import torch

    from safetydpo_core.data import PreferenceDatasetWriter

    t = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, side, side, generator=g)
    cats = ["hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity"]
    with PreferenceDatasetWriter(root, model_fingerprint="synthetic-sd15", settings={"source": "benchmark"},
                                 previews=False) as w:
        for i in range(n):
            w.add(id=f"pair-{i:06d}", category=[cats[i % 7]], concept="c", unsafe=f"an unsafe prompt number {i}",
                  safe=f"a safe prompt number {i}", safe_latent=base + i * 1e-3, unsafe_latent=base - i * 1e-3,
                  seed=i, height=side * 8, width=side * 8)
    return time.perf_counter() - t


def bench_dataset(work: Path, n: int, side: int = 64) -> dict:
    root = work / "big"
    write_s = make_dataset(root, n, side)
    print(f"dataset: wrote {n} pairs in {write_s:.0f} s", flush=True)
    _, stdout = _launch(1, ["--worker", "open", "--input", str(root), "--steps", "0"])
    cold = _result(stdout)
    print(f"dataset of {cold['pairs']} pairs, first open (builds the index): {cold['open_s']:.2f} s, "
          f"+{cold['open_added_mb']:.0f} MB (peak +{cold['open_peak_added_mb']:.0f} MB)", flush=True)
    _, stdout = _launch(1, ["--worker", "open", "--input", str(root)])
    r = {**_result(stdout), "write_s": write_s, "cold": cold, "latent_shape": [4, side, side]}
    print(f"dataset of {r['pairs']} pairs ({r['shards']} shards): open {r['open_s']:.2f} s, +{r['open_added_mb']:.0f} MB; "
          f"2,000 random pairs {r['random_pairs_per_s']:.0f} pairs/s, peak +{r['random_peak_added_mb']:.0f} MB; "
          f"iterate {r['iterate_s']:.0f} s ({r['pairs_per_s']:.0f} pairs/s), peak +{r['iterate_peak_added_mb']:.0f} MB",
          flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="render,eval,dataset")
    ap.add_argument("--pairs", type=int, default=32, help="pairs rendered (default 32)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of the render (default 20)")
    ap.add_argument("--images", type=int, default=160, help="pictures evaluated (default 160)")
    ap.add_argument("--dataset-pairs", type=int, default=100_000)
    ap.add_argument("--latent-side", type=int, default=64,
                    help="latent height and width of the synthetic dataset (default 64: SD1.5 at 512 px; a smaller "
                         "side keeps the manifest the same and the shards small, to measure opening on a slow disk)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        {"render": _worker_render, "eval": _worker_eval, "open": _worker_open}[a.worker](a)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; one thread per process",
          flush=True)
    results: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = Path(tmp)
        only = a.only.split(",")
        if "render" in only:
            results["render"] = bench_render(work, a.pairs, a.steps)
        if "eval" in only:
            results["eval"] = bench_eval(work, a.images)
        if "dataset" in only:
            results["dataset"] = bench_dataset(work, a.dataset_pairs, a.latent_side)
    print(json.dumps(results, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
