"""The demo's report: scores per model from judged pictures, ``report.json``, ``report.md`` and image grids.

Scores of one model on one evaluation set (unsafe prompts and their safe twins, same seeds):

* ``ip``: share of pictures for unsafe prompts that show an unsafe concept; ``ip_per_category`` the same
  per category (its concept's prompts only);
* ``fidelity``: share of pictures for safe prompts that show every requested attribute;
* ``layout``: among unsafe prompts now drawn as a safe object, the share that keep the requested colour
  and position; ``twin_rate``: share of unsafe prompts drawn as exactly the concept's safe twin;
* ``ip_on_safe_prompts``: unsafe concepts drawn for safe prompts (should stay near 0).

Grids (``grids/``): ``before_after.png`` (for each concept, unsafe prompts drawn by the base model and by the
merged LoRA from the same seed), ``experts.png`` (one unsafe prompt per concept: base, the concept's own
expert, merged),
``safe_prompts.png`` (safe prompts, base and merged: quality kept).

Public API: :func:`scores`, :func:`write_report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..utils.atomic import atomic_path, atomic_write_text
from .goals import check_goals
from .lora_eval import model_scores
from .spec import WORLD


def write_report(out: Path, settings, results: Mapping[str, Mapping], stages: Mapping[str, float], *,
                 dataset_summary: Mapping, training: Mapping[str, Mapping], merge_report: Path) -> dict:
    """Write ``report.json``, ``report.md`` and the grids; return the report."""
    base_entry = results["base"]
    base = model_scores(base_entry, base_entry)
    experts = {name.split(":", 1)[1]: model_scores(e, base_entry) for name, e in results.items()
               if name.startswith("expert:")}
    merged = model_scores(results["merged"], base_entry)
    for cat, sc in experts.items():
        sc["own_ip"] = sc["ip_per_category"].get(cat)
    merge = json.loads(Path(merge_report).read_text(encoding="utf-8")) if Path(merge_report).exists() else {}
    report = {
        "world": WORLD.version, "settings": settings.to_dict(),
        "base": base, "experts": experts, "merged": merged,
        "goals": check_goals(merged, base),
        "dataset": dict(dataset_summary), "training": dict(training),
        "merge": {"method": merge.get("method"), "shares": (merge.get("overall") or {}).get("shares"),
                  "retention": (merge.get("overall") or {}).get("retention")},
        "seconds": {**stages, "total": round(sum(stages.values()), 1)},
        "files": {"merged_lora": "merged.safetensors", "comerge_lora": "comerge.safetensors", "experts": {c: f"experts/{c}.safetensors" for c in experts},
                  "grids": ["grids/before_after.png", "grids/experts.png", "grids/safe_prompts.png"]},
    }
    _grids(out, results)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n", "demo report")
    atomic_write_text(out / "report.md", _markdown(report), "demo report")
    return report


# ------------------------------------------------------------------------------------------------------
# Markdown


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _adversary_words(s: Mapping) -> str:
    """The summary's words for the adversarial fine-tune of settings ``s`` (nothing without one)."""
    if not s.get("adversary"):
        return ""
    n = s.get("adversary_pictures", 0)
    pictures = (f", its plain-shape preservation prompts noised from {n} picture{'s' if n != 1 else ''} of their own"
                if n else "")
    kept = f", preserving `{s['adversary_preserve']}`" if s.get("adversary_preserve") else ""
    return (f" and, beside that, {s['finetune_steps']} steps against concept inversion (adv_weight {s['adversary']:g}"
            f"{kept}{pictures}); the merged LoRA is the two summed, the adversarial one at "
            f"{s.get('adversary_share', 0.5):g}")


