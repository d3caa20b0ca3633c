"""Prompt pairs and their JSONL file: the format every part of the pack reads (renderer, merger calibration,
ComfyUI nodes, demo).

One JSON object per line::

    {"id": "builtin-violence-3f2a9c1b7e04", "category": ["violence"], "concept": "stabbing",
     "unsafe": "...", "safe": "...", "minimality": 0.25, "source": "builtin", "synonyms": ["stab"]}

* ``id``: string, unique in the file.
* ``category``: list of canonical category ids (written as a list; a plain string or a comma-separated
  string, in any spelling :mod:`..categories` knows, is accepted when read).
* ``concept``: the unsafe concept the pair is about (empty when the source does not say, e.g. CoProV2).
* ``unsafe``, ``safe``: the two prompts, non-empty and different.
* optional: ``minimality`` (share of the words that changed between the two prompts, 0..1, smaller is a more
  minimal edit), ``source`` (``builtin``, ``llm:<model>``, ``coprov2``, ...), ``synonyms`` (words the safe
  prompt must not contain); any other field is kept in :attr:`PromptPair.extra` and written back.

Public API: :class:`PromptPair`, :func:`read_pairs`, :func:`write_pairs`, :class:`PairWriter` (streaming,
checkpointed, resumable), :func:`filter_pairs`, :func:`make_pair_id`, :func:`check_output_path`.
Every write is atomic: at any moment the file on disk is a complete, valid JSONL file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..categories import normalize_categories
from ..errors import ConfigError, DatasetError, SafetyDPOError
from ..utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

_KNOWN = ("id", "category", "concept", "unsafe", "safe", "minimality", "source", "synonyms")


@dataclass
class PromptPair:
    """An unsafe prompt and its minimally different safe twin."""

    id: str
    category: list[str]
    concept: str
    unsafe: str
    safe: str
    minimality: float | None = None
    source: str | None = None
    synonyms: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.category = normalize_categories(self.category)
        if not self.category:
            raise ConfigError(f"Prompt pair {self.id!r} has no category; give at least one.")
        for name in ("id", "unsafe", "safe"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"Prompt pair {self.id!r}: {name!r} must be a non-empty string, got {v!r}.")
        if not isinstance(self.concept, str):
            raise ConfigError(f"Prompt pair {self.id!r}: 'concept' must be a string, got {self.concept!r}.")
        if isinstance(self.synonyms, str):
            self.synonyms = [s.strip() for s in self.synonyms.split(",") if s.strip()]
        self.synonyms = [str(s) for s in (self.synonyms or [])]

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record: required fields first, optional ones only when set, then the extra fields."""
        d: dict[str, Any] = {"id": self.id, "category": list(self.category), "concept": self.concept,
                             "unsafe": self.unsafe, "safe": self.safe}
        if self.minimality is not None:
            d["minimality"] = round(float(self.minimality), 4)
        if self.source:
            d["source"] = self.source
        if self.synonyms:
            d["synonyms"] = list(self.synonyms)
        for k, v in self.extra.items():
            if k not in d:
                d[k] = v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "prompt pair") -> "PromptPair":
        """Build from a JSONL record; a :class:`DatasetError` naming ``where`` if it is malformed."""
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected a JSON object, found {type(d).__name__}.")
        missing = [k for k in ("id", "category", "unsafe", "safe") if k not in d]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}. Each line needs id, category, "
                               f"concept, unsafe and safe.")
        mini = d.get("minimality")
        if mini is not None and not isinstance(mini, (int, float)):
            raise DatasetError(f"{where}: 'minimality' must be a number, got {mini!r}.")
        syn = d.get("synonyms") or []
        if not isinstance(syn, (list, str)):
            raise DatasetError(f"{where}: 'synonyms' must be a list of strings, got {syn!r}.")
        try:
            return cls(id=str(d["id"]) if isinstance(d["id"], (int, str)) else d["id"], category=d["category"],
                       concept=d.get("concept") or "", unsafe=d["unsafe"], safe=d["safe"], minimality=mini,
                       source=d.get("source"), synonyms=syn,
                       extra={k: v for k, v in d.items() if k not in _KNOWN})
        except SafetyDPOError as e:
            raise DatasetError(f"{where}: {e}") from e


def make_pair_id(source: str, category: str | Iterable[str], unsafe: str, safe: str) -> str:
    """A stable id from the content: ``<source>-<first category>-<12 hex digits>``."""
    cats = normalize_categories(category)
    h = hashlib.sha1(f"{unsafe}\n{safe}".encode("utf-8")).hexdigest()[:12]
    src = "".join(ch if ch.isalnum() else "_" for ch in source.split(":")[0]) or "pair"
    return f"{src}-{cats[0] if cats else 'none'}-{h}"


def filter_pairs(pairs: Iterable[PromptPair], categories: str | Iterable[str] | None) -> list[PromptPair]:
    """The pairs that belong to at least one of ``categories`` (any spelling; None or "all": every pair)."""
    pairs = list(pairs)
    wanted = normalize_categories(categories) if categories is not None else []
    if not wanted:
        return pairs
    ws = set(wanted)
    return [p for p in pairs if ws.intersection(p.category)]


