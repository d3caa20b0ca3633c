"""The merge report: who won which weights, what the SVD lost, how much of each expert survives.

Per layer and overall:

* ``shares``: for the selection merges (Co-Merge), the share of weights each expert won, over the elements
  some expert decided (they sum to one); for reading F also split into ``down`` and ``up``. ``undecided`` is
  the share of elements where every expert's weight was zero (left zero).
* ``svd_rel_error``: ``||M - M_k||_F / ||M||_F`` of the rank-``k`` factorisation of the merged update ``M``
  (delta-space merges); overall, the energy-weighted value ``sqrt(sum err_l^2 ||M_l||^2 / sum ||M_l||^2)``
  and the largest per-layer value.
* ``retention[e]``: ``<dW*, dW_e> / ||dW_e||^2``, the component of the merged update along expert ``e``'s own
  update (1: kept at full strength; 1/N: averaged away; summed over layers for the overall figure).
* ``sum_deviation``: ``||dW* - sum_e w_e dW_e||_F / ||sum_e w_e dW_e||_F``, the distance from the exact sum
  (zero for ``concat``).

These are computed from the factors in float64 (``r x r`` products), never from full matrices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..lora.lora_set import LoraLayer
from ..utils.atomic import atomic_write_text


def _factors(layer: LoraLayer, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    up = layer.up.reshape(layer.out_features, layer.rank).double() * scale
    down = layer.down.reshape(layer.rank, -1).double()
    return up, down


def _inner(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(((a[0].T @ b[0]) * (a[1] @ b[1].T)).sum())


def factor_metrics(merged: LoraLayer, layers: Sequence[LoraLayer | None], weights: Sequence[float]) -> dict[str, Any]:
    """Inner products between the merged update and the experts' updates (raw sums for aggregation)."""
    m = _factors(merged, merged.scale)
    xs = [(_factors(l, l.scale) if l is not None else None) for l in layers]
    inner = [(_inner(m, x) if x is not None else 0.0) for x in xs]
    self_sq = [(_inner(x, x) if x is not None else 0.0) for x in xs]
    s_sq = 0.0
    for i, xi in enumerate(xs):
        if xi is None:
            continue
        for j, xj in enumerate(xs):
            if xj is None:
                continue
            v = self_sq[i] if i == j else _inner(xi, xj)
            s_sq += float(weights[i]) * float(weights[j]) * v
    m_sq = _inner(m, m)
    m_s = sum(float(w) * v for w, v in zip(weights, inner))
    dev_sq = max(m_sq - 2 * m_s + s_sq, 0.0)
    return {"inner": inner, "self_sq": self_sq, "sum_sq": s_sq, "merged_sq": m_sq, "dev_sq": dev_sq}


@dataclasses.dataclass
class LayerReport:
    name: str
    rank: int
    counts: dict[str, list[int]] | None = None   # part ("down", "up", "delta") -> wins per expert
    elements: dict[str, int] | None = None       # part -> number of elements
    svd_rel_error: float | None = None
    selected_norm: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def shares(self, labels: Sequence[str], part: str | None = None) -> dict[str, float] | None:
        if not self.counts:
            return None
        parts = [part] if part else list(self.counts)
        tot = [sum(self.counts[p][e] for p in parts) for e in range(len(labels))]
        decided = sum(tot)
        return {lab: (t / decided if decided else 0.0) for lab, t in zip(labels, tot)}

    def undecided(self) -> float | None:
        if not self.counts or not self.elements:
            return None
        n = sum(self.elements.values())
        decided = sum(sum(c) for c in self.counts.values())
        return (n - decided) / n if n else 0.0

    def retention(self, labels: Sequence[str]) -> dict[str, float | None]:
        inner, self_sq = self.metrics.get("inner"), self.metrics.get("self_sq")
        if inner is None:
            return {}
        return {lab: (i / s if s > 0 else None) for lab, i, s in zip(labels, inner, self_sq)}

    def sum_deviation(self) -> float | None:
        s = self.metrics.get("sum_sq")
        if s is None:
            return None
        return math.sqrt(self.metrics["dev_sq"] / s) if s > 0 else 0.0

    def to_dict(self, labels: Sequence[str]) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.name, "rank": self.rank}
        if self.counts:
            d["shares"] = self.shares(labels)
            if len(self.counts) > 1:
                d["shares_by_part"] = {p: self.shares(labels, p) for p in self.counts}
            d["undecided"] = self.undecided()
        if self.svd_rel_error is not None:
            d["svd_rel_error"] = self.svd_rel_error
        d["retention"] = self.retention(labels)
        d["sum_deviation"] = self.sum_deviation()
        if self.notes:
            d["notes"] = self.notes
        return d


