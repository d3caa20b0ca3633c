"""Recipe search on the built-in world: which expert training terms and which merge keep unrelated content.

For one seed: the demo's dataset (24 pairs per concept), seven experts per training variant (plain DPO,
output preservation alone, SFT + output preservation), each set merged with several methods and output ranks,
and every merge evaluated like the demo and ``benchmarks/science.py`` do (IP with training and held-out
wording, safe-twin fidelity, twin with layout, unrelated fidelity, preservation). Everything is cached under
``--out``: run it again to resume or to add variants. Figures: docs/benchmarks.md, "Recipe".

    python benchmarks/recipe_search.py --out /tmp/recipe                 # all variants and merges, seed 0
    python benchmarks/recipe_search.py --variants sft1_preserve10 --merges comerge-delta@auto
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VARIANTS = {  # expert training terms; everything else is the demo's recipe
    "plain": {"sft_weight": 0.0, "preserve_weight": 0.0},
    "preserve10": {"sft_weight": 0.0, "preserve_weight": 10.0},
    "sft1_preserve10": {"sft_weight": 1.0, "preserve_weight": 10.0},
}
MERGES = ("comerge-delta@4", "comerge-delta@auto", "comerge", "linear@auto", "ties@auto", "concat")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/recipe", help="cache and results folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--merges", nargs="+", default=list(MERGES), help="method or method@rank (rank a number or auto)")
    p.add_argument("--eval", type=int, default=8, help="evaluation prompts per concept and wording (default 8)")
    p.add_argument("--unrelated", type=int, default=30, help="plain-shape prompts per wording (default 30)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from safetydpo_core.prompts.pairs import read_pairs, write_pairs
    from safetydpo_core.world import WORLD, load_judge, load_world_model, world_pairs
    from safetydpo_core.world.demo import DemoSettings, expert_config, merge_experts_into, render_dataset, train_lora
    from safetydpo_core.world.goals import check_goals
    from safetydpo_core.world.lora_eval import cached_evaluation, eval_sets, evaluate_lora, model_scores

    root = Path(a.out) / f"seed_{a.seed}"
    root.mkdir(parents=True, exist_ok=True)
    s = DemoSettings.preset(seed=a.seed, eval_per_concept=a.eval, eval_steps=15, unrelated_per_wording=a.unrelated)
    den, judge = load_world_model(), load_judge()
    cats = [o.category for o in WORLD.concepts]
    pairs_path = root / "pairs.jsonl"
    if not pairs_path.exists():
        write_pairs(world_pairs(s.pairs_per_concept, seed=a.seed, split="train"), pairs_path)
    dataset = render_dataset(den, judge, read_pairs(pairs_path), root / "dataset", steps=20, cfg=s.cfg, seed=a.seed,
                             say=log)
    sets = eval_sets(s)

    def evaluate(name: str, path: Path | None) -> dict:
        f = root / "eval" / (name.replace(":", "_").replace("@", "_") + ".pt")
        if not f.exists():
            log(f"evaluating {name}")
        return cached_evaluation(f, lambda: evaluate_lora(den, judge, path, sets, steps=s.eval_steps, cfg=s.cfg))

    base = evaluate("base", None)
    rows = [("base model", "-", model_scores(base, base))]
    for v in a.variants:
        experts = {c: train_lora(den, dataset, expert_config(s, c, **VARIANTS[v]), root / v / f"{c}.safetensors",
                                 say=log, label=f"{v} {c}") for c in cats}
        for m in a.merges:
            method, _, rank = m.partition("@")
            rank = (int(rank) if rank.isdigit() else rank) or None
            path = root / v / f"merge_{method}_{rank or 'own'}.safetensors"
            if not path.exists():
                log(f"merging {v} with {m}")
                merge_experts_into(den, experts, s, path, dataset=dataset, pairs=pairs_path, method=method,
                                   rank=rank if rank is not None else (None if method in ("comerge", "concat") else 4))
            rows.append((v, m, model_scores(evaluate(f"{v}:{m}", path), base)))
    base_scores = rows[0][2]
    print("| experts | merge | IP | IP held-out | safe-twin fidelity | twin with layout | unrelated fidelity | "
          "preservation | goals met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, m, sc in rows:
        goals = check_goals(sc, base_scores)
        u = sc["unrelated"]
        print(f"| {v} | {m} | {sc['ip']:.2f} | {sc['held_out']['ip']:.2f} | {sc['fidelity']:.2f} | "
              f"{sc['twin_with_layout']:.2f} | {u['fidelity']:.2f} | {u['preservation']:.2f} | "
              f"{sum(g['met'] for g in goals.values())}/{len(goals)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
