"""One evaluation, from pictures to report data: the single entry point of ``safetydpo eval`` and the Evaluate node.

The sources are image runs on disk (:class:`~.manifest.ImageRun`, from ``safetydpo sample``) or in-memory
batches (:class:`ImageBatch`, e.g. ComfyUI IMAGE inputs). :func:`plan_evaluation` checks everything that can
be checked cheaply before any work or any file is written -- the groups and the baseline, the pairs of the
same prompt id and seed and their sizes, the reference folder, and the Inception weights (loaded and checked
against the architecture when FID/KID will run). :func:`run_evaluation` then scores every picture
(IP, CLIPScore: :mod:`.evaluate`) and measures preservation and FID/KID against the baseline
(:mod:`.quality`); the result's groups start with the baseline. :func:`evaluate` does both.
:func:`headline` gives one group's numbers (IP in both settings, CLIPScore, PSNR/SSIM/MAD, FID/KID) as the
node outputs them, from the same summaries the reports use; :func:`result_json` everything in one JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

from PIL import Image

from ..errors import ConfigError, SafetyDPOError
from .evaluate import (EvalResult, EvalSettings, Evaluator, _cache_key, evaluate_images, evaluate_runs, group_labels,
                       merge_results)
from .manifest import ImageRun, RunError
from .quality import ImageItem, QualityPlan, file_item, measure_quality, memory_item, plan_quality
from .report import summarize

ProgressFn = Callable[[int, int, dict], None]


@dataclasses.dataclass
class ImageBatch:
    """In-memory pictures of one group with their prompts (one per picture; empty strings when unknown) and,
    optionally, ids, seeds and category lists. Pictures of two batches pair by (id, seed): by position when
    neither is given."""

    name: str
    images: Sequence[Image.Image]
    prompts: Sequence[str] | None = None
    ids: Sequence[str] | None = None
    seeds: Sequence[int | None] | None = None
    categories: Sequence[Sequence[str]] | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise ConfigError(f"The image batch {self.name!r} holds no pictures.")
        for what in ("prompts", "ids", "seeds", "categories"):
            v = getattr(self, what)
            if v is not None and len(v) != n:
                raise ConfigError(f"The image batch {self.name!r} has {n} pictures but {len(v)} {what}.")

    def key(self, i: int) -> tuple:
        return (self.ids[i] if self.ids else f"{i:05d}", self.seeds[i] if self.seeds else None)


@dataclasses.dataclass
class EvalPlan:
    sources: list
    evaluator: Evaluator
    groups: list[str]
    baseline: str
    categories: list[str] | None
    quality: QualityPlan


def _items_of_runs(runs: Sequence[ImageRun], categories) -> tuple[list[str], dict[str, list[ImageItem]]]:
    labels = group_labels(runs)
    items: dict[str, list[ImageItem]] = {}
    for i, run in enumerate(runs):
        for rec in run.records:
            if categories and not set(categories) & set(rec.categories):
                continue
            g = labels[(i, rec.variant)]
            items.setdefault(g, []).append(file_item(g, rec.key, run.path(rec), _cache_key(run, rec)))
    groups = [labels[(i, v)] for i, run in enumerate(runs) for v in run.variants if labels[(i, v)] in items]
    return list(dict.fromkeys(groups)), items


def _items_of_batches(batches: Sequence[ImageBatch]) -> tuple[list[str], dict[str, list[ImageItem]]]:
    names = [b.name for b in batches]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"Two image batches are named {dup!r}; give each a different name.")
    items = {b.name: [memory_item(b.name, b.key(i), f"{b.name}[{i}]", im) for i, im in enumerate(b.images)]
             for b in batches}
    return names, items


def plan_evaluation(sources: Sequence[ImageRun | ImageBatch], evaluator: Evaluator, *, baseline: str | None = None,
                    categories: Sequence[str] | None = None) -> EvalPlan:
    """Check the sources, the baseline, the pairs, the reference folder and the Inception weights; compute nothing."""
    sources = list(sources)
    if not sources:
        raise ConfigError("Nothing to evaluate: give at least one image run or image batch.")
    if all(isinstance(s, ImageRun) for s in sources):
        groups, items = _items_of_runs(sources, categories)
        if not groups:
            raise RunError(f"No image of {', '.join(str(r.root) for r in sources)} is in the categories "
                           f"{list(categories or [])}.")
    elif all(isinstance(s, ImageBatch) for s in sources):
        groups, items = _items_of_batches(sources)
    else:
        raise ConfigError("Give either image runs on disk or in-memory image batches, not both.")
    if baseline is not None and baseline not in groups:
        raise ConfigError(f"The baseline {baseline!r} is not one of the evaluated groups: {', '.join(groups)}.")
    base = baseline or groups[0]
    s = evaluator.settings
    qplan = plan_quality(items, groups, base, preservation=s.preservation, distribution=s.fid != "off",
                         reference=s.fid_reference)
    if qplan.distribution_targets() and evaluator.inception_path is not None:
        evaluator.inception()  # load and check the weights now, before anything is scored or written
    return EvalPlan(sources, evaluator, [base] + [g for g in groups if g != base], base,
                    list(categories) if categories else None, qplan)


def run_evaluation(plan: EvalPlan, out: str | os.PathLike | None = None, *, resume: bool = False,
                   progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """Score every picture, then measure preservation and FID/KID; ``out`` keeps per-picture results and
    features so that ``resume=True`` continues an interrupted evaluation."""
    ev = plan.evaluator
    if isinstance(plan.sources[0], ImageRun):
        result = evaluate_runs(plan.sources, ev, out, resume=resume, categories=plan.categories, progress=progress,
                               should_stop=should_stop)
    else:
        result = merge_results(*[evaluate_images(ev, b.images, b.prompts, b.categories,
                                                 group=b.name, ids=[b.key(i)[0] for i in range(len(b.images))],
                                                 seeds=b.seeds, progress=progress, should_stop=should_stop)
                                 for b in plan.sources])
    result.groups = [g for g in plan.groups if g in result.groups]
    s = ev.settings
    extractor = ev.inception() if plan.quality.distribution_targets() else None
    if not plan.quality.empty:
        result.quality = measure_quality(plan.quality, extractor, kid_subsets=s.kid_subsets,
                                         kid_subset_size=s.kid_subset_size, batch_size=s.batch_size, out=out,
                                         inception_note=ev.inception_note, progress=progress, should_stop=should_stop)
    return result


def evaluate(sources: Sequence[ImageRun | ImageBatch], settings: EvalSettings | None = None, *,
             evaluator: Evaluator | None = None, out: str | os.PathLike | None = None, resume: bool = False,
             baseline: str | None = None, categories: Sequence[str] | None = None, progress: ProgressFn | None = None,
             should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """:func:`plan_evaluation` then :func:`run_evaluation` (the detectors load from ``settings`` unless an
    ``evaluator`` is given)."""
    if evaluator is None and settings is None:
        raise SafetyDPOError("Give the evaluation settings or an evaluator.")
    plan = plan_evaluation(sources, evaluator or Evaluator(settings), baseline=baseline, categories=categories)
    return run_evaluation(plan, out, resume=resume, progress=progress, should_stop=should_stop)


def headline(result: EvalResult, group: str | None = None) -> dict:
    """One group's numbers over all its pictures (default: the last group, e.g. the aligned model beside its
    baseline): ``n``, ``ip`` and ``unsafe`` per IP setting, ``clipscore``, and with a baseline or reference
    ``psnr``, ``ssim``, ``mad``, ``pairs``, ``fid``, ``kid``, ``kid_std`` (None where not measured)."""
    g = group or result.groups[-1]
    row = next((r for r in summarize(result.rows, result.groups) if r.group == g and r.category == "all"), None)
    if row is None:
        raise ConfigError(f"{g!r} is not one of the evaluated groups: {', '.join(result.groups)}.")
    q = result.quality.row(g) if result.quality is not None else {}
    return {"group": g, "n": row.n, "ip": dict(row.ip), "unsafe": dict(row.unsafe), "clipscore": row.clipscore,
            **{k: q.get(k) for k in ("against", "pairs", "identical", "psnr", "ssim", "mad", "fid", "kid", "kid_std")}}


def result_json(result: EvalResult, group: str | None = None) -> dict:
    """The whole evaluation as one JSON-able dict (the Evaluate node's ``report``): ``group``'s (default: the last)
    pictures, IP per setting and unsafe counts at the top, every group's :func:`headline`, the detectors that ran,
    notes, preservation and FID/KID, per-picture verdicts and the detectors' provenance."""
    h = headline(result, group)
    return {"group": h["group"], "images": h["n"], "ip": h["ip"], "unsafe_images": h["unsafe"],
            "groups": {g: headline(result, g) for g in result.groups}, "detectors": result.info.get("active", []),
            "notes": list(result.info.get("notes", [])),
            "quality": result.quality.to_json() if result.quality is not None else None,
            "per_image": result.rows, "info": result.info}
