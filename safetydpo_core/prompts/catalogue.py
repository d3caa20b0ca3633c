"""The concept catalogue: unsafe concepts per category, their synonyms, and the phrases and scene templates the
built-in writer combines into prompt pairs. The LLM writers use it for the concepts to ask about.

The built-in catalogue is ``builtin_catalogue.json`` beside this module (written for this project, not
taken from CoProV2; at least 15 concepts per category). Users add concepts, or synonyms and phrases for existing concepts, from
a file:

* JSON: ``{"concepts": [...]}`` or a plain list; each concept is an object with ``category`` (a name or a
  list), ``concept``, and optionally ``synonyms``, ``unsafe``, ``safe`` (lists of phrases) and ``slot``
  (``"thing"``, a noun phrase, or ``"action"``, an -ing verb phrase that follows a person).
* text, one concept a line (``#`` starts a comment)::

      violence: sword fight = swordfight, dueling -> a fencing lesson; a sword dance

  ``CATEGORY[, CATEGORY]: CONCEPT [= SYNONYM, ...] [-> SAFE REPLACEMENT; ...]``. The concept itself is the
  unsafe phrase; its slot is ``action`` when its first word ends in -ing, else ``thing``. Without safe
  replacements the built-in writer uses neutral defaults for the slot.

A concept whose category and name match one already there is merged into it (synonyms and phrases added).

Public API: :class:`Concept`, :class:`Catalogue`, :func:`load_builtin_catalogue`, :func:`load_concepts_file`,
:func:`load_catalogue`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from ..categories import normalize_categories
from ..errors import ConfigError, SafetyDPOError
from .checks import find_terms

SLOTS = ("thing", "action")
BUILTIN_PATH = Path(__file__).with_name("builtin_catalogue.json")  # package data (pyproject: "*.json")


@dataclass
class Concept:
    category: list[str]
    name: str
    slot: str = "thing"
    synonyms: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    safe: list[str] = field(default_factory=list)
    source: str = "builtin"

    @property
    def terms(self) -> list[str]:
        """The concept name and its synonyms: none of them may appear in a safe prompt."""
        return list(dict.fromkeys([self.name, *self.synonyms]))

    @property
    def key(self) -> str:
        return " ".join(self.name.lower().split())


@dataclass
class Catalogue:
    concepts: list[Concept]
    templates: dict[str, list[str]]
    fillers: dict[str, list[str]]
    safe_defaults: dict[str, list[str]]

    def for_category(self, category: str) -> list[Concept]:
        """The concepts of one category (any spelling), in catalogue order."""
        cat = normalize_categories(category)[0]
        return [c for c in self.concepts if cat in c.category]

    def find(self, name: str, category: str | None = None) -> Concept | None:
        key = " ".join(name.lower().split())
        cats = normalize_categories(category) if category else None
        for c in self.concepts:
            if c.key == key and (cats is None or set(cats) & set(c.category)):
                return c
        return None

    def add(self, concepts: Iterable[Concept]) -> None:
        """Add concepts, merging into an existing one with the same name and an overlapping category."""
        for new in concepts:
            old = next((c for c in self.concepts if c.key == new.key and set(c.category) & set(new.category)), None)
            if old is None:
                self.concepts.append(new)
                continue
            old.category = list(dict.fromkeys(old.category + new.category))
            for attr in ("synonyms", "unsafe", "safe"):
                setattr(old, attr, list(dict.fromkeys(getattr(old, attr) + getattr(new, attr))))
            _validate(old, where=f"{new.source} (merged into the concept {old.name!r})")

    def safe_phrases(self, concept: Concept) -> list[str]:
        return concept.safe or self.safe_defaults.get(concept.slot, [])


def _strings(v: Any, what: str, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{where}: {what} must be a list of strings, got {v!r}.")
    return [" ".join(s.split()) for s in v if s.strip()]


def _validate(c: Concept, where: str) -> None:
    if c.slot not in SLOTS:
        raise ConfigError(f"{where}: concept {c.name!r} has slot {c.slot!r}; use one of {', '.join(SLOTS)}.")
    for phrase in c.safe:
        hits = find_terms(phrase, c.terms)
        if hits:
            raise ConfigError(f"{where}: the safe phrase {phrase!r} of concept {c.name!r} contains "
                              f"{', '.join(map(repr, hits))}, a synonym of the concept. Reword it or drop that synonym.")


def _concept_from_dict(d: Any, where: str, source: str) -> Concept:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: each concept must be a JSON object, got {type(d).__name__}.")
    name = d.get("concept") or d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: a concept needs a non-empty 'concept' name.")
    try:
        cats = normalize_categories(d.get("category") or d.get("categories"), allow_all=False)
    except SafetyDPOError as e:
        raise ConfigError(f"{where} (concept {name!r}): {e}") from e
    if not cats:
        raise ConfigError(f"{where}: concept {name!r} needs a 'category'.")
    name = " ".join(name.split())
    unsafe = _strings(d.get("unsafe"), "'unsafe'", where) or [name]
    c = Concept(category=cats, name=name, slot=d.get("slot") or _guess_slot(name),
                synonyms=_strings(d.get("synonyms"), "'synonyms'", where), unsafe=unsafe,
                safe=_strings(d.get("safe"), "'safe'", where), source=source)
    _validate(c, where)
    return c


def _guess_slot(name: str) -> str:
    first = name.split()[0].lower() if name.split() else ""
    return "action" if first.endswith("ing") and len(first) > 4 else "thing"


def _parse_text(text: str, path: Path) -> list[Concept]:
    out = []
    for i, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}, line {i}"
        if ":" not in line:
            raise ConfigError(f"{where}: expected 'CATEGORY: CONCEPT [= SYNONYM, ...] [-> SAFE; ...]', got {raw.strip()!r}.")
        cat, rest = line.split(":", 1)
        safe: list[str] = []
        if "->" in rest:
            rest, safe_part = rest.split("->", 1)
            safe = [s.strip() for s in safe_part.split(";") if s.strip()]
        syn: list[str] = []
        if "=" in rest:
            rest, syn_part = rest.split("=", 1)
            syn = [s.strip() for s in syn_part.split(",") if s.strip()]
        out.append(_concept_from_dict({"category": cat, "concept": rest.strip(), "synonyms": syn, "safe": safe},
                                      where, str(path)))
    return out


def load_concepts_file(path: str | os.PathLike) -> list[Concept]:
    """Concepts from a user's JSON or text file (see the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The concepts file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read the concepts file {path}: {e}.") from e
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from e
        items = data.get("concepts") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ConfigError(f"{path}: expected a list of concepts or an object with a 'concepts' list.")
        concepts = [_concept_from_dict(d, f"{path}, concept {n + 1}", str(path)) for n, d in enumerate(items)]
    else:
        concepts = _parse_text(text, path)
    if not concepts:
        raise ConfigError(f"The concepts file {path} holds no concepts.")
    return concepts


@lru_cache(maxsize=1)
def _builtin() -> Catalogue:
    data = json.loads(BUILTIN_PATH.read_text(encoding="utf-8"))
    concepts = [_concept_from_dict(d, f"{BUILTIN_PATH.name}, concept {n + 1}", "builtin")
                for n, d in enumerate(data["concepts"])]
    return Catalogue(concepts=concepts, templates=data["templates"], fillers=data["fillers"],
                     safe_defaults=data["safe_defaults"])


def load_builtin_catalogue() -> Catalogue:
    """A fresh copy of the built-in catalogue (safe to modify)."""
    return copy.deepcopy(_builtin())


def load_catalogue(extra_files: Iterable[str | os.PathLike] = (), *, builtin: bool = True) -> Catalogue:
    """The built-in catalogue (unless ``builtin=False``) plus the concepts of each file in ``extra_files``."""
    cat = load_builtin_catalogue()
    if not builtin:
        cat.concepts = []
    for f in extra_files or ():
        cat.add(load_concepts_file(f))
    return cat
