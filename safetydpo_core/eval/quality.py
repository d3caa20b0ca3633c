"""What an aligned model does to the pictures: preservation (same-seed pairs) and FID/KID (distributions).

Given the evaluated groups (runs, or variants of a run such as a LoRA at strengths 0 and 1, or in-memory
batches) and a baseline group (the base model):

* **Preservation** pairs every picture of a group with the baseline's picture of the same prompt id and
  seed (:attr:`~.manifest.ImageRecord.key`) and reports the mean PSNR, SSIM and mean absolute difference
  (:mod:`.similarity`); no weights needed. A pair of different sizes is refused before anything is scored.
* **FID and KID** (:mod:`.fid`) of each group's Inception features (:mod:`.inception`) against the
  baseline's, or, with a reference folder, of every group (the baseline too) against the folder's pictures
  (any sizes: each is resized to 299x299). Features of pictures on disk are kept in
  ``<out>/inception_features.safetensors`` so an interrupted or repeated evaluation does not compute them again.

:func:`plan_quality` checks everything cheap first (pairs and their sizes, the reference folder); then
:func:`measure_quality` computes. :mod:`.pipeline` calls both; reports come from :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError, Interrupted
from .fid import KID_SEED, fid, kid
from .manifest import IMAGE_SUFFIXES, RunError
from .similarity import DEFINITIONS, compare_pair

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]
FEATURE_CACHE = "inception_features.safetensors"
REFERENCE = "reference"
FEW_IMAGES = 2048  # below this many images the covariance of the 2048-d features is singular
_SAVE_EVERY = 64


@dataclasses.dataclass
class ImageItem:
    """One picture of a group: its pairing key (prompt id, seed), a name for messages, and how to get it."""

    group: str
    key: tuple
    name: str
    load: Callable[[], Image.Image]
    size: Callable[[], tuple[int, int]]
    cache_key: str | None = None      # stable identity of a picture on disk (None: in memory, not cached)


def file_item(group: str, key: tuple, path: Path, cache_key: str | None = None) -> ImageItem:
    from .evaluate import load_image

    def size() -> tuple[int, int]:
        try:
            with Image.open(path) as im:
                return im.size
        except (UnidentifiedImageError, OSError) as e:
            raise RunError(f"The image {path} cannot be read ({e}); replace it or remove it.") from e

    if cache_key is None:
        st = path.stat()
        cache_key = f"{path.resolve()}::{st.st_size}::{int(st.st_mtime_ns)}"
    return ImageItem(group, key, str(path), lambda: load_image(path), size, cache_key)


def memory_item(group: str, key: tuple, name: str, image: Image.Image) -> ImageItem:
    return ImageItem(group, key, name, lambda: image, lambda: image.size, None)


def reference_items(folder: str | os.PathLike) -> list[ImageItem]:
    """Every picture under ``folder`` (recursively, hidden files skipped), checked to open; :class:`RunError`
    naming the folder when it is missing, not a folder, or holds no pictures."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise RunError(f"The reference folder {root} does not exist.")
    if not root.is_dir():
        raise RunError(f"The reference {root} is a file; give a folder of reference images (png, jpg, webp, bmp).")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise RunError(f"The reference folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); FID and KID need "
                       f"reference pictures to compare with.")
    items = [file_item(REFERENCE, (p.relative_to(root).as_posix(), None), p) for p in files]
    for it in items:
        it.size()  # a file that is not a picture is named now, before anything is scored
    return items


