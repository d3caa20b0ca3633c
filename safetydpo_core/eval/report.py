"""Evaluation reports: per-category tables, comparisons between runs, and the files a user reads.

From per-image rows (:mod:`.evaluate`), :func:`summarize` computes for each group (a run, or a variant of a
run such as a LoRA strength) and each category (plus ``all``): the number of images, IP in the SafetyDPO
and the I2P setting with a 95% Wilson interval, the rates of each detector, and the CLIPScore means.
:func:`compare` sets every group against a baseline group (the first, e.g. the base model): the change of
IP, and over images that match by prompt id and seed, how many turned from unsafe to safe and back.

:func:`write_report` writes into a folder: ``per_image.csv``, ``summary.csv``, ``comparison.csv`` (with
two or more groups), ``report.md``, ``report.json`` and ``ip_by_category.png``; with preservation or FID/KID
measured (:mod:`.quality`), also ``quality.csv`` (one row per group) and ``preservation.csv`` (one row per pair).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

from ..categories import CATEGORIES, DISPLAY_NAMES
from ..utils.atomic import atomic_path, atomic_write_text
from .nudenet import SETTINGS as NUDENET_SETTINGS

IP_SETTINGS = tuple(NUDENET_SETTINGS)  # ("safetydpo", "i2p")
SETTING_TITLES = {"safetydpo": "SafetyDPO setting", "i2p": "I2P setting"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclasses.dataclass
class SummaryRow:
    group: str
    category: str
    n: int
    unsafe: dict[str, int]
    ip: dict[str, float]
    ip_ci: dict[str, tuple[float, float]]
    nudenet: dict[str, float | None]
    q16: float | None
    clipscore: float | None
    clip_s: float | None

    def flat(self) -> dict:
        d = {"group": self.group, "category": self.category, "n": self.n}
        for s in IP_SETTINGS:
            d[f"ip_{s}"] = self.ip[s]
            d[f"ip_{s}_low"], d[f"ip_{s}_high"] = self.ip_ci[s]
            d[f"unsafe_{s}"] = self.unsafe[s]
        for s in IP_SETTINGS:
            d[f"nudenet_{s}"] = self.nudenet[s]
        d.update({"q16": self.q16, "clipscore": self.clipscore, "clip_s": self.clip_s})
        return d


def categories_of(rows: Sequence[dict]) -> list[str]:
    present = {c for r in rows for c in r.get("categories") or []}
    return ["all"] + [c for c in CATEGORIES if c in present]


def _in(row: dict, category: str) -> bool:
    return category == "all" or category in (row.get("categories") or [])


def summarize(rows: Sequence[dict], groups: Sequence[str]) -> list[SummaryRow]:
    out = []
    for g in groups:
        mine = [r for r in rows if r["group"] == g]
        for cat in categories_of(rows):
            sel = [r for r in mine if _in(r, cat)]
            n = len(sel)
            if n == 0:
                continue
            unsafe = {s: sum(bool(r[f"unsafe_{s}"]) for r in sel) for s in IP_SETTINGS}
            nud = {s: (_mean([float(bool(r[f"nudenet_{s}"])) for r in sel]) if sel[0].get(f"nudenet_{s}") is not None
                       else None) for s in IP_SETTINGS}
            q16 = _mean([float(bool(r["q16"])) for r in sel]) if sel[0].get("q16") is not None else None
            cos = [r["clip_cos"] for r in sel if r.get("clip_cos") is not None]
            out.append(SummaryRow(
                group=g, category=cat, n=n, unsafe=unsafe, ip={s: unsafe[s] / n for s in IP_SETTINGS},
                ip_ci={s: wilson(unsafe[s], n) for s in IP_SETTINGS}, nudenet=nud, q16=q16,
                clipscore=_mean([100.0 * c for c in cos]), clip_s=_mean([2.5 * max(c, 0.0) for c in cos])))
    return out


@dataclasses.dataclass
class ComparisonRow:
    group: str
    baseline: str
    category: str
    setting: str
    ip_baseline: float
    ip: float
    delta: float
    relative_change: float | None     # (ip - ip_baseline) / ip_baseline
    paired: int                        # images matched by (id, seed)
    fixed: int                         # unsafe in the baseline, safe here
    broken: int                        # safe in the baseline, unsafe here

    def flat(self) -> dict:
        return dataclasses.asdict(self)


def compare(rows: Sequence[dict], groups: Sequence[str], baseline: str | None = None) -> list[ComparisonRow]:
    if len(groups) < 2:
        return []
    base = baseline or groups[0]
    summary = {(s.group, s.category): s for s in summarize(rows, groups)}
    by_key: dict[str, dict[tuple, dict]] = {g: {} for g in groups}
    for r in rows:
        by_key[r["group"]][(r["id"], r["seed"])] = r
    out = []
    for g in groups:
        if g == base:
            continue
        for cat in categories_of(rows):
            a, b = summary.get((base, cat)), summary.get((g, cat))
            if a is None or b is None:
                continue
            keys = [k for k, r in by_key[g].items() if _in(r, cat) and k in by_key[base]]
            for s in IP_SETTINGS:
                fixed = sum(1 for k in keys if by_key[base][k][f"unsafe_{s}"] and not by_key[g][k][f"unsafe_{s}"])
                broken = sum(1 for k in keys if not by_key[base][k][f"unsafe_{s}"] and by_key[g][k][f"unsafe_{s}"])
                rel = (b.ip[s] - a.ip[s]) / a.ip[s] if a.ip[s] > 0 else None
                out.append(ComparisonRow(g, base, cat, s, a.ip[s], b.ip[s], b.ip[s] - a.ip[s], rel, len(keys), fixed,
                                         broken))
    return out


# -- writers -------------------------------------------------------------------------------------------
def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


PER_IMAGE_COLUMNS = ("group", "run", "variant", "file", "id", "seed", "guidance", "categories", "prompt", "lora",
                     "strength", "nudenet_detections", "nudenet_safetydpo", "nudenet_i2p", "q16", "q16_p",
                     "unsafe_safetydpo", "unsafe_i2p", "clip_cos")


QUALITY_COLUMNS = ("group", "baseline", "pairs", "identical", "unpaired", "psnr", "ssim", "mad", "against", "n",
                   "n_against", "fid", "kid", "kid_std", "kid_subsets", "kid_subset_size")
PAIR_COLUMNS = ("group", "baseline", "id", "seed", "image", "baseline_image", "psnr", "ssim", "mad", "identical")


def per_image_csv(rows: Sequence[dict]) -> str:
    flat = []
    for r in rows:
        d = dict(r)
        d["categories"] = ",".join(r.get("categories") or [])
        dets = r.get("nudenet")
        d["nudenet_detections"] = "" if dets is None else ";".join(f"{x['class']}:{x['score']:.3f}" for x in dets)
        flat.append(d)
    return _csv(flat, PER_IMAGE_COLUMNS)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cat_name(c: str) -> str:
    return "All" if c == "all" else DISPLAY_NAMES.get(c, c)


def markdown(result, summary: Sequence[SummaryRow], comparison: Sequence[ComparisonRow]) -> str:
    info = result.info
    groups = result.groups
    cats = [c for c in categories_of(result.rows)]
    cell = {(s.group, s.category): s for s in summary}
    lines = ["# Safety evaluation", ""]
    lines.append("Runs: " + "; ".join(f"`{r['name']}` ({r['images']} images, {r['root']})" for r in result.runs))
    lines.append("")
    lines.append("## Detectors")
    lines.append("")
    if "nudenet" in info:
        n = info["nudenet"]
        lines.append(f"* **NudeNet** {n['version']} (onnxruntime {n['onnxruntime']}), model `{n['model']}` "
                     f"(sha256 `{n['model_sha256'][:16]}…`), input {n['resolution']} px, detector minimum score "
                     f"{n['min_score']}.")
        for name, s in n["settings"].items():
            lines.append(f"  * {SETTING_TITLES.get(name, name)}: {', '.join(s['classes'])}; threshold {s['threshold']}.")
    else:
        lines.append("* **NudeNet**: not run.")
    if "q16" in info:
        q = info["q16"]
        lines.append(f"* **Q16**: CLIP `{q['clip']['path']}` (embedding dim {q['clip']['embed_dim']}), prompt embeddings "
                     f"`{q['embeddings']}`; {q['rule']}.")
    else:
        lines.append("* **Q16**: not run.")
    if "clipscore" in info:
        c = info["clipscore"]
        lines.append(f"* **CLIPScore**: CLIP `{c['clip']['path']}`; clipscore = {c['clipscore']}; clip_s = {c['clip_s']}.")
    else:
        lines.append("* **CLIPScore**: not run.")
    lines.append(f"* IP: {info['ip_rule']}; 95% Wilson intervals in brackets.")
    if info.get("notes"):
        lines.append("")
        lines.extend(f"> {note}" for note in info["notes"])
    for s in IP_SETTINGS:
        lines += ["", f"## Inappropriate Probability — {SETTING_TITLES[s]}", ""]
        head = ["Category", "n"] + list(groups) + [f"Δ {g}" for g in groups[1:]]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for c in cats:
            ns = sorted({cell[(g, c)].n for g in groups if (g, c) in cell})
            row = [_cat_name(c), "/".join(str(n) for n in ns)]
            for g in groups:
                r = cell.get((g, c))
                row.append("—" if r is None else f"{_fmt(r.ip[s])} [{_fmt(r.ip_ci[s][0], 2)}, {_fmt(r.ip_ci[s][1], 2)}]")
            for g in groups[1:]:
                a, b = cell.get((groups[0], c)), cell.get((g, c))
                row.append("—" if a is None or b is None else f"{b.ip[s] - a.ip[s]:+.3f}")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Detector rates", "", "| Group | Category | n | NudeNet (SafetyDPO) | NudeNet (I2P) | Q16 |",
              "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r.group} | {_cat_name(r.category)} | {r.n} | {_fmt(r.nudenet['safetydpo'])} | "
                     f"{_fmt(r.nudenet['i2p'])} | {_fmt(r.q16)} |")
    if "clipscore" in info:
        lines += ["", "## CLIPScore", "", "| Group | Category | n | CLIPScore (100·cos) | CLIP-S (2.5·max(cos,0)) |",
                  "|---|---|---|---|---|"]
        for r in summary:
            lines.append(f"| {r.group} | {_cat_name(r.category)} | {r.n} | {_fmt(r.clipscore, 2)} | {_fmt(r.clip_s, 4)} |")
    if comparison:
        lines += ["", f"## Comparison with `{comparison[0].baseline}`", "",
                  "Paired: images with the same prompt id and seed in both groups. Fixed: unsafe in the baseline, "
                  "safe here. Broken: the reverse.", "",
                  "| Group | Category | Setting | IP baseline | IP | Δ | relative | paired | fixed | broken |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in comparison:
            rel = "—" if c.relative_change is None else f"{100 * c.relative_change:+.1f}%"
            lines.append(f"| {c.group} | {_cat_name(c.category)} | {SETTING_TITLES[c.setting]} | {_fmt(c.ip_baseline)} | "
                         f"{_fmt(c.ip)} | {c.delta:+.3f} | {rel} | {c.paired} | {c.fixed} | {c.broken} |")
    if getattr(result, "quality", None) is not None:
        lines += quality_markdown(result.quality)
    lines.append("")
    return "\n".join(lines)


def _fmt_sig(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def quality_markdown(q) -> list[str]:
    """The report section of :class:`~.quality.QualityResult`: preservation and FID/KID per group."""
    from .similarity import DEFINITIONS

    lines = ["", f"## Preservation and FID/KID against `{q.baseline}`" if q.against == q.baseline else
             "## Preservation and FID/KID", ""]
    if q.preservation:
        lines += [f"Preservation: each picture against `{q.baseline}`'s picture of the same prompt id and seed. PSNR in "
                  f"dB (higher = closer; pixel-identical pairs are counted apart and left out of the mean), SSIM (1 = "
                  f"identical; {DEFINITIONS['ssim']}), MAD = mean absolute difference in 8-bit levels (0 = identical).",
                  "", "| Group | pairs | identical | unpaired | PSNR (dB) | SSIM | MAD |", "|---|---|---|---|---|---|---|"]
        for r in q.preservation:
            psnr = "∞ (all identical)" if r.psnr is None and r.pairs else _fmt(r.psnr, 2)
            lines.append(f"| {r.group} | {r.pairs} | {r.identical} | {r.unpaired} | {psnr} | {_fmt(r.ssim, 4)} | "
                         f"{_fmt(r.mad, 2)} |")
        lines.append("")
    if q.distribution:
        against = (f"the reference folder `{q.reference['path']}` ({q.reference['images']} pictures; sizes "
                   f"{', '.join(q.reference['sizes'])})" if q.reference else f"`{q.baseline}`")
        inc = q.inception or {}
        lines += [f"FID and KID against {against}, on Inception-v3 pool3 features (2048-d; weights `{inc.get('path')}`, "
                  f"sha256 `{str(inc.get('sha256', ''))[:16]}…`; resize: {inc.get('resize')}). FID: Fréchet distance of "
                  f"Gaussians fitted to the two feature sets (0 = same statistics). KID: unbiased squared MMD with the "
                  f"kernel (x·y/2048 + 1)³, mean ± std over random subsets (≈0 for one distribution; can be slightly "
                  f"negative).", "", f"| Group | n | n {'reference' if q.reference else q.baseline} | FID | KID | KID std | "
                                     f"subsets × size |",
                  "|---|---|---|---|---|---|---|"]
        for r in q.distribution:
            lines.append(f"| {r.group} | {r.n} | {r.n_against} | {_fmt(r.fid, 2)} | {_fmt_sig(r.kid)} | "
                         f"{_fmt_sig(r.kid_std)} | {r.kid_subsets} × {r.kid_subset_size} |")
        lines.append("")
    if q.notes:
        lines.extend(f"> {note}" for note in q.notes)
    return lines


# -- chart ---------------------------------------------------------------------------------------------
PALETTE = ((76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96),
           (218, 139, 195), (140, 140, 140))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def chart(summary: Sequence[SummaryRow], groups: Sequence[str], path: str | os.PathLike) -> Path:
    """Save :func:`chart_image` as a PNG, atomically."""
    img = chart_image(summary, groups)
    path = Path(path)
    with atomic_path(path, "chart") as tmp:
        img.save(tmp, format="PNG")
    return path


def chart_image(summary: Sequence[SummaryRow], groups: Sequence[str]):
    """A PIL image with one panel per IP setting: grouped bars of IP per category (95% intervals as lines), one
    colour per group."""
    from PIL import Image, ImageDraw

    cats = list(dict.fromkeys(r.category for r in summary))
    cell = {(r.group, r.category): r for r in summary}
    bar_w, left, right, top, panel_h, bottom = 20, 60, 20, 60, 260, 60
    group_w = bar_w * len(groups)
    slot = max(group_w + 24, 92)
    width = max(420, left + right + len(cats) * slot)
    legend_h = 24 * ((len(groups) + 2) // 3)
    height = top + len(IP_SETTINGS) * (panel_h + bottom) + legend_h + 10
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    title, small, tiny = _font(18), _font(13), _font(11)
    d.text((left, 14), "Inappropriate Probability by category (bars: IP; lines: 95% interval)", fill="black", font=small)
    top_value = max([r.ip_ci[s][1] for r in summary for s in IP_SETTINGS if not math.isnan(r.ip_ci[s][1])] + [0.0])
    ymax = next(v for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0) if v >= top_value - 1e-9)
    for pi, s in enumerate(IP_SETTINGS):
        y0 = top + pi * (panel_h + bottom) + 20
        y1 = y0 + panel_h - 20
        d.text((left, y0 - 24), SETTING_TITLES[s], fill="black", font=title)
        for t in range(0, 6):
            v = ymax * t / 5
            y = y1 - (y1 - y0) * t / 5
            d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
            d.text((10, y - 7), f"{v:.2f}", fill=(90, 90, 90), font=tiny)
        d.line([(left, y0), (left, y1), (width - right, y1)], fill="black")
        for ci, c in enumerate(cats):
            x0 = left + ci * slot + (slot - group_w) / 2
            for gi, g in enumerate(groups):
                r = cell.get((g, c))
                if r is None:
                    continue
                h = (y1 - y0) * r.ip[s] / ymax
                xa = x0 + gi * bar_w
                d.rectangle([xa, y1 - h, xa + bar_w - 3, y1], fill=PALETTE[gi % len(PALETTE)])
                lo, hi = r.ip_ci[s]
                if not math.isnan(lo):
                    xm = xa + (bar_w - 3) / 2
                    d.line([(xm, y1 - (y1 - y0) * lo / ymax), (xm, y1 - (y1 - y0) * hi / ymax)], fill=(40, 40, 40))
            label = _cat_name(c)
            tw = d.textlength(label, font=tiny)
            d.text((left + ci * slot + slot / 2 - tw / 2, y1 + 6), label, fill="black", font=tiny)
    ly = height - legend_h - 4
    for gi, g in enumerate(groups):
        lx = left + (gi % 3) * ((width - left) // 3)
        yy = ly + (gi // 3) * 24
        d.rectangle([lx, yy + 3, lx + 14, yy + 17], fill=PALETTE[gi % len(PALETTE)])
        d.text((lx + 20, yy + 2), g[:40], fill="black", font=small)
    return img


def write_report(result, out: str | os.PathLike, baseline: str | None = None, settings: dict | None = None) -> dict:
    """Write every report file into ``out``; returns ``{name: path}``. ``baseline`` (default: the first group)
    is what the other groups are compared with."""
    out = Path(out)
    quality = getattr(result, "quality", None)
    if baseline is not None:
        from ..errors import ConfigError

        if baseline not in result.groups:
            raise ConfigError(f"The baseline {baseline!r} is not one of the evaluated groups: {', '.join(result.groups)}.")
        if quality is not None and quality.baseline != baseline:
            raise ConfigError(f"Preservation and FID/KID were measured against {quality.baseline!r}, not {baseline!r}; "
                              f"evaluate again with that baseline.")
        result.groups = [baseline] + [g for g in result.groups if g != baseline]
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result.rows, result.groups)
    comparison = compare(result.rows, result.groups)
    files = {}
    files["per_image_csv"] = out / "per_image.csv"
    atomic_write_text(files["per_image_csv"], per_image_csv(result.rows), "per-image results")
    files["summary_csv"] = out / "summary.csv"
    flat = [s.flat() for s in summary]
    atomic_write_text(files["summary_csv"], _csv(flat, list(flat[0]) if flat else ["group"]), "summary table")
    if comparison:
        files["comparison_csv"] = out / "comparison.csv"
        cflat = [c.flat() for c in comparison]
        atomic_write_text(files["comparison_csv"], _csv(cflat, list(cflat[0])), "comparison table")
    if quality is not None:
        qrows = [r.flat() for r in quality.preservation]
        drows = {r.group: r.flat() for r in quality.distribution}
        merged = []
        for g in result.groups:
            p = next((r for r in qrows if r["group"] == g), None)
            d = drows.get(g)
            if p is None and d is None:
                continue
            merged.append({"group": g, "baseline": quality.baseline, "against": d["against"] if d else "",
                           **{k: (p or {}).get(k) for k in ("pairs", "identical", "unpaired", "psnr", "ssim", "mad")},
                           **{k: (d or {}).get(k) for k in ("n", "n_against", "fid", "kid", "kid_std", "kid_subsets",
                                                             "kid_subset_size")}})
        files["quality_csv"] = out / "quality.csv"
        atomic_write_text(files["quality_csv"], _csv(merged, QUALITY_COLUMNS), "quality table")
        if quality.pairs:
            files["preservation_csv"] = out / "preservation.csv"
            atomic_write_text(files["preservation_csv"], _csv(quality.pairs, PAIR_COLUMNS), "per-pair preservation")
    for stale in ("comparison.csv", "quality.csv", "preservation.csv"):  # of an earlier evaluation in this folder
        if (out / stale) not in files.values():
            (out / stale).unlink(missing_ok=True)
    files["markdown"] = out / "report.md"
    atomic_write_text(files["markdown"], markdown(result, summary, comparison), "Markdown report")
    files["chart"] = chart(summary, result.groups, out / "ip_by_category.png")
    files["json"] = out / "report.json"
    payload = {**result.to_json(), "settings": settings or {}, "summary": flat,
               "comparison": [c.flat() for c in comparison]}
    atomic_write_text(files["json"], json.dumps(payload, indent=1, default=str) + "\n", "JSON report")
    return files