def _parse_lines(path: Path, text: str, *, tolerate_torn_tail: bool) -> list[PromptPair]:
    pairs: list[PromptPair] = []
    seen: dict[str, int] = {}
    lines = text.split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            last = i == len(lines) and not text.endswith("\n")
            if tolerate_torn_tail and last:
                log.warning("%s: the last line is cut off (%s); it is dropped and will be written again.", where, e.msg)
                break
            raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno}). Fix or remove that line.") from e
        p = PromptPair.from_dict(d, where)
        if p.id in seen:
            raise DatasetError(f"{where}: id {p.id!r} already used on line {seen[p.id]}. Ids must be unique.")
        seen[p.id] = i
        pairs.append(p)
    return pairs


def read_pairs(path: str | os.PathLike, categories: str | Iterable[str] | None = None, *,
               allow_empty: bool = False) -> list[PromptPair]:
    """Read a prompt-pair JSONL file, optionally keeping only some categories.

    Raises :class:`DatasetError` naming the file and line for a missing file, a malformed line or a
    duplicate id, and when no pair is left (unless ``allow_empty``).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"The prompt-pair file {path} does not exist. Make one with `safetydpo pairs`.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"Cannot read the prompt-pair file {path}: {e}.") from e
    pairs = _parse_lines(path, text, tolerate_torn_tail=False)
    kept = filter_pairs(pairs, categories)
    if not kept and not allow_empty:
        if pairs:
            have = sorted({c for p in pairs for c in p.category})
            raise DatasetError(f"{path} has no pairs of the categories {normalize_categories(categories)}; "
                               f"it has {', '.join(have)}.")
        raise DatasetError(f"The prompt-pair file {path} is empty.")
    return kept


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse an existing output file unless ``overwrite`` or ``resume``; both at once is an error."""
    path = Path(path)
    if overwrite and resume:
        raise ConfigError("Choose either overwrite (start the file anew) or resume (keep it and add to it), not both.")
    if path.exists() and path.is_dir():
        raise ConfigError(f"The output {path} is a folder; give a file name.")
    if path.exists() and not (overwrite or resume):
        raise ConfigError(f"The output file {path} already exists. Set overwrite (--overwrite) to replace it or "
                          f"resume (--resume) to keep its pairs and add to them.")
    return path


class PairWriter:
    """Writes pairs to a JSONL file as they come, so that long work keeps what it made.

    The file is rewritten atomically every ``flush_every`` pairs or ``flush_seconds`` seconds and on
    :meth:`close` (also when the ``with`` block ends by an exception), so the file on disk is always complete
    and valid. With ``resume`` the pairs already in the file are kept (a torn last line from a crash is
    dropped) and :meth:`add` skips pairs whose id is already there.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 flush_every: int = 25, flush_seconds: float = 10.0):
        self.path = check_output_path(path, overwrite=overwrite, resume=resume)
        self.existing: list[PromptPair] = []
        if resume and self.path.exists():
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DatasetError(f"Cannot read {self.path} to resume it: {e}.") from e
            self.existing = _parse_lines(self.path, text, tolerate_torn_tail=True)
        self._lines = [p.to_json() for p in self.existing]
        self._ids = {p.id for p in self.existing}
        self.new: list[PromptPair] = []
        self.skipped = 0
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = flush_seconds
        self._dirty = False
        self._last_flush = time.monotonic()
        self._closed = False

    @property
    def pairs(self) -> list[PromptPair]:
        """Every pair the file will hold: the resumed ones, then the new ones."""
        return self.existing + self.new

    def add(self, pair: PromptPair) -> bool:
        """Queue one pair; False (and nothing written) when its id is already in the file."""
        if self._closed:
            raise RuntimeError("PairWriter is closed")
        if pair.id in self._ids:
            self.skipped += 1
            return False
        self._ids.add(pair.id)
        self._lines.append(pair.to_json())
        self.new.append(pair)
        self._dirty = True
        if len(self.new) % self.flush_every == 0 or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()
        return True

    def flush(self) -> None:
        """Rewrite the file atomically with every pair so far."""
        atomic_write_text(self.path, "".join(line + "\n" for line in self._lines), what="prompt-pair file")
        self._dirty = False
        self._last_flush = time.monotonic()

    def close(self, *, failed: bool = False) -> None:
        """Write what was added. After a failure a file is only touched if new pairs came in."""
        if self._closed:
            return
        self._closed = True
        if self._dirty or not failed:
            self.flush()

    def __enter__(self) -> "PairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def write_pairs(pairs: Iterable[PromptPair], path: str | os.PathLike, *, overwrite: bool = False,
                resume: bool = False) -> int:
    """Write pairs to a JSONL file atomically; returns how many new pairs were written.

    An existing file is refused unless ``overwrite`` (replace it) or ``resume`` (keep its pairs, add the
    ones whose id is not there yet). Ids among the new pairs must be unique.
    """
    pairs = list(pairs)
    ids: set[str] = set()
    for p in pairs:
        if p.id in ids:
            raise DatasetError(f"Two pairs share the id {p.id!r}; ids must be unique.")
        ids.add(p.id)
    writer = PairWriter(path, overwrite=overwrite, resume=resume, flush_every=len(pairs) + 1, flush_seconds=float("inf"))
    with writer:
        for p in pairs:
            writer.add(p)
    return len(writer.new)
