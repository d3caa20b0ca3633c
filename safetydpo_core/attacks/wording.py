"""The wording attack (black-box): rewrite the prompt until the attacked model draws the concept again.

Candidates, in tiers (the synonyms best first, every other tier shuffled by the prompt's own random
generator; the list is then cut to the budget):

1. **synonyms**: the concept's word in the prompt swapped for each synonym. On the built-in world these are
   the concept's other words, held-out words first (the experts never saw them); for real models they come
   from the wording table shipped with the pack (``synonyms.json``, per category), the prompt's own
   ``synonyms`` field and the built-in catalogue's synonyms of its concept;
2. **paraphrase** with a synonym: the world's held-out caption templates (the caption re-composed), or the
   table's paraphrase templates;
3. **dilution** with a synonym: benign filler before or after the prompt;
4. **character noise** on the concept word and on its synonyms: typos (swap, drop, double a letter),
   homoglyphs (look-alike letters from other scripts) and spacing (``n u d e``, ``nu-de``);
5. paraphrase and dilution of the original wording.

Each round queries the next candidate of every prompt that has not succeeded yet (one picture each, from
the prompt's seed), so a prompt costs at most ``budget.queries`` pictures; the adversarial prompt is the
first candidate judged unsafe, else the highest-scoring one. No optimisation steps.

Public API: :class:`WordingAttack`, :func:`wording_table`, :func:`candidates`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError
from .base import Attack, AttackContext, AttackPrompt, Budget, Candidate, PromptResult, Stopwatch, new_result

TABLE_PATH = Path(__file__).resolve().parent / "synonyms.json"
WORLD_PREFIXES = ("a picture of", "an image showing", "a drawing of")
NOISE_KINDS = ("swap", "drop", "double", "homoglyph", "spacing", "hyphen")


@functools.lru_cache(maxsize=4)
def wording_table(path: str | None = None) -> dict:
    """The wording table (``synonyms.json`` beside this module, or ``path``), checked."""
    p = Path(path) if path else TABLE_PATH
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"The wording table {p} cannot be read: {e}") from e
    from ..categories import CATEGORIES

    syn = data.get("synonyms")
    if not isinstance(syn, dict) or set(syn) - set(CATEGORIES):
        raise ConfigError(f"The wording table {p}: 'synonyms' must map categories ({', '.join(CATEGORIES)}) to groups.")
    for cat, groups in syn.items():
        if not all(isinstance(g, list) and len(g) >= 2 and all(isinstance(w, str) and w.strip() for w in g)
                   for g in groups):
            raise ConfigError(f"The wording table {p}: every group of {cat!r} must list at least two words.")
    for key in ("paraphrase", "dilution"):
        if not all(isinstance(t, str) for t in data.get(key, [])):
            raise ConfigError(f"The wording table {p}: {key!r} must be a list of strings.")
    if not all("{p}" in t for t in data.get("paraphrase", [])):
        raise ConfigError(f"The wording table {p}: every paraphrase template needs {{p}}.")
    return data


def _find(text: str, word: str) -> re.Match | None:
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text, flags=re.IGNORECASE)


def _swap(text: str, word: str, new: str) -> str:
    """``text`` with the first ``word`` replaced by ``new`` (and an article before it fitted: a/an)."""
    m = _find(text, word)
    if m is None:
        return text
    head, tail = text[:m.start()], text[m.end():]
    art = re.search(r"(?:^|\s)(a|an) $", head, flags=re.IGNORECASE)
    if art:
        want = "an" if new[:1].lower() in "aeiou" else "a"
        if art.group(1).lower() != want:
            want = want.capitalize() if art.group(1)[0].isupper() else want
            head = head[:art.start(1)] + want + " "
    return head + new + tail


def _catalogue_synonyms(concept: str) -> list[str]:
    """The built-in catalogue's name and synonyms of ``concept`` (empty when it is not in the catalogue)."""
    from ..prompts.catalogue import load_builtin_catalogue

    c = load_builtin_catalogue().find(concept)
    return [c.name] + list(c.synonyms) if c is not None else []


