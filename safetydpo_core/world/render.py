"""The procedural renderer of the concept world: a :class:`~.spec.Scene` and a seed -> a 32x32 RGB image.

Each object kind is a glyph given as an inside-test on local coordinates ``(u, v)`` in ``[-1, 1]`` (``u`` to
the right, ``v`` down). The seed decides the small variations: the object's offset from its nominal
position (up to 1.25 px), its size (half-side 6.8 to 8.2 px), a rotation of up to 8 degrees, the exact tint of
the colour and of the background, and a faint background gradient. Edges are anti-aliased by rendering at
4x4 supersampling. Rendering uses only NumPy with its PCG64 generator, so a (scene, seed) gives the same
pixels on every machine.

Public API: :func:`render`, :func:`render_batch`, :func:`to_pil`, :data:`GLYPHS`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .spec import WORLD, Scene

SUPERSAMPLE = 4
MAX_OFFSET = 1.25
HALF_SIZE = (6.8, 8.2)
MAX_ROTATION_DEG = 8.0


def _polygon(points: Sequence[tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    px = np.array([p[0] for p in points], dtype=np.float64)
    py = np.array([p[1] for p in points], dtype=np.float64)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        res = np.zeros(u.shape, dtype=bool)
        j = len(px) - 1
        for i in range(len(px)):
            cond = (py[i] > v) != (py[j] > v)
            with np.errstate(divide="ignore", invalid="ignore"):
                xint = (px[j] - px[i]) * (v - py[i]) / (py[j] - py[i]) + px[i]
            res ^= cond & (u < xint)
            j = i
        return res

    return inside


def _star_points(n: int = 5, r_out: float = 1.0, r_in: float = 0.42) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = -np.pi / 2 + k * np.pi / n
        pts.append((r * np.cos(a), r * np.sin(a) + 0.08))
    return pts


def _box(u, v, s=0.85):
    return (np.abs(u) <= s) & (np.abs(v) <= s)


def _heart(u, v):
    x, y = u * 1.2, -v * 1.2 + 0.2
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


_bolt = _polygon([(0.3, -1.0), (-0.72, 0.15), (-0.08, 0.15), (-0.38, 1.0), (0.74, -0.22), (0.1, -0.22), (0.58, -1.0)])
_star = _polygon(_star_points())
_triangle = _polygon([(0.0, -0.9), (0.92, 0.8), (-0.92, 0.8)])

GLYPHS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: u * u + v * v <= 0.9 ** 2,
    "square": lambda u, v: _box(u, v, 0.8),
    "triangle": _triangle,
    # unsafe concept glyphs
    "saltire": lambda u, v: _box(u, v, 0.88) & ((np.abs(u - v) <= 0.34) | (np.abs(u + v) <= 0.34)),
    "bolt": _bolt,
    "arrow": lambda u, v: ((np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15))
    | ((u >= 0.05) & (u <= 0.95) & (np.abs(v) <= 0.85 * (0.95 - u) / 0.9)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 0.98,
    "hourglass": lambda u, v: (np.abs(v) <= 0.88) & (np.abs(u) <= 0.9 * np.abs(v) + 0.06),
    "star": _star,
    "dots": lambda u, v: ((u ** 2 + (v + 0.48) ** 2) <= 0.36 ** 2) | (((u + 0.5) ** 2 + (v - 0.45) ** 2) <= 0.36 ** 2)
    | (((u - 0.5) ** 2 + (v - 0.45) ** 2) <= 0.36 ** 2),
    # safe twins
    "heart": _heart,
    "ring": lambda u, v: (u * u + v * v <= 0.92 ** 2) & (u * u + v * v >= 0.55 ** 2),
    "tee": lambda u, v: ((np.abs(v + 0.62) <= 0.24) & (np.abs(u) <= 0.9)) | ((np.abs(u) <= 0.22) & (v >= -0.7) & (v <= 0.9)),
    "bars": lambda u, v: (np.abs(v) <= 0.88) & ((np.abs(u) <= 0.17) | (np.abs(np.abs(u) - 0.7) <= 0.17)),
    "frame": lambda u, v: _box(u, v, 0.85) & ~_box(u, v, 0.45),
    "crescent": lambda u, v: (u * u + v * v <= 0.92 ** 2) & ((u - 0.42) ** 2 + (v + 0.1) ** 2 > 0.7 ** 2),
    "checker": lambda u, v: _box(u, v, 0.85) & ((u < 0) == (v < 0)),
}

missing = {o.glyph for o in WORLD.objects} - set(GLYPHS)
assert not missing, missing


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE
    return np.meshgrid(c, c)  # x (columns), y (rows)


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def render_array(scene: Scene | Mapping, seed: int, size: int | None = None) -> np.ndarray:
    """The picture as a float32 array ``[3, size, size]`` in ``[0, 1]``."""
    scene = Scene.from_value(scene)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"A render seed must be a non-negative integer; got {seed!r}.")
    size = int(size or WORLD.image_size)
    if size < 16 or size % 8:
        raise ConfigError(f"World image size must be a multiple of 8 and at least 16; got {size}.")
    rng = np.random.default_rng(int(seed))
    scale = size / WORLD.image_size
    cx, cy = WORLD.get("position", scene.position).data
    cx = (cx + rng.uniform(-MAX_OFFSET, MAX_OFFSET)) * scale
    cy = (cy + rng.uniform(-MAX_OFFSET, MAX_OFFSET)) * scale
    half = rng.uniform(*HALF_SIZE) * scale
    theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    rgb = np.clip(np.array(WORLD.get("colour", scene.colour).data, dtype=np.float64) + rng.normal(0, 9, 3), 0, 255)
    bg = np.array(WORLD.get("background", scene.background).data, dtype=np.float64) + rng.uniform(-8, 8)
    grad_dir = rng.uniform(0, 2 * np.pi)
    grad_amp = rng.uniform(-10, 10)

    if size not in _GRIDS:
        _GRIDS[size] = _grid(size)
    x, y = _GRIDS[size]
    dx, dy = x - cx, y - cy
    c, s = np.cos(theta), np.sin(theta)
    u = (c * dx + s * dy) / half
    v = (-s * dx + c * dy) / half
    mask = GLYPHS[WORLD.object(scene.shape).glyph](u, v).astype(np.float64)
    n = size
    mask = mask.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))
    gx = (np.arange(n) + 0.5) / n - 0.5
    back = bg[:, None, None] + grad_amp * (np.cos(grad_dir) * gx[None, :] + np.sin(grad_dir) * gx[:, None])[None]
    img = back * (1 - mask[None]) + rgb[:, None, None] * mask[None]
    return (np.clip(img, 0, 255) / 255.0).astype(np.float32)


def render(scene: Scene | Mapping, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """Render one scene: a float tensor ``[3, H, W]`` in ``[0, 1]`` (H = W = 32 by default)."""
    return torch.from_numpy(render_array(scene, seed, size))


def render_batch(scenes: Iterable[Scene | Mapping], seeds: Iterable[int], size: int | None = None) -> torch.Tensor:
    """Render several scenes, one seed each: ``[B, 3, H, W]`` in ``[0, 1]``."""
    scenes, seeds = list(scenes), list(seeds)
    if len(scenes) != len(seeds):
        raise ConfigError(f"render_batch got {len(scenes)} scenes but {len(seeds)} seeds; give one seed per scene.")
    if not scenes:
        raise ConfigError("render_batch got no scenes.")
    return torch.from_numpy(np.stack([render_array(s, int(k), size) for s, k in zip(scenes, seeds)]))


def to_pil(image: torch.Tensor, scale: int = 1):
    """A ``[3, H, W]`` tensor in ``[0, 1]`` -> a PIL image (optionally enlarged ``scale`` times, nearest)."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] != 3:
        raise ConfigError(f"to_pil wants one [3, H, W] image; got shape {tuple(image.shape)}.")
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def contact_sheet(images: torch.Tensor, columns: int = 8, scale: int = 3):
    """A grid of ``[B, 3, H, W]`` images as one PIL image (for looking at results)."""
    from PIL import Image

    b = images.shape[0]
    rows = (b + columns - 1) // columns
    h, w = images.shape[2] * scale, images.shape[3] * scale
    sheet = Image.new("RGB", (columns * (w + 2), rows * (h + 2)), (60, 60, 60))
    for i in range(b):
        sheet.paste(to_pil(images[i], scale), ((i % columns) * (w + 2), (i // columns) * (h + 2)))
    return sheet
