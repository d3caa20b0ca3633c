"""The preference dataset format that every producer writes and the trainer reads.

A dataset is a folder::

    DATA/
      dataset.json            header: format, version, model fingerprint, settings, counts
      manifest.jsonl          one JSON object per pair (see PairRecord)
      shards/shard-00000.safetensors   latents: "<id>.safe" and "<id>.unsafe" ([C, h, w] each)
      previews/<id>.safe.png, <id>.unsafe.png   optional

Latents are the model's scaled latents (what the UNet sees at t = 0), so training needs no VAE. Writing
is crash-safe and resumable: a shard is written atomically before its manifest lines are appended, a
torn last manifest line is dropped on resume, and ids already in the manifest are skipped, so a crashed
render resumes without duplicates. A full disk is a one-line error naming the file, and the next run
resumes. Writing holds ``DATA.lock`` beside the folder, so a second run on the same dataset is refused.

``overwrite`` never deletes the old dataset first: the new one is built beside it (``.DATA.new``) and swapped
in when it is complete, so a failure or Ctrl-C leaves the old dataset as it was.

Latents are checked for NaN/infinities when written and when read (the error names the shard and key).
Pairs whose safe and unsafe latents are bit-identical teach nothing: the writer marks them
(``"identical": true`` in the manifest, ``identical_pairs`` in the header) and :meth:`PreferenceDataset.drop_identical`
leaves them out of training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..categories import normalize_categories
from ..errors import DatasetError, SafetyDPOError
from ..utils.atomic import atomic_path, atomic_write_text, disk_full_errors, ensure_writable_dir
from ..utils.lock import OutputLock
from ..utils.numbers import check_finite_tensors, first_nonfinite
from .manifest_index import LazyRecords, iter_manifest, open_index

log = logging.getLogger(__name__)

FORMAT = "safetydpo-preference-dataset"
VERSION = 1
OPEN_SHARDS = 4  # shards kept open while reading (100,000 pairs are ~1,600 shards: never all at once)
_SHARD_RE = re.compile(r"shard-(\d+)\.safetensors$")


@dataclasses.dataclass
class PairRecord:
    """One manifest line: a prompt pair and where its two latents are stored."""

    id: str
    category: list[str]
    concept: str
    unsafe: str
    safe: str
    seed: int | None
    height: int
    width: int
    latent_shape: list[int]
    shard: str
    model_fingerprint: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "manifest") -> "PairRecord":
        fields = _FIELDS
        missing = [f for f in ("id", "unsafe", "safe", "latent_shape", "shard") if f not in d]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {missing}.")
        known = {k: d[k] for k in fields if k in d}
        known.setdefault("category", [])
        known["category"] = _categories(known["category"])
        known.setdefault("concept", "")
        known.setdefault("seed", None)
        known.setdefault("height", 0)
        known.setdefault("width", 0)
        known.setdefault("model_fingerprint", "")
        known["id"] = str(known["id"])
        return cls(**known, extra={k: v for k, v in d.items() if k not in fields})

    @staticmethod
    def index_entry(d: dict[str, Any], where: str = "manifest") -> "_IndexEntry":
        """What the manifest's index keeps of one line, checked as :meth:`from_json` checks it (faster)."""
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: not a JSON object.")
        missing = [f for f in ("id", "unsafe", "safe", "latent_shape", "shard") if f not in d]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {missing}.")
        return _IndexEntry(d["shard"], _categories(d.get("category")), d["latent_shape"], d.get("identical"))


class _IndexEntry:
    __slots__ = ("shard", "category", "latent_shape", "identical")

    def __init__(self, shard, category, latent_shape, identical):
        self.shard, self.category, self.latent_shape, self.identical = shard, category, latent_shape, identical

    @property
    def extra(self) -> dict[str, Any]:
        return {"identical": self.identical}


def _categories(cats) -> list[str]:
    if not cats:
        return []
    try:
        return list(_normalized(tuple(cats) if isinstance(cats, list) else cats))
    except TypeError:  # unhashable entries: let normalize_categories name the problem
        return normalize_categories(cats)


_FIELDS = frozenset(f.name for f in dataclasses.fields(PairRecord)) - {"extra"}


@functools.lru_cache(maxsize=1024)
def _normalized(categories: tuple[str, ...] | str) -> tuple[str, ...]:
    """:func:`normalize_categories`, memoised: a 100,000-line manifest repeats a few category sets."""
    return tuple(normalize_categories(list(categories) if isinstance(categories, tuple) else categories))