def _markdown(r: Mapping) -> str:
    s = r["settings"]
    cats = [o.category for o in WORLD.concepts]
    concept_of = {o.category: o.id for o in WORLD.concepts}
    lines = ["# SafetyDPO demo on the built-in concept world", "",
             f"World `{r['world']}`, seed {s['seed']}{' (quick run)' if s['quick'] else ''}. "
             f"{s['pairs_per_concept']} prompt pairs per concept rendered with the same seed for both prompts; one DPO "
             f"expert per category ({s['steps']} steps, rank {s['rank']} on `{s.get('targets', 'attn')}`, beta {s['beta']:g}, lr {s['lr']:g}); experts "
             f"merged with `{s['merge_method']}`"
             + (f", the merge then fine-tuned {s['finetune_steps']} steps on all pairs" if s.get('finetune_steps') else "")
             + (f" keeping each pair's safe twin (twin_weight {s['twin_weight']:g})"
                if s.get('finetune_steps') and s.get('twin_weight') else "")
             + _adversary_words(s)
             + (f"; {'each fine-tune' if s.get('adversary') else 'the fine-tune'} saved as the moving average of its "
                f"weights (ema_decay {s['finetune_ema']:g})"
                if s.get('finetune_steps') and s.get('finetune_ema') else "")
             + (f"; the merged LoRA evaluated from sampling step {s['lora_start']} of {s['eval_steps']} on (the "
                f"untouched model before it)" if s.get('lora_start') else "")
             + (f"; the merged LoRA evaluated at strength {s['lora_strength']:g}"
                if s.get('lora_strength', 1) != 1 else "")
             + f". Evaluation: {s['eval_per_concept']} new unsafe prompts per concept and "
             f"their safe twins, the same seeds for every model, {s['eval_steps']} sampler steps, read by the world judge.",
             "", "## Summary", "",
             "Unsafe prompts: IP (share drawn with an unsafe concept), layout kept (of those drawn safe, share with the "
             "prompt's colour and position), drawn as the safe twin with colour and position. Safe prompts: fidelity "
             "(every requested attribute drawn). Unrelated content (plain shapes in training, held-out and free "
             "wording): fidelity, and preservation (same-seed picture unchanged from the base model's).", "",
             "| model | IP | layout kept | twin with layout | safe-twin fidelity | IP on safe prompts | "
             "unrelated fidelity | preservation |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("base", r["base"])] + [(f"expert {c}", r["experts"][c]) for c in cats if c in r["experts"]] + [("merged", r["merged"])]
    for name, sc in rows:
        u = sc.get("unrelated") or {}
        lines.append(f"| {name} | {_f(sc['ip'])} | {_f(sc['layout'])} | {_f(sc['twin_with_layout'])} | "
                     f"{_f(sc['fidelity'])} | {_f(sc['ip_on_safe_prompts'])} | {_f(u.get('fidelity'))} | "
                     f"{_f(u.get('preservation'))} |")
    lines += ["", "## Goals (merged LoRA against the base model)", "", "| goal | value | target | |", "|---|---|---|---|"]
    for g in r["goals"].values():
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "missed")
        lines.append(f"| {g['label']} | {_f(g['value'])} | {g['target']} | {verdict} |")
    if "unrelated" in r["base"]:
        lines += ["", "## Unrelated content per wording", "",
                  "Plain shapes (no concept, no twin) in every colour and position; training wording, held-out wording, "
                  "and free wording outside the caption templates. Fidelity (preservation).", "",
                  "| model | " + " | ".join(r["base"]["unrelated"]["per_wording"]) + " |",
                  "|---|" + "---|" * len(r["base"]["unrelated"]["per_wording"])]
        for name, sc in rows:
            pw = (sc.get("unrelated") or {}).get("per_wording", {})
            lines.append(f"| {name} | " + " | ".join(
                f"{_f(pw.get(w, {}).get('fidelity'))} ({_f(pw.get(w, {}).get('preservation'))})"
                for w in r["base"]["unrelated"]["per_wording"]) + " |")
    lines += ["", "## IP per concept", "",
              "| model | " + " | ".join(f"{c} ({concept_of[c]})" for c in cats) + " |",
              "|---|" + "---|" * len(cats)]
    for name, sc in rows:
        lines.append(f"| {name} | " + " | ".join(_f(sc["ip_per_category"].get(c)) for c in cats) + " |")
    if "held_out" in r["base"]:
        lines += ["", "## Held-out paraphrases and synonyms", "",
                  "Prompts with templates or words the experts never saw in training (the base model knows them).", "",
                  "| model | IP | fidelity (safe prompts) | layout kept |", "|---|---|---|---|"]
        for name, sc in rows:
            h = sc.get("held_out") or {}
            lines.append(f"| {name} | {_f(h.get('ip'))} | {_f(h.get('fidelity'))} | {_f(h.get('layout'))} |")
    d = r["dataset"]
    lines += ["", "## Data, training and merge", "",
              f"Dataset: {d.get('rendered')} pairs kept, dropped by the judge: {d.get('dropped') or 'none'}; per category "
              f"{d.get('per_category')}.", "", "| expert | pairs | final training metrics |", "|---|---|---|"]
    for c in cats:
        t = r["training"].get(c, {})
        lines.append(f"| {c} | {t.get('dataset_pairs', '-')} | {t.get('final_metrics', '-')} |")
    m = r["merge"]
    if m.get("shares"):
        lines += ["", f"Merge `{m['method']}`: share of weights each expert won: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in m["shares"].items()) + "."]
    lines += ["", "## Files", "", "- `merged.safetensors`: the safety LoRA: the merge after its joint fine-tune (kohya keys)",
              "- `comerge.safetensors`: the merge of the experts before the fine-tune (its report in `comerge.report.txt`)",
              "- `experts/<category>.safetensors` and `experts/<category>.metrics.csv`: each expert and its training metrics",
              "- `grids/before_after.png`: unsafe prompts, base model (odd rows) and merged LoRA (even rows), same seeds",
              "- `grids/experts.png`: one unsafe prompt per concept (columns); rows: base, the concept's own expert, merged",
              "- `grids/safe_prompts.png`: safe prompts, base (odd rows) and merged (even rows)",
              "- `pairs.jsonl`, `dataset/`: the prompt pairs and the paired dataset", "",
              "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# Grids


def _sheet(rows: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 3):
    """Rows of ``[N, 3, 32, 32]`` uint8 pictures, each row labelled on the left."""
    from PIL import Image, ImageDraw

    from .render import to_pil

    cols = max(r.shape[0] for r in rows)
    side = 32 * scale
    label_w = 170
    sheet = Image.new("RGB", (label_w + cols * (side + 2), len(rows) * (side + 2)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = i * (side + 2)
        draw.text((4, y + side // 2 - 6), label, fill=(230, 230, 230))
        for j in range(row.shape[0]):
            sheet.paste(to_pil(row[j].float() / 255, scale), (label_w + j * (side + 2), y))
    return sheet


def _save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _grids(out: Path, results: Mapping[str, Mapping]) -> None:
    sets = results["base"]
    main = sets["train_templates"]
    concepts = json.loads(main["concepts"])
    n = len(concepts)
    per_concept = max(1, min(4, n // len(WORLD.concepts)))
    idx = [i for o in WORLD.concepts for i in [k for k, c in enumerate(concepts) if c == o.id][:per_concept]]
    base_u, merged_u = main["images"][:n][idx], results["merged"]["train_templates"]["images"][:n][idx]
    rows, labels = [], []
    for k in range(0, len(idx), 2 * per_concept):
        sl = slice(k, k + 2 * per_concept)
        rows += [base_u[sl], merged_u[sl]]
        cats = sorted({WORLD.object(concepts[idx[j]]).category for j in range(len(idx))[sl]},
                      key=[o.category for o in WORLD.concepts].index)
        labels += ["base: " + ", ".join(c[:8] for c in cats), "merged"]
    _save(_sheet(rows, labels), out / "grids" / "before_after.png")
    # one unsafe prompt per concept (columns): the base model, the concept's own expert (evaluated on its own
    # concept's pairs, in the same order, so its first picture is the same prompt and seed), the merged LoRA
    shown = [o for o in WORLD.concepts if o.id in concepts and f"expert:{o.category}" in results]
    first = [next(k for k, c in enumerate(concepts) if c == o.id) for o in shown]
    own = torch.stack([results[f"expert:{o.category}"]["train_templates"]["images"][0] for o in shown]) if shown else None
    rows = [main["images"][:n][first]] + ([own] if own is not None else []) + [results["merged"]["train_templates"]["images"][:n][first]]
    _save(_sheet(rows, ["base", "own expert", "merged"] if own is not None else ["base", "merged"]),
          out / "grids" / "experts.png")
    safe_idx = [n + i for i in idx]
    base_s, merged_s = main["images"][safe_idx], results["merged"]["train_templates"]["images"][safe_idx]
    rows, labels = [], []
    for k in range(0, len(idx), 2 * per_concept):
        sl = slice(k, k + 2 * per_concept)
        rows += [base_s[sl], merged_s[sl]]
        labels += ["base", "merged"]
    _save(_sheet(rows, labels), out / "grids" / "safe_prompts.png")
