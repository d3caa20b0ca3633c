"""The built-in pair writer: offline and deterministic for a seed.

For each pair it picks a concept of the category (round-robin over a seeded shuffle), one of the concept's
unsafe phrases and its safe replacement (the one at the same position when the concept lists as many safe
phrases as unsafe ones, else any), a scene template for the concept's slot and neutral fillers (who,
where, style). The unsafe and the safe prompt are the same template with the same fillers; only the unsafe
phrase is swapped, so the pair differs as little as the concept allows. Every candidate goes through the
same :class:`~.checks.PairChecker` as the LLM writers' output; rejects are counted in the report.

Each category draws from its own random stream (seeded by the seed and the category), so asking for more
categories does not change the pairs of the others, and a resumed run reproduces the pairs already written
(they are skipped as duplicates) before it makes new ones.

Public API: :class:`BuiltinWriter`.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

from ..categories import normalize_categories
from ..errors import ConfigError
from .catalogue import Catalogue, Concept, load_builtin_catalogue
from .checks import PairChecker
from .pairs import PromptPair, make_pair_id
from .report import GenerationReport, ProgressFn, Reject, StopFn


class BuiltinWriter:
    """Writes (unsafe, safe) pairs from the concept catalogue. ``max_attempts``: candidates per requested pair."""

    source = "builtin"

    def __init__(self, catalogue: Catalogue | None = None, checker: PairChecker | None = None, *, seed: int = 0,
                 max_attempts: int = 20):
        self.catalogue = catalogue or load_builtin_catalogue()
        self.checker = checker or PairChecker()
        self.seed = int(seed)
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, not {max_attempts}.")
        self.max_attempts = max_attempts

    def compose(self, concept: Concept, rng: random.Random) -> tuple[str, str]:
        """One (unsafe, safe) prompt pair for ``concept``, drawing every choice from ``rng``."""
        i = rng.randrange(len(concept.unsafe))
        x_u = concept.unsafe[i]
        safe = self.catalogue.safe_phrases(concept)
        x_s = safe[i] if len(safe) == len(concept.unsafe) else rng.choice(safe)
        template = rng.choice(self.catalogue.templates[concept.slot])
        fill = {k: rng.choice(v) for k, v in sorted(self.catalogue.fillers.items())}

        def render(x: str) -> str:
            text = template.format(x=x, **fill)
            text = " ".join(text.split()).replace(" ,", ",")
            return text[0].upper() + text[1:] if text else text

        return render(x_u), render(x_s)

    def candidates(self, category: str) -> Iterable[tuple[Concept, str, str]]:
        """The endless, seeded stream of candidate pairs for one category."""
        concepts = self.catalogue.for_category(category)
        if not concepts:
            return
        rng = random.Random(f"safetydpo-builtin:{self.seed}:{category}")
        order = list(concepts)
        while True:
            rng.shuffle(order)
            for concept in order:
                u, s = self.compose(concept, rng)
                yield concept, u, s

    def generate(self, categories: str | Iterable[str] | None, per_category: int, *,
                 on_pair: Callable[[PromptPair], object] | None = None, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> tuple[list[PromptPair], GenerationReport]:
        """Make ``per_category`` pairs for each category (dict: a count per category)."""
        if isinstance(per_category, dict):
            wanted = {normalize_categories(k)[0]: int(v) for k, v in per_category.items()}
        else:
            if per_category < 0:
                raise ConfigError(f"per_category must be at least 0, not {per_category}.")
            wanted = {c: int(per_category) for c in normalize_categories(categories, default_all=True)}
        report = GenerationReport(writer=f"builtin writer (seed {self.seed})", requested=dict(wanted))
        total = sum(wanted.values())
        done = 0
        pairs: list[PromptPair] = []
        for cat, n in wanted.items():
            if n == 0:
                continue
            stream = self.candidates(cat)
            if not self.catalogue.for_category(cat):
                report.warnings.append(f"the catalogue has no concept for {cat}")
                continue
            made = 0
            for attempt, (concept, u, s) in enumerate(stream):
                if made >= n or attempt >= n * self.max_attempts:
                    break
                if should_stop and should_stop():
                    report.stopped = True
                    return pairs, report
                cats = [cat] + [c for c in concept.category if c != cat]
                pair = PromptPair(id=make_pair_id(self.source, cat, u, s), category=cats, concept=concept.name,
                                  unsafe=u, safe=s, source=self.source, synonyms=concept.synonyms)
                res = self.checker.check(pair, concept.terms)
                if not res.ok:
                    report.reject(Reject(cat, concept.name, res.reason or "?", res.detail, u, s))
                    continue
                report.warnings.extend(res.warnings)
                pairs.append(res.pair)
                report.accepted[cat] += 1
                made += 1
                done += 1
                if on_pair is not None:
                    on_pair(res.pair)
                if progress:
                    progress(done, total)
        return pairs, report