def concept_words(p: AttackPrompt, world: bool, table: dict | None = None) -> tuple[str | None, list[str]]:
    """The concept's word found in the prompt (None if none is) and its synonyms, best first."""
    if world:
        from ..world.spec import WORLD

        kind = WORLD.concept(p.concept)
        held, train = list(kind.held_out_words), list(kind.words)
        target = next((w for w in sorted(kind.all_words, key=len, reverse=True) if _find(p.prompt, w)), None)
        return target, [w for w in held + train if w != target]
    table = table or wording_table()
    groups = [list(g) for c in p.category for g in table["synonyms"].get(c, [])]
    own = [w for w in [p.concept] + list(p.synonyms) if w.strip()]
    if len(own) > 1:
        groups.insert(0, own)
    extra = _catalogue_synonyms(p.concept)
    if len(extra) > 1:
        groups.insert(0, extra)
    words = sorted({w for g in groups for w in g}, key=len, reverse=True)
    target = next((w for w in words if _find(p.prompt, w)), None)
    if target is None:
        return None, list(dict.fromkeys(w for g in groups[:3] for w in g))
    syn = [w for g in groups if any(w.lower() == target.lower() for w in g) for w in g]
    return target, [w for w in dict.fromkeys(syn) if w.lower() != target.lower()]


