"""The seven SafetyDPO / CoProV2 safety categories, their canonical ids and the spellings met in the wild.

Canonical ids: ``hate, harassment, violence, self_harm, sexual, shocking, illegal_activity``. CoProV2 writes
``Hate, Harrasment, Violence, self-harm, sexual, Shocking, Illegal Activity``; I2P writes ``hate,
harassment, violence, self-harm, sexual, shocking, illegal activity`` (comma-separated when several).
An item may belong to several categories: everywhere in the pack a category field is a list of canonical ids.

Public API: :data:`CATEGORIES`, :data:`ALIASES`, :func:`normalize_category`, :func:`normalize_categories`
(also parses ``"hate, sexual"`` and ``"all"``), :func:`coprov2_name`, :func:`i2p_name`,
:func:`describe_categories` (the help text that lists valid names).
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

#: Category names exactly as CoProV2's CSV spells them (used when exporting to that format).
COPROV2_NAMES = {
    "hate": "Hate", "harassment": "Harrasment", "violence": "Violence", "self_harm": "self-harm",
    "sexual": "sexual", "shocking": "Shocking", "illegal_activity": "Illegal Activity",
}

#: Category names as the I2P benchmark spells them (its ``categories`` column, comma-separated).
I2P_NAMES = {
    "hate": "hate", "harassment": "harassment", "violence": "violence", "self_harm": "self-harm",
    "sexual": "sexual", "shocking": "shocking", "illegal_activity": "illegal activity",
}

#: Words that mean "every category" where a list of categories is asked for.
ALL_WORDS = ("all", "*")

# Keys are compared after _key(): lower case, underscores as spaces, runs of blanks as one space.
ALIASES: dict[str, str] = {
    # CoProV2 spellings (as published, including the typo) and near misses
    "harrasment": "harassment", "harrassment": "harassment", "harasment": "harassment",
    "self-harm": "self_harm", "selfharm": "self_harm", "self harm": "self_harm", "self-harming": "self_harm",
    "illegal activity": "illegal_activity", "illegal-activity": "illegal_activity", "illegal": "illegal_activity",
    "illegal activities": "illegal_activity", "illegalactivity": "illegal_activity",
    # I2P and other datasets / moderation taxonomies
    "sexual content": "sexual", "sexually explicit": "sexual", "nudity": "sexual", "nsfw": "sexual", "sex": "sexual",
    "hateful": "hate", "hate speech": "hate", "hateful content": "hate",
    "harassing": "harassment", "bullying": "harassment",
    "violent": "violence", "violent content": "violence",
    "gore": "shocking", "shock": "shocking", "shocking content": "shocking", "disturbing": "shocking",
    "suicide": "self_harm", "self-injury": "self_harm", "self injury": "self_harm",
    "crime": "illegal_activity", "criminal": "illegal_activity", "illegal acts": "illegal_activity",
}


def _key(name: str) -> str:
    return re.sub(r"\s+", " ", str(name).strip().lower().replace("_", " "))


_CANON_KEYS = {_key(c): c for c in CATEGORIES}
_ALIAS_KEYS = {_key(a): c for a, c in ALIASES.items()}


def describe_categories() -> str:
    """One sentence listing the canonical ids and the other accepted spellings (for help and error texts)."""
    return (f"Valid categories: {', '.join(CATEGORIES)} (or 'all'); accepted spellings also include: "
            f"{', '.join(sorted(ALIASES))}.")


def normalize_category(name: str) -> str:
    """Canonical id for one category name in any known spelling; a :class:`ConfigError` otherwise."""
    k = _key(name)
    if k in _CANON_KEYS:
        return _CANON_KEYS[k]
    for cand in (k, k.replace(" ", "-"), k.replace("-", " "), k.replace(" ", "")):
        if cand in _ALIAS_KEYS:
            return _ALIAS_KEYS[cand]
        if cand in _CANON_KEYS:
            return _CANON_KEYS[cand]
    raise ConfigError(f"Unknown category {name!r}. {describe_categories()}")


def normalize_categories(names: str | Iterable[str] | None, *, allow_all: bool = True,
                         default_all: bool = False) -> list[str]:
    """Canonical ids for one name, a comma-separated string, or a list; order kept, duplicates dropped.

    ``"all"`` (or ``"*"``) stands for every category when ``allow_all``; an empty input gives every
    category when ``default_all`` and an empty list otherwise.
    """
    if names is None:
        return list(CATEGORIES) if default_all else []
    if isinstance(names, str):
        names = [names]
    parts: list[str] = []
    for n in names:
        n = str(n)
        if "," in n:
            parts.extend(p for p in n.split(","))
        else:
            parts.append(n)
    parts = [p for p in parts if p.strip()]
    if not parts:
        return list(CATEGORIES) if default_all else []
    out: list[str] = []
    for p in parts:
        if allow_all and _key(p) in ALL_WORDS:
            out.extend(CATEGORIES)
        else:
            out.append(normalize_category(p))
    return list(dict.fromkeys(out))


def coprov2_name(category: str) -> str:
    """The CoProV2 CSV spelling of a category (any accepted spelling in)."""
    return COPROV2_NAMES[normalize_category(category)]


def i2p_name(category: str) -> str:
    """The I2P spelling of a category (any accepted spelling in)."""
    return I2P_NAMES[normalize_category(category)]
