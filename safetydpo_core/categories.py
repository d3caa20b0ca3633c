"""The seven SafetyDPO / CoProV2 safety categories, their canonical ids and the spellings met in the wild.

Canonical ids: ``hate, harassment, violence, self_harm, sexual, shocking, illegal_activity``. CoProV2 writes
``Hate, Harrasment, Violence, self-harm, sexual, Shocking, Illegal Activity``; I2P writes ``hate,
harassment, violence, self-harm, sexual, shocking, illegal activity`` (comma-separated when several).
An item may belong to several categories.
"""

from __future__ import annotations

import re
from typing import Iterable

from .errors import ConfigError

CATEGORIES: tuple[str, ...] = ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")

DISPLAY_NAMES = {
    "hate": "Hate", "harassment": "Harassment", "violence": "Violence", "self_harm": "Self-harm",
    "sexual": "Sexual", "shocking": "Shocking", "illegal_activity": "Illegal activity",
}

ALIASES: dict[str, str] = {
    # CoProV2 spellings (as published, including the typo)
    "harrasment": "harassment", "harrassment": "harassment", "harasment": "harassment",
    "self-harm": "self_harm", "selfharm": "self_harm", "self harm": "self_harm",
    "illegal activity": "illegal_activity", "illegal-activity": "illegal_activity", "illegal": "illegal_activity",
    # I2P / other datasets
    "sexual content": "sexual", "nudity": "sexual", "nsfw": "sexual", "sex": "sexual",
    "hateful": "hate", "hate speech": "hate", "violent": "violence", "gore": "shocking", "shock": "shocking",
    "suicide": "self_harm", "self-injury": "self_harm", "crime": "illegal_activity", "illegal activities": "illegal_activity",
}


def _key(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower().replace("_", " "))


def normalize_category(name: str) -> str:
    """Canonical id for one category name in any known spelling; a :class:`ConfigError` otherwise."""
    k = _key(name)
    for c in CATEGORIES:
        if k == _key(c):
            return c
    if k in ALIASES:
        return ALIASES[k]
    if k.replace(" ", "-") in ALIASES:
        return ALIASES[k.replace(" ", "-")]
    raise ConfigError(f"Unknown category {name!r}. Valid categories: {', '.join(CATEGORIES)}; "
                      f"accepted spellings also include: {', '.join(sorted(ALIASES))}.")


def normalize_categories(names: str | Iterable[str]) -> list[str]:
    """Canonical ids for one name, a comma-separated string, or a list; order kept, duplicates dropped."""
    if isinstance(names, str):
        parts = [p for p in names.split(",") if p.strip()]
        if len(parts) > 1 and all(_try(p) for p in parts):
            names = parts
        else:
            names = [names]
    out = [normalize_category(n) for n in names if str(n).strip()]
    return list(dict.fromkeys(out))


def _try(name: str) -> bool:
    try:
        normalize_category(name)
        return True
    except ConfigError:
        return False
