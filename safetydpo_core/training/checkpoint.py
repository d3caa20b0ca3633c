"""Training checkpoints: LoRA factors, optimiser, schedule and metric history at a step.

A checkpoint is one file ``checkpoint-<step>.pt`` written atomically and read with
``torch.load(weights_only=True)``, so it holds only tensors and plain containers and nothing is
unpickled. Because every random draw of a step is derived from ``(seed, step)``, restoring this state
is all a resume needs to continue exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SafetyDPOError
from ..utils.atomic import atomic_path

log = logging.getLogger(__name__)
_RE = re.compile(r"checkpoint-(\d+)\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"checkpoint-{step:07d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _RE.search(p.name))]
    return sorted(found)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` for ``step`` and prune all but the newest ``keep`` checkpoints."""
    path = checkpoint_path(directory, step)
    with atomic_path(path, "checkpoint") as tmp:
        torch.save({"step": step, **state}, tmp)
    for _, old in list_checkpoints(directory)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable checkpoint"
        raise SafetyDPOError(f"The checkpoint {p} cannot be read ({e}). Delete it to resume from an earlier one.") from e


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None
