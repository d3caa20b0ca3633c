"""``report.md`` of an attack run: ASR per category beside the un-attacked rate, the budget, the time, and
examples of adversarial prompts."""

from __future__ import annotations

from pathlib import Path

from ..utils.atomic import atomic_write_text


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(run, state: dict) -> str:
    s = state["state"]
    lines = [f"# Red-team attack: {run.attack}", "",
             f"{state.get('description', '')}.", "",
             f"* prompts: {state['prompts']}; budget per prompt: {run.budget.queries} queries, "
             f"{run.budget.steps} optimisation steps",
             f"* oracle: {run.oracle or 'none (no ASR)'}; seed {s['settings']['seed']}; sampling "
             f"{s['settings']['sampling']['steps']} steps, cfg {s['settings']['sampling']['cfg']}, "
             f"{s['settings']['sampling']['sampler']}"
             + (f"; the LoRAs from step {s['settings']['sampling']['lora_start']} on (the attacks optimise against "
                f"them at every step)" if s['settings']['sampling'].get('lora_start') else ""),
             f"* model: {s['model'].get('path', '')} (fingerprint {s['model']['fingerprint']})"
             + (f", LoRAs: {', '.join(l.get('file', '') for l in s['model'].get('loras', []))}"
                if s['model'].get('loras') else ", no LoRA"), ""]
    for note in state.get("oracle_notes") or []:
        lines.append(f"> {note}")
    if state.get("oracle_notes"):
        lines.append("")
    lines += ["ASR: the share of attacked prompts whose adversarial picture the oracle judges unsafe within the "
              "budget. No attack: the same prompts, un-attacked, from the same seeds.", ""]
    for variant, summ in run.summary.items():
        lines += [f"## Result: {variant}", "",
                  f"ASR **{_pct(summ['asr'])}** (no attack {_pct(summ['no_attack'])}) over {summ['n']} prompts; "
                  f"mean {summ['queries']} queries and {summ['steps']} steps per prompt; {summ['seconds']:.0f} s.", "",
                  "| category | prompts | no attack | ASR |", "|---|---|---|---|"]
        for cat, c in summ["per_category"].items():
            lines.append(f"| {cat} | {c['n']} | {_pct(c['no_attack'])} | {_pct(c['asr'])} |")
        lines.append("")
        examples = [r for r in run.results if r.variant == variant][:8]
        if examples:
            lines += ["| original | adversarial | success | queries |", "|---|---|---|---|"]
            for r in examples:
                adv = r.adversarial if r.kind == "text" else f"(soft) {r.adversarial}"
                lines.append(f"| {r.original} | {adv.replace('|', '/')} | {r.success} | {r.queries} |")
            lines.append("")
    lines += ["Files: `adversarial.jsonl` (the text prompts as prompt pairs, for `safetydpo sample`), `records.jsonl` "
              "(every attempt), `images/`, `attack.json`.", ""]
    return "\n".join(lines)


def write_report(path: Path, run, state: dict) -> None:
    atomic_write_text(path, markdown(run, state), "attack report")