def _read_manifest(path: Path) -> tuple[list[PairRecord], int]:
    """Records and the byte length of the valid prefix (a torn last line is dropped with a warning). For small
    manifests (a process's part); a dataset reads its manifest through the index (:mod:`.manifest_index`)."""
    records, valid = [], 0
    for rec, start, length in iter_manifest(path, 0, PairRecord.from_json):
        records.append(rec)
        valid = start + length
    return records, _valid_length(path, valid)


def _valid_length(path: Path, end: int) -> int:
    """``end`` (the end of the last good record) moved past the newline and blank lines that follow it."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(end)
        rest = f.read(size - end)
    return size if not rest.strip() else end + (len(rest) - len(rest.lstrip(b"\n")))


class PreferenceDatasetWriter:
    """Appends pairs to a dataset folder in shards; use as a context manager.

    ``resume=True`` continues an existing dataset (ids already present are reported by :attr:`done_ids`);
    without it an existing non-empty dataset is refused unless ``overwrite=True``.
    """

    def __init__(self, root: str | os.PathLike, model_fingerprint: str = "", settings: dict | None = None,
                 shard_size: int = 64, resume: bool = False, overwrite: bool = False, previews: bool = True):
        self.target = Path(root)
        self.root = self.target  # where the files are written (a staging folder beside it while overwriting)
        self.shard_size = max(1, int(shard_size))
        self.previews = previews
        self._staging: Path | None = None
        self._closed = False
        if self.target.exists() and not self.target.is_dir():
            raise DatasetError(f"The dataset output {self.target} is a file; a dataset is a folder. Choose another path.")
        self._lock = OutputLock(self.target, "dataset").acquire()
        try:
            self._open(model_fingerprint, settings, resume, overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _sibling(self, tag: str) -> Path:
        return self.target.with_name(f".{self.target.name}.{tag}")

    def _recover(self) -> None:
        """Clean up after a swap that was cut between its steps (the lock is held)."""
        old, new = self._sibling("old"), self._sibling("new")
        if not old.exists():
            return
        if (self.target / "manifest.jsonl").exists():  # the swap was done; only the old copy was left
            shutil.rmtree(old, ignore_errors=True)
        elif not self.target.exists() and (new / "dataset.json").exists():  # cut between the two renames
            log.warning("Finishing the interrupted replacement of the dataset %s.", self.target)
            os.replace(new, self.target)
            shutil.rmtree(old, ignore_errors=True)
        elif not self.target.exists() or not any(self.target.iterdir()):
            log.warning("Restoring the dataset %s from %s (its replacement was interrupted).", self.target, old)
            if self.target.exists():
                self.target.rmdir()
            os.replace(old, self.target)

    def _open(self, model_fingerprint: str, settings: dict | None, resume: bool, overwrite: bool) -> None:
        self._recover()
        manifest = self.target / "manifest.jsonl"
        exists = manifest.exists() and manifest.stat().st_size > 0
        if exists and not resume and not overwrite:
            raise DatasetError(f"The dataset folder {self.target} already holds a dataset. Use --resume to continue it "
                               f"or --overwrite to replace it.")
        if exists and overwrite and not resume:
            staging = self._sibling("new")
            if staging.exists():  # what an interrupted earlier overwrite left (we hold the lock)
                shutil.rmtree(staging)
            self._staging = self.root = staging
            manifest = staging / "manifest.jsonl"
            exists = False
        ensure_writable_dir(self.root, "dataset")
        (self.root / "shards").mkdir(exist_ok=True)
        if self.previews:
            (self.root / "previews").mkdir(exist_ok=True)
        self.header = self._read_header() if (resume and exists) else {}
        if resume and exists:
            old_fp = self.header.get("model_fingerprint", "")
            if old_fp and model_fingerprint and old_fp != model_fingerprint:
                raise DatasetError(f"Cannot resume {self.root}: it was rendered with model {old_fp}, this model is "
                                   f"{model_fingerprint}. Use a new output folder or --overwrite.")
        # Streamed, not held: a resumed 100,000-pair render keeps only the ids and the counts.
        self.done_ids: set[str] = set()
        self._written = 0
        self.category_counts: Counter[str] = Counter()
        self.identical = 0
        end = 0
        for rec, start, length in iter_manifest(manifest, 0, PairRecord.from_json):
            self._count(rec)
            end = start + length
        valid = _valid_length(manifest, end)
        if manifest.exists() and valid < manifest.stat().st_size:
            with open(manifest, "r+b") as f:
                f.truncate(valid)
        self.model_fingerprint = model_fingerprint or self.header.get("model_fingerprint", "")
        self.settings = {**self.header.get("settings", {}), **(settings or {})}
        self._next_shard = 1 + max((int(m.group(1)) for f in (self.root / "shards").glob("shard-*.safetensors")
                                    if (m := _SHARD_RE.search(f.name))), default=-1)
        self._buffer: list[tuple[PairRecord, torch.Tensor, torch.Tensor]] = []
        self._write_header()

    def _read_header(self) -> dict:
        p = self.root / "dataset.json"
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p} is not valid JSON ({e.msg}).") from e

    def _write_header(self) -> None:
        header = {"format": FORMAT, "version": VERSION, "model_fingerprint": self.model_fingerprint,
                  "settings": self.settings, "pairs": self.pairs, "per_category": self.per_category(),
                  "identical_pairs": self.identical}
        atomic_write_text(self.root / "dataset.json", json.dumps(header, indent=1) + "\n", "dataset header")

    def add(self, *, id: str, category: Sequence[str] | str, concept: str, unsafe: str, safe: str,
            safe_latent: torch.Tensor, unsafe_latent: torch.Tensor, seed: int | None = None, height: int = 0,
            width: int = 0, preview_safe=None, preview_unsafe=None, **extra: Any) -> PairRecord:
        """Queue one pair; it is on disk after the next :meth:`flush` (every ``shard_size`` pairs)."""
        id = str(id)
        if id in self.done_ids:
            raise DatasetError(f"Pair id {id!r} is already in the dataset {self.root}.")
        if tuple(safe_latent.shape) != tuple(unsafe_latent.shape):
            raise DatasetError(f"Pair {id!r}: the safe latent {tuple(safe_latent.shape)} and the unsafe latent "
                               f"{tuple(unsafe_latent.shape)} differ in shape; both images must have the same size.")
        bad = first_nonfinite({"safe": safe_latent, "unsafe": unsafe_latent})
        if bad is not None:
            raise DatasetError(f"Pair {id!r}: the {bad} latent holds NaN or infinite values, so the pair is not written. "
                               f"The model's sampling diverged: check the guidance scale, or use fp32 instead of fp16.")
        if self.previews and preview_safe is not None:
            rel = preview_paths(id)
            for image, path in ((preview_safe, rel[0]), (preview_unsafe, rel[1])):
                with atomic_path(self.root / path, "preview image") as tmp:
                    image.save(tmp, format="PNG")
            extra.setdefault("previews", list(rel))
        if torch.equal(safe_latent, unsafe_latent):
            extra["identical"] = True
        rec = PairRecord(id=id, category=normalize_categories(category), concept=concept, unsafe=unsafe, safe=safe,
                         seed=seed, height=int(height), width=int(width), latent_shape=list(safe_latent.shape),
                         shard="", model_fingerprint=self.model_fingerprint, extra=extra)
        self._buffer.append((rec, safe_latent.detach().to("cpu", torch.float32).contiguous(),
                             unsafe_latent.detach().to("cpu", torch.float32).contiguous()))
        self.done_ids.add(id)
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return rec

    def flush(self) -> None:
        """Write queued pairs: the shard first (atomically), then their manifest lines."""
        if not self._buffer:
            return
        name = f"shards/shard-{self._next_shard:05d}.safetensors"
        tensors = {}
        for rec, s, u in self._buffer:
            rec.shard = name
            tensors[f"{rec.id}.safe"] = s
            tensors[f"{rec.id}.unsafe"] = u
        with atomic_path(self.root / name, "dataset shard") as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        self._next_shard += 1
        lines = "".join(json.dumps(rec.to_json(), ensure_ascii=False) + "\n" for rec, _, _ in self._buffer)
        with disk_full_errors(self.root / "manifest.jsonl", "dataset manifest"):
            with open(self.root / "manifest.jsonl", "a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        for rec, _, _ in self._buffer:
            self._count(rec)
        self._buffer.clear()
        self._write_header()

    def _count(self, rec: PairRecord) -> None:
        self._written += 1
        self.done_ids.add(rec.id)
        self.category_counts.update(rec.category)
        self.identical += bool(rec.extra.get("identical"))  # pairs with bit-identical safe and unsafe latents

    @property
    def pairs(self) -> int:
        """How many pairs are written (flushed) so far."""
        return self._written

    def per_category(self) -> dict[str, int]:
        """Pairs written so far per category."""
        return dict(sorted(self.category_counts.items()))

    def close(self, commit: bool = True) -> None:
        """Write what is queued; when overwriting, swap the new dataset in (``commit``) or leave the old one."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
            self._write_header()
            if (self.root / "manifest.jsonl").exists():  # so the finished dataset opens at once
                try:
                    open_index(self.root / "manifest.jsonl", PairRecord.index_entry)
                except (OSError, SafetyDPOError) as e:
                    log.warning("Could not index %s (%s); it will be indexed when it is opened.", self.root, e)
            if self._staging is not None:
                if commit:
                    self._swap()
                else:
                    log.warning("The dataset %s is unchanged; the unfinished replacement is in %s (run again with "
                                "--overwrite to start it over).", self.target, self._staging)
        finally:
            self._lock.release()

    def _swap(self) -> None:
        """The finished new dataset replaces the old one: two renames, recovered by the next run if cut."""
        old = self._sibling("old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(self.target, old)
        os.replace(self._staging, self.target)
        self.root, self._staging = self.target, None
        shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> "PreferenceDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Keep what was rendered even when interrupted: finished pairs are flushed, so a resume skips them.
        self.close(commit=exc_type is None)


def _safe_name(id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", id)


def preview_paths(pair_id: str) -> tuple[str, str]:
    """Paths, relative to the dataset folder, of a pair's (safe, unsafe) preview PNGs."""
    name = _safe_name(pair_id)
    return f"previews/{name}.safe.png", f"previews/{name}.unsafe.png"


class PreferenceDataset:
    """Read a preference dataset, optionally restricted to some categories.

    ``expect_fingerprint``: the fingerprint of the model about to be trained; a dataset rendered with another
    model is refused (``on_mismatch="error"``) or accepted with a warning (``"warn"``).
    """

    def __init__(self, root: str | os.PathLike, categories: Iterable[str] | str | None = None,
                 expect_fingerprint: str | None = None, on_mismatch: str = "error"):
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"The dataset folder {self.root} does not exist.")
        if not (self.root / "manifest.jsonl").exists():
            raise DatasetError(f"{self.root} is not a preference dataset: it has no manifest.jsonl. Make one with "
                               f"`safetydpo render` or `safetydpo dataset from-images`.")
        header_path = self.root / "dataset.json"
        try:
            self.header = json.loads(header_path.read_text(encoding="utf-8")) if header_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{header_path} is not valid JSON ({e}); the dataset header is damaged. Re-render, "
                               f"or delete dataset.json to read the manifest alone.") from e
        if not isinstance(self.header, dict):
            raise DatasetError(f"{header_path} does not hold a dataset header (a JSON object).")
        if self.header and self.header.get("format") != FORMAT:
            raise DatasetError(f"{header_path} is not a {FORMAT} header (format {self.header.get('format')!r}).")
        manifest = self.root / "manifest.jsonl"
        # An index (built once, stored beside the manifest) instead of the parsed manifest: opening 100,000
        # pairs takes milliseconds and a few MB, and records are parsed when used.
        self.index = open_index(manifest, PairRecord.index_entry)
        self.all_records: LazyRecords = LazyRecords(manifest, self.index, PairRecord.from_json)
        records = self.all_records
        if not len(records):
            raise DatasetError(f"The dataset {self.root} is empty: its manifest lists no pairs.")
        self.categories = normalize_categories(categories) if categories else []
        if self.categories:
            wanted = set(self.categories)
            sets = [i for i, c in enumerate(self.index.category_sets) if set(c) & wanted]
            records = records.select(np.flatnonzero(np.isin(self.index.cats, sets)))
            if not len(records):
                have = sorted({c for cs in self.index.category_sets for c in cs})
                raise DatasetError(f"The dataset {self.root} has no pairs for {', '.join(self.categories)}; "
                                   f"it has pairs for: {', '.join(have) or 'no category at all'}.")
        self.records = records
        self.model_fingerprint = self.header.get("model_fingerprint") or records[0].model_fingerprint
        if expect_fingerprint and self.model_fingerprint and expect_fingerprint != self.model_fingerprint:
            msg = (f"The dataset {self.root} was made with model {self.model_fingerprint}, but the model being "
                   f"trained is {expect_fingerprint}. Its images are not this model's outputs.")
            if on_mismatch == "error":
                raise DatasetError(msg + " Pass --allow-model-mismatch to train on it anyway.")
            log.warning(msg)
        for shape in self.latent_shapes():
            if len(shape) != 3:
                r = self._first_with_shape(shape)
                raise DatasetError(f"Pair {r.id!r} has latent shape {r.latent_shape}; expected [channels, height, width].")
        self._handles: OrderedDict[str, Any] = OrderedDict()  # a few open shards: memory bounded by a shard

    @property
    def records(self) -> Sequence[PairRecord]:
        """The pairs in use: a :class:`~.manifest_index.LazyRecords` (parsed when read), or a list if one was set."""
        return self._records

    @records.setter
    def records(self, value: Sequence[PairRecord]) -> None:
        self._records = value

    def latent_shapes(self) -> set[tuple[int, ...]]:
        """The distinct latent shapes of the pairs in use (from the index, without reading the records)."""
        if isinstance(self._records, LazyRecords):
            return self._records.shapes()
        return {tuple(r.latent_shape) for r in self._records}

    def _first_with_shape(self, shape: tuple[int, ...]) -> PairRecord:
        return next(r for r in self._records if tuple(r.latent_shape) == tuple(shape))

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        """Digest of the manifest lines in use (ids and prompts), for LoRA metadata."""
        import hashlib

        cached = getattr(self, "_fingerprint", None)
        if cached is not None and cached[0] is self._records:  # computed once per selection (checkpoints ask often)
            return cached[1]
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.id}\t{r.unsafe}\t{r.safe}\t{r.shard}\n".encode())
        if isinstance(self._records, LazyRecords):  # immutable; a list set by hand could change in place
            self._fingerprint = (self._records, h.hexdigest()[:16])
        return h.hexdigest()[:16]

    def per_category(self) -> dict[str, int]:
        if isinstance(self._records, LazyRecords):
            sets = self.index.category_sets
            counts = Counter()
            for k, n in zip(*np.unique(self._records.column("cats"), return_counts=True)):
                counts.update({c: int(n) for c in sets[k]})
            return dict(sorted(counts.items()))
        return dict(sorted(Counter(c for r in self.records for c in r.category).items()))

    def _shard(self, name: str):
        h = self._handles.get(name)
        if h is not None:
            self._handles.move_to_end(name)
        else:
            path = self.root / name
            if not path.exists():
                raise DatasetError(f"Dataset shard {path} is missing; the dataset is incomplete. Re-run the render "
                                   f"with --resume.")
            try:
                h = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise DatasetError(f"Dataset shard {path} cannot be read: {e}.") from e
            self._handles[name] = h
            while len(self._handles) > OPEN_SHARDS:
                self._handles.popitem(last=False)
        return h

    def load_latent(self, shard: str, key: str) -> torch.Tensor:
        """One stored latent by shard file and key (``<id>.safe`` or ``<id>.unsafe``), of any pair in the folder."""
        try:
            return self._shard(shard).get_tensor(key)
        except (SafetensorError, KeyError) as e:
            raise DatasetError(f"The latent {key!r} is listed in the manifest but missing from {shard}.") from e

    def load_pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (safe, unsafe) latents of pair ``i``."""
        r = self.records[i]
        h = self._shard(r.shard)
        try:
            s, u = h.get_tensor(f"{r.id}.safe"), h.get_tensor(f"{r.id}.unsafe")
        except (SafetensorError, KeyError) as e:
            raise DatasetError(f"Pair {r.id!r} is listed in the manifest but missing from {r.shard}.") from e
        if s.shape != u.shape:
            raise DatasetError(f"Pair {r.id!r}: the safe latent {tuple(s.shape)} and the unsafe latent {tuple(u.shape)} "
                               f"differ in shape.")
        check_finite_tensors({f"{r.id}.safe": s, f"{r.id}.unsafe": u}, f"Dataset shard {self.root / r.shard}",
                             DatasetError)
        return s, u

    def drop_identical(self) -> list[str]:
        """Read every pair once (which also refuses NaN/inf latents, naming shard and key), leave out the pairs
        whose safe and unsafe latents are bit-identical, and return their ids."""
        keep, dropped = [], []
        for i, r in enumerate(self.records):
            s, u = self.load_pair(i)
            (dropped if torch.equal(s, u) else keep).append(i)
        dropped = [self.records[i].id for i in dropped]
        if dropped and not keep:
            raise DatasetError(f"Every selected pair of {self.root} ({len(dropped)}) has bit-identical safe and unsafe "
                               f"latents: there is nothing to learn. Render pairs whose prompts differ in what the model "
                               f"draws.")
        if dropped:
            records = self.records
            self.records = (records.select(records.rows[keep]) if isinstance(records, LazyRecords)
                            else [records[i] for i in keep])
        return dropped