# -- results ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PreservationRow:
    group: str
    baseline: str
    pairs: int
    identical: int        # pixel-identical pairs (infinite PSNR; left out of the PSNR mean)
    unpaired: int         # pictures of the group without a baseline picture of the same prompt id and seed
    psnr: float | None    # mean over the pairs that differ, dB
    ssim: float | None
    mad: float | None

    def flat(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DistributionRow:
    group: str
    against: str
    n: int
    n_against: int
    fid: float | None
    kid: float | None
    kid_std: float | None
    kid_subsets: int
    kid_subset_size: int

    def flat(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QualityResult:
    baseline: str
    against: str                       # the baseline group, or "reference"
    preservation: list[PreservationRow]
    distribution: list[DistributionRow]
    pairs: list[dict]                  # per pair: group, id, seed, image, baseline_image, psnr, ssim, mad
    reference: dict | None             # the reference folder: path, images, sizes
    inception: dict | None             # weights file, hash, features, resize
    notes: list[str]

    def to_json(self) -> dict:
        return {"baseline": self.baseline, "against": self.against, "definitions": DEFINITIONS,
                "preservation": [r.flat() for r in self.preservation],
                "distribution": [r.flat() for r in self.distribution], "pairs": self.pairs, "reference": self.reference,
                "inception": self.inception, "notes": self.notes}

    def row(self, group: str) -> dict:
        """The group's headline numbers: pairs, psnr, ssim, mad, fid, kid, kid_std (None where not measured)."""
        p = next((r for r in self.preservation if r.group == group), None)
        d = next((r for r in self.distribution if r.group == group), None)
        return {"against": self.against if d is not None else self.baseline,
                "pairs": p.pairs if p else 0, "identical": p.identical if p else 0,
                "psnr": p.psnr if p else None, "ssim": p.ssim if p else None, "mad": p.mad if p else None,
                "fid": d.fid if d else None, "kid": d.kid if d else None, "kid_std": d.kid_std if d else None,
                "n": d.n if d else None, "n_against": d.n_against if d else None}


# -- planning ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QualityPlan:
    groups: list[str]
    baseline: str
    items: dict[str, list[ImageItem]]
    pairs: dict[str, list[tuple[ImageItem, ImageItem]]]
    unpaired: dict[str, int]
    reference: list[ImageItem] | None
    reference_path: str | None
    preservation: bool
    distribution: bool          # FID/KID asked for (weights located)
    notes: list[str]

    @property
    def empty(self) -> bool:
        return not (self.pairs or self.distribution_targets())

    def distribution_targets(self) -> list[str]:
        if not self.distribution:
            return []
        if self.reference is not None:
            return list(self.groups)
        return [g for g in self.groups if g != self.baseline]


def plan_quality(items: dict[str, list[ImageItem]], groups: Sequence[str], baseline: str, *, preservation: bool = True,
                 distribution: bool = False, reference: str | os.PathLike | None = None) -> QualityPlan:
    """Pair the pictures, check the pairs' sizes and the reference folder; nothing is computed yet."""
    notes: list[str] = []
    pairs: dict[str, list[tuple[ImageItem, ImageItem]]] = {}
    unpaired: dict[str, int] = {}
    if preservation and len(groups) > 1:
        base = {it.key: it for it in items.get(baseline, [])}
        for g in groups:
            if g == baseline:
                continue
            mine = [(base[it.key], it) for it in items.get(g, []) if it.key in base]
            unpaired[g] = len(items.get(g, [])) - len(mine)
            if mine:
                pairs[g] = mine
            else:
                notes.append(f"Preservation of `{g}`: none of its pictures has a picture of the same prompt id and seed "
                             f"in `{baseline}`, so there is nothing to pair.")
        for g, ps in pairs.items():
            for a, b in ps:
                sa, sb = a.size(), b.size()
                if sa != sb:
                    raise DatasetError(
                        f"{b.name} ({g}) is {sb[0]}x{sb[1]} but {a.name} ({baseline}), the picture of the same prompt and "
                        f"seed, is {sa[0]}x{sa[1]} pixels: PSNR, SSIM and the mean absolute difference compare pictures "
                        f"pixel by pixel, so a pair must have one size. Render both at the same size, or turn "
                        f"preservation off.")
    ref_items = reference_items(reference) if reference is not None else None
    if distribution and ref_items is None and len(groups) < 2:
        notes.append("FID and KID compare two sets of pictures: give two runs, a run with two variants (e.g. the LoRA "
                     "at strengths 0 and 1), or a reference folder.")
    return QualityPlan(list(groups), baseline, items, pairs, unpaired, ref_items,
                       str(Path(reference).expanduser()) if reference is not None else None, preservation,
                       distribution, notes)


# -- measuring --------------------------------------------------------------------------------------------------
def _cache_id(cache_key: str) -> str:
    return hashlib.sha1(cache_key.encode()).hexdigest()


class FeatureCache:
    """Features of pictures on disk, kept in ``<out>/inception_features.safetensors`` for one weights file."""

    def __init__(self, out: str | os.PathLike | None, weights_sha256: str):
        self.path = Path(out) / FEATURE_CACHE if out is not None else None
        self.sha = weights_sha256
        self.data: dict[str, np.ndarray] = {}
        self.dirty = 0
        if self.path is not None and self.path.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(self.path), framework="np") as f:
                    if (f.metadata() or {}).get("weights_sha256") == self.sha:
                        self.data = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # a torn cache is only a cache: start it again
                log.warning("Ignoring the unreadable feature cache %s (%s).", self.path, e)

    def get(self, item: ImageItem) -> np.ndarray | None:
        return self.data.get(_cache_id(item.cache_key)) if item.cache_key else None

    def put(self, item: ImageItem, feature: np.ndarray) -> None:
        if item.cache_key and self.path is not None:
            self.data[_cache_id(item.cache_key)] = np.asarray(feature, dtype=np.float32)
            self.dirty += 1

    def save(self, force: bool = False) -> None:
        if self.path is None or not self.dirty or (not force and self.dirty < _SAVE_EVERY):
            return
        from safetensors.numpy import save_file

        from ..utils.atomic import atomic_path

        with atomic_path(self.path, "feature cache") as tmp:
            save_file(self.data, str(tmp), metadata={"weights_sha256": self.sha})
        self.dirty = 0


def _features(items: list[ImageItem], extractor, cache: FeatureCache, batch_size: int, done: list[int], total: int,
              progress: ProgressFn | None, should_stop: Callable[[], bool] | None) -> np.ndarray:
    out: list[np.ndarray | None] = [cache.get(it) for it in items]
    todo = [i for i, f in enumerate(out) if f is None]
    done[0] += len(items) - len(todo)
    for start in range(0, len(todo), batch_size):
        if should_stop is not None and should_stop():
            raise Interrupted(f"FID/KID was cancelled after the features of {done[0]} of {total} pictures; run again "
                              f"(--resume) to continue: computed features are kept.")
        batch = todo[start:start + batch_size]
        feats = extractor.features([items[i].load() for i in batch])
        for i, f in zip(batch, feats):
            out[i] = f
            cache.put(items[i], f)
        cache.save()
        done[0] += len(batch)
        if progress is not None:
            progress(done[0], total, {"stage": "inception features"})
    return np.stack([np.asarray(f, dtype=np.float64) for f in out])


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def measure_quality(plan: QualityPlan, extractor=None, *, kid_subsets: int, kid_subset_size: int, batch_size: int = 8,
                    out: str | os.PathLike | None = None, inception_note: str | None = None,
                    progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> QualityResult:
    """Preservation of the planned pairs, then FID/KID with ``extractor`` (an :class:`~.inception.InceptionFeatures`;
    None: FID/KID are left out, with ``inception_note`` saying why)."""
    notes = list(plan.notes)
    preservation, pair_rows = [], []
    total_pairs = sum(len(p) for p in plan.pairs.values())
    done = 0
    for g, ps in plan.pairs.items():
        scores = []
        for a, b in ps:
            if should_stop is not None and should_stop():
                raise Interrupted(f"Preservation was cancelled after {done} of {total_pairs} pairs.")
            sc = compare_pair(a.load(), b.load(), (b.name, a.name))
            scores.append(sc)
            pair_rows.append({"group": g, "baseline": plan.baseline, "id": b.key[0], "seed": b.key[1], "image": b.name,
                              "baseline_image": a.name, "psnr": None if sc.identical else sc.psnr, "ssim": sc.ssim,
                              "mad": sc.mad, "identical": sc.identical})
            done += 1
            if progress is not None and (done % 16 == 0 or done == total_pairs):
                progress(done, total_pairs, {"stage": "preservation"})
        finite = [s.psnr for s in scores if not s.identical]
        preservation.append(PreservationRow(g, plan.baseline, len(scores), len(scores) - len(finite),
                                            plan.unpaired.get(g, 0), _mean(finite), _mean([s.ssim for s in scores]),
                                            _mean([s.mad for s in scores])))
    distribution: list[DistributionRow] = []
    targets = plan.distribution_targets()
    against = REFERENCE if plan.reference is not None else plan.baseline
    ref_info = None
    if plan.reference is not None:
        sizes = sorted({it.size() for it in plan.reference})
        ref_info = {"path": plan.reference_path, "images": len(plan.reference),
                    "sizes": [f"{w}x{h}" for w, h in sizes]}
        if len(sizes) > 1:
            notes.append(f"The reference folder holds pictures of {len(sizes)} sizes; each is resized to 299x299 for the "
                         f"Inception features, as any picture is.")
    if targets and extractor is None:
        notes.append(inception_note or "FID and KID did not run (no Inception weights).")
        targets = []
    if targets:
        cache = FeatureCache(out, extractor.sha256)
        sets = {g: plan.items.get(g, []) for g in targets}
        sets[against] = plan.reference if plan.reference is not None else plan.items.get(plan.baseline, [])
        total = sum(len(v) for v in sets.values())
        counter = [0]
        feats: dict[str, np.ndarray] = {}
        try:
            for name, its in sets.items():
                if len(its) >= 2:
                    feats[name] = _features(its, extractor, cache, batch_size, counter, total, progress, should_stop)
                else:
                    counter[0] += len(its)
        finally:
            cache.save(force=True)
        ref = feats.get(against)
        for g in targets:
            n, n_ref = len(sets[g]), len(sets[against])
            if g not in feats or ref is None:
                notes.append(f"FID/KID of `{g}` against `{against}`: {n} and {n_ref} pictures; both need at least 2.")
                distribution.append(DistributionRow(g, against, n, n_ref, None, None, None, kid_subsets, 0))
                continue
            k = kid(feats[g], ref, subsets=kid_subsets, subset_size=kid_subset_size, seed=KID_SEED)
            distribution.append(DistributionRow(g, against, n, n_ref, fid(feats[g], ref), k.mean, k.std, k.subsets,
                                                k.subset_size))
        fewest = min([r.n for r in distribution] + [r.n_against for r in distribution])
        if fewest < FEW_IMAGES:
            notes.append(f"FID from {fewest} pictures (fewer than {FEW_IMAGES}, the feature size) is biased upward and "
                         f"noisy: compare FIDs only between sets of equally many pictures, and prefer KID (unbiased) "
                         f"for small sets. For a figure comparable with papers use thousands of pictures.")
    return QualityResult(plan.baseline, against, preservation, distribution, pair_rows, ref_info,
                         extractor.info() if (extractor is not None and targets) else None, notes)
