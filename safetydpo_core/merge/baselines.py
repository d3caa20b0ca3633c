"""The standard LoRA merges, per layer, with the same interface as Co-Merge.

Notation: expert ``e`` has factors ``A_e`` (down), ``B_e`` (up), scale ``s_e = alpha_e / r_e`` and user
weight ``w_e``; its update is ``dW_e = s_e B_e A_e``. A layer an expert lacks is its zero update.

* ``concat``: ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1, ...]``. Exact (``B A = sum_e w_e dW_e``), rank ``sum r_e``.
* ``linear`` (task arithmetic): ``sum_e w_e dW_e`` truncated to rank ``k`` by an exact SVD of the factored sum
  (:func:`~.lowrank.factored_svd`), never materialising the full matrix. peft's ``combination_type="linear"``
  instead sums ``A`` and ``B`` separately (factor space), which adds cross terms ``B_e A_f`` and refuses
  negative weights; that is not used. peft's ``svd`` path applied the scale twice before PR #3111; here the
  scale is folded exactly once, in :meth:`LoraLayer.delta`.
* ``ties``, ``dare`` (DARE-linear), ``dare-ties``, ``magnitude``: the full updates ``dW_e`` go through
  peft's ``merge_utils`` (``dare_linear``, ``dare_ties``, ``calculate_majority_sign_mask``,
  ``disjoint_merge``, ``task_arithmetic``: random drop with rescale, sign election on the trimmed unweighted
  updates, disjoint mean of the weighted ones), then the truncated SVD to rank ``k``
  (:func:`~.lowrank.truncated_svd`). The magnitude trim of TIES and magnitude pruning is :func:`trim`, a
  ``kthvalue`` threshold equal to peft's ``topk`` mask up to ties and several times faster on CPU. peft's ``random_pruning`` draws from
  torch's global generator; each layer runs under a forked generator seeded from the merge seed and the
  layer name, so DARE merges are reproducible and independent of layer order.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from ..errors import ConfigError
from ..lora.lora_set import LoraLayer
from .lowrank import factored_svd, truncated_svd

MAJORITY_SIGN = ("total", "frequency")


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends on the merge seed and the layer name only."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31 - 1)


def _flat(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.up.reshape(layer.out_features, layer.rank).float(), layer.down.reshape(layer.rank, -1).float()


def _ref(layers: Sequence[LoraLayer | None]) -> LoraLayer:
    ref = next((l for l in layers if l is not None), None)
    if ref is None:
        raise ConfigError("No expert adapts this layer.")
    return ref


def _shape(ref: LoraLayer, up: torch.Tensor, down: torch.Tensor) -> LoraLayer:
    k = down.shape[0]
    if ref.is_conv:
        down = down.reshape(k, *ref.down.shape[1:])
        up = up.reshape(up.shape[0], k, 1, 1)
    return LoraLayer(down.contiguous(), up.contiguous(), float(k))


def concat_layer(layers: Sequence[LoraLayer | None], weights: Sequence[float]) -> tuple[LoraLayer, dict]:
    """Exact merge by concatenation: rank = the sum of the present experts' ranks, scale 1."""
    ref = _ref(layers)
    ups, downs = [], []
    for layer, w in zip(layers, weights):
        if layer is None:
            continue
        up, down = _flat(layer)
        ups.append(up)
        downs.append(down * (float(w) * layer.scale))
    return _shape(ref, torch.cat(ups, 1), torch.cat(downs, 0)), {"svd_rel_error": None, "notes": []}


def linear_layer(layers: Sequence[LoraLayer | None], weights: Sequence[float], rank: int) -> tuple[LoraLayer, dict]:
    """Task arithmetic ``sum_e w_e dW_e``, truncated to ``rank`` by an exact factored SVD."""
    ref = _ref(layers)
    exact, _ = concat_layer(layers, weights)
    up, down = _flat(exact)
    new_up, new_down, err = factored_svd(up, down, rank)
    return _shape(ref, new_up, new_down), {"svd_rel_error": err, "notes": []}


