"""Adversarial training against concept inversion, on the built-in concept world: the demo's joint fine-tune of
the Co-Merge LoRA with the adversary of ``training/adversarial.py`` switched on, beside the demo's own merged LoRA.

For each output folder of ``safetydpo demo`` given and each variant (``NAME=setting=value,...``, the
training settings of ``safetydpo train`` with underscores):

* the demo's joint fine-tune (``comerge.safetensors`` -> 200 steps of DPO + SFT + preservation on every
  category's pairs, the demo's settings) with the variant's settings on top, written to
  ``<out>/seed_<seed>/<NAME>.safetensors``;
* evaluated as the demo evaluates (IP with training and held-out wording, safe-twin fidelity, twin with
  layout, unrelated fidelity, preservation; the world judge, nothing tuned);
* attacked as ``benchmarks/science_attacks.py`` attacks (56 prompts, the world's default budgets), by default
  with concept inversion and wording.

Prints a Markdown table (mean ± sd over the demos given) and writes ``results.json`` to ``--out``; everything
is cached per seed (run it again to resume or add demos or variants)::

    python benchmarks/science_adversarial.py --demos demos/s0 demos/s1 demos/s2 --out adversarial \\
        --variant dpo1=adv_weight=1 --variant anchor10=adv_weight=10,adv_objective=anchor
    # a range setting as lo:hi, e.g. training on the timesteps a LoRA from step 10 of 20 acts on
    python benchmarks/science_adversarial.py --demos demos/s0 --out adversarial --variant t500=adv_weight=0.5,timestep_range=0:500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

UTILITY = ("ip", "ip_held_out", "fidelity", "twin_with_layout", "unrelated_fidelity", "preservation")
ATTACKS = ("inversion", "wording")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=key=value,key=value`` -> (NAME, {key: value}) with values typed as the training setting's."""
    from safetydpo_core.training.config import SETTINGS

    name, _, spec = text.partition("=")
    if not name or not spec:
        raise SystemExit(f"--variant {text!r}: write NAME=setting=value[,setting=value...].")
    out = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a training setting.")
        kind = SETTINGS[key].kind
        if ":" in value:  # a range, e.g. timestep_range=0:500
            out[key] = tuple(int(v) for v in value.split(":"))
            continue
        out[key] = int(value) if kind == "int" else float(value) if kind == "float" else value
    return name, out


def finetune(demo: Path, s, name: str, overrides: dict, path: Path, den) -> Path:
    """The demo's joint fine-tune of its Co-Merge LoRA with ``overrides``, written to ``path`` (kept if there;
    an interrupted run resumes from its checkpoint)."""
    from safetydpo_core.world.demo import expert_config, train_lora

    return train_lora(den, demo / "dataset", expert_config(s, None, steps=s.finetune_steps, **overrides), path,
                      say=lambda m: print(m, flush=True), label=f"the fine-tune {name}",
                      init=demo / "comerge.safetensors")


def run_demo(demo: Path, variants: dict[str, dict], out: Path, attacks, den, judge) -> dict:
    from science_attacks import attack_table
    from science_merges import demo_settings

    from safetydpo_core.world.lora_eval import eval_sets, evaluate_models, model_scores

    s = demo_settings(demo)
    seed_dir = out / f"seed_{s.seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    loras = {"merged": demo / "merged.safetensors"}
    for name, overrides in variants.items():
        loras[name] = finetune(demo, s, name, overrides, seed_dir / f"{name}.safetensors", den)
    entries = evaluate_models(den, judge, {"base": None, **loras}, eval_sets(s), steps=s.eval_steps, cfg=s.cfg,
                              cache=seed_dir / "eval", log=lambda m: print(f"seed {s.seed}: {m}", flush=True))
    table = attack_table(s.seed, seed_dir, den, judge, loras, attacks=attacks)
    rows = {}
    base_unrel = model_scores(entries["base"], entries["base"])["unrelated"]["fidelity"]
    for name in loras:
        sc = model_scores(entries[name], entries["base"])
        rows[name] = {"ip": sc["ip"], "ip_held_out": sc["held_out"]["ip"], "fidelity": sc["fidelity"],
                      "twin_with_layout": sc["twin_with_layout"],
                      "unrelated_fidelity": round(sc["unrelated"]["fidelity"] / base_unrel, 4) if base_unrel else None,
                      "preservation": sc["unrelated"]["preservation"],
                      **{f"asr_{a}": table[name][a]["asr"] for a in attacks}}
    done = seed_dir / "results.json"  # every variant run so far for this seed
    kept = json.loads(done.read_text()) if done.exists() else {}
    done.write_text(json.dumps({**kept, **rows}, indent=1))
    return rows


def markdown(per_seed: list[dict], columns) -> str:
    names = list(per_seed[0])
    head = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    lines = []
    for n in names:
        cells = []
        for c in columns:
            vals = [r[n][c] for r in per_seed if r.get(n, {}).get(c) is not None]
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/science_adversarial.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--demos", nargs="+", required=True, help="output folders of `safetydpo demo`")
    p.add_argument("--out", required=True, help="folder for the LoRAs, caches and results")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SETTING=VALUE,...",
                   help="a fine-tune variant (default: dpo1=adv_weight=1)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks (default: inversion,wording)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from safetydpo_core.world import load_judge, load_world_model

    variants = dict(parse_variant(v) for v in (a.variant or ["dpo1=adv_weight=1"]))
    attacks = tuple(x.strip() for x in a.attacks.split(",") if x.strip())
    den, judge = load_world_model(), load_judge()
    out = Path(a.out)
    t0 = time.perf_counter()
    per_seed = [run_demo(Path(d), variants, out, attacks, den, judge) for d in a.demos]
    text = markdown(per_seed, UTILITY + tuple(f"asr_{x}" for x in attacks))
    print(f"\n{len(per_seed)} seed(s), {platform.machine()} CPU, {a.threads} thread(s), "
          f"{os.cpu_count()} cores; {time.perf_counter() - t0:.0f} s\n\n{text}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"variants": variants, "per_seed": per_seed}, indent=1))
    (out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
