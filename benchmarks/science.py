"""The SafetyDPO paper's experiments at toy scale, on the built-in concept world: does the method work, and
what does it cost content that has nothing to do with safety?

For each seed (pairs, rendering, training and evaluation all follow the seed):

* the shipped world model renders prompt pairs (48 per concept, same seed for both prompts of a pair, pairs
  the judge rejects dropped); the first 24 per concept are the demo's dataset, and smaller and larger
  subsets are the data-scaling ablation;
* one expert per concept with the demo's recipe (:class:`~safetydpo_core.world.demo.DemoSettings`);
* **All-single**: one LoRA trained on the pairs of all seven concepts with the same total number of steps;
* **merges** of the seven experts: Co-Merge (factor and delta readings), concat, linear (sum), average
  (linear with weights 1/7), TIES, DARE;
* **scaling**: the first 3 concepts' experts merged (IP on those concepts);
* **ablations** on three concepts: the condition switch, MaPO, the official beta 5000, and the recipe's
  extra terms off (plain DPO: no SFT term, no output preservation);
* **preserve-weight sweep**: the seven experts trained with other output-preservation weights, merged;
* **output-rank sweep**: the recipe's experts merged at several output ranks;
* **data scaling**: experts trained on 6, 12, 24 and 48 pairs per concept, merged;
* every model draws new prompts (training wording and held-out paraphrases and synonyms; each unsafe prompt
  beside its safe twin from the same seed) and **unrelated content** (plain shapes in training, held-out and
  free wording), read by the world judge: IP, safe-twin fidelity, layout, drawn-as-twin, unrelated fidelity
  and **preservation** (same-seed plain-shape pictures unchanged from the base model's).

Prints Markdown tables (mean ± standard deviation over seeds) and writes ``results.json``, ``results.md``
and a PNG chart to ``--out``. Everything is cached per seed under ``--out``: run it again to resume or to
add seeds.

    python benchmarks/science.py                       # 3 seeds
    python benchmarks/science.py --seeds 0 --quick     # a smoke run (fewer pairs, steps and prompts)
    python benchmarks/science.py --parts rank          # the main table and the output-rank sweep only
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MERGES = ("comerge", "comerge-delta", "concat", "linear", "average", "ties", "dare")  # average: linear with weights 1/N
SCALING_METHODS = ("comerge-delta", "comerge", "linear")
ABLATION_CONCEPTS = ("hate", "violence", "sexual")
ABLATIONS = {"condition=safe": {"condition": "safe"}, "condition=both": {"condition": "both"},
             "objective=mapo": {"objective": "mapo"}, "beta=5000": {"beta": 5000.0},
             "plain DPO": {"sft_weight": 0.0, "preserve_weight": 0.0}}
PRESERVE_SWEEP = (0.0, 1.0, 10.0, 100.0)   # the recipe's own weight is added if it is not among these
RANK_SWEEP = (4, 8, 16, "auto")
DATA_SCALING = (6, 12, 24, 48)             # pairs per concept; the recipe's own count is its dataset
PARTS = ("scaling", "ablations", "preserve", "rank", "data")  # the optional experiments (--parts)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def subset_dataset(src: Path, dst: Path, per_concept: int) -> Path:
    """A dataset folder with the pairs of ``src`` whose index within their concept is below ``per_concept``
    (world pair ids end in that index), written once."""
    from safetydpo_core.data import PreferenceDatasetWriter
    from safetydpo_core.data.preference_dataset import PreferenceDataset

    if (dst / "summary.json").exists():
        return dst
    ds = PreferenceDataset(src)
    keep = [i for i, r in enumerate(ds.records) if int(r.id.rsplit("-", 1)[1]) < per_concept]
    with PreferenceDatasetWriter(dst, model_fingerprint=ds.model_fingerprint, previews=False, overwrite=True,
                                 settings={**ds.header.get("settings", {}), "subset_of": src.name,
                                           "per_concept": per_concept}) as wr:
        for i in keep:
            r = ds.records[i]
            safe, unsafe = ds.load_pair(i)
            wr.add(id=r.id, category=r.category, concept=r.concept, unsafe=r.unsafe, safe=r.safe, safe_latent=safe,
                   unsafe_latent=unsafe, seed=r.seed, height=r.height, width=r.width, **r.extra)
    (dst / "summary.json").write_text(json.dumps({"rendered": len(keep), "subset_of": str(src)}))
    return dst


def merge_lora(den, files: dict[str, Path], s, folder: Path, tag: str, method: str, rank=None, *, dataset: Path,
               pairs: Path, label: str = "") -> Path:
    """The merge of the expert ``files`` with ``method`` (one of :data:`MERGES`; ``average`` is linear with
    weights 1/N) at output ``rank`` (default: the recipe's), made once into ``folder``."""
    from safetydpo_core.world.demo import merge_experts_into

    rank = s.merge_rank if rank is None else rank
    path = folder / f"{tag}_{method}_{rank or 'default'}.safetensors"
    if not path.exists():
        log(f"{label}merging {tag} ({len(files)} experts) with {method}, rank {rank or 'default'}")
        method_, weights = (("linear", [1.0 / len(files)] * len(files)) if method == "average" else (method, None))
        merge_experts_into(den, files, s, path, dataset=dataset, pairs=pairs, method=method_, rank=rank,
                           weights=weights)
    return path


def run_seed(seed: int, out: Path, a) -> dict:
    """Train, merge and evaluate everything for one seed; returns {model name: scores}."""
    from safetydpo_core.prompts.pairs import read_pairs, write_pairs
    from safetydpo_core.world import WORLD, load_judge, load_world_model, world_pairs
    from safetydpo_core.world.demo import DemoSettings, expert_config, render_dataset, train_lora
    from safetydpo_core.world.lora_eval import eval_sets, evaluate_models, model_scores

    s = DemoSettings.preset(quick=a.quick, seed=seed, eval_per_concept=a.eval, eval_steps=a.eval_steps,
                            steps=a.steps, held_out=True, unrelated_per_wording=a.unrelated)
    d = out / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    den, judge = load_world_model(), load_judge()
    cats = [o.category for o in WORLD.concepts]
    sizes = sorted({*(x for x in DATA_SCALING if not a.quick), s.pairs_per_concept})
    pairs_path = d / "pairs.jsonl"
    if not pairs_path.exists():
        write_pairs(world_pairs(max(sizes), seed=seed, split="train"), pairs_path)
    full = render_dataset(den, judge, read_pairs(pairs_path), d / "dataset", steps=s.render_steps, cfg=s.cfg,
                          seed=seed, say=log)
    datasets = {n: (full if n == max(sizes) else subset_dataset(full, d / f"dataset_{n}", n)) for n in sizes}
    dataset = datasets[s.pairs_per_concept]

    def experts(folder: str, data: Path = dataset, concepts=cats, **over) -> dict[str, Path]:
        return {c: train_lora(den, data, expert_config(s, c, **over), d / folder / f"{c}.safetensors", say=log,
                              label=f"seed {seed} {folder} {c}") for c in concepts}

    def merge(tag: str, files: dict[str, Path], method: str, rank=None, data: Path = dataset) -> Path:
        return merge_lora(den, files, s, d / "merges", tag, method, rank, dataset=data, pairs=pairs_path,
                          label=f"seed {seed}: ")

    loras: dict[str, Path | None] = {"base": None}
    recipe = experts("experts")
    loras.update({f"expert:{c}": p for c, p in recipe.items()})
    loras["all-single"] = train_lora(den, dataset, expert_config(s, None, steps=s.steps * len(cats)),
                                     d / "all_single.safetensors", say=log, label=f"seed {seed} All-single")
    for m in MERGES:
        loras[f"merge:{m}"] = merge("recipe", recipe, m)
    parts = set(a.parts)
    for m in SCALING_METHODS if "scaling" in parts else ():
        loras[f"scaling3:{m}"] = merge("recipe3", {c: recipe[c] for c in cats[:3]}, m)
    for name, over in ABLATIONS.items() if "ablations" in parts else ():
        if expert_config(s, cats[0], **over) == expert_config(s, cats[0]):
            continue  # the recipe itself
        ab = experts(f"ablations/{name.replace('=', '_').replace(' ', '_')}", concepts=ABLATION_CONCEPTS, **over)
        loras.update({f"{name}:{c}": p for c, p in ab.items()})
    default = s.merge_method
    for w in sorted({*PRESERVE_SWEEP, s.preserve_weight}) if "preserve" in parts else ():
        ex = recipe if w == s.preserve_weight else experts(f"preserve_{w:g}", preserve_weight=w)
        loras[f"preserve={w:g}"] = loras[f"merge:{default}"] if w == s.preserve_weight else merge(f"preserve_{w:g}", ex, default)
    for r in RANK_SWEEP if "rank" in parts else ():
        loras[f"rank={r}"] = merge("recipe", recipe, default, r)
    for n, data in datasets.items() if "data" in parts else ():
        ex = recipe if n == s.pairs_per_concept else experts(f"data_{n}", data=data)
        loras[f"data={n}"] = loras[f"merge:{default}"] if n == s.pairs_per_concept else merge(f"data_{n}", ex, default,
                                                                                                data=data)
    if a.baselines:
        from science_baselines import baseline_loras

        loras.update({f"baseline:{k}": p for k, p in baseline_loras(seed, d, den, s, log=log).items()})

    entries = evaluate_models(den, judge, loras, eval_sets(s), steps=s.eval_steps, cfg=s.cfg, cache=d / "eval",
                              log=lambda m: log(f"seed {seed}: {m}"))
    results = {name: model_scores(e, entries["base"]) for name, e in entries.items()}
    if a.attacks:
        from science_attacks import attack_table

        results["_attacks"] = attack_table(seed, d, den, judge, {k: v for k, v in loras.items()
                                                                 if k == "base" or k.startswith(("merge:", "expert:",
                                                                                                 "all-single", "baseline:"))},
                                           log=log)
    from safetydpo_core.world.demo import HOW_SETTINGS

    results["_recipe"] = {k: v for k, v in s.to_dict().items() if k != "seed" and k not in HOW_SETTINGS}
    return results


# ------------------------------------------------------------------------------------------------------
# Aggregation and tables


def _ms(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(values) -> str:
    m, sd = _ms(values)
    return "-" if m is None else f"{m:.2f} ± {sd:.2f}"


def _ip_over(sc: dict, cats) -> float | None:
    vals = [sc["ip_per_category"].get(c) for c in cats]
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _safe_layout(sc: dict) -> float:
    return (1 - sc["ip"]) * (sc["layout"] or 0.0)


def _u(sc: dict, key: str):
    return (sc.get("unrelated") or {}).get(key)


# the columns every model table shows: (header, getter)
COLUMNS = (
    ("IP (train wording)", lambda sc: sc["ip"]),
    ("IP (held-out wording)", lambda sc: (sc.get("held_out") or {}).get("ip")),
    ("safe-twin fidelity", lambda sc: sc["fidelity"]),
    ("layout kept", lambda sc: sc["layout"]),
    ("safe with layout", _safe_layout),
    ("twin with layout", lambda sc: sc.get("twin_with_layout")),
    ("unrelated fidelity", lambda sc: _u(sc, "fidelity")),
    ("preservation", lambda sc: _u(sc, "preservation")),
)


def _table(R: list[dict], rows: list[tuple[str, str]], summary: dict | None = None) -> list[str]:
    """A Markdown table with :data:`COLUMNS` for ``rows`` = [(label, model name)]."""
    lines = ["| model | " + " | ".join(h for h, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for label, m in rows:
        if any(m not in r for r in R):
            continue
        vals = [[get(r[m]) for r in R] for _, get in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
        if summary is not None:
            summary[m] = {h: _ms(v) for (h, _), v in zip(COLUMNS, vals)}
    return lines


def tables(per_seed: dict[int, dict]) -> tuple[str, dict]:
    from safetydpo_core.world import WORLD
    from safetydpo_core.world.goals import GOALS, check_goals

    cats = [o.category for o in WORLD.concepts]
    seeds = sorted(per_seed)
    R = [per_seed[s] for s in seeds]
    recipe = R[0].get("_recipe", {})
    default = recipe.get("merge_method", "comerge-delta")
    summary: dict = {"seeds": seeds, "recipe": recipe, "models": {}}
    lines = [f"Seeds: {', '.join(map(str, seeds))} (mean ± standard deviation over seeds). Recipe: "
             + ", ".join(f"{k} {v}" for k, v in recipe.items() if k in ("steps", "lr", "beta", "rank", "batch_size",
                                                                          "sft_weight", "preserve_weight", "merge_method",
                                                                          "merge_rank", "calibration")) + ".", ""]
    baselines = sorted({k for r in R for k in r if k.startswith("baseline:")})
    lines += ["### Base model, All-single, the merges of the seven experts and the erasure baselines", "",
              "*safe with layout*: unsafe prompts drawn as a safe object with the prompt's colour and position "
              "((1 - IP) x layout kept); *twin with layout*: drawn as exactly the concept's safe twin with the prompt's "
              "colour and position; *unrelated fidelity*: plain shapes drawn as asked (three wordings); "
              "*preservation*: same-seed plain-shape pictures unchanged from the base model's.", ""]
    lines += _table(R, [("base", "base"), ("all-single", "all-single")] + [(f"merge:{m}", f"merge:{m}") for m in MERGES]
                    + [(b, b) for b in baselines], summary["models"])
    # single experts
    lines += ["", "### Single experts", "",
              "IP on the expert's own concept and on the other six; fidelity on all safe prompts and on plain shapes.", "",
              "| expert | own concept IP | own IP (held-out wording) | others' IP | safe-twin fidelity | unrelated fidelity | "
              "preservation |", "|---|---|---|---|---|---|---|"]
    for c in cats:
        m = f"expert:{c}"
        others = [x for x in cats if x != c]
        lines.append(f"| {c} | {_fmt([r[m]['ip_per_category'].get(c) for r in R])} | "
                     f"{_fmt([r[m]['held_out']['ip_per_category'].get(c) for r in R])} | "
                     f"{_fmt([_ip_over(r[m], others) for r in R])} | {_fmt([r[m]['fidelity'] for r in R])} | "
                     f"{_fmt([_u(r[m], 'fidelity') for r in R])} | {_fmt([_u(r[m], 'preservation') for r in R])} |")
    own = [statistics.fmean([r[f"expert:{c}"]["ip_per_category"][c] for c in cats]) for r in R]
    summary["single_expert_own_ip"] = _ms(own)
    lines.append(f"| mean | {_fmt(own)} | | | | | |")
    # per concept IP
    lines += ["", "### IP per concept", "", "| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for m in ["base", "all-single"] + [f"merge:{x}" for x in MERGES] + baselines:
        if all(m in r for r in R):
            vals = [[r[m]["ip_per_category"].get(c) for r in R] for c in cats]
            lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in vals) + " |")
    # scaling
    lines += ["", "### Merging more experts", "",
              "IP over the merged experts' concepts (k = 1: the first expert alone); unrelated fidelity.", "",
              "| method | k=1 IP | k=3 IP | k=7 IP | k=1 unrelated | k=3 unrelated | k=7 unrelated |",
              "|---|---|---|---|---|---|---|"]
    summary["scaling"] = {}
    for m in SCALING_METHODS:
        ips, unr = [], []
        for k in (1, 3, 7):
            name = f"expert:{cats[0]}" if k == 1 else (f"scaling3:{m}" if k == 3 else f"merge:{m}")
            ips.append([_ip_over(r[name], cats[:k]) for r in R])
            unr.append([_u(r[name], "fidelity") for r in R])
        summary["scaling"][m] = {"ip": [_ms(v) for v in ips], "unrelated_fidelity": [_ms(v) for v in unr]}
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in ips) + " | " + " | ".join(_fmt(v) for v in unr) + " |")
    # ablations
    lines += ["", f"### Ablations (experts for {', '.join(ABLATION_CONCEPTS)})", "",
              "| variant | own concept IP | others' IP | safe-twin fidelity | layout kept | twin with layout | "
              "unrelated fidelity | preservation |", "|---|---|---|---|---|---|---|---|"]
    summary["ablations"] = {}
    for label, prefix in ({"the recipe": "expert"} | {k: k for k in ABLATIONS}).items():
        if not all(f"{prefix}:{c}" in r for r in R for c in ABLATION_CONCEPTS):
            continue  # a variant equal to the recipe is not trained twice
        cols: dict[str, list] = {k: [] for k in ("own", "others", "fid", "lay", "twin", "ufid", "pres")}
        for r in R:
            names = [(f"{prefix}:{c}", c) for c in ABLATION_CONCEPTS]

            def mean(f):
                vals = [f(r[n], c) for n, c in names]
                vals = [v for v in vals if v is not None]
                return statistics.fmean(vals) if vals else None

            cols["own"].append(mean(lambda sc, c: sc["ip_per_category"][c]))
            cols["others"].append(mean(lambda sc, c: _ip_over(sc, [x for x in cats if x != c])))
            cols["fid"].append(mean(lambda sc, c: sc["fidelity"]))
            cols["lay"].append(mean(lambda sc, c: sc["layout"]))
            cols["twin"].append(mean(lambda sc, c: sc.get("twin_with_layout")))
            cols["ufid"].append(mean(lambda sc, c: _u(sc, "fidelity")))
            cols["pres"].append(mean(lambda sc, c: _u(sc, "preservation")))
        summary["ablations"][label] = {k: _ms(v) for k, v in cols.items()}
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in cols.values()) + " |")
    # sweeps
    for title, prefix, note in (
            ("Output preservation: preserve-weight sweep", "preserve=",
             f"The seven experts trained with this output-preservation weight, merged with {default}."),
            ("Output rank of the merge", "rank=", f"The recipe's experts merged with {default} at this output rank "
                                                   f"(auto: the sum of the experts' ranks)."),
            ("Data scaling", "data=", f"Experts trained on this many pairs per concept (before the judge's check), "
                                      f"merged with {default}.")):
        keys = sorted({k for r in R for k in r if k.startswith(prefix)},
                      key=lambda k: (not k[len(prefix):].replace(".", "").isdigit(),
                                     float(k[len(prefix):]) if k[len(prefix):].replace(".", "").isdigit() else 0))
        if keys:
            summary[prefix.rstrip("=")] = {}
            lines += ["", f"### {title}", "", note, ""]
            lines += _table(R, [(k[len(prefix):], k) for k in keys], summary[prefix.rstrip("=")])
    # goals
    base = [r["base"] for r in R]
    lines += ["", "### Goals", "", "Each merge of the seven experts against the base model (mean over seeds; "
              "a goal is met when the mean meets it).", "",
              "| merge | " + " | ".join(f"{g.label} ({g.op} {g.target:g})" for g in GOALS) + " |",
              "|---|" + "---|" * len(GOALS)]
    summary["goals"] = {}
    for m in [f"merge:{x}" for x in MERGES] + ["all-single"] + baselines:
        if not all(m in r for r in R):
            continue
        checks = [check_goals(r[m], b) for r, b in zip(R, base)]
        cells, row = [], {}
        for g in GOALS:
            mean, sd = _ms([c[g.key]["value"] for c in checks])
            met = g.met(mean)
            row[g.key] = {"value": (mean, sd), "met": met}
            cells.append("-" if mean is None else f"{mean:.2f} ± {sd:.2f} {'met' if met else 'missed'}")
        summary["goals"][m] = row
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any("_attacks" in r for r in R):
        lines += ["", "### Attacks", "", _attack_table(R)]
    return "\n".join(lines) + "\n", summary


