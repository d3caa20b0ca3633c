"""Prompt sets shipped with the pack, loadable by name wherever a prompt file is taken (``--prompts neutral``).

``neutral``: 320 everyday captions written for this pack (not taken from COCO or any other dataset), 64
each of people, animals, objects, scenes and art styles (paintings, prints, crafts and photographic
styles), with nothing in them that any safety category concerns. They measure what an aligned model does
to content that has nothing to do with safety: render them with the LoRA at strengths 0 and 1
(``safetydpo sample --prompts neutral --lora X --strength 0 1``), then ``safetydpo eval`` reports
preservation (PSNR, SSIM, mean absolute difference of same-seed pairs) and FID/KID of the aligned images
against the base model's. The rows of ``neutral_prompts.csv`` (``id,prompt,topic``) interleave the five
topics, so the first N prompts (``--limit N``) cover all of them.

``neutral-train``: 160 more everyday captions of the same five topics (32 each, ``neutral_train_prompts.csv``),
disjoint from ``neutral``: the trainer's output-preservation term (:mod:`..training.preservation`) trains on
these, so that evaluating on ``neutral`` measures preservation on prompts the expert never saw.

:func:`load_prompt_set` gives a set's captions as strings; :func:`resolve_prompt_source` lets every prompt-file
argument take a set's name.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DatasetError

_HERE = Path(__file__).resolve().parent
PROMPT_SETS = {
    "neutral": _HERE / "neutral_prompts.csv",
    "neutral-train": _HERE / "neutral_train_prompts.csv",
}


def prompt_set_names() -> list[str]:
    return sorted(PROMPT_SETS)


def prompt_set_path(name: str) -> Path:
    """The CSV file of a built-in prompt set; :class:`DatasetError` naming the set for an unknown name."""
    key = str(name).strip().lower()
    if key not in PROMPT_SETS:
        raise DatasetError(f"{name!r} is not a prompt file and not a built-in prompt set; the built-in sets are: "
                           f"{', '.join(prompt_set_names())}.")
    return PROMPT_SETS[key]


def resolve_prompt_source(value: str | os.PathLike) -> Path:
    """An existing prompt file as it is, else the built-in set of that name. A name that is neither (no such
    file, no such set) is a :class:`DatasetError` that names it and lists the built-in sets."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    key = str(value).strip().lower()
    if key in PROMPT_SETS:
        return PROMPT_SETS[key]
    if p.exists():
        raise DatasetError(f"The prompt file {p} is a folder; give a .csv or .jsonl file, or a built-in prompt set "
                           f"({', '.join(prompt_set_names())}).")
    raise DatasetError(f"The prompt file {p} does not exist, and {str(value)!r} is not a built-in prompt set (built-in: "
                       f"{', '.join(prompt_set_names())}).")


def load_prompt_set(name: str) -> list[str]:
    """The captions of a built-in prompt set, in file order; :class:`DatasetError` for an unknown name."""
    path = prompt_set_path(name)
    with open(path, encoding="utf-8", newline="") as f:
        return [row["prompt"].strip() for row in csv.DictReader(f) if row.get("prompt", "").strip()]
