"""Atomic file writes: write to a temporary file beside the target, then rename over it.

Nothing already on disk is lost or half-written: if anything fails before the rename, the temporary file
is removed and the old file (if any) is left as it was. A full disk (or quota) while writing becomes one
:class:`~safetydpo_core.errors.DiskFullError` that names the file: :func:`disk_full_errors` does that for
writes that are not atomic (appends to a manifest or a metrics log).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import DiskFullError, SafetyDPOError

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def is_disk_full(e: BaseException) -> bool:
    """True for an OSError of a full disk or quota, also when a library wrapped it in its own error text
    (safetensors and torch report the OS error inside their message)."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    text = str(e)
    return not isinstance(e, SafetyDPOError) and ("No space left on device" in text or "Disk quota exceeded" in text
                                                  or "os error 28" in text)


def disk_full_error(path: str | os.PathLike, what: str = "output file") -> DiskFullError:
    return DiskFullError(f"No space left on device while writing the {what} {path}. Free some space (or choose "
                         f"another output location) and run the same command again; with --resume it continues "
                         f"where it stopped (files already written are complete).")


@contextlib.contextmanager
def disk_full_errors(path: str | os.PathLike, what: str = "output file") -> Iterator[None]:
    """Turn a full-disk OSError inside the block into a one-line :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only disk-full errors are translated
        if is_disk_full(e):
            raise disk_full_error(path, what) from e
        raise


def ensure_writable_dir(directory: str | os.PathLike, what: str = "output") -> Path:
    """Create ``directory`` if needed and check that files can be created in it."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SafetyDPOError(f"Cannot create the {what} folder {d}: {e.strerror or e}. Choose a writable location.") from e
    if not os.access(d, os.W_OK | os.X_OK):
        raise SafetyDPOError(f"The {what} folder {d} is not writable. Choose a writable location or fix its permissions.")
    return d


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to ``target``.

    Usage::

        with atomic_path("out.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    target = Path(target)
    ensure_writable_dir(target.parent if str(target.parent) else Path("."), what=f"{what}'s")
    if target.exists() and target.is_dir():
        raise SafetyDPOError(f"The {what} {target} is a folder; give a file name.")
    with disk_full_errors(target, what):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent or "."))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would (or the old file's mode)
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(target, what) from e
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(target: str | os.PathLike, text: str, what: str = "output file") -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(target: str | os.PathLike, data: bytes, what: str = "output file") -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target, what) as tmp:
        tmp.write_bytes(data)
