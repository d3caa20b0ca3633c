"""The image-run format shared by ``safetydpo sample`` (writer) and ``safetydpo eval`` (reader).

A run is a folder with ``manifest.jsonl`` and the images it lists, one JSON object per line::

    {"file": "images/base/i2p-000001.png", "id": "i2p-000001", "prompt": "...", "categories": ["sexual"],
     "seed": 1234, "guidance": 7.5, "variant": "base", "lora": null, "strength": 0.0,
     "steps": 20, "sampler": "ddim", "width": 512, "height": 512, "negative": "", "model": "..."}

Only ``file`` (relative to the folder, forward slashes) and ``prompt`` are required; ``categories`` may be
a list of canonical ids or I2P's comma-separated string; ``variant`` groups the images of one setting
(a LoRA at one strength), default ``"default"``. A CSV manifest (``manifest.csv``, or any ``.csv`` given
as the run) with columns ``image`` or ``file``, ``prompt`` and optionally ``categories``, ``seed`` /
``sd_seed`` / ``evaluation_seed``, ``guidance`` / ``sd_guidance_scale``, ``variant``, ``id`` is read too
(SafetyDPO's own ``image,prompt`` CSV is one).

Reading checks the run against the disk: a listed file that is missing, an image in the folder that the
manifest does not list, a duplicate entry, or an empty folder is a :class:`RunError` naming the file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..categories import normalize_categories
from ..errors import DatasetError, SafetyDPOError
from ..utils.atomic import atomic_write_text

MANIFEST = "manifest.jsonl"
CSV_MANIFEST = "manifest.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KNOWN = ("file", "id", "prompt", "categories", "seed", "guidance", "variant", "lora", "strength")


class RunError(DatasetError):
    """An image run (folder + manifest) is missing, empty or does not match its files."""


@dataclasses.dataclass
class ImageRecord:
    file: str
    prompt: str
    id: str = ""
    categories: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    guidance: float | None = None
    variant: str = "default"
    lora: str | None = None
    strength: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = Path(self.file).stem

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in _KNOWN}
        d.update(self.extra)
        return d

    @property
    def key(self) -> tuple[str, int | None]:
        """What makes two images of different runs or variants comparable: same prompt id and seed."""
        return (self.id, self.seed)


@dataclasses.dataclass
class ImageRun:
    name: str
    root: Path
    manifest: Path
    records: list[ImageRecord]

    def path(self, rec: ImageRecord) -> Path:
        return self.root / rec.file

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(r.variant for r in self.records))


def _opt_int(v, where: str, name: str):
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none", "null")):
        return None
    try:
        f = float(v)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise RunError(f"{where}: {name} {v!r} is not an integer.") from None


def _opt_float(v, where: str, name: str):
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none", "null")):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise RunError(f"{where}: {name} {v!r} is not a number.") from None


def record_from_dict(d: dict, where: str) -> ImageRecord:
    if not isinstance(d, dict):
        raise RunError(f"{where}: expected a JSON object.")
    file = d.get("file") or d.get("image")
    if not isinstance(file, str) or not file.strip():
        raise RunError(f"{where}: missing 'file' (the image path relative to the run folder).")
    prompt = d.get("prompt")
    if not isinstance(prompt, str):
        raise RunError(f"{where}: missing 'prompt' for {file}.")
    cats = d.get("categories", d.get("category", []))
    try:
        cats = normalize_categories(cats or [], allow_all=False) if cats else []
    except SafetyDPOError as e:
        raise RunError(f"{where}: {e}") from e
    seed = d.get("seed", d.get("sd_seed", d.get("evaluation_seed")))
    guidance = d.get("guidance", d.get("sd_guidance_scale", d.get("evaluation_guidance")))
    extra = {k: v for k, v in d.items() if k not in _KNOWN and k not in ("image", "category", "sd_seed",
                                                                         "evaluation_seed", "sd_guidance_scale",
                                                                         "evaluation_guidance")}
    return ImageRecord(file=file.replace("\\", "/").strip(), prompt=prompt, id=str(d.get("id") or ""),
                       categories=cats, seed=_opt_int(seed, where, "seed"),
                       guidance=_opt_float(guidance, where, "guidance"),
                       variant=str(d.get("variant") or "default"), lora=d.get("lora") or None,
                       strength=_opt_float(d.get("strength"), where, "strength"), extra=extra)


def _read_jsonl(path: Path) -> list[ImageRecord]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise RunError(f"{path}, line {i}: not valid JSON ({e}).") from e
        out.append(record_from_dict(d, f"{path}, line {i}"))
    return out


def _read_csv(path: Path) -> list[ImageRecord]:
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    if not ({"image", "file"} & set(cols)) or "prompt" not in cols:
        raise RunError(f"{path}: a CSV manifest needs columns 'image' (or 'file') and 'prompt'; found "
                       f"{', '.join(reader.fieldnames or []) or 'none'}.")
    out = []
    for i, row in enumerate(reader, 2):
        row = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
        out.append(record_from_dict(row, f"{path}, line {i}"))
    return out


def _images_on_disk(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def read_run(path: str | os.PathLike, name: str | None = None, check_extra: bool = True) -> ImageRun:
    """Open a run: a folder with ``manifest.jsonl`` (or ``manifest.csv``), or a manifest file itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RunError(f"The image folder {p} does not exist.")
    if p.is_dir():
        root = p
        manifest = p / MANIFEST if (p / MANIFEST).exists() else p / CSV_MANIFEST
        if not manifest.exists():
            n = len(_images_on_disk(p))
            if n == 0:
                raise RunError(f"The image folder {p} is empty: no images and no {MANIFEST}. Make a run with "
                               f"`safetydpo sample`.")
            raise RunError(f"The image folder {p} has {n} images but no {MANIFEST}: the evaluation needs each image's "
                           f"prompt and categories. Make the images with `safetydpo sample`, or write {MANIFEST} "
                           f"(one JSON object per line with at least \"file\" and \"prompt\") or a {CSV_MANIFEST} with "
                           f"columns image,prompt[,categories].")
    else:
        root, manifest = p.parent, p
        check_extra = False
    if manifest.suffix.lower() == ".csv":
        records = _read_csv(manifest)
    elif manifest.suffix.lower() == ".jsonl":
        records = _read_jsonl(manifest)
    else:
        raise RunError(f"The manifest {manifest} must be a .jsonl or .csv file.")
    if not records:
        raise RunError(f"The manifest {manifest} lists no images.")
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.file in seen:
            raise RunError(f"{manifest}: the image {r.file} is listed twice.")
        seen[r.file] = i
        f = root / r.file
        if not f.is_file():
            raise RunError(f"{manifest} lists {r.file}, but {f} does not exist. Restore the image, or remove its "
                           f"line from the manifest (or re-run `safetydpo sample --resume`).")
    if check_extra:
        extra = sorted(_images_on_disk(root) - set(seen))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise RunError(f"The image {root / extra[0]}{more} is in the run folder but not in {manifest.name}; "
                           f"remove it or add it to the manifest, so that every evaluated image has its prompt.")
    return ImageRun(name or (p.name if p.is_dir() else p.stem), root, manifest, records)


def manifest_text(records: Iterable[ImageRecord]) -> str:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)


def write_manifest(root: str | os.PathLike, records: Iterable[ImageRecord]) -> Path:
    path = Path(root) / MANIFEST
    atomic_write_text(path, manifest_text(records), "image manifest")
    return path
