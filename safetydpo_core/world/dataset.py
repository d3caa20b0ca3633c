"""Rendered training sets of the concept world: balanced random scenes, their pictures, cached on disk.

Both the model trainer and the judge trainer draw scenes uniformly over object kind, colour, position and
background from a seeded generator, render them (one render seed per image) and keep the result as uint8
arrays in an ``.npz`` cache, so that a resumed run does not render again.

Public API: :func:`random_scenes`, :class:`RenderedSet`, :func:`rendered_set`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..utils.atomic import atomic_path
from .render import render_array
from .spec import WORLD, Scene

ATTRS = ("shape", "colour", "position", "background")


def random_scenes(n: int, seed: int) -> np.ndarray:
    """``[n, 4]`` int array of attribute indices (shape, colour, position, background), uniform and seeded."""
    if n <= 0:
        raise ConfigError(f"The number of scenes must be positive; got {n}.")
    rng = np.random.default_rng(seed)
    cols = [rng.integers(len(WORLD.ids(a)), size=n) for a in ATTRS]
    return np.stack(cols, axis=1).astype(np.int64)


def scene_of(row) -> Scene:
    return Scene(*(WORLD.ids(a)[int(i)] for a, i in zip(ATTRS, row)))


@dataclasses.dataclass
class RenderedSet:
    """Pictures (uint8 ``[N, 3, H, W]``), their attribute indices ``[N, 4]`` and render seeds ``[N]``."""

    images: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def scene(self, i: int) -> Scene:
        return scene_of(self.labels[i])


def render_fingerprint() -> str:
    """A short hash of a few renders: a cache made by another renderer is not reused."""
    import hashlib

    h = hashlib.sha1()
    for k, o in enumerate(WORLD.objects):
        s = Scene(o.id, WORLD.ids("colour")[k % 6], WORLD.ids("position")[k % 5], WORLD.ids("background")[k % 3])
        h.update(np.round(render_array(s, k) * 255).astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


def rendered_set(n: int, seed: int, cache: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None) -> RenderedSet:
    """Render ``n`` random scenes (render seeds ``seed * 1_000_003 + i``), cached in ``cache`` if given."""
    if cache is not None and Path(cache).exists():
        with np.load(cache) as z:
            if (int(z["n"]) == n and int(z["seed"]) == seed and "renderer" in z.files
                    and str(z["renderer"]) == render_fingerprint()):
                return RenderedSet(z["images"], z["labels"], z["seeds"])
    labels = random_scenes(n, seed)
    seeds = (np.int64(seed) * 1_000_003 + np.arange(n, dtype=np.int64))
    images = np.empty((n, 3, WORLD.image_size, WORLD.image_size), dtype=np.uint8)
    t0 = time.time()
    for i in range(n):
        images[i] = np.round(render_array(scene_of(labels[i]), int(seeds[i])) * 255).astype(np.uint8)
        if progress is not None and ((i + 1) % 5000 == 0 or i + 1 == n):
            progress(i + 1, n)
    if cache is not None:
        with atomic_path(cache, "render cache") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels, seeds=seeds, n=n, seed=seed, version=WORLD.version,
                         renderer=render_fingerprint(),
                         seconds=time.time() - t0)
    return RenderedSet(images, labels, seeds)
