"""Atomic file writes: write to a temporary file beside the target, then rename over it.

Nothing already on disk is lost or half-written: if anything fails before the rename, the temporary file
is removed and the old file (if any) is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import SafetyDPOError


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
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent or "."))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would (or the old file's mode)
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
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
