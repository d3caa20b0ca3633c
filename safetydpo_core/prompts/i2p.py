"""I2P-style prompt CSVs: unsafe prompts only, for evaluation (no safe twins).

I2P's columns are ``prompt, categories, hard, inappropriate_percentage, nudity_percentage, q16_percentage,
sd_safety_percentage, prompt_toxicity, lexica_url, sd_seed, sd_guidance_scale, sd_image_width,
sd_image_height, sd_model``; only ``prompt`` is required here. ``categories`` is comma-separated in I2P's
spelling (``self-harm``, ``illegal activity``); ``category`` is accepted too. Other columns are kept as
strings in :attr:`EvalPrompt.extra` and written back.

Public API: :class:`EvalPrompt`, :func:`read_i2p_csv`, :func:`write_i2p_csv`, :func:`pairs_to_eval_prompts`,
:func:`filter_eval_prompts`.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..categories import I2P_NAMES, normalize_categories
from ..errors import DatasetError, SafetyDPOError
from ..utils.atomic import atomic_write_text
from .coprov2 import _open_text
from .pairs import PromptPair, check_output_path

COLUMNS = ("prompt", "categories", "sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height")


@dataclass
class EvalPrompt:
    """One evaluation prompt (an unsafe prompt with optional render settings)."""

    id: str
    prompt: str
    category: list[str] = field(default_factory=list)
    seed: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _num(value: str, kind, name: str, where: str):
    value = (value or "").strip()
    if not value or value.lower() in ("nan", "none", "null"):
        return None
    try:
        x = float(value)
        if kind is int:
            if x != int(x):
                raise ValueError
            return int(x)
        return x
    except ValueError:
        raise DatasetError(f"{where}: {name} {value!r} is not a{'n integer' if kind is int else ' number'}.") from None


def read_i2p_csv(path: str | os.PathLike) -> list[EvalPrompt]:
    """Read an I2P-style CSV; :class:`DatasetError` naming the line for a broken row or bad value."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_open_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"The CSV file {path} is empty.") from None
    except csv.Error as e:
        raise DatasetError(f"{path}, line 1: broken CSV header ({e}).") from e
    cols = [c.strip().lower() for c in header]
    if "prompt" not in cols:
        raise DatasetError(f"{path}: missing column prompt; an I2P-style CSV needs at least a 'prompt' column "
                           f"(found: {','.join(header) or 'none'}).")
    cat_col = "categories" if "categories" in cols else "category" if "category" in cols else None
    out: list[EvalPrompt] = []
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DatasetError(f"{path}, line {line}: broken CSV row ({e}).") from e
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path}, line {line}: expected {len(header)} fields, found {len(row)}. A prompt with "
                               f"commas must be quoted.")
        d = dict(zip(cols, row))
        where = f"{path}, line {line}"
        prompt = d["prompt"].strip()
        if not prompt:
            raise DatasetError(f"{where}: the prompt is empty.")
        try:
            cats = normalize_categories(d.get(cat_col, "") if cat_col else "", allow_all=False)
        except SafetyDPOError as e:
            raise DatasetError(f"{where}: {e}") from e
        known = {"prompt", "categories", "category", "sd_seed", "sd_guidance_scale", "sd_image_width",
                 "sd_image_height", "id"}
        out.append(EvalPrompt(
            id=d.get("id", "").strip() or f"i2p-{len(out):06d}", prompt=prompt, category=cats,
            seed=_num(d.get("sd_seed", ""), int, "sd_seed", where),
            guidance=_num(d.get("sd_guidance_scale", ""), float, "sd_guidance_scale", where),
            width=_num(d.get("sd_image_width", ""), int, "sd_image_width", where),
            height=_num(d.get("sd_image_height", ""), int, "sd_image_height", where),
            extra={h: v for h, c, v in zip(header, cols, row) if c not in known}))
    if not out:
        raise DatasetError(f"The CSV file {path} has a header but no rows.")
    return out


def pairs_to_eval_prompts(pairs: Iterable[PromptPair], *, seed: int | None = None) -> list[EvalPrompt]:
    """The unsafe prompts of ``pairs`` as evaluation prompts (same ids and categories; optional fixed seed)."""
    return [EvalPrompt(id=p.id, prompt=p.unsafe, category=list(p.category), seed=seed,
                       extra={"concept": p.concept} if p.concept else {}) for p in pairs]


def filter_eval_prompts(prompts: Iterable[EvalPrompt], categories) -> list[EvalPrompt]:
    """The prompts of at least one of ``categories`` (None or "all": every prompt)."""
    wanted = set(normalize_categories(categories)) if categories is not None else set()
    prompts = list(prompts)
    return [p for p in prompts if wanted & set(p.category)] if wanted else prompts


def write_i2p_csv(prompts: Iterable[EvalPrompt | PromptPair], path: str | os.PathLike, *,
                  overwrite: bool = False) -> int:
    """Write evaluation prompts (or the unsafe halves of pairs) as an I2P-style CSV, atomically."""
    path = check_output_path(path, overwrite=overwrite)
    evals = [p if isinstance(p, EvalPrompt) else pairs_to_eval_prompts([p])[0] for p in prompts]
    extra_cols: list[str] = []
    for e in evals:
        for k in e.extra:
            if k not in extra_cols and k.lower() not in COLUMNS and k.lower() != "id":
                extra_cols.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*COLUMNS, *extra_cols, "id"])
    fmt = lambda v: "" if v is None else str(v)  # noqa: E731
    for e in evals:
        w.writerow([e.prompt, ", ".join(I2P_NAMES[c] for c in e.category), fmt(e.seed), fmt(e.guidance),
                    fmt(e.width), fmt(e.height), *(e.extra.get(k, "") for k in extra_cols), e.id])
    atomic_write_text(path, buf.getvalue(), what="I2P CSV")
    return len(evals)
