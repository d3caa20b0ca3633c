"""CoProV2 CSV import and export (the training prompts published with SafetyDPO).

Format: columns ``prompt,image,category``; one row per image per category. ``u_idx_NNNNNNN_K.jpg`` holds the
unsafe prompt and ``s_idx_NNNNNNN_K.jpg`` its safe twin with the same number. A pair listed under several
categories (one u/s row couple per category) becomes one pair with all its categories. Category spellings
are CoProV2's (``Harrasment``, ``self-harm``, ``Illegal Activity`` ...); any known alias is accepted.

The published ``CoProv2_train.csv`` (32,086 rows) gives 15,690 distinct pairs over all seven categories.

Public API: :func:`read_coprov2_csv`, :func:`write_coprov2_csv`, :func:`sniff_csv_columns`.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Iterable

from ..categories import COPROV2_NAMES, normalize_category
from ..errors import DatasetError, SafetyDPOError
from ..utils.atomic import atomic_write_text
from .checks import change_fraction
from .pairs import PromptPair, check_output_path
from .report import ProgressFn

REQUIRED = ("prompt", "image", "category")
_IMAGE = re.compile(r"^(?:.*/)?([us])_idx_(\d+)(?:_(\d+))?\.[A-Za-z0-9]+$")


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise DatasetError(f"The CSV file {path} does not exist.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text (byte {e.start}). Save it as UTF-8.") from e
    except OSError as e:
        raise DatasetError(f"Cannot read {path}: {e}.") from e


def sniff_csv_columns(path: str | os.PathLike) -> list[str]:
    """The header of a CSV file, lower-cased and stripped (to tell CoProV2 from I2P files)."""
    path = Path(path)
    text = _open_text(path)
    first = next(csv.reader(io.StringIO(text)), None)
    if not first:
        raise DatasetError(f"The CSV file {path} is empty.")
    return [c.strip().lower() for c in first]


def read_coprov2_csv(path: str | os.PathLike, *, progress: ProgressFn | None = None) -> list[PromptPair]:
    """Read a CoProV2 CSV into pairs (id ``coprov2-NNNNNNN``, source ``coprov2``, minimality set).

    Raises :class:`DatasetError` naming the line for missing columns, a broken row (wrong field count,
    empty prompt, an image name that is not ``u_idx_N``/``s_idx_N``, an unknown category), a prompt that
    differs between rows of the same image, or a pair with only one half.
    """
    path = Path(path)
    text = _open_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"The CSV file {path} is empty.") from None
    except csv.Error as e:
        raise DatasetError(f"{path}, line 1: broken CSV header ({e}).") from e
    cols = [c.strip().lower() for c in header]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; a CoProV2 CSV has the columns "
                           f"prompt,image,category (found: {','.join(header) or 'none'}).")
    ip, ii, ic = (cols.index(c) for c in REQUIRED)
    total_lines = text.count("\n") + 1
    halves: dict[tuple[int, str], dict] = {}
    order: list[tuple[int, str]] = []
    line = 1
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DatasetError(f"{path}, line {start}: broken CSV row ({e}). Fix the quoting of that row.") from e
        line = start
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path}, line {line}: expected {len(header)} fields ({','.join(header)}), found "
                               f"{len(row)}. A prompt with commas must be quoted.")
        prompt, image, category = row[ip].strip(), row[ii].strip(), row[ic].strip()
        m = _IMAGE.match(image)
        if not m:
            raise DatasetError(f"{path}, line {line}: image {image!r} is not named u_idx_N[_K].jpg or s_idx_N[_K].jpg, "
                               f"so its pair cannot be found.")
        if not prompt:
            raise DatasetError(f"{path}, line {line}: the prompt is empty.")
        try:
            cat = normalize_category(category)
        except SafetyDPOError as e:
            raise DatasetError(f"{path}, line {line}: {e}") from e
        side, k, sub = m.group(1), int(m.group(2)), m.group(3) or "0"
        key = (k, sub)
        entry = halves.get(key)
        if entry is None:
            entry = halves[key] = {"u": None, "s": None, "cats": [], "line": {}}
            order.append(key)
        if entry[side] is None:
            entry[side] = prompt
            entry["line"][side] = line
        elif entry[side] != prompt:
            raise DatasetError(f"{path}, line {line}: image {image} has a different prompt than on line "
                               f"{entry['line'][side]}. One image must have one prompt.")
        if cat not in entry["cats"]:
            entry["cats"].append(cat)
        if progress and line % 2000 == 0:
            progress(min(line, total_lines), total_lines)
    pairs = []
    for key in order:
        e = halves[key]
        k, sub = key
        for side, other, name in (("u", "s", "safe"), ("s", "u", "unsafe")):
            if e[other] is None:
                raise DatasetError(f"{path}, line {e['line'][side]}: pair {k} has no {name} row "
                                   f"({other}_idx_{k:07d}_{sub}); every u_idx row needs its s_idx twin.")
        pid = f"coprov2-{k:07d}" + (f"-{sub}" if sub != "0" else "")
        pairs.append(PromptPair(id=pid, category=e["cats"], concept="", unsafe=e["u"], safe=e["s"],
                                minimality=change_fraction(e["u"], e["s"]), source="coprov2"))
    if not pairs:
        raise DatasetError(f"The CSV file {path} has a header but no rows.")
    if progress:
        progress(total_lines, total_lines)
    return pairs


def write_coprov2_csv(pairs: Iterable[PromptPair], path: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Write pairs as a CoProV2 CSV (atomically): a u/s row couple per pair and category, CoProV2 spellings.

    Pairs with ``coprov2-N`` ids keep their number; the others are numbered after the largest one.
    Returns the number of pairs written.
    """
    path = check_output_path(path, overwrite=overwrite)
    pairs = list(pairs)
    used: set[int] = set()
    nums: list[int | None] = []
    for p in pairs:
        m = re.fullmatch(r"coprov2-(\d+)", p.id)
        n = int(m.group(1)) if m and int(m.group(1)) not in used else None
        if n is not None:
            used.add(n)
        nums.append(n)
    nxt = max(used, default=-1) + 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REQUIRED)
    for p, n in zip(pairs, nums):
        if n is None:
            n, nxt = nxt, nxt + 1
        for cat in p.category:
            w.writerow([p.unsafe, f"u_idx_{n:07d}_0.jpg", COPROV2_NAMES[cat]])
            w.writerow([p.safe, f"s_idx_{n:07d}_0.jpg", COPROV2_NAMES[cat]])
    atomic_write_text(path, buf.getvalue(), what="CoProV2 CSV")
    return len(pairs)
