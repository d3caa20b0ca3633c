"""Per-step training metrics: an in-memory history, and CSV/JSONL logs written as training goes."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..utils.atomic import disk_full_errors

COLUMNS = ("step", "loss", "implicit_acc", "margin", "reward_w", "reward_l", "m_w", "m_l", "r_w", "r_l", "lr",
           "grad_norm", "seconds")


class MetricsLog:
    """Keeps the history; mirrors it to ``<stem>.csv`` and ``<stem>.jsonl`` when a path stem is given."""

    def __init__(self, path_stem: str | Path | None = None, history: list[dict[str, Any]] | None = None):
        self.history: list[dict[str, Any]] = list(history or [])
        self.stem = Path(path_stem) if path_stem else None
        self._fields = self._columns()
        if self.stem is not None:
            self.stem.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite()

    def _columns(self) -> list[str]:
        extra = sorted({k for r in self.history for k in r} - set(COLUMNS))
        return list(COLUMNS) + extra

    def _path(self, ext: str) -> Path:
        assert self.stem is not None
        return self.stem.with_name(self.stem.name + ext)

    def _rewrite(self) -> None:
        assert self.stem is not None
        with disk_full_errors(self._path(".csv"), "metrics log"):
            self._write_all()

    def _write_all(self) -> None:
        with open(self._path(".csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.history)
        with open(self._path(".jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)

    def append(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.stem is None:
            return
        if not set(row) <= set(self._fields):
            self._fields = self._columns()
            self._rewrite()
            return
        with disk_full_errors(self._path(".csv"), "metrics log"):
            with open(self._path(".csv"), "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore").writerow(row)
            with open(self._path(".jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
