"""The adversarial fine-tune's change, cut to its top directions or scaled down, on the built-in concept world.

With the adversary (the default), the demo's merged LoRA is two fine-tunes of the Co-Merge merge summed:
``(1 - a) * plain + a * adversary`` (``a`` = ``adversary_share``, 0.5). The adversarial one buys robustness
to concept inversion and costs plain shapes (docs/benchmarks.md, "The adversary by default"). This asks
whether that cost lives in other directions than the robustness: for each ``safetydpo demo`` folder given and
each variant, the adversarial fine-tune's change from the merge (``adversary - merge``, layer by layer) is
rewritten before the sum:

* ``r<k>`` (e.g. ``r2``): only its top ``k`` singular directions kept (an exact truncated SVD per layer);
* ``r<k>x<m>`` (e.g. ``r2x1.43``): those directions multiplied by ``m``; ``r2x1.43`` has the whole change's
  Frobenius energy on the demo's LoRAs;
* ``s<c>`` (e.g. ``s0.7``): scaled by ``c``, the control: ``s0.7`` keeps the Frobenius energy (0.49) that
  ``r2`` keeps on the demo's LoRAs.

The rewritten merged LoRA (an exact concatenation of the three LoRAs' factors, rank ``16 + 16 + k`` or
``16 + 16 + 16``) goes into a folder of its own that links the demo's other files, is evaluated as the demo
evaluates (IP with training and held-out wording, safe-twin fidelity, unrelated fidelity, preservation,
twin with layout; the world judge, nothing tuned) and, with ``--attacks``, attacked
(``benchmarks/science_attacks.py``). Prints the table of docs/benchmarks.md (seeds side by side, the mean in
brackets) and writes ``results.json`` to ``--out``. Cached and resumable: a finished folder is read again::

    safetydpo demo --seed 0 --out demos/s0      # and --seed 1, 2
    python benchmarks/science_adversary_change.py --demos demos/s0 demos/s1 demos/s2 --variants r2 r4 s0.7 \\
        --out adversary_change --attacks inversion,wording
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from science_strength import GOALS, attack_asr, evaluate, linked_demo  # noqa: E402

FILES = ("finetuned.safetensors", "adversary.safetensors", "comerge.safetensors", "demo.json", "eval")


def parse_variant(text: str) -> tuple[str, float, float]:
    """``r<k>`` -> ("rank", k, 1) with k a positive integer, ``r<k>x<m>`` -> ("rank", k, m) (the cut change
    multiplied by m > 0); ``s<c>`` -> ("scale", c, 1) with c in [0, 1]."""
    m = re.fullmatch(r"r([0-9]+)(?:x([0-9]*\.?[0-9]+))?|s([0-9]*\.?[0-9]+)", text)
    ok = m is not None and (int(m.group(1)) >= 1 and (m.group(2) is None or float(m.group(2)) > 0) if m.group(1)
                            else 0 <= float(m.group(3)) <= 1)
    if not ok:
        raise ValueError(f"variant {text!r}: give r<k> (the top k directions of the adversarial change, k >= 1, "
                         f"e.g. r2), r<k>x<m> (those multiplied by m > 0, e.g. r2x1.4) or s<c> (the change scaled "
                         f"by c, 0 <= c <= 1, e.g. s0.7)")
    if m.group(1):
        return "rank", int(m.group(1)), float(m.group(2) or 1)
    return "scale", float(m.group(3)), 1.0


def rewritten_merged(plain, adversary, merge, share: float, variant: str):
    """The merged LoRA ``(1 - share) * plain + share * (merge + T(adversary - merge))`` (LoraSets of one model,
    in one naming) with ``T`` the ``variant`` (:func:`parse_variant`), and the share of the change's
    Frobenius energy that ``T`` keeps, summed over layers."""
    from safetydpo_core.lora.lora_set import LoraSet
    from safetydpo_core.merge.baselines import concat_layer, linear_layer

    kind, value, times = parse_variant(variant)
    layers, kept, total = {}, 0.0, 0.0
    for name, p in plain.items():
        a, m = adversary.layers.get(name), merge.layers.get(name)
        if a is None:
            raise ValueError(f"layer {name!r} is in the plain fine-tune but not in the adversarial one: both "
                             f"fine-tunes of a demo adapt the same layers; are these files from one demo?")
        change = a.delta() - (m.delta() if m is not None else 0)
        if kind == "rank":
            cut, _ = linear_layer([a, m], [1.0, -1.0], int(value))
            layers[name], _ = concat_layer([p, m, cut], [1 - share, share, share * times])
            kept += float(cut.delta().pow(2).sum()) * times ** 2
        else:
            layers[name], _ = concat_layer([p, m, a], [1 - share, share * (1 - value), share * value])
            kept += float(change.pow(2).sum()) * value ** 2
        total += float(change.pow(2).sum())
    return LoraSet(layers, plain.naming), (kept / total if total else 1.0)


def variant_demo(demo: Path, variant: str, out: Path) -> Path:
    """A demo folder whose merged LoRA is ``demo``'s with the adversarial change rewritten by ``variant``
    (:func:`rewritten_merged`, at the demo's ``adversary_share``); the rest linked to ``demo``. Made once."""
    from safetydpo_core.lora.io import load_lora, save_lora
    from safetydpo_core.world.model import load_world_model

    folder = out / demo.name / variant
    if (folder / "merged.safetensors").exists():
        return folder
    share = float(json.loads((demo / "demo.json").read_text())["settings"].get("adversary_share", 0.5))
    names = load_world_model().names()
    plain, adversary, merge = (load_lora(demo / f, names=names) for f in FILES[:3])
    lora, kept = rewritten_merged(plain, adversary, merge, share, variant)
    linked_demo(demo, folder)
    (folder / "variant.json").write_text(json.dumps({"variant": variant, "adversary_share": share,
                                                     "change_energy_kept": round(kept, 4)}) + "\n")
    save_lora(lora, folder / "merged.safetensors", names=names)  # written last: a finished folder has it
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demos", nargs="+", required=True, type=Path,
                    help="finished `safetydpo demo` folders made with the adversary (the default)")
    ap.add_argument("--variants", nargs="+", default=["r2", "r4", "s0.7"],
                    help="r<k>: the top k directions of the adversarial change; r<k>x<m>: those multiplied by m; "
                         "s<c>: the change scaled by c (default r2 r4 s0.7)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the rewritten LoRAs and their evaluations")
    ap.add_argument("--attacks", default="", help="comma-separated attacks to run on each (e.g. inversion,wording; "
                                                   "default none)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as e:
            ap.error(str(e))
    attacks = [a for a in args.attacks.split(",") if a]
    from science_attacks import ATTACKS

    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        ap.error(f"--attacks: unknown attack(s) {', '.join(bad)}; choose from {', '.join(ATTACKS)}")
    for d in args.demos:
        missing = [f for f in FILES if not (d / f).exists()]
        if missing:
            raise SystemExit(f"{d} is not a finished `safetydpo demo` folder made with the adversary (no "
                             f"{', '.join(missing)}); run `safetydpo demo --out {d}` (the default has the adversary).")
    rows: dict[str, list[dict]] = {}
    for v in args.variants:
        for d in args.demos:
            folder = variant_demo(d, v, args.out)
            scores = evaluate(folder, args.threads)
            scores["change_energy_kept"] = json.loads((folder / "variant.json").read_text())["change_energy_kept"]
            if attacks:
                scores["asr"] = attack_asr(folder, attacks, args.threads)
            print(f"{v}, {d}: {json.dumps(scores)}", flush=True)
            rows.setdefault(v, []).append(scores)
    cell = lambda vals: " / ".join(f"{x:.2f}" for x in vals) + f" ({sum(vals) / len(vals):.3f})"  # noqa: E731
    print("\n| variant | energy kept | " + " | ".join([*GOALS, *attacks]) + " |")
    print("|---|---|" + "---|" * (len(GOALS) + len(attacks)))
    for v, runs in rows.items():
        print(f"| {v} | {cell([r['change_energy_kept'] for r in runs])} | "
              + " | ".join([cell([r[g] for r in runs]) for g in GOALS] + [cell([r['asr'][a] for r in runs])
                                                                          for a in attacks]) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
