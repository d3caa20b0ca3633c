"""The index of a preference dataset's ``manifest.jsonl``: where each line is and a few compact columns.

A dataset of 100,000+ pairs must open in well under a second and without holding 100,000 parsed records. The
index keeps, per pair, the byte span of its manifest line and small integer columns (shard, category set,
latent shape, the ``identical`` mark), each pointing into short tables of distinct values; a record itself is
parsed only when it is used (:class:`LazyRecords`). For 100,000 pairs that is about 2.5 MB.

``manifest.jsonl`` stays the truth. The index is a cache stored beside it (``manifest.index.safetensors``: plain
arrays plus one JSON metadata entry, never pickle), keyed by the manifest's byte length and SHA-256. When the
manifest only grew (a resumed render appended lines) the index is extended from where it stopped; when it
changed otherwise it is rebuilt; when the folder is read-only the index is built in memory and not stored.
Its bytes depend on the manifest alone, so two runs that write the same manifest write the same index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DatasetError, SafetyDPOError
from ..utils.atomic import atomic_path

log = logging.getLogger(__name__)

INDEX_NAME = "manifest.index.safetensors"
INDEX_VERSION = 1
_CHUNK = 1 << 20
_COLUMNS = ("start", "length", "shard", "cats", "shape", "identical")


def iter_manifest(path: Path, start: int = 0, parse: Callable[[dict, str], Any] | None = None
                  ) -> Iterator[tuple[Any, int, int]]:
    """Yield ``(record, line_start, line_length)`` for each JSON line of ``path`` from byte ``start``.

    A torn last line (an interrupted append) is dropped with a warning; bad JSON anywhere else is an error
    naming the line. ``parse(obj, where)`` turns each object into a record. A complete last line without its
    newline is kept, and ends the manifest.
    """
    if not path.exists():
        return
    with open(path, "rb") as f:
        f.seek(start)
        offset, lineno = start, _line_number(path, start) - 1
        for raw in f:
            here, offset, lineno = offset, offset + len(raw), lineno + 1
            body = raw.rstrip(b"\n")
            if not body.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                if all(not rest.strip() for rest in f):
                    log.warning("%s: dropping an incomplete last line (an interrupted write).", path)
                    return
                raise DatasetError(f"{where}: not valid JSON ({e.msg}). Fix or "
                                   f"remove that line.") from e
            yield (parse(obj, where) if parse else obj), here, len(body)


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte ``offset``."""
    if offset == 0:
        return 1
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(_CHUNK, offset))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def manifest_digest(path: Path, upto: int | None = None) -> str:
    """SHA-256 of the manifest's first ``upto`` bytes (all of it by default), read in 1 MB chunks."""
    h = hashlib.sha256()
    left = path.stat().st_size if upto is None else upto
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class ManifestIndex:
    """Byte spans and compact columns of a manifest's records (row ``i`` is the ``i``-th record in file order)."""

    start: np.ndarray        # int64: byte offset of each line
    length: np.ndarray       # int32: byte length of each line (without its newline)
    shard: np.ndarray        # int32: index into ``shards``
    cats: np.ndarray         # int32: index into ``category_sets``
    shape: np.ndarray        # int32: index into ``shapes``
    identical: np.ndarray    # bool: the writer marked the pair's two latents bit-identical
    shards: list[str]
    category_sets: list[tuple[str, ...]]
    shapes: list[tuple[int, ...]]
    covered: int = 0         # bytes of the manifest the index covers (where parsing stopped)
    file_size: int = 0       # the manifest's size when indexed, and its SHA-256 then
    digest: str = ""

    def __len__(self) -> int:
        return len(self.start)

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> "ManifestIndex":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.int32), np.zeros(0, bool), [], [], [])

    def extend(self, path: Path, parse: Callable[[dict, str], Any]) -> "ManifestIndex":
        """A new index: this one plus the records from byte ``covered`` on."""
        tables = {"shard": {s: i for i, s in enumerate(self.shards)},
                  "cats": {c: i for i, c in enumerate(self.category_sets)},
                  "shape": {s: i for i, s in enumerate(self.shapes)}}
        cols: dict[str, list] = {c: [] for c in _COLUMNS}
        covered = self.covered
        for rec, start, length in iter_manifest(path, self.covered, parse):
            cols["start"].append(start)
            cols["length"].append(length)
            for col, value in (("shard", rec.shard), ("cats", tuple(rec.category)), ("shape", tuple(rec.latent_shape))):
                cols[col].append(tables[col].setdefault(value, len(tables[col])))
            cols["identical"].append(bool(rec.extra.get("identical")))
            covered = start + length
        size = path.stat().st_size
        if covered < size and _rest_is_newlines(path, covered, size):
            covered = size
        return ManifestIndex(
            start=np.concatenate([self.start, np.asarray(cols["start"], np.int64)]),
            length=np.concatenate([self.length, np.asarray(cols["length"], np.int32)]),
            shard=np.concatenate([self.shard, np.asarray(cols["shard"], np.int32)]),
            cats=np.concatenate([self.cats, np.asarray(cols["cats"], np.int32)]),
            shape=np.concatenate([self.shape, np.asarray(cols["shape"], np.int32)]),
            identical=np.concatenate([self.identical, np.asarray(cols["identical"], bool)]),
            shards=list(tables["shard"]), category_sets=list(tables["cats"]), shapes=list(tables["shape"]),
            covered=covered, file_size=size, digest=manifest_digest(path))

    # -- storing --------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        meta = {"version": INDEX_VERSION, "covered": self.covered, "file_size": self.file_size,
                "digest": self.digest, "shards": self.shards, "category_sets": [list(c) for c in self.category_sets],
                "shapes": [list(s) for s in self.shapes]}
        tensors = {"start": torch.from_numpy(self.start), "length": torch.from_numpy(self.length),
                   "shard": torch.from_numpy(self.shard), "cats": torch.from_numpy(self.cats),
                   "shape": torch.from_numpy(self.shape), "identical": torch.from_numpy(self.identical.astype(np.uint8))}
        with atomic_path(path, "dataset index") as tmp:
            save_file(tensors, str(tmp), metadata={"index": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: Path) -> "ManifestIndex | None":
        """The stored index, or None when it is absent, unreadable or of another version."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("index", "{}"))
                if meta.get("version") != INDEX_VERSION:
                    return None
                t = {k: f.get_tensor(k).numpy() for k in _COLUMNS}
        except (OSError, SafetensorError, ValueError, KeyError) as e:
            log.debug("Ignoring the dataset index %s (%s); it will be rebuilt.", path, e)
            return None
        return cls(start=t["start"].astype(np.int64), length=t["length"].astype(np.int32),
                   shard=t["shard"].astype(np.int32), cats=t["cats"].astype(np.int32),
                   shape=t["shape"].astype(np.int32), identical=t["identical"].astype(bool),
                   shards=list(meta["shards"]), category_sets=[tuple(c) for c in meta["category_sets"]],
                   shapes=[tuple(s) for s in meta["shapes"]], covered=int(meta["covered"]),
                   file_size=int(meta["file_size"]), digest=str(meta["digest"]))


def _rest_is_newlines(path: Path, begin: int, end: int) -> bool:
    with open(path, "rb") as f:
        f.seek(begin)
        return not f.read(end - begin).strip()


def open_index(manifest: Path, parse: Callable[[dict, str], Any], store: bool = True) -> ManifestIndex:
    """The index of ``manifest``: the stored one when it is current, extended when the manifest only grew,
    rebuilt otherwise; stored again (atomically) when it changed and ``store`` and the folder allows."""
    path = manifest.with_name(INDEX_NAME)
    size = manifest.stat().st_size if manifest.exists() else 0
    idx = ManifestIndex.load(path) if path.exists() else None
    if idx is not None:
        if idx.file_size == size and idx.digest == manifest_digest(manifest):
            return idx
        if not (idx.file_size < size and idx.digest == manifest_digest(manifest, idx.file_size)
                and idx.covered == idx.file_size):
            idx = None
    fresh = (idx or ManifestIndex.empty()).extend(manifest, parse)
    if store:
        try:
            fresh.save(path)
        except (OSError, SafetyDPOError) as e:  # a read-only dataset still opens; it just indexes each time
            log.debug("Not storing the dataset index %s: %s", path, e)
    return fresh


class LazyRecords(Sequence):
    """A sequence of manifest records (rows ``rows`` of ``index``), each parsed from its line when used.

    Behaves like the list of :class:`PairRecord` it replaces (``len``, ``[i]``, slices, iteration) with memory
    independent of the dataset's size: a few recent records are kept parsed.
    """

    CACHE = 256

    def __init__(self, manifest: Path, index: ManifestIndex, parse: Callable[[dict, str], Any],
                 rows: np.ndarray | None = None):
        self.manifest, self.index, self._parse = Path(manifest), index, parse
        self.rows = np.arange(len(index), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(self.rows[i])
        n = len(self.rows)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        return self._row(int(self.rows[i]))

    def __iter__(self) -> Iterator[Any]:
        with open(self.manifest, "rb") as f:
            for row in self.rows:
                row = int(row)
                if row in self._cache:
                    yield self._cache[row]
                    continue
                f.seek(int(self.index.start[row]))
                yield self._decode(row, f.read(int(self.index.length[row])))

    def _row(self, row: int):
        rec = self._cache.get(row)
        if rec is not None:
            self._cache.move_to_end(row)
            return rec
        with open(self.manifest, "rb") as f:
            f.seek(int(self.index.start[row]))
            rec = self._decode(row, f.read(int(self.index.length[row])))
        self._cache[row] = rec
        while len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return rec

    def _decode(self, row: int, raw: bytes):
        try:
            return self._parse(json.loads(raw), f"{self.manifest}, record {row + 1}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.manifest} changed while it was open (record {row + 1} is no longer where it "
                               f"was). Open the dataset again.") from e

    def select(self, rows) -> "LazyRecords":
        """The records at manifest rows ``rows`` (a subset of this sequence's rows, in the given order)."""
        return LazyRecords(self.manifest, self.index, self._parse, np.asarray(rows, np.int64))

    # -- columns of the rows in use (no parsing) ----------------------------------------------------------
    def column(self, name: str) -> np.ndarray:
        return getattr(self.index, name)[self.rows]

    def categories(self) -> list[tuple[str, ...]]:
        """The category set of each row, from the index."""
        sets = self.index.category_sets
        return [sets[c] for c in self.column("cats")]

    def shapes(self) -> set[tuple[int, ...]]:
        return {self.index.shapes[s] for s in np.unique(self.column("shape"))}

    def shard_names(self) -> set[str]:
        return {self.index.shards[s] for s in np.unique(self.column("shard"))}
