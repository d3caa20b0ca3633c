"""Building a preference dataset from image files you already have.

The CSV has the columns ``prompt_unsafe, prompt_safe, image_safe, image_unsafe, category`` (image paths
relative to the CSV; ``category`` may list several, comma-separated, in any known spelling). Each image
is resized (shorter side) and centre-cropped to the model's size, then encoded by the model's VAE.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from ..categories import normalize_categories
from ..denoiser.protocol import RenderingDenoiser
from ..errors import ConfigError, DatasetError
from .preference_dataset import PreferenceDatasetWriter

COLUMNS = ("prompt_unsafe", "prompt_safe", "image_safe", "image_unsafe", "category")


def load_image(path: Path, size: tuple[int, int], where: str) -> Image.Image:
    """Open ``path`` as RGB, resize its shorter side and centre-crop to ``size`` (h, w)."""
    if not path.exists():
        raise DatasetError(f"{where}: image {path} does not exist.")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{where}: {path} is not a readable image ({e}).") from e
    h, w = size
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def read_pairs_csv(csv_path: Path) -> list[dict]:
    """Rows of the CSV, validated; errors name the line."""
    if not csv_path.exists():
        raise DatasetError(f"The CSV {csv_path} does not exist.")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path} lacks the column(s) {missing}; it needs {', '.join(COLUMNS)}.")
        rows = []
        for line, row in enumerate(reader, start=2):
            empty = [c for c in COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise DatasetError(f"{csv_path}, line {line}: empty {', '.join(empty)}.")
            try:
                row["category"] = normalize_categories(row["category"])
            except ConfigError as e:
                raise DatasetError(f"{csv_path}, line {line}: {e}") from e
            row["_line"] = line
            rows.append(row)
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no pairs.")
    return rows


def build_from_images(denoiser: RenderingDenoiser, csv_path: str | os.PathLike, out: str | os.PathLike,
                      size: int | None = None, resume: bool = False, overwrite: bool = False,
                      progress: Callable[[int, int, dict], None] | None = None) -> Path:
    """Encode the CSV's image pairs with ``denoiser``'s VAE into a preference dataset at ``out``."""
    csv_path = Path(csv_path)
    rows = read_pairs_csv(csv_path)
    side = size or denoiser.sample_size
    denoiser.latent_shape(side, side)  # validates the size for this model
    settings = {"source": "images", "csv": str(csv_path), "size": side}
    with PreferenceDatasetWriter(out, model_fingerprint=denoiser.fingerprint(), settings=settings,
                                 resume=resume, overwrite=overwrite) as writer:
        for n, row in enumerate(rows, start=1):
            pid = "img-" + hashlib.sha256(f"{row['prompt_unsafe']}\t{row['image_safe']}\t{row['image_unsafe']}".encode()).hexdigest()[:12]
            if pid in writer.done_ids:
                continue
            where = f"{csv_path}, line {row['_line']}"
            imgs = [load_image(csv_path.parent / row[c], (side, side), where) for c in ("image_safe", "image_unsafe")]
            lat = denoiser.encode_images(torch.stack([to_tensor(i) for i in imgs]))
            writer.add(id=pid, category=row["category"], concept=row.get("concept", "") or "",
                       unsafe=row["prompt_unsafe"], safe=row["prompt_safe"], safe_latent=lat[0], unsafe_latent=lat[1],
                       height=side, width=side, preview_safe=imgs[0], preview_unsafe=imgs[1],
                       source_images=[row["image_safe"], row["image_unsafe"]])
            if progress:
                progress(n, len(rows), {})
    return Path(out)