def _deltas(layers: Sequence[LoraLayer | None]) -> list[torch.Tensor]:
    ref = _ref(layers)
    shape = (ref.out_features, ref.in_features)
    return [l.delta(torch.float32) if l is not None else torch.zeros(shape) for l in layers]


def pruned_layer(method: str, name: str, layers: Sequence[LoraLayer | None], weights: Sequence[float], rank: int,
                 density: float = 0.5, majority_sign: str = "total", svd: str = "auto",
                 seed: int = 0) -> tuple[LoraLayer, dict]:
    """``ties``, ``dare``, ``dare-ties`` or ``magnitude`` on the full updates (peft's merge_utils), then SVD."""
    from peft.utils import merge_utils as mu

    if not 0.0 < density <= 1.0:
        raise ConfigError(f"The density (share of each update kept) must be in (0, 1]; got {density}.")
    if majority_sign not in MAJORITY_SIGN:
        raise ConfigError(f"Unknown majority-sign method {majority_sign!r}; choose one of {', '.join(MAJORITY_SIGN)}.")
    ref = _ref(layers)
    tensors = _deltas(layers)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    notes: list[str] = []
    s = layer_seed(seed, name)
    if method == "ties":
        merged = _ties([trim(t, density) for t in tensors], w, majority_sign, mu)
    elif method == "magnitude":
        merged = mu.task_arithmetic([trim(t, density) for t in tensors], w)
    elif method in ("dare", "dare-ties"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            if density >= 1:
                merged = mu.task_arithmetic(tensors, w) if method == "dare" else _ties(tensors, w, majority_sign, mu)
            elif method == "dare":
                merged = mu.dare_linear(tensors, w, density)
            else:
                merged = mu.dare_ties(tensors, w, density, majority_sign)
    else:
        raise ConfigError(f"Unknown pruning merge {method!r}.")
    del tensors
    up, down, err = truncated_svd(merged, rank, mode=svd, seed=s)
    return _shape(ref, up, down), {"svd_rel_error": err, "notes": notes,
                                   "selected_norm": float(torch.linalg.matrix_norm(merged))}


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries of ``t`` (TIES' trim, peft's
    ``magnitude_based_pruning``), found by a ``kthvalue`` threshold instead of peft's ``topk``: the same result
    when magnitudes are distinct (entries tied at the threshold are all kept), and several times faster on CPU
    for the half-a-tensor ``k`` that densities around 0.5 ask for."""
    n = t.numel()
    k = int(density * n)
    if k >= n:
        return t
    if k <= 0:
        return torch.zeros_like(t)
    mag = t.abs()
    thresh = kth_largest(mag.reshape(-1), k)
    return torch.where(mag >= thresh, t, torch.zeros_like(t))


def kth_largest(x: torch.Tensor, k: int, sample: int = 65536) -> torch.Tensor:
    """The ``k``-th largest value of the 1-D ``x``, exactly, without sorting all of it.

    A fixed-seed sample brackets the value; one pass counts the entries above the bracket and a
    ``kthvalue`` over the (small) bracket finds it. Falls back to a full ``kthvalue`` if the bracket missed.
    """
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    if n <= 4 * sample:
        return torch.kthvalue(x, n - k + 1).values
    gen = torch.Generator(device="cpu").manual_seed(1234)
    s = x[torch.randint(n, (sample,), generator=gen).to(x.device)]
    p = 1.0 - k / n
    delta = 6.0 * (max(p * (1 - p), 1.0 / sample) / sample) ** 0.5 + 2.0 / sample
    lo = torch.kthvalue(s, max(1, int((p - delta) * sample))).values
    hi = torch.kthvalue(s, min(sample, int((p + delta) * sample) + 1)).values
    above = int((x > hi).sum())
    band = x[(x >= lo) & (x <= hi)]
    need = k - above
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(x, n - k + 1).values


def _ties(tensors, w, majority_sign, mu):
    """Sign election on the (trimmed, unweighted) updates and the disjoint mean of the weighted ones (peft)."""
    stacked = torch.stack(tensors, 0)
    mask = mu.calculate_majority_sign_mask(stacked, method=majority_sign)
    weighted = stacked * mu.reshape_weight_task_tensors(stacked, w)
    return mu.disjoint_merge(weighted, mask)
