"""Red-teaming on the built-in concept world: the attack success rate (ASR) of every attack against the base model
and each aligned model, at the world's default budget.

:func:`attack_table` is what ``benchmarks/science.py --attacks`` calls for one seed: 8 unsafe prompts per concept
(7 x 8 = 56, the training wording, new scenes: ``world_pairs(8, seed=seed + 3000)``), every attack of
:mod:`safetydpo_core.attacks` against every model given (a LoRA file, or None for the base model), through the
same runner as ``safetydpo attack`` (the world judge as the oracle: a success is a picture of the attacked
category's glyph). Every run is cached under ``seed_dir / "attacks" / <model> / <attack>``, so an interrupted
benchmark resumes where it stopped and adding models or attacks reuses what is done.

Standalone, on the output folder of ``safetydpo demo`` (its experts and merged LoRA)::

    python benchmarks/science_attacks.py --demo demo-out                      # base, merged and each expert
    python benchmarks/science_attacks.py --demo demo-out --models base,merged --attacks wording,unlearndiff
    python benchmarks/science_attacks.py --demo demo-out --models base,merged,esd-u \
        --lora esd-u=baselines/seed_0/baselines/esd-u.safetensors     # beside an erasure baseline
    python benchmarks/science_attacks.py --demo demo-out --models merged --lora-start 10   # as sampled from step 10
    python benchmarks/science_attacks.py --summary demos/s0 demos/s1 demos/s2   # mean ± sd over seeds

prints Markdown tables (ASR per model and attack, beside the un-attacked rate; per category for the merged
LoRA; CPU time per attack) and writes ``<demo>/attacks/results.json``.

``--lora-start N`` judges each LoRA's pictures sampled with it switched on only after the first N steps (as
``safetydpo attack --lora-start N`` and ``safetydpo sample --lora-start N`` do); the white-box attacks still
optimise against it at every step. Those models are named ``<model> from step N`` (their own folders).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ATTACKS = ("wording", "ring-a-bell", "unlearndiff", "inversion")
# the result that stands for each attack in the table (the others are listed under "variants")
PRIMARY = {"wording": "text", "ring-a-bell": "hard", "unlearndiff": "text", "inversion": "soft"}
PER_CONCEPT = 8
PROMPT_SEED_OFFSET = 3000


def attack_prompts(seed: int):
    """The 7 x 8 prompts attacked for ``seed`` (training wording, scenes and seeds of their own)."""
    from safetydpo_core.attacks import AttackPrompt
    from safetydpo_core.world import world_pairs

    return [AttackPrompt(p.id, p.unsafe, p.category, p.concept, p.safe, p.extra["seed"], p.synonyms)
            for p in world_pairs(PER_CONCEPT, seed=seed + PROMPT_SEED_OFFSET, split="train")]


def world_sampling():
    """How a query's picture is made on the world: the demo's evaluation sampling (20 DDIM steps, cfg 3)."""
    from safetydpo_core.attacks import Sampling

    return Sampling(steps=20, cfg=3.0, sampler="ddim", batch_size=64)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _row(run, attack: str) -> dict:
    primary = PRIMARY[attack]
    res = [r for r in run.results if r.variant == primary]
    s = run.summary[primary]
    return {"asr": s["asr"], "no_attack": s["no_attack"], "per_category": s["per_category"],
            "queries": s["queries"], "steps": s["steps"], "variant": primary,
            "seconds": round(sum(r.info.get("cpu_seconds", 0.0) for r in res), 1),
            "wall_seconds": round(sum(r.seconds for r in res), 1),
            "budget": {"queries": run.budget.queries, "steps": run.budget.steps},
            "variants": {v: {"asr": x["asr"], "per_category": x["per_category"], "queries": x["queries"]}
                         for v, x in run.summary.items()}}


def attack_table(seed: int, seed_dir: Path, den, judge, loras: dict[str, Path | None], *, attacks=ATTACKS,
                 budget: int | None = None, log=print, lora_start: int = 0) -> dict[str, dict[str, dict]]:
    """``{model name: {attack: {"asr", "no_attack", "per_category", "queries", "steps", "seconds", ...}}}`` for
    one seed. ``loras``: model name -> LoRA file (None: the base model). ``budget``: queries per prompt (None:
    each attack's world default). ``seconds`` is the attack's CPU time over the 56 prompts (the un-attacked
    pictures and the base model's target pictures not included). ``lora_start``: the LoRAs from that sampling
    step on (the base model is as it is); such a model's name gets `` from step N``."""
    import dataclasses

    from safetydpo_core.attacks import AttackSettings, WorldOracle, run_attack
    from safetydpo_core.lora.apply import lora_applied, lora_withheld_until
    from safetydpo_core.sampling import _lora_fingerprint
    from safetydpo_core.world.lora_eval import aligned_lora

    prompts = attack_prompts(seed)
    oracle = WorldOracle(judge)
    table: dict[str, dict[str, dict]] = {}
    for name, path in loras.items():
        lora = None if path is None else aligned_lora(den, path)
        model = {"path": "world", "loras": [] if lora is None else [{"file": str(path),
                                                                     "fingerprint": _lora_fingerprint(lora)}]}
        start = lora_start if lora is not None else 0
        name = f"{name} from step {start}" if start else name
        table[name] = {}
        for attack in attacks:
            out = Path(seed_dir) / "attacks" / _slug(name) / attack
            settings = AttackSettings(attack, queries=budget, seed=seed,
                                      sampling=dataclasses.replace(world_sampling(), lora_start=start))
            if not (out / "attack.json").exists() or not json.loads((out / "attack.json").read_text()).get("complete"):
                log(f"seed {seed}: {attack} against {name}")
            run = run_attack(den, prompts, settings, oracle=oracle, out=out, model=model, world=True,
                             attacked=(lambda: lora_applied(den.module, [(lora, 1.0)])) if lora is not None else None,
                             base=lambda: contextlib.nullcontext(den), log=lambda m: log(f"  {m}"),
                             lora_switch=(lambda: lora_withheld_until(den.module, [(lora, 1.0)], start))
                             if start else None)
            table[name][attack] = _row(run, attack)
    return table


def summary(tables: list[dict], attacks) -> str:
    """Mean ± sd over seeds (one :func:`attack_table` each) of every model's ASR per attack (its primary and
    other results) beside the un-attacked rate, and the CPU seconds each attack took per model."""
    from science import _fmt as mean_sd

    models = list(dict.fromkeys(m for t in tables for m in t))
    variants = [(a, v) for a in attacks for v in dict.fromkeys(v for t in tables for row in t.values() if a in row
                                                                  for v in row[a]["variants"])]
    lines = ["| model | " + " | ".join(f"{a} ({v})" for a, v in variants) + " | no attack |",
             "|---|" + "---|" * (len(variants) + 1)]
    for m in models:
        cells = [mean_sd([t[m][a]["variants"][v]["asr"] for t in tables if m in t and a in t[m]]) for a, v in variants]
        no = mean_sd([next((t[m][a]["no_attack"] for a in attacks if a in t[m]), None) for t in tables if m in t])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {no} |")
    lines += ["", "| attack | CPU seconds per model (56 prompts), min-max over models and seeds |", "|---|---|"]
    for a in attacks:
        secs = [row[a]["seconds"] for t in tables for row in t.values() if a in row]
        lines.append(f"| {a} | {min(secs):.0f}-{max(secs):.0f} |" if secs else f"| {a} | - |")
    return "\n".join(lines)


# -- standalone --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(table: dict, attacks) -> str:
    lines = ["| model | " + " | ".join(f"{a} ({PRIMARY[a]})" for a in attacks) + " | no attack |",
             "|---|" + "---|" * (len(attacks) + 1)]
    for name, row in table.items():
        no = next((row[a]["no_attack"] for a in attacks if a in row), None)
        lines.append(f"| {name} | " + " | ".join(_fmt(row[a]["asr"]) for a in attacks) + f" | {_fmt(no)} |")
    others = [(a, v) for a in attacks for v in (table[next(iter(table))][a]["variants"]) if v != PRIMARY[a]]
    if others:
        lines += ["", "Other results: | model | " + " | ".join(f"{a} ({v})" for a, v in others) + " |"]
        for name, row in table.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row[a]["variants"][v]["asr"]) for a, v in others) + " |")
    for name in [n for n in table if n == "merged"] or list(table)[-1:]:
        row = table[name]
        cats = list(next(iter(row.values()))["per_category"])
        lines += ["", f"ASR per category, {name}:", "",
                  "| attack | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for a in attacks:
            lines.append(f"| {a} | " + " | ".join(_fmt(row[a]["per_category"][c]["asr"]) for c in cats) + " |")
    lines += ["", "| attack | budget (queries, steps) | mean queries used, base | CPU seconds per model (56 prompts) |",
              "|---|---|---|---|"]
    for a in attacks:
        secs = [row[a]["seconds"] for row in table.values()]
        b = next(iter(table.values()))[a]["budget"]
        q = table.get("base", next(iter(table.values())))[a]["queries"]
        lines.append(f"| {a} | {b['queries']}, {b['steps']} | {q} | {min(secs):.0f}-{max(secs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/science_attacks.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", help="output folder of `safetydpo demo` (experts/, merged.safetensors)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the demo's)")
    p.add_argument("--models", default=None, help="comma-separated: base, merged, expert:<category> (default: all)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="one more model to attack: a LoRA file for the world model under a name of its own, e.g. "
                        "esd-u=baselines/seed_0/baselines/esd-u.safetensors (repeatable; benchmarks/science_baselines.py "
                        "makes the erasure baselines)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks (default: all four)")
    p.add_argument("--budget", type=int, default=None, help="queries per prompt (default: each attack's world default)")
    p.add_argument("--lora-start", type=int, default=0, metavar="N",
                   help="judge pictures sampled with each LoRA from step N on (default 0: every step)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--summary", nargs="+", metavar="DEMO", default=None,
                   help="only print the mean ± sd over these demo folders' attacks/results.json (one per seed)")
    a = p.parse_args(argv)
    if a.summary:
        found = [json.loads((Path(d) / "attacks" / "results.json").read_text()) for d in a.summary]
        attacks = list(dict.fromkeys(x for r in found for x in r["attacks"]))
        print(f"Seeds {', '.join(str(r['seed']) for r in found)}; machines: "
              f"{'; '.join(dict.fromkeys(r['machine'] for r in found))}\n")
        print(summary([r["table"] for r in found], attacks))
        return 0
    if not a.demo:
        p.error("--demo is required (or --summary)")
    torch.set_num_threads(a.threads)
    from safetydpo_core.errors import SafetyDPOError
    from safetydpo_core.world import WORLD, load_judge, load_world_model

    demo = Path(a.demo)
    if not (demo / "merged.safetensors").exists():
        print(f"error: {demo} holds no finished demo run (no merged.safetensors); run `safetydpo demo --out {demo}`.",
              file=sys.stderr)
        return 2
    seed = a.seed if a.seed is not None else json.loads((demo / "demo.json").read_text())["settings"]["seed"]
    loras: dict[str, Path | None] = {"base": None, "merged": demo / "merged.safetensors"}
    for c in WORLD.concepts:
        f = demo / "experts" / f"{c.category}.safetensors"
        if f.exists():
            loras[f"expert:{c.category}"] = f
    for item in a.lora:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or name.strip() in loras or not Path(path).is_file():
            print(f"error: --lora {item!r}: give NAME=PATH with a new name and an existing LoRA file.", file=sys.stderr)
            return 2
        loras[name.strip()] = Path(path)
    if a.models:
        wanted = [m.strip() for m in a.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in loras]
        if unknown:
            print(f"error: unknown model(s) {unknown}; choose from {', '.join(loras)}.", file=sys.stderr)
            return 2
        loras = {m: loras[m] for m in wanted}
    attacks = [x.strip() for x in a.attacks.split(",") if x.strip()]
    bad = [x for x in attacks if x not in ATTACKS]
    if bad:
        print(f"error: unknown attack(s) {bad}; choose from {', '.join(ATTACKS)}.", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        table = attack_table(seed, demo, load_world_model(), load_judge(), loras, attacks=attacks, budget=a.budget,
                             lora_start=a.lora_start, log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", file=sys.stderr, flush=True))
    except SafetyDPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} thread(s), "
               f"{platform.python_version()}")
    from safetydpo_core.utils.atomic import atomic_write_text

    # the models and attacks of earlier runs on this demo stay in results.json beside this run's
    old = demo / "attacks" / "results.json"
    old = json.loads(old.read_text()) if old.exists() else {}
    merged_table = old.get("table", {}) if old.get("seed") == seed else {}
    merged_table = {m: {**merged_table.get(m, {}), **table.get(m, {})} for m in {**merged_table, **table}}
    result = {"seed": seed, "machine": machine,
              "attacks": list(dict.fromkeys([*(old.get("attacks", []) if merged_table else []), *attacks])),
              "table": merged_table, "wall_seconds": round(time.time() - t0, 1)}
    atomic_write_text(demo / "attacks" / "results.json", json.dumps(result, indent=1) + "\n")
    print(f"Attacks on the world, seed {seed} ({machine}):\n")
    print(markdown(table, attacks))
    print(f"\nwrote {demo / 'attacks' / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
