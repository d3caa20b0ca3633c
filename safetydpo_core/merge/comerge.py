"""Co-Merge: merge N experts by keeping, for every weight, the expert whose weight is most active.

SafetyDPO's description: "we analyze which expert has the highest activation for each weight across all
inputs, then obtain the merged weights by merging only the most active weights per expert". The code was not
released; two readings are implemented (see the README, "Merging safety experts"), both scoring a weight by
``|weight| x activation`` (Wanda's importance, Sun et al. 2024):

* **F, factor space** (:func:`comerge_factor_layer`): each element of ``down`` (``A_e[k, j]``) and of ``up``
  (``B_e[i, k]``) is taken from the expert with the highest score, where a ``down`` element's activation is
  the RMS of input channel ``j`` and an ``up`` element's is the RMS of the expert's own rank-space activation
  ``(A_e x)_k``. The output keeps rank ``r``. Like every factor-space merge it creates cross terms
  ``B_e A_f`` between experts, and it depends on how each expert splits its scale between the factors
  (``factor_balance``: ``sqrt`` puts ``sqrt(w * alpha / r)`` on both, as peft does; ``up`` puts it all on
  ``up``).
* **D, delta space** (:func:`comerge_delta_layer`): each element of the full update ``w_e * (alpha/r) * up @
  down`` is taken from the expert with the highest ``|delta| x input RMS``; the selected update (generally of
  full rank) is factorised back to rank ``k`` by SVD and the relative error of that step is reported.

"Across all inputs" has two readings too: ``aggregate="mean"`` averages the activation over all calibration
tokens (RMS) and takes one argmax; ``aggregate="vote"`` takes the argmax per calibration input and keeps the
expert that wins most inputs (ties go to the mean-mode winner). When every expert's score shares the same
activation factor (``down`` and delta scores without normalisation) the vote provably equals the mean-mode
argmax and is computed that way. ``normalize`` divides each expert's scores by their mean (or RMS) over
the layer before the argmax, so that an expert with larger weights overall does not win everywhere.
Expert weights ``w_e`` scale the updates and therefore also the scores.

Ties: an element where every score is zero (a channel never active, or all experts zero there) goes to the
expert with the largest ``|weight|``; an element where every expert's weight is zero is left undecided and
zero. So an all-zero expert never wins a weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..lora.lora_set import LoraLayer
from .calibration import LayerStats
from .lowrank import truncated_svd

AGGREGATES = ("mean", "vote")
NORMALIZATIONS = ("none", "mean", "rms")
FACTOR_BALANCES = ("sqrt", "up")


@dataclasses.dataclass
class Selection:
    """Outcome of one element-wise selection: the merged tensor and who won each element."""

    merged: torch.Tensor
    winner: torch.Tensor        # int64, same shape as merged; -1 where undecided

    def counts(self, n_experts: int) -> list[int]:
        w = self.winner.reshape(-1)
        w = w[w >= 0]
        return torch.bincount(w, minlength=n_experts).tolist() if w.numel() else [0] * n_experts

    @property
    def elements(self) -> int:
        return int(self.winner.numel())


def normalize_scores(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Divide each expert's scores (dim 0) by their mean or RMS over the rest; zero experts stay zero."""
    if mode == "none":
        return scores
    flat = scores.reshape(scores.shape[0], -1)
    if mode == "mean":
        den = flat.mean(1)
    elif mode == "rms":
        den = flat.pow(2).mean(1).sqrt()
    else:
        raise ConfigError(f"Unknown score normalisation {mode!r}; choose one of {', '.join(NORMALIZATIONS)}.")
    den = torch.where(den > 0, den, torch.ones_like(den))
    return scores / den.reshape((-1,) + (1,) * (scores.dim() - 1))


def pick(values: torch.Tensor, scores: torch.Tensor) -> Selection:
    """Element-wise argmax over experts (dim 0) of ``scores``, with the tie rules of the module docstring."""
    best, idx = scores.max(0)
    dead = ~(best > 0)
    if bool(dead.any()):
        mag_best, mag_idx = values.abs().max(0)
        idx = torch.where(dead, mag_idx, idx)
        undecided = dead & ~(mag_best > 0)
    else:
        undecided = None
    merged = values.gather(0, idx.unsqueeze(0)).squeeze(0)
    if undecided is not None and bool(undecided.any()):
        merged = merged.masked_fill(undecided, 0.0)
        idx = idx.masked_fill(undecided, -1)
    return Selection(merged, idx)