def char_noise(word: str, kind: str, g: torch.Generator, table: dict | None = None) -> str:
    """``word`` with one kind of character noise (see :data:`NOISE_KINDS`)."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 2:
        return word
    i = letters[int(torch.randint(len(letters) - 1, (1,), generator=g))]
    if kind == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i + 1] + word[i] + word[i + 1:]
    if kind == "homoglyph":
        glyphs = (table or wording_table()).get("homoglyphs", {})
        hits = [j for j, ch in enumerate(word) if ch.lower() in glyphs]
        if not hits:
            return word
        j = hits[int(torch.randint(len(hits), (1,), generator=g))]
        return word[:j] + glyphs[word[j].lower()] + word[j + 1:]
    if kind == "spacing":
        return " ".join(word)
    if kind == "hyphen":
        return word[:i + 1] + "-" + word[i + 1:]
    return word


def _world_paraphrase(text: str, g: torch.Generator) -> str | None:
    """The caption re-composed with a held-out template (its words for each attribute kept)."""
    import numpy as np

    from ..world.captions import HELD_OUT_TEMPLATES, compose, parse_caption
    from ..world.spec import WORLD, Scene

    try:
        attrs = parse_caption(text)
    except ConfigError:
        return None
    if attrs["shape"] is None or attrs["colour"] is None or attrs["position"] is None:
        return None
    bg = attrs["background"]
    scene = Scene(attrs["shape"], attrs["colour"], attrs["position"], bg or "white")
    choices = {}
    for key, attr in (("s", "shape"), ("c", "colour"), ("p", "position"), ("b", "background")):
        words = WORLD.get(attr, getattr(scene, attr)).all_words
        found = next((i for i, w in sorted(enumerate(words), key=lambda iw: -len(iw[1])) if _find(text, w)), 0)
        choices[key] = found
    templates = [t for t in HELD_OUT_TEMPLATES if ("{b}" in t) == (bg is not None)] or list(HELD_OUT_TEMPLATES)
    rng = np.random.default_rng(int(torch.randint(2 ** 31 - 1, (1,), generator=g)))
    choices["template"] = templates[int(rng.integers(len(templates)))]
    out = compose(scene, choices)
    return None if out == text else out


def _paraphrase(text: str, world: bool, g: torch.Generator, table: dict) -> str | None:
    if world:
        return _world_paraphrase(text, g)
    ts = table.get("paraphrase", [])
    if not ts:
        return None
    return ts[int(torch.randint(len(ts), (1,), generator=g))].format(p=text)


def _dilute(text: str, world: bool, g: torch.Generator, table: dict) -> str:
    if world:
        pre = WORLD_PREFIXES[int(torch.randint(len(WORLD_PREFIXES), (1,), generator=g))]
        return f"{pre} {text}"
    fill = table.get("dilution") or ["a quiet afternoon"]
    f = fill[int(torch.randint(len(fill), (1,), generator=g))]
    return f"{f}, {text}" if int(torch.randint(2, (1,), generator=g)) else f"{text}, {f}"


def candidates(p: AttackPrompt, world: bool, g: torch.Generator, limit: int, table: dict | None = None) -> list[Candidate]:
    """Up to ``limit`` distinct rewrites of ``p`` (see the module docstring), deterministic for ``g``'s seed."""
    table = table if table is not None or world else wording_table()
    table = table or {}
    target, synonyms = concept_words(p, world, table if not world else None)
    text = p.prompt
    if target is not None:
        swapped = [(s, _swap(text, target, s)) for s in synonyms]
    else:
        swapped = [(s, f"{text}, {s}") for s in synonyms]
    tiers: list[list[Candidate]] = []
    tiers.append([Candidate(t, info={"transform": "synonym", "word": s}) for s, t in swapped])
    paras = []
    for s, t in swapped:
        q = _paraphrase(t, world, g, table)
        if q:
            paras.append(Candidate(q, info={"transform": "synonym+paraphrase", "word": s}))
    tiers.append(paras)
    tiers.append([Candidate(_dilute(t, world, g, table), info={"transform": "synonym+dilution", "word": s})
                  for s, t in swapped])
    noisy = []
    for w in ([target] if target else []) + synonyms[:2]:
        for kind in NOISE_KINDS:
            n = char_noise(w, kind, g, table if not world else wording_table())
            if n != w:
                base = text if w == target else _swap(text, target, w) if target else f"{text}, {w}"
                noisy.append(Candidate(_swap(base, w, n) if _find(base, w) else base,
                                       info={"transform": f"noise:{kind}", "word": n}))
    tiers.append(noisy)
    own = []
    q = _paraphrase(text, world, g, table)
    if q:
        own.append(Candidate(q, info={"transform": "paraphrase"}))
    own.append(Candidate(_dilute(text, world, g, table), info={"transform": "dilution"}))
    tiers.append(own)
    out, seen = [], {text.strip().lower()}
    for k, tier in enumerate(tiers):  # synonyms best first; the other tiers in a random order
        order = list(range(len(tier))) if k == 0 else torch.randperm(len(tier), generator=g).tolist()
        for i in order:
            c = tier[i]
            key = c.text.strip().lower()
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out[:limit]


class WordingAttack(Attack):
    name = "wording"
    variants = ("text",)
    text_variant = "text"
    token_level = False
    description = "synonym and paraphrase substitution, character noise and dilution (black-box)"

    def defaults(self, world: bool) -> Budget:
        return Budget(queries=8 if world else 16, steps=0)

    def run(self, ctx: AttackContext, chunk: Sequence[AttackPrompt]) -> list[PromptResult]:
        clock = Stopwatch()
        table = None if ctx.world else wording_table(ctx.options.get("table"))
        cands = {p.id: candidates(p, ctx.world, ctx.generator(p, "wording"), ctx.budget.queries, table) for p in chunk}
        results = {p.id: new_result(ctx, p, "text") for p in chunk}
        for p in chunk:
            results[p.id].info["candidates"] = len(cands[p.id])
        rounds = max((len(v) for v in cands.values()), default=0)
        for r in range(rounds):
            ctx.check()
            items = [(p, cands[p.id][r]) for p in chunk if not results[p.id].success and r < len(cands[p.id])]
            for (p, c), (verdict, image) in zip(items, ctx.query(items)):
                results[p.id].record(c, verdict, 0, image)
            ctx.tick((r + 1) / rounds)
        out = [results[p.id] for p in chunk]
        clock.share(out, len(chunk))
        return out
