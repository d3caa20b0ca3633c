"""All-single and every merge beside the demo's Co-Merge, with the demo's recipe, on the built-in concept world.

For each output folder of ``safetydpo demo`` given (its seed, dataset, experts and merged LoRA are used as
they are):

* **All-single**: one LoRA trained with the demo's recipe (SFT and output preservation included) on the
  pairs of all seven concepts, with the same total number of steps as the seven experts;
* **merges** of the demo's seven experts with every method of ``benchmarks/science.py`` (Co-Merge's factor
  and delta readings, concat, linear, average, TIES, DARE) at the demo's output rank; the Co-Merge delta
  merge is the demo's own ``comerge.safetensors``;
* the demo's **merged LoRA** (``merged.safetensors``): that merge after the demo's fine-tune stage on all pairs
  (with the default ``adversary`` 0.5: the plain joint fine-tune, ``finetuned.safetensors``, and the one against
  concept inversion summed half each; the plain one is a row of its own);
* **All-single through the same fine-tune stage** (the demo's own function, started from All-single in place of
  the merge), so that the two differ only in what the stage starts from: the merge of seven experts, or one
  LoRA trained on everything;
* every model evaluated as the demo evaluates: IP (training and held-out wording), safe-twin fidelity,
  layout, twin with layout, unrelated fidelity and preservation (the world judge; nothing tuned).

Prints a Markdown table (mean ± standard deviation over the demos given) and writes ``results.json`` and
``results.md`` to ``--out``; everything is cached per seed under ``--out`` (run it again to resume or to add
demos; a run per demo in parallel, then one with all of them, aggregates)::

    safetydpo demo --seed 0 --out demos/s0      # and --seed 1, 2
    python benchmarks/science_merges.py --demos demos/s0 demos/s1 demos/s2 --out merges
    python benchmarks/science_merges.py --demos demos/s0 demos/s1 demos/s2 --out merges --all-single-ranks 16

The second adds All-single at the merge's output rank (16) to the same cache, to tell what the merge of the
experts gives from what its larger rank gives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from science import MERGES, _table, log, merge_lora  # noqa: E402


def demo_settings(demo: Path):
    """The demo's settings (``demo.json``), checked against the preset of its seed: the recipe is the default one."""
    from safetydpo_core.world.demo import DemoSettings, _differences, _what

    if not all((demo / f).exists() for f in ("merged.safetensors", "comerge.safetensors", "demo.json")):
        raise SystemExit(f"{demo} is not a finished `safetydpo demo` folder of this version (no merged.safetensors, "
                         f"comerge.safetensors or demo.json); run `safetydpo demo --out {demo}` again.")
    given = json.loads((demo / "demo.json").read_text())["settings"]
    s = DemoSettings.preset(quick=bool(given.get("quick")), seed=int(given["seed"]))
    made, preset = {"settings": given}, {"settings": s.to_dict()}
    if _what(made) != _what(preset):  # as the demo compares, and named as it names them
        raise SystemExit(f"{demo} was made with settings other than the preset of its seed "
                         f"({_differences(made, preset)}).")
    return s


def run_demo_models(demo: Path, s, out: Path, den, judge, single_ranks: tuple[int, ...] = ()) -> dict:
    """All-single and the merges for one demo (made with settings ``s``); returns {model name: scores}.
    ``single_ranks``: All-single (and its fine-tune stage) also at these ranks, as ``all-single r<rank>``."""
    from safetydpo_core.world import WORLD
    from safetydpo_core.world.demo import expert_config, finetune_stage, train_lora
    from safetydpo_core.world.lora_eval import eval_sets, evaluate_models, model_scores

    d = out / f"seed_{s.seed}"
    cats = [o.category for o in WORLD.concepts]
    experts = {c: demo / "experts" / f"{c}.safetensors" for c in cats}
    models: dict[str, Path | None] = {"base": None, "merged": demo / "merged.safetensors"}
    if s.adversary:
        models["finetuned"] = demo / "finetuned.safetensors"
    for rank in all_single_ranks(s, single_ranks):
        tag, name = all_single(s, rank)
        single = models[name] = train_lora(den, demo / "dataset",
                                           expert_config(s, None, steps=s.steps * len(cats), rank=rank),
                                           d / f"all_single{tag}.safetensors", say=log, label=f"seed {s.seed} {name}")
        if s.finetune_steps:
            staged = d / f"all_single{tag}_finetuned"
            models[f"{name}+ft"] = finetune_stage(den, single, staged, s, dataset=demo / "dataset",
                                                  pairs=demo / "pairs.jsonl", say=lambda m: log(f"seed {s.seed} {name}: {m}"))
            if s.adversary:
                models[f"{name}+plain-ft"] = staged / "finetuned.safetensors"
    for m in MERGES:
        models[f"merge:{m}"] = demo / "comerge.safetensors" if m == s.merge_method else merge_lora(
            den, experts, s, d / "merges", "demo", m, dataset=demo / "dataset", pairs=demo / "pairs.jsonl",
            label=f"seed {s.seed}: ")
    entries = evaluate_models(den, judge, models, eval_sets(s), steps=s.eval_steps, cfg=s.cfg, cache=d / "eval",
                              log=lambda m: log(f"seed {s.seed}: {m}"))
    return {name: model_scores(e, entries["base"]) for name, e in entries.items()}