@dataclasses.dataclass
class MergeReport:
    method: str
    labels: list[str]
    experts: list[dict[str, Any]]
    options: dict[str, Any]
    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    calibration: dict[str, Any] | None = None
    seconds: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    # -- overall figures ------------------------------------------------------------------------------
    def shares(self) -> dict[str, float] | None:
        rows = [l for l in self.layers if l.counts]
        if not rows:
            return None
        tot = [0] * len(self.labels)
        for l in rows:
            for c in l.counts.values():
                for e, v in enumerate(c):
                    tot[e] += v
        decided = sum(tot)
        return {lab: (t / decided if decided else 0.0) for lab, t in zip(self.labels, tot)}

    def svd_error(self) -> dict[str, float] | None:
        rows = [l for l in self.layers if l.svd_rel_error is not None]
        if not rows:
            return None
        def sq(l: LayerReport) -> float:
            return l.selected_norm ** 2 if l.selected_norm is not None else float(l.metrics.get("sum_sq", 0.0))

        num = sum((l.svd_rel_error ** 2) * sq(l) for l in rows)
        den = sum(sq(l) for l in rows)
        errs = [l.svd_rel_error for l in rows]
        return {"energy_weighted": math.sqrt(num / den) if den > 0 else 0.0,
                "mean": sum(errs) / len(errs), "max": max(errs)}

    def retention(self) -> dict[str, float | None]:
        inner = [0.0] * len(self.labels)
        self_sq = [0.0] * len(self.labels)
        for l in self.layers:
            for e in range(len(self.labels)):
                inner[e] += l.metrics.get("inner", [0.0] * len(self.labels))[e]
                self_sq[e] += l.metrics.get("self_sq", [0.0] * len(self.labels))[e]
        return {lab: (i / s if s > 0 else None) for lab, i, s in zip(self.labels, inner, self_sq)}

    def sum_deviation(self) -> float:
        dev = sum(l.metrics.get("dev_sq", 0.0) for l in self.layers)
        s = sum(l.metrics.get("sum_sq", 0.0) for l in self.layers)
        return math.sqrt(dev / s) if s > 0 else 0.0

    def overall(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": len(self.layers)}
        ranks = sorted({l.rank for l in self.layers})
        d["rank"] = ranks[0] if len(ranks) == 1 else {"min": ranks[0], "max": ranks[-1]}
        sh = self.shares()
        if sh is not None:
            d["shares"] = sh
            n = sum(sum(l.elements.values()) for l in self.layers if l.elements)
            dec = sum(sum(sum(c) for c in l.counts.values()) for l in self.layers if l.counts)
            d["undecided"] = (n - dec) / n if n else 0.0
        se = self.svd_error()
        if se is not None:
            d["svd_rel_error"] = se
        d["retention"] = self.retention()
        d["sum_deviation"] = self.sum_deviation()
        notes = list(self.notes) + sorted({n for l in self.layers for n in l.notes})
        if notes:
            d["notes"] = notes
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "experts": self.experts, "options": self.options,
                "calibration": self.calibration, "seconds": self.seconds, "overall": self.overall(),
                "layers": [l.to_dict(self.labels) for l in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    # -- text -----------------------------------------------------------------------------------------
    def summary(self, max_layers: int | None = None) -> str:
        """A readable summary: the overall figures, one line per expert, then one line per layer."""
        ov = self.overall()
        rank = ov["rank"] if not isinstance(ov["rank"], dict) else f"{ov['rank']['min']}-{ov['rank']['max']}"
        lines = [f"Merge method: {self.method}", f"Layers: {ov['layers']}, output rank: {rank}"]
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items() if v is not None)
        if opts:
            lines.append(f"Options: {opts}")
        if self.calibration:
            c = self.calibration
            lines.append(f"Calibration: {c.get('num_inputs')} inputs ({c.get('prompts')} prompts, x0={c.get('x0')}, "
                         f"timesteps {c.get('timesteps')}, rank statistics: {c.get('rank_stats')})")
        if self.seconds is not None:
            lines.append(f"Time: {self.seconds:.1f} s")
        se = ov.get("svd_rel_error")
        if se:
            lines.append(f"SVD relative error: {se['energy_weighted']:.4f} (energy-weighted), mean {se['mean']:.4f}, "
                         f"max {se['max']:.4f}")
        lines.append(f"Deviation from the exact sum of the experts: {ov['sum_deviation']:.4f}")
        if "undecided" in ov:
            lines.append(f"Undecided (all experts zero): {ov['undecided']:.2%}")
        lines.append("")
        shares = ov.get("shares")
        width = max(8, *(len(l) for l in self.labels))
        head = f"{'expert':<{width}}  {'file':<40}  rank  " + ("share   " if shares else "") + "retention"
        lines.append(head)
        for e, lab in enumerate(self.labels):
            info = self.experts[e] if e < len(self.experts) else {}
            ret = ov["retention"].get(lab)
            row = f"{lab:<{width}}  {str(info.get('file') or '-')[-40:]:<40}  {str(info.get('rank', '')):>4}  "
            if shares:
                row += f"{shares[lab]:7.2%} "
            row += f"{ret:9.4f}" if ret is not None else "        -"
            lines.append(row)
        for n in ov.get("notes", []):
            lines.append(f"note: {n}")
        lines.append("")
        short = [lab[:10] for lab in self.labels]
        head = f"{'layer':<60} rank " + " ".join(f"{s:>10}" for s in short) + "    svd err  deviation"
        lines.append(head)
        rows = self.layers if max_layers is None else self.layers[:max_layers]
        for l in rows:
            sh = l.shares(self.labels)
            cells = " ".join((f"{sh[lab]:10.2%}" if sh else f"{'':>10}") for lab in self.labels)
            err = f"{l.svd_rel_error:10.4f}" if l.svd_rel_error is not None else f"{'-':>10}"
            dev = l.sum_deviation()
            lines.append(f"{l.name[-60:]:<60} {l.rank:>4} {cells} {err} {dev:10.4f}" if dev is not None
                         else f"{l.name[-60:]:<60} {l.rank:>4} {cells} {err}")
        if max_layers is not None and len(self.layers) > max_layers:
            lines.append(f"... {len(self.layers) - max_layers} more layers in the JSON report")
        return "\n".join(lines) + "\n"

    def write(self, out_path: str | Path) -> tuple[Path, Path]:
        """Write ``<out>.report.json`` and ``<out>.report.txt`` beside ``out_path`` (atomically)."""
        out = Path(out_path)
        base = out.with_suffix("") if out.suffix else out
        j = base.with_name(base.name + ".report.json")
        t = base.with_name(base.name + ".report.txt")
        atomic_write_text(j, self.to_json() + "\n", "merge report")
        atomic_write_text(t, self.summary(), "merge report")
        return j, t
