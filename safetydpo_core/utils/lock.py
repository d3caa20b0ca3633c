"""A lock file per output, so that two runs never write the same output at the same time.

``with output_lock(path):`` creates ``<path>.lock`` beside the output (a file or a folder) with
``O_CREAT | O_EXCL`` and writes who holds it (process id, host, command, start time). A second run on the
same output finds the file and is refused with :class:`~safetydpo_core.errors.OutputLocked`, naming the
lock file and the holder. A lock whose process is gone (a run that was killed) is stale: on the same host
the next run sees that the process id no longer runs, removes the lock with a warning and takes it. A lock
from another host cannot be checked; the message says to delete the file if that run is gone.

Locks are not re-entrant: the same process asking twice for one output (two nodes, two threads) is
refused as well.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import OutputLocked, SafetyDPOError

log = logging.getLogger(__name__)

SUFFIX = ".lock"


def lock_path(output: str | os.PathLike) -> Path:
    """``<output>.lock`` beside the output (trailing slashes of a folder ignored)."""
    p = Path(os.path.abspath(output))
    return p.with_name(p.name + SUFFIX)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return True
    if sys.platform.startswith("linux"):  # a zombie (killed, not yet reaped) holds nothing
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z"
        except (OSError, IndexError):
            return True
    return True


def _read(lock: Path) -> dict:
    try:
        data = json.loads(lock.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _age(lock: Path) -> float:
    try:
        return time.time() - lock.stat().st_mtime
    except OSError:
        return 0.0


def _holder(info: dict) -> str:
    parts = [f"process {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    if info.get("command"):
        parts.append(f"running `{info['command']}`")
    return " ".join(parts)


class OutputLock:
    """The lock on one output; use :func:`output_lock` (a context manager) or :meth:`acquire` / :meth:`release`."""

    def __init__(self, output: str | os.PathLike, what: str = "output"):
        self.output = Path(output)
        self.path = lock_path(output)
        self.what = what
        self.held = False

    def acquire(self) -> "OutputLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SafetyDPOError(f"Cannot create the folder of the {self.what} {self.output}: {e.strerror or e}.") from e
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read(self.path)
                same_host = other.get("host") in (None, socket.gethostname())
                pid = other.get("pid")
                if not other and _age(self.path) > 10:  # a run killed between creating and filling its lock
                    pid, other = -1, {"pid": "unknown"}
                if same_host and isinstance(pid, int) and not _alive(pid):
                    log.warning("Removing the stale lock %s of %s, which is no longer running.", self.path,
                                _holder(other))
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                where = "" if same_host else " (on another machine: this run cannot check it)"
                raise OutputLocked(
                    f"The {self.what} {self.output} is locked by another run{where}: {_holder(other)} holds "
                    f"{self.path}. Wait for that run to finish or stop it, or choose another output. If you are sure "
                    f"no run is using it, delete {self.path}.") from None
            except OSError as e:
                raise SafetyDPOError(f"Cannot create the lock file {self.path}: {e.strerror or e}. Choose a writable "
                                     f"location for the {self.what}.") from e
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(info) + "\n")
            self.held = True
            return self
        raise OutputLocked(f"Could not take the lock {self.path} for the {self.what} {self.output}: another run keeps "
                           f"taking it.")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = _read(self.path)
        if info.get("pid") in (None, os.getpid()):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(*outputs: str | os.PathLike, what: str = "output") -> Iterator[list[OutputLock]]:
    """Hold the locks of every given output (in order) for the ``with`` block; all or none are taken."""
    held: list[OutputLock] = []
    try:
        for o in outputs:
            held.append(OutputLock(o, what).acquire())
        yield held
    finally:
        for lk in reversed(held):
            lk.release()