def all_single_ranks(s, single_ranks=()) -> list[int]:
    """The ranks All-single is trained at: the experts' (``s.rank``) first, then ``single_ranks`` in order of size."""
    return [s.rank, *sorted(set(single_ranks) - {s.rank})]


def all_single(s, rank: int) -> tuple[str, str]:
    """All-single at ``rank``: (its files' tag, its model name); at the experts' rank plain ``all-single``."""
    return ("", "all-single") if rank == s.rank else (f"_r{rank}", f"all-single r{rank}")


def table_rows(s, names, single_ranks=()) -> list[tuple[str, str]]:
    """The table's (label, model name) rows for demos made with settings ``s`` (and All-single also at
    ``single_ranks``), of the models in ``names``."""
    default = f"merge:{s.merge_method}"
    stage = (f"joint fine-tune, {s.finetune_steps} steps" if not s.adversary else
             f"the plain and the adversarial fine-tunes of {s.finetune_steps} steps, summed "
             f"{1 - s.adversary_share:g} / {s.adversary_share:g}")
    rows = [("base", "base")]
    for rank in all_single_ranks(s, single_ranks):
        name = all_single(s, rank)[1]
        label = "All-single" + ("" if rank == s.rank else f" at rank {rank}")
        rows += [(label, name), (f"{label} + {stage} (the demo's fine-tune stage)", f"{name}+ft"),
                 (f"{label} + the plain joint fine-tune alone", f"{name}+plain-ft")]
    rows += [(f"{default[6:]} + {stage} (the demo's merged LoRA)", "merged"),
             (f"{default[6:]} + the plain joint fine-tune alone (`--adversary 0`)", "finetuned"),
             (f"{default[6:]} (the demo's merge before the fine-tune)", default)]
    rows += [(m[6:], m) for m in names if m.startswith("merge:") and m != default]
    return [(label, name) for label, name in rows if name in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demos", nargs="+", required=True, help="`safetydpo demo` output folders (one per seed)")
    p.add_argument("--out", default="benchmarks/results/merges", help="cache and results folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--all-single-ranks", type=int, nargs="*", default=[], metavar="RANK",
                   help="All-single also at these LoRA ranks (default: only the experts' rank); e.g. the merge's, 16")
    a = p.parse_args(argv)
    if any(r < 1 for r in a.all_single_ranks):
        p.error(f"--all-single-ranks must be ranks of at least 1; got {a.all_single_ranks}")
    torch.set_num_threads(a.threads)
    from safetydpo_core.world import load_judge, load_world_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    den, judge = load_world_model(), load_judge()
    t0 = time.time()
    settings = {Path(demo): demo_settings(Path(demo)) for demo in a.demos}
    per_seed = {s.seed: run_demo_models(demo, s, out, den, judge, tuple(a.all_single_ranks))
                for demo, s in settings.items()}
    R = [per_seed[k] for k in sorted(per_seed)]
    rows = table_rows(next(iter(settings.values())), list(R[0]), a.all_single_ranks)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    text = "\n".join([f"Seeds {', '.join(map(str, sorted(per_seed)))} (mean ± sd); machine: {machine}, "
                      f"{a.threads} thread(s).", "", *_table(R, rows)]) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"machine": machine, "seeds": sorted(per_seed),
                                                  "results": {str(k): v for k, v in per_seed.items()},
                                                  "wall_s": round(time.time() - t0, 1)}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