def vote(values: torch.Tensor, scores_for_input: Callable[[int], torch.Tensor], n_inputs: int,
         mean_selection: Selection) -> Selection:
    """Per-input argmax, then the expert that wins the most inputs; ties go to ``mean_selection``'s winner."""
    counts = torch.zeros(values.shape, dtype=torch.int32)
    for n in range(n_inputs):
        s = scores_for_input(n)
        best, idx = s.max(0)
        counts.scatter_add_(0, idx.unsqueeze(0), (best > 0).to(torch.int32).unsqueeze(0))
    fallback = mean_selection.winner
    total = counts.sum(0)
    bonus = torch.zeros_like(counts)
    ok = fallback >= 0
    bonus.scatter_(0, fallback.clamp_min(0).unsqueeze(0), ok.to(torch.int32).unsqueeze(0))
    idx = (counts * 2 + bonus).argmax(0)
    idx = torch.where(total > 0, idx, fallback.clamp_min(0))
    undecided = (total == 0) & ~ok
    merged = values.gather(0, idx.unsqueeze(0)).squeeze(0)
    if bool(undecided.any()):
        merged = merged.masked_fill(undecided, 0.0)
        idx = idx.masked_fill(undecided, -1)
    return Selection(merged, idx)


def _select(values: torch.Tensor, act: torch.Tensor, act_inputs: torch.Tensor | None, normalize: str,
            aggregate: str, notes: list[str], what: str) -> Selection:
    """Score ``|values| * act`` (``act`` broadcast against ``values``) and select; ``act_inputs[n]`` per input."""
    mag = values.abs()
    mean_sel = pick(values, normalize_scores(mag * act, normalize))
    if aggregate == "mean":
        return mean_sel
    if act_inputs is None:
        notes.append(f"{what}: no per-input statistics; vote fell back to the mean")
        return mean_sel
    return vote(values, lambda n: normalize_scores(mag * act_inputs[n], normalize), int(act_inputs.shape[0]), mean_sel)


def _check_options(aggregate: str, normalize: str) -> None:
    if aggregate not in AGGREGATES:
        raise ConfigError(f"Unknown aggregation {aggregate!r}; choose one of {', '.join(AGGREGATES)}.")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"Unknown score normalisation {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}.")


def _stats_for(stats: LayerStats | None, name: str, n_cols: int) -> LayerStats:
    if stats is None:
        raise ConfigError(f"Co-Merge needs calibration statistics for layer {name!r}; calibrate with the experts' "
                          f"layers (the statistics in use do not cover this one).")
    have = int(stats.sq.shape[1]) * stats.kernel
    if have != n_cols:
        raise ConfigError(f"The calibration statistics of layer {name!r} describe {have} input columns but the experts' "
                          f"layer has {n_cols}; the statistics were measured on another model.")
    return stats


def _reference(layers: Sequence[LoraLayer | None]) -> LoraLayer:
    ref = next((l for l in layers if l is not None), None)
    if ref is None:
        raise ConfigError("No expert adapts this layer.")
    return ref


