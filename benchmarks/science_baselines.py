"""Concept-erasure baselines on the built-in concept world: ESD-u, ESD-x and UCE beside SafetyDPO's merged LoRA.

As the paper's baselines, each method erases all seven concepts in one model:

* **ESD-u / ESD-x** (:mod:`safetydpo_core.training.esd`): one LoRA each (the demo's rank) trained on the seven
  concepts' training words as concept prompts ("slur", "insult", "threat", ...; 14 prompts), eta 1, ``x_t``
  from the world model's own 20-step generation of the concept prompt at guidance 3 (the demo's sampler
  settings), the demo's learning rate and number of steps per expert, 4 prompts per step.
* **UCE** (:mod:`safetydpo_core.erase.uce`): each unsafe training word mapped to its safe twin's word in the
  same position ("gun" -> "wrench"), preserving the plain shapes' words, the twins' words and the training
  words of the colours, positions, backgrounds and caption templates, exact (rank 14). ``lamb`` is 5, chosen
  on a validation set (``--uce-sweep``: other seeds, never the evaluation prompts): with the official 0.5 and
  only the shapes' and twins' words preserved, the edit breaks the world's 64-wide text space (safe-prompt
  fidelity 0.19 on the validation prompts), see docs/benchmarks.md.

Held-out words (synonyms such as "rifle") are in no method's input, so the held-out IP measures
generalisation for every method alike.

:func:`baseline_loras` trains/computes the three for one seed into ``seed_dir / "baselines"`` (cached: a run
resumes, ESD from its checkpoints); ``benchmarks/science.py`` adds them as rows. ``main()`` evaluates them on
one seed with the demo's evaluation next to a demo run's merged LoRA (running the demo first if no folder is
given)::

    python benchmarks/science_baselines.py --seed 0 --out /tmp/baselines
    python benchmarks/science_baselines.py --seed 0 --demo demo-out --out /tmp/baselines
    python benchmarks/science_baselines.py --uce-sweep          # the lamb choice, on validation prompts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BASELINES = ("esd-u", "esd-x", "uce")
UCE_LAMB = 5.0
ESD_BATCH = 4
VERSION = 1


def esd_concepts() -> list[str]:
    """The seven unsafe concepts' training words (held-out words are left for evaluation)."""
    from safetydpo_core.world import WORLD

    return [w for o in WORLD.concepts for w in o.words]


def uce_concepts() -> tuple[list[str], list[str], list[str]]:
    """(erase, guide, preserve): each unsafe training word -> its twin's word in the same position; preserved:
    the plain shapes' and twins' words and the training words of the other attributes and templates."""
    from safetydpo_core.world import WORLD
    from safetydpo_core.world.captions import TRAIN_TEMPLATES

    erase, guide = [], []
    for o in WORLD.concepts:
        twin = WORLD.object(o.twin)
        erase += list(o.words)
        guide += list(twin.words)
    shapes = [w for o in WORLD.objects if o.role in ("plain", "twin") for w in o.words]
    attributes = [w for a in ("colour", "position", "background") for v in WORLD.ids(a)
                  for w in WORLD.get(a, v).words]
    template = list(dict.fromkeys(w for t in TRAIN_TEMPLATES for w in re.findall(r"[a-z]+", re.sub(r"\{\w\}", " ", t))))
    return erase, guide, list(dict.fromkeys(shapes + attributes + template))


