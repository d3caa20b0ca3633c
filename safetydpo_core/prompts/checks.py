"""Quality checks every generated prompt pair must pass, the same for the built-in writer and the LLM writers.

A pair is rejected, with a reason from :data:`REASONS`, when:

* a prompt is missing or empty (``missing_unsafe`` / ``missing_safe``; the LLM writer adds ``not_json``
  when the model's answer holds no JSON object at all);
* either prompt reads as a refusal (``refusal``: "I'm sorry", "I can't help with that", "As an AI" ...);
* the two prompts are the same (``identical``);
* the safe prompt names the concept or one of its synonyms, in any common inflection (``concept_in_safe``);
* a prompt is over CLIP's 77-token context (``too_long``), unless the checker truncates (then a warning);
* the unsafe prompt was seen before, in this run, in the file being resumed or in the few-shot examples
  (``duplicate``);
* optionally, more than ``max_change`` of the words changed (``too_different``).

Public API: :class:`PairChecker`, :class:`CheckResult`, :func:`change_fraction` (the ``minimality`` score),
:func:`find_terms`, :func:`is_refusal`, :data:`REASONS`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import ConfigError
from .pairs import PromptPair
from .tokens import CLIP_CONTENT_TOKENS, TokenCounter, load_token_counter

log = logging.getLogger(__name__)

REASONS = ("not_json", "missing_unsafe", "missing_safe", "refusal", "identical", "concept_in_safe", "too_long",
           "duplicate", "too_different")

_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|i can(?:'|’)?t|i cannot|i won(?:'|’)?t|i will not|"
    r"i'?m (?:not able|unable)|i am (?:not able|unable)|as an ai\b|as a language model|"
    r"(?:cannot|can(?:'|’)?t|unable to|not able to) (?:help|assist|comply|fulfil+|provide|create|generate|write)|"
    r"against (?:my|our|the) (?:guidelines|policy|policies|principles)|i (?:must|have to) (?:decline|refuse)|"
    r"not (?:appropriate|something i can)|inappropriate (?:request|content|to)|harmful (?:request|content) (?:is|isn'?t))",
    re.IGNORECASE)

_WORD = re.compile(r"[a-z0-9]+")


def is_refusal(text: str) -> bool:
    """Whether ``text`` reads as a model declining the task."""
    return bool(_REFUSAL.search(text or ""))


def _words(text: str) -> list[str]:
    return _WORD.findall(re.sub(r"['’]s\b", "", text.lower()))


def _forms(word: str) -> set[str]:
    """The word and its common English inflections (plural, -ed, -ing, consonant doubling, y/ies)."""
    w = word.lower()
    out = {w, w + "s", w + "es", w + "ed", w + "d", w + "ing", w + "er", w + "ers"}
    if w.endswith("e"):
        out |= {w[:-1] + "ing", w[:-1] + "er"}
    if w.endswith("y") and len(w) > 2:
        out |= {w[:-1] + "ies", w[:-1] + "ied"}
    if len(w) >= 3 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
        out |= {w + w[-1] + "ing", w + w[-1] + "ed", w + w[-1] + "er"}
    for suf in ("ing", "ed", "es", "s"):  # a term given inflected also matches its base form
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            base = w[: -len(suf)]
            if suf in ("es", "s") or len(base) >= 4:  # "hated" -> "hate", not "hat"
                out.add(base)
            if suf in ("ing", "ed"):
                out.add(base + "e")
                if len(base) >= 4 and base[-1] == base[-2]:
                    out.add(base[:-1])
    return out


def find_terms(text: str, terms: Iterable[str]) -> list[str]:
    """The terms (words or phrases) that occur in ``text``, matched word by word in any common inflection."""
    words = _words(text)
    found = []
    for term in terms:
        tw = _words(term)
        if not tw:
            continue
        forms = [_forms(w) for w in tw]
        n = len(tw)
        for i in range(len(words) - n + 1):
            if all(words[i + j] in forms[j] for j in range(n)):
                found.append(term)
                break
        else:
            joined = "".join(tw)  # "self-harm" also matches "selfharm"
            if n > 1 and joined in words:
                found.append(term)
    return found


def _levenshtein(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def change_fraction(unsafe: str, safe: str) -> float:
    """The ``minimality`` score: word-level edit distance over the longer prompt's word count, 0..1.

    0 means the same words; smaller is a more minimal edit (CoProV2's aim: change only the unsafe part).
    """
    a, b = _words(unsafe), _words(safe)
    if not a and not b:
        return 0.0
    return round(_levenshtein(a, b) / max(len(a), len(b)), 4)


def _norm(text: str) -> str:
    return " ".join(_words(text))


@dataclass
class CheckResult:
    ok: bool
    pair: PromptPair | None
    reason: str | None = None
    detail: str = ""
    warnings: list[str] = field(default_factory=list)


class PairChecker:
    """Checks pairs (see the module docstring) and remembers the accepted ones to catch duplicates.

    ``too_long``: ``"reject"`` (default) or ``"truncate"`` (cut at a word boundary to ``max_tokens`` and warn).
    ``counter``: a :class:`~.tokens.TokenCounter`; by default :func:`~.tokens.load_token_counter` (a real
    CLIP vocabulary if one is found on this machine, else a conservative estimate).
    """

    def __init__(self, counter: TokenCounter | None = None, *, max_tokens: int = CLIP_CONTENT_TOKENS,
                 too_long: str = "reject", max_change: float | None = None, seen: Iterable[str] = ()):
        if too_long not in ("reject", "truncate"):
            raise ConfigError(f"too_long must be 'reject' or 'truncate', not {too_long!r}.")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, not {max_tokens}.")
        if max_change is not None and not 0 < max_change <= 1:
            raise ConfigError(f"max_change must be in (0, 1], not {max_change}.")
        self.counter = counter if counter is not None else load_token_counter()
        self.max_tokens = max_tokens
        self.too_long = too_long
        self.max_change = max_change
        self.seen: set[str] = {_norm(s) for s in seen}

    def remember(self, unsafe_prompts: Iterable[str]) -> None:
        """Treat these unsafe prompts as already used (resumed file, few-shot examples)."""
        self.seen.update(_norm(s) for s in unsafe_prompts)

    def check(self, pair: PromptPair | None, terms: Iterable[str] | None = None, *, unsafe: str | None = None,
              safe: str | None = None, remember: bool = True) -> CheckResult:
        """Check one pair (or raw ``unsafe``/``safe`` strings before a pair is built).

        ``terms``: the concept and its synonyms; by default the pair's ``concept`` and ``synonyms``. On
        success the result's ``pair`` is the pair to keep (truncated, with ``minimality`` set).
        """
        if pair is not None:
            unsafe, safe = pair.unsafe, pair.safe
            if terms is None:
                terms = [t for t in [pair.concept, *pair.synonyms] if t]
        unsafe = (unsafe or "").strip()
        safe = (safe or "").strip()
        terms = [t for t in (terms or []) if t and t.strip()]
        if not unsafe:
            return CheckResult(False, pair, "missing_unsafe", "the unsafe prompt is empty")
        if not safe:
            return CheckResult(False, pair, "missing_safe", "the safe prompt is empty")
        for name, text in (("unsafe", unsafe), ("safe", safe)):
            if is_refusal(text):
                return CheckResult(False, pair, "refusal", f"the {name} prompt reads as a refusal")
        warnings: list[str] = []
        for name in ("unsafe", "safe"):
            text = unsafe if name == "unsafe" else safe
            n = self.counter.count(text)
            if n > self.max_tokens:
                if self.too_long == "reject":
                    return CheckResult(False, pair, "too_long",
                                       f"the {name} prompt has {n} tokens, over the limit of {self.max_tokens}")
                cut = self.counter.truncate(text, self.max_tokens)
                warnings.append(f"the {name} prompt had {n} tokens; truncated to {self.max_tokens}")
                if name == "unsafe":
                    unsafe = cut
                else:
                    safe = cut
        if _norm(unsafe) == _norm(safe):
            return CheckResult(False, pair, "identical", "the safe prompt is the same as the unsafe one")
        hits = find_terms(safe, terms)
        if hits:
            return CheckResult(False, pair, "concept_in_safe", f"the safe prompt contains {', '.join(map(repr, hits))}")
        key = _norm(unsafe)
        if key in self.seen:
            return CheckResult(False, pair, "duplicate", "the unsafe prompt was already used")
        mini = change_fraction(unsafe, safe)
        if self.max_change is not None and mini > self.max_change:
            return CheckResult(False, pair, "too_different",
                               f"{mini:.0%} of the words changed, over the limit of {self.max_change:.0%}")
        if remember:
            self.seen.add(key)
        out = pair
        if pair is not None:
            out = PromptPair(id=pair.id, category=pair.category, concept=pair.concept, unsafe=unsafe, safe=safe,
                             minimality=mini, source=pair.source, synonyms=pair.synonyms, extra=dict(pair.extra))
        for w in warnings:
            log.warning("%s: %s", pair.id if pair is not None else "pair", w)
        return CheckResult(True, out, None, "", warnings)
