"""Item-wise work (render, sample, eval, attack) spread over the processes of an ``accelerate launch``.

One object, :class:`Split`, owns the protocol; the commands only say what their items and parts are:

* **Shares.** The work is cut into *units* (the batches a single process would form, in its order), each
  named by the id of its first item. Every process sorts the units by a hash of that id and takes every
  ``world_size``-th one from position ``rank``: the shares are disjoint, balanced to one unit, and decided by
  the ids, not by the order of the input. Because a unit is exactly a batch of the one-process run, every
  image is computed in the same batch as there, so the outputs are bit-identical to one process.
* **Parts.** Process ``rank`` writes into ``OUT/.parts/p<rank>/`` with the command's own crash-safe writer
  (shards or images written atomically, then manifest lines); ``part.json`` there holds the run's key (model,
  settings, inputs). A part is only a container: what is done is the union of the items in every part, so a
  next launch with any number of processes (one included) continues where the last one stopped; a process
  killed mid-item loses only that item (its torn manifest line or temporary file is ignored and redone).
* **Join.** After every process has finished its share, the main process joins the parts into exactly the
  files one process writes (the command's ``join`` function), then removes ``OUT/.parts``.

A split is active when the run was launched as several processes, or when ``OUT/.parts`` exists (the
leftovers of an interrupted launch, which a one-process ``--resume`` then finishes). Parts of another run
(other model, settings or inputs) are refused and named; parts without ``--resume`` are refused too.

Using it (the pattern of every command)::

    split = Split.open(out, key={...}, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if split is None:            # one process, no parts: the command's usual path
        ...
    else:
        done = split.gather(read_done)         # ids finished in any part (collective: all read, then all write)
        do_my_share(split.part, split.owned(units, key_of_unit), done)
        split.finish(lambda parts: join(parts))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .errors import SafetyDPOError
from .training.distributed import Environment, from_environment, launched_distributed
from .utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

PARTS = ".parts"
PART_STATE = "part.json"
T = TypeVar("T")


class PartsError(SafetyDPOError):
    """The parts in an output folder belong to another run, or a launch cannot use them."""


def run_key(settings: dict[str, Any]) -> str:
    """A digest of everything that decides a run's outputs (model fingerprint, settings, input ids)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ids_digest(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode() + b"\n")
    return h.hexdigest()[:16]


def _unit_rank(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owners(unit_keys: Sequence[str], world_size: int) -> list[int]:
    """The process of each unit: units sorted by the hash of their key, dealt round-robin."""
    order = sorted(range(len(unit_keys)), key=lambda i: (_unit_rank(unit_keys[i]), unit_keys[i]))
    out = [0] * len(unit_keys)
    for pos, i in enumerate(order):
        out[i] = pos % world_size
    return out


class Split:
    """This process's place in a split run over the output folder ``out``."""

    def __init__(self, out: Path, env: Environment, key: str, what: str):
        self.out = Path(out)
        self.env = env
        self.key = key
        self.what = what
        self.parts_dir = self.out / PARTS

    # -- setting up -------------------------------------------------------------------------------
    @classmethod
    def open(cls, out: str | os.PathLike, *, key: dict[str, Any], what: str, resume: bool, overwrite: bool,
             device: str = "auto") -> "Split | None":
        """The split of this run, or None for a plain one-process run without parts in ``out``.

        Every process checks the parts (read-only) before any process writes: parts of another run are
        refused by name; with ``overwrite`` the main process removes them first."""
        out = Path(out)
        parts_dir = out / PARTS
        if not launched_distributed() and not parts_dir.exists():
            return None
        env = from_environment(device)
        split = cls(out, env, run_key(key), what)
        if env.is_main and overwrite and parts_dir.exists():
            shutil.rmtree(parts_dir)
        split.barrier()
        split._check_parts(resume)
        split.barrier()  # nobody writes a part before every process has read them
        if env.group.world_size > 1:
            log.info("%s split over %s", what, env.description)
        return split

    @property
    def rank(self) -> int:
        return self.env.group.rank

    @property
    def world_size(self) -> int:
        return self.env.group.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def device(self) -> str | None:
        """This process's accelerator (``cuda:LOCAL_RANK``); None on CPUs."""
        dev = self.env.device
        return str(dev) if dev is not None and dev.type != "cpu" else None

    @property
    def part(self) -> Path:
        """This process's part folder (created with its ``part.json`` on first use)."""
        p = self.parts_dir / f"p{self.rank}"
        if not (p / PART_STATE).exists():
            p.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p / PART_STATE, json.dumps({"what": self.what, "run_key": self.key}) + "\n", "part state")
        return p

    def parts(self) -> list[Path]:
        """Every part folder in ``out`` (from this launch or an earlier one)."""
        if not self.parts_dir.exists():
            return []
        return sorted((p for p in self.parts_dir.iterdir() if p.is_dir()), key=lambda p: p.name)

    def _check_parts(self, resume: bool) -> None:
        parts = [p for p in self.parts() if (p / PART_STATE).exists()]
        for p in parts:
            try:
                state = json.loads((p / PART_STATE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise PartsError(f"The part {p} is unreadable ({e}). Remove {self.parts_dir} or pass --overwrite.") from e
            if state.get("what") != self.what or state.get("run_key") != self.key:
                raise PartsError(f"The part {p} belongs to another {state.get('what', 'run')} (other model, settings "
                                 f"or inputs) than this one. Finish that run with its own settings, pass --overwrite "
                                 f"to discard it, or choose another output folder.")
        if parts and not resume:
            raise PartsError(f"{self.parts_dir} holds {len(parts)} part(s) of an interrupted {self.what} of these "
                             f"settings. Pass --resume to finish it (with any number of processes) or --overwrite to "
                             f"start anew.")

    # -- the work ---------------------------------------------------------------------------------
    def gather(self, read_done: Callable[[Path], Iterable[Any]], also: Iterable[Path] = ()) -> set:
        """The union of ``read_done(folder)`` over every part (and the folders ``also``, e.g. the final output
        when resuming): what no process must do again. Collective: every process calls it once, and no process
        writes before all have read (the shares are computed from it, so all must see the same)."""
        done: set = set()
        for p in [*self.parts(), *also]:
            done.update(read_done(p))
        self.barrier()
        return done

    def owned(self, units: Sequence[T], key: Callable[[T], str]) -> list[T]:
        """This process's units, in their original order. Warns (main process) when some processes get none."""
        keys = [key(u) for u in units]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise PartsError(f"Two work units of the {self.what} are named {dup!r}; item ids must be unique.")
        own = owners(keys, self.world_size)
        if self.is_main and 0 < len(units) < self.world_size:
            log.warning("%d processes for %d batches of %s work: processes %d-%d have nothing to do. Launch at most %d "
                        "processes (or use smaller batches).", self.world_size, len(units), self.what, len(units),
                        self.world_size - 1, len(units))
        return [u for u, o in zip(units, own) if o == self.rank]

    def barrier(self) -> None:
        self.env.group.barrier()

    def finish(self, join: Callable[[list[Path]], T]) -> T | None:
        """Wait for every process; the main process joins the parts and removes them. Returns ``join``'s result
        on the main process, None elsewhere."""
        self.barrier()
        result = None
        if self.is_main:
            result = join(self.parts())
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.env.close()
        return result

    def close(self) -> None:
        self.env.close()