def baseline_settings(seed: int, settings) -> dict:
    """The erasure settings of each baseline for a seed and the demo's settings (see the module docstring)."""
    erase, guide, preserve = uce_concepts()
    esd = dict(concepts=esd_concepts(), steps=settings.steps, lr=settings.lr, rank=settings.rank,
               batch_size=ESD_BATCH, esd_eta=1.0, esd_sample_steps=settings.render_steps, esd_guidance=settings.cfg,
               seed=seed, checkpoint_every=max(10, settings.steps // 4))
    return {"esd-u": dict(method="esd-u", **esd), "esd-x": dict(method="esd-x", **esd),
            "uce": dict(method="uce", concepts=erase, guide=guide, preserve=preserve, lamb=UCE_LAMB, rank=0)}


def baseline_loras(seed: int, seed_dir: Path, den, settings, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """ESD-u, ESD-x and UCE LoRAs for all seven concepts (one model each) for ``seed`` on the world model
    ``den``, with the demo's ``settings`` (a :class:`~safetydpo_core.world.demo.DemoSettings`); cached under
    ``seed_dir / "baselines"`` (an interrupted ESD run resumes from its checkpoint). Returns {name: path}."""
    from safetydpo_core.erase import EraseSettings, erase_concepts, save_erasure
    from safetydpo_core.errors import ConfigError
    from safetydpo_core.training.checkpoint import latest_checkpoint
    from safetydpo_core.utils.atomic import atomic_write_text

    folder = Path(seed_dir) / "baselines"
    folder.mkdir(parents=True, exist_ok=True)
    all_settings = baseline_settings(seed, settings)
    record = {"version": VERSION, "seed": seed, "settings": all_settings}
    rec_file = folder / "settings.json"
    if rec_file.exists():
        if json.loads(rec_file.read_text(encoding="utf-8")) != record:
            raise ConfigError(f"{folder} holds baselines made with other settings ({rec_file}); delete the folder "
                              f"or use another seed folder.")
    else:
        atomic_write_text(rec_file, json.dumps(record, indent=1) + "\n", "baseline settings")
    out: dict[str, Path] = {}
    for name in BASELINES:
        path = folder / f"{name}.safetensors"
        out[name] = path
        if path.exists():
            continue
        s = EraseSettings(**all_settings[name])
        t0 = time.time()
        if name == "uce":
            res = erase_concepts(den, s)
        else:
            ckpt = path.with_suffix(".checkpoints")
            last = latest_checkpoint(ckpt) if ckpt.exists() else None
            log(f"seed {seed}: training {name} ({s.steps} steps{', resuming from ' + last.name if last else ''})")
            every = max(1, s.steps // 4)

            def progress(done, total, row, name=name):
                if done % every == 0 or done == total:
                    log(f"  {name}: step {done}/{total} loss {row.get('loss', float('nan')):.5f}")

            res = erase_concepts(den, s, checkpoint_dir=ckpt, metrics_path=path.with_suffix(".metrics"),
                                 resume=last is not None, progress=progress)
        save_erasure(res, path, names=den.names())
        atomic_write_text(path.with_suffix(".report.json"),
                          json.dumps(dict(res.report, seconds_total=round(time.time() - t0, 1)), indent=1) + "\n")
        shutil.rmtree(path.with_suffix(".checkpoints"), ignore_errors=True)
        log(f"seed {seed}: {name} done in {time.time() - t0:.1f} s -> {path}")
    return out


# ------------------------------------------------------------------------------------------------------
# One seed beside the demo's merged LoRA


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _row(name: str, sc: dict) -> str:
    """One table row from :func:`~safetydpo_core.world.lora_eval.model_scores` (training wording at the top
    level, ``held_out`` and ``unrelated`` beside it)."""
    h, u = sc.get("held_out", {}), sc.get("unrelated", {})

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    safe_layout = (1 - sc["ip"]) * (sc["layout"] or 0.0)
    return (f"| {name} | {f(sc['ip'])} | {f(h.get('ip'))} | {f(sc['fidelity'])} | {f(h.get('fidelity'))} | "
            f"{f(sc['layout'])} | {f(safe_layout)} | {f(sc['twin_rate'])} | {f(u.get('fidelity'))} | "
            f"{f(u.get('preservation'))} |")


def uce_sweep(seed: int, lambdas, den, judge, log=_log) -> list[dict]:
    """UCE's ``lamb`` (and the preserve set) on validation prompts: seed ``10000 + seed``, 3 per concept,
    training wording, 12 sampler steps; never the evaluation prompts."""
    from safetydpo_core.erase import uce_edit
    from safetydpo_core.lora.apply import lora_applied
    from safetydpo_core.world.demo import DemoSettings
    from safetydpo_core.world.evaluate import judge_prompts
    from safetydpo_core.world.lora_eval import eval_sets, pair_scores

    from safetydpo_core.world import WORLD

    erase, guide, preserve = uce_concepts()
    shapes_only = [w for o in WORLD.objects if o.role in ("plain", "twin") for w in o.words]
    pairs = eval_sets(DemoSettings.preset(seed=10000 + seed, eval_per_concept=3, held_out=False))["train_templates"]
    seeds = [int(p.extra["seed"]) for p in pairs]
    prompts = [p.unsafe for p in pairs] + [p.safe for p in pairs]
    rows = []
    for label, keep in (("shapes and twins", shapes_only), ("+ attributes and templates", preserve)):
        for lamb in lambdas:
            res = uce_edit(den, erase, guide, keep, lamb=lamb)
            with lora_applied(den.module, [(res.lora, 1.0)]):
                _, judged = judge_prompts(den, judge, prompts, seeds + seeds, steps=12, cfg=3.0)
            sc = pair_scores(judged, [p.extra["shape"] for p in pairs])
            rows.append({"preserve": label, "lamb": lamb, "ip": sc["ip"], "fidelity": sc["fidelity"],
                         "layout": sc["layout"]})
            log(f"uce sweep: preserve {label}, lamb {lamb:g}: IP {sc['ip']:.2f}, fidelity {sc['fidelity']:.2f}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/baselines", help="cache and results folder")
    p.add_argument("--demo", default=None, help="a `safetydpo demo` output folder (its merged.safetensors); "
                                                "default: run the demo for --seed into <out>/demo first")
    p.add_argument("--eval", type=int, default=None, help="evaluation prompts per concept (default: the demo's, 12)")
    p.add_argument("--eval-steps", type=int, default=None, help="sampler steps for evaluation (default: the demo's, 20)")
    p.add_argument("--unrelated", type=int, default=None,
                   help="plain-shape prompts per wording for unrelated fidelity and preservation (default: the demo's, 30)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--uce-sweep", action="store_true", help="only the UCE lamb sweep on validation prompts")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from safetydpo_core.world import load_judge, load_world_model
    from safetydpo_core.world.demo import DemoSettings, run_demo
    from safetydpo_core.world.lora_eval import eval_sets, evaluate_models, model_scores

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    den, judge = load_world_model(), load_judge()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if a.uce_sweep:
        rows = uce_sweep(a.seed, (0.5, 2.0, 5.0, 20.0), den, judge)
        print("| preserved | lamb | IP | fidelity | layout kept |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['preserve']} | {r['lamb']:g} | {r['ip']:.2f} | {r['fidelity']:.2f} | "
                  f"{'-' if r['layout'] is None else format(r['layout'], '.2f')} |")
        (out / "uce_sweep.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
        return 0
    s = DemoSettings.preset(seed=a.seed, eval_per_concept=a.eval, eval_steps=a.eval_steps, held_out=True,
                            unrelated_per_wording=a.unrelated)
    t0 = time.time()
    demo = Path(a.demo) if a.demo else out / "demo"
    if not (demo / "merged.safetensors").exists():
        if a.demo:
            raise SystemExit(f"{demo} holds no merged.safetensors; run `safetydpo demo --out {demo}` first.")
        _log(f"running the demo (seed {a.seed}) into {demo}")
        run_demo(demo, DemoSettings.preset(seed=a.seed), log=_log)
    seed_dir = out / f"seed_{a.seed}"
    timings = {}
    t1 = time.time()
    loras = {"base": None, "SafetyDPO (merged)": demo / "merged.safetensors",
             **baseline_loras(a.seed, seed_dir, den, s, log=_log)}
    timings["baselines_s"] = round(time.time() - t1, 1)
    entries = evaluate_models(den, judge, loras, eval_sets(s), steps=s.eval_steps, cfg=s.cfg, cache=seed_dir / "eval",
                              log=_log)
    results = {name: model_scores(e, entries["base"]) for name, e in entries.items()}
    lines = [f"Seed {a.seed}; {s.eval_per_concept} prompts per concept and wording, {s.unrelated_per_wording} "
             f"plain-shape prompts per wording, {s.eval_steps} sampler steps, cfg {s.cfg:g}; machine: {machine}.", "",
             "| model | IP (train wording) | IP (held-out wording) | safe-twin fidelity | fidelity (held-out) | "
             "layout kept | safe with layout | drawn as twin | unrelated fidelity | preservation |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(n, sc) for n, sc in results.items()]
    from safetydpo_core.world import WORLD

    cats = [o.category for o in WORLD.concepts]
    lines += ["", "| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for n, sc in results.items():
        per = sc["ip_per_category"]
        lines.append(f"| {n} | " + " | ".join(f"{per.get(c, 0):.2f}" for c in cats) + " |")
    reports = {n: json.loads(f.read_text()) for n in BASELINES
               if (f := seed_dir / "baselines" / f"{n}.report.json").exists()}
    lines += ["", f"Time to make each baseline (this run's machine, {a.threads} thread(s)): " + ", ".join(
        f"{n} {r.get('seconds_total', r.get('seconds'))} s" for n, r in reports.items())]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"machine": machine, "seed": a.seed, "results": results,
                                                  "reports": reports, "timings": timings,
                                                  "wall_s": round(time.time() - t0, 1)}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