def _attack_table(R: list[dict]) -> str:
    """ASR per model and attack (mean ± sd over seeds) from ``science_attacks.attack_table`` results."""
    models = list(dict.fromkeys(m for r in R for m in r.get("_attacks", {})))
    attacks = list(dict.fromkeys(a for r in R for m in r.get("_attacks", {}).values() for a in m))
    lines = ["| model | " + " | ".join(f"ASR {a}" for a in attacks) + " |", "|---|" + "---|" * len(attacks)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(_fmt([r.get("_attacks", {}).get(m, {}).get(a, {}).get("asr") for r in R])
                                             for a in attacks) + " |")
    return "\n".join(lines)


def chart(summary: dict, path: Path) -> None:
    """Bars per model: IP (dark red), safe-twin fidelity (light blue) and unrelated fidelity (green), mean with
    the spread over seeds as a line."""
    from PIL import Image, ImageDraw

    models = list(summary["models"])
    keys = (("IP (train wording)", (170, 40, 40)), ("safe-twin fidelity", (120, 170, 220)),
            ("unrelated fidelity", (90, 170, 90)))
    left, top, bw, gap, h = 60, 40, 14, 24, 240
    width = left + len(models) * (len(keys) * bw + gap) + 20
    img = Image.new("RGB", (width, top + h + 90), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), "IP (red), safe-twin fidelity (blue), unrelated fidelity (green); mean ± sd over seeds",
           fill="black")
    y1 = top + h
    for t in range(6):
        y = y1 - h * t / 5
        d.line([(left, y), (width - 10, y)], fill=(225, 225, 225))
        d.text((20, y - 6), f"{t / 5:.1f}", fill=(80, 80, 80))
    for i, m in enumerate(models):
        x = left + 10 + i * (len(keys) * bw + gap)
        for j, (key, colour) in enumerate(keys):
            mean, sd = summary["models"][m].get(key, (None, None))
            if mean is None:
                continue
            xa = x + j * bw
            d.rectangle([xa, y1 - h * mean, xa + bw - 3, y1], fill=colour)
            xm = xa + (bw - 3) / 2
            d.line([(xm, y1 - h * max(0.0, mean - sd)), (xm, y1 - h * min(1.0, mean + sd))], fill="black")
        d.text((x - 4, y1 + 6 + (i % 2) * 14), m.replace("merge:", "").replace("baseline:", "")[:14], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/results/science", help="cache and results folder")
    p.add_argument("--steps", type=int, default=None, help="DPO steps per expert (default: the demo's)")
    p.add_argument("--eval", type=int, default=8, help="evaluation prompts per concept and wording (default 8)")
    p.add_argument("--unrelated", type=int, default=30, help="plain-shape prompts per wording (default 30)")
    p.add_argument("--eval-steps", type=int, default=15, help="sampler steps for evaluation pictures (default 15)")
    p.add_argument("--quick", action="store_true", help="the demo's --quick settings (smoke run)")
    p.add_argument("--baselines", action="store_true", help="add the erasure baselines (ESD-u, ESD-x, UCE)")
    p.add_argument("--attacks", action="store_true", help="add attack success rates (benchmarks/science_attacks.py)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS),
                   help="which experiments besides the base model, experts, All-single and the merges (default: all)")
    p.add_argument("--report-only", action="store_true", help="only aggregate seeds already done")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    per_seed = {}
    t0 = time.process_time()
    suffix = "".join(("_baselines" if a.baselines else "", "_attacks" if a.attacks else "",
                      "" if set(a.parts) == set(PARTS) else "_" + "-".join(sorted(a.parts)) if a.parts else "_main"))
    for seed in a.seeds:
        res_file = out / f"seed_{seed}" / f"results{suffix}.json"
        if res_file.exists():
            per_seed[seed] = json.loads(res_file.read_text())
            continue
        if a.report_only:
            continue
        per_seed[seed] = run_seed(seed, out, a)
        tmp = res_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(per_seed[seed], indent=1))
        os.replace(tmp, res_file)
    if not per_seed:
        print("no results yet", file=sys.stderr)
        return 1
    text, summary = tables(per_seed)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    summary["machine"] = machine
    summary["cpu_seconds_this_run"] = round(time.process_time() - t0, 1)
    (out / "results.json").write_text(json.dumps({"summary": summary, "per_seed": per_seed}, indent=1))
    (out / "results.md").write_text(text)
    chart(summary, out / "science.png")
    print(text)
    print(f"machine: {machine}; results in {out}/results.json, chart {out}/science.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
