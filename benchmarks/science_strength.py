"""The merged LoRA's strength dial on the built-in concept world: every #12 measure at other strengths.

A user who loads the demo's ``merged.safetensors`` at strength ``s`` (a LoRA loader's strength, the Safe
Sampler's ``strength``, ``safetydpo sample --strength s``) gets the LoRA with every update scaled by ``s``.
For each ``safetydpo demo`` folder given and each strength, this writes that scaled LoRA into a folder of its
own beside the demo's files (linked, not copied: dataset, experts, the base model's and the experts'
cached evaluations), evaluates it as the demo evaluates (IP with training and held-out wording, safe-twin
fidelity, unrelated fidelity, preservation, twin with layout; the world judge, nothing tuned) and prints the
table of docs/benchmarks.md ("The merged LoRA's strength"): seeds side by side, the mean in brackets.
``--attacks`` also runs ``benchmarks/science_attacks.py`` on each (the four attacks, the merged LoRA only).
``--lora-start N`` evaluates each scaled LoRA switched on only after the first N sampling steps, as
``safetydpo demo --lora-start N`` does, and attacks it so (``science_attacks.py --lora-start N``).

Cached and resumable: a finished folder is read again, not recomputed::

    safetydpo demo --seed 0 --out demos/s0      # and --seed 1, 2
    python benchmarks/science_strength.py --demos demos/s0 demos/s1 demos/s2 --strengths 0.9 0.8 --out strength
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = ("ip_ratio", "ip_held_out_ratio", "fidelity_ratio", "unrelated_fidelity_ratio", "preservation", "twin_with_layout")
SKIP = {"eval", "merged.safetensors", "report.json", "report.md", "grids", "attacks", "merged.metrics.csv",
        "merged.metrics.jsonl"}


def linked_demo(demo: Path, folder: Path, lora_start: int = 0) -> None:
    """``folder`` made a demo folder that links ``demo``'s files (its cached evaluations too) but the merged
    LoRA, its evaluation, report and attacks, which a variant of the merged LoRA makes anew; with ``lora_start``
    the demo's record is copied with that later start, so that the demo resumes ``folder`` with it."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in demo.iterdir():
        if f.name not in SKIP and not (folder / f.name).exists() and not (lora_start and f.name == "demo.json"):
            (folder / f.name).symlink_to(f.resolve())
    if lora_start:
        record = json.loads((demo / "demo.json").read_text())
        record["settings"]["lora_start"] = lora_start
        (folder / "demo.json").write_text(json.dumps(record, indent=1) + "\n")
    (folder / "eval").mkdir(exist_ok=True)
    for f in (demo / "eval").iterdir():
        if f.name != "merged.pt" and not (folder / "eval" / f.name).exists():
            (folder / "eval" / f.name).symlink_to(f.resolve())


def scaled_demo(demo: Path, strength: float, out: Path, lora_start: int = 0) -> Path:
    """A demo folder whose merged LoRA is ``demo``'s scaled by ``strength``; the rest linked to ``demo``."""
    from safetydpo_core.lora.io import load_lora, save_lora
    from safetydpo_core.world.model import load_world_model

    folder = out / demo.name / (f"strength_{strength:g}" + (f"_from_step_{lora_start}" if lora_start else ""))
    if (folder / "merged.safetensors").exists():
        return folder
    linked_demo(demo, folder, lora_start)
    names = load_world_model().names()
    save_lora(load_lora(demo / "merged.safetensors", names=names).scaled(strength), folder / "merged.safetensors",
              names=names)
    return folder


def evaluate(folder: Path, threads: int, lora_start: int = 0) -> dict:
    """The demo's goals for ``folder``, evaluated with the settings its demo was made with (the LoRA from step
    ``lora_start`` on)."""
    from safetydpo_core.world.demo import DemoSettings, run_demo

    s = DemoSettings.recorded_in(folder, threads=threads, workers=1, lora_start=lora_start)
    report = run_demo(folder, s, log=lambda m: None)
    return {k: v["value"] for k, v in report["goals"].items()}


def attack_asr(folder: Path, attacks, threads: int, lora_start: int = 0) -> dict[str, float]:
    """The ASR of each of ``attacks`` against ``folder``'s merged LoRA (from step ``lora_start`` on), from
    ``folder/attacks/results.json``; the attacks not there yet are run first (``science_attacks.py``)."""
    res = folder / "attacks" / "results.json"
    model = f"merged from step {lora_start}" if lora_start else "merged"
    table = json.loads(res.read_text())["table"].get(model, {}) if res.exists() else {}
    todo = [a for a in attacks if a not in table]
    if todo:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "science_attacks.py"), "--demo", str(folder),
                        "--models", "merged", "--attacks", ",".join(todo), "--lora-start", str(lora_start),
                        "--threads", str(threads)], check=True)
        table = json.loads(res.read_text())["table"][model]
    return {a: table[a]["asr"] for a in attacks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demos", nargs="+", required=True, type=Path, help="finished `safetydpo demo` folders")
    ap.add_argument("--strengths", nargs="+", type=float, default=[0.9, 0.8, 0.7], help="strengths (default 0.9 0.8 0.7)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the scaled LoRAs and their evaluations")
    ap.add_argument("--attacks", action="store_true", help="also attack each scaled LoRA (science_attacks.py)")
    ap.add_argument("--lora-start", type=int, default=0,
                    help="evaluate with the LoRA on only after this many sampling steps (default 0: every step)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    for d in args.demos:
        if not all((d / f).exists() for f in ("merged.safetensors", "demo.json", "eval")):
            raise SystemExit(f"{d} is not a finished `safetydpo demo` folder (merged.safetensors, demo.json, eval/); "
                             f"run `safetydpo demo --out {d}` first.")
    rows: dict[float, list[dict]] = {}
    for st in args.strengths:
        for d in args.demos:
            folder = scaled_demo(d, st, args.out, args.lora_start)
            scores = evaluate(folder, args.threads, args.lora_start)
            if args.attacks:
                from science_attacks import ATTACKS

                scores["asr"] = attack_asr(folder, ATTACKS, args.threads, args.lora_start)
            print(f"strength {st:g}, {d}: {json.dumps(scores)}", flush=True)
            rows.setdefault(st, []).append(scores)
    cell = lambda vals: " / ".join(f"{v:.2f}" for v in vals) + f" ({sum(vals) / len(vals):.2f})"  # noqa: E731
    print("\n| strength | " + " | ".join(GOALS) + " |")
    print("|---|" + "---|" * len(GOALS))
    for st, runs in rows.items():
        print(f"| {st:g} | " + " | ".join(cell([r[g] for r in runs]) for g in GOALS) + " |")
    (args.out / "results.json").write_text(json.dumps({f"{k:g}": v for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