def comerge_factor_layer(name: str, layers: Sequence[LoraLayer | None], weights: Sequence[float],
                         stats: LayerStats | None, aggregate: str = "mean", normalize: str = "none",
                         factor_balance: str = "sqrt") -> tuple[LoraLayer, dict]:
    """Reading F for one layer: element-wise selection of ``down`` and ``up``; output rank = the largest rank.

    ``layers[e]`` is expert ``e``'s layer or ``None`` (a zero update). Returns the merged layer (alpha = rank,
    scale 1: every expert's ``weight * alpha / rank`` is folded in) and a dict with the winners of ``down`` and
    ``up`` and notes.
    """
    _check_options(aggregate, normalize)
    if factor_balance not in FACTOR_BALANCES:
        raise ConfigError(f"Unknown factor balance {factor_balance!r}; choose one of {', '.join(FACTOR_BALANCES)}.")
    ref = _reference(layers)
    n_e = len(layers)
    r = max(l.rank for l in layers if l is not None)
    n_cols = ref.in_features
    out = ref.out_features
    st = _stats_for(stats, name, n_cols)
    downs = torch.zeros(n_e, r, n_cols)
    ups = torch.zeros(n_e, out, r)
    h = torch.zeros(n_e, r)
    h_in: torch.Tensor | None = None
    notes: list[str] = []
    per_input_ok = aggregate == "vote"
    sources = set()
    for e, layer in enumerate(layers):
        if layer is None:
            continue
        c = float(weights[e]) * layer.scale
        a_raw = layer.down.reshape(layer.rank, -1).float()
        b_raw = layer.up.reshape(out, layer.rank).float()
        if factor_balance == "sqrt":
            f_down, f_up = math.sqrt(abs(c)), math.copysign(math.sqrt(abs(c)), c)
        else:
            f_down, f_up = 1.0, c
        downs[e, :layer.rank] = a_raw * f_down
        ups[e, :, :layer.rank] = b_raw * f_up
        rms, src = st.rank_rms(e, a_raw)
        sources.add(src)
        h[e, :layer.rank] = rms * f_down
        if per_input_ok:
            per = st.rank_rms_inputs(e, a_raw)
            if per is None:
                per_input_ok = False
            else:
                if h_in is None:
                    h_in = torch.zeros(st.num_inputs, n_e, r)
                h_in[:, e, :layer.rank] = per * f_down
    if "diagonal" in sources:
        notes.append("up scores: rank activations approximated from per-channel statistics (no rank statistics)")
    act = st.channel_rms()
    act_in = st.channel_rms_inputs() if aggregate == "vote" and normalize != "none" else None
    if aggregate == "vote" and normalize == "none":
        down_sel = _select(downs, act, None, normalize, "mean", notes, "down")
    else:
        down_sel = _select(downs, act, None if act_in is None else act_in[:, None, None, :], normalize, aggregate,
                           notes, "down")
    up_act_inputs = h_in[:, :, None, :] if (aggregate == "vote" and per_input_ok and h_in is not None) else None
    up_sel = _select(ups, h[:, None, :], up_act_inputs, normalize, aggregate if up_act_inputs is not None else "mean",
                     notes, "up")
    if aggregate == "vote" and up_act_inputs is None:
        notes.append("up: no per-input rank statistics; vote fell back to the mean")
    down = down_sel.merged
    up = up_sel.merged
    if ref.is_conv:
        down = down.reshape(r, *ref.down.shape[1:])
        up = up.reshape(out, r, 1, 1)
    merged = LoraLayer(down.contiguous(), up.contiguous(), float(r))
    return merged, {"selections": {"down": down_sel, "up": up_sel}, "notes": notes, "svd_rel_error": None}


def comerge_delta_layer(name: str, layers: Sequence[LoraLayer | None], weights: Sequence[float],
                        stats: LayerStats | None, rank: int, aggregate: str = "mean", normalize: str = "none",
                        svd: str = "auto", seed: int = 0) -> tuple[LoraLayer, dict]:
    """Reading D for one layer: element-wise selection of the full updates, then SVD to ``rank``."""
    _check_options(aggregate, normalize)
    ref = _reference(layers)
    n_cols = ref.in_features
    out = ref.out_features
    st = _stats_for(stats, name, n_cols)
    values = torch.zeros(len(layers), out, n_cols)
    for e, layer in enumerate(layers):
        if layer is not None:
            values[e] = layer.delta(torch.float32) * float(weights[e])
    notes: list[str] = []
    act = st.channel_rms()
    if aggregate == "vote" and normalize == "none":
        sel = _select(values, act, None, normalize, "mean", notes, "delta")
    else:
        act_in = st.channel_rms_inputs()[:, None, None, :] if aggregate == "vote" else None
        sel = _select(values, act, act_in, normalize, aggregate, notes, "delta")
    del values
    up, down, err = truncated_svd(sel.merged, rank, mode=svd, seed=seed)
    k = down.shape[0]
    if ref.is_conv:
        down = down.reshape(k, *ref.down.shape[1:])
        up = up.reshape(out, k, 1, 1)
    merged = LoraLayer(down.contiguous(), up.contiguous(), float(k))
    return merged, {"selections": {"delta": sel}, "notes": notes, "svd_rel_error": err,
                    "selected_norm": float(torch.linalg.matrix_norm(sel.merged))}


def selected_delta(layers: Sequence[LoraLayer | None], weights: Sequence[float], stats: LayerStats,
                   aggregate: str = "mean", normalize: str = "none") -> Selection:
    """The full-rank update that reading D selects, before the SVD (for inspection and tests)."""
    ref = _reference(layers)
    values = torch.zeros(len(layers), ref.out_features, ref.in_features)
    for e, layer in enumerate(layers):
        if layer is not None:
            values[e] = layer.delta(torch.float32) * float(weights[e])
    act = stats.channel_rms()
    notes: list[str] = []
    if aggregate == "vote" and normalize != "none":
        return _select(values, act, stats.channel_rms_inputs()[:, None, None, :], normalize, aggregate, notes, "delta")
    return _select(values, act, None, normalize, "mean", notes, "delta")
