"""Rank-k factorisations for the merges: truncated SVD of a full update, and exact SVD of a factored one.

Every delta-space merge (Co-Merge's delta reading, linear, TIES, DARE, magnitude pruning) ends with an
update matrix ``M`` (``[out, in*k*k]``) that has to become a LoRA of rank ``k`` again. The optimum is the
truncated SVD (Eckart-Young). A full ``torch.linalg.svd`` of a 1280x1280 matrix takes seconds on a small
CPU, which is far too slow for a UNet's hundred-odd layers, so :func:`truncated_svd` by default uses
randomized subspace iteration (Halko, Martinsson & Tropp 2011) until the top-``k`` singular values stop
capturing more energy; it falls back to the full SVD when ``k`` is a large share of the matrix. The relative error it
reports, ``||M - U_k S_k V_k^T||_F / ||M||_F``, is measured on the factors actually returned, never
estimated.

:func:`factored_svd` handles updates that are already a product ``up @ down`` of modest inner size (a sum of
LoRAs, a concatenation): two thin QRs and an SVD of an ``R x R`` core give the exact truncated SVD at
almost no cost.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import ConfigError

SVD_MODES = ("auto", "exact", "randomized")


def _rel_error(m: torch.Tensor, up: torch.Tensor, down: torch.Tensor, m_norm: float) -> float:
    if m_norm == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(m - up @ down)) / m_norm


def truncated_svd(m: torch.Tensor, rank: int, mode: str = "auto", seed: int = 0, tol: float = 1e-4,
                  max_iter: int = 40, oversample: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``m`` (``[out, n]``): ``(up [out, k], down [k, n], relative error)``.

    ``k = min(rank, out, n)``; singular values are folded into ``up``. ``mode``: ``exact`` (full SVD),
    ``randomized`` (subspace iteration with ``oversample`` extra columns, stopped when the energy
    ``sum s_i^2`` of the top ``k`` singular values changes by less than ``tol`` relatively, which is what the
    approximation error depends on; at most ``max_iter`` rounds), or ``auto``
    (randomized unless ``k`` plus the oversampling reaches a third of ``min(out, n)`` or the matrix is small).
    Deterministic for a given ``seed``.
    """
    if mode not in SVD_MODES:
        raise ConfigError(f"Unknown SVD mode {mode!r}; choose one of {', '.join(SVD_MODES)}.")
    if rank <= 0:
        raise ConfigError(f"The output rank must be a positive integer; got {rank}.")
    m = m.to(torch.float32)
    rows, cols = m.shape
    small = min(rows, cols)
    k = min(rank, small)
    m_norm = float(torch.linalg.matrix_norm(m))
    if m_norm == 0.0:
        return m.new_zeros(rows, k), m.new_zeros(k, cols), 0.0
    p = oversample if oversample is not None else max(8, k // 2)
    q = min(k + p, small)
    if mode == "auto":
        mode = "exact" if (small <= 128 or 3 * q >= small) else "randomized"
    if mode == "exact":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        up, down = u[:, :k] * s[:k], vh[:k].contiguous()
        tail = float(torch.linalg.vector_norm(s[k:]))
        return up.contiguous(), down, tail / float(torch.linalg.vector_norm(s))
    return _randomized(m, k, q, seed, tol, max_iter, m_norm)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run a stretch of work with ``n`` torch CPU threads (``None`` or 0: leave the setting alone).

    The merges are loops of many small operations (QR of thin matrices, ``r x r`` products, one layer's
    element-wise selection). Each parallel region of torch's thread pool ends in a barrier; when the cores
    are shared with other processes a barrier waits for a scheduler time slice (about 20 ms measured on this
    project's 2-core machine under load, against 20 us on one thread), so such loops run several times
    faster single-threaded, which is why merging defaults to one thread.
    """
    if not n or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _randomized(m: torch.Tensor, k: int, q: int, seed: int, tol: float, max_iter: int,
                m_norm: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    cols = m.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(cols, q, generator=gen).to(m.device)
    qm, _ = _orth(m @ omega)
    prev = None
    for _ in range(max_iter):
        z, _ = _orth(m.T @ qm)
        qm, r = _orth(m @ z)
        energy = float(torch.linalg.svdvals(r)[:k].pow(2).sum())
        if prev is not None and abs(energy - prev) <= tol * energy:
            break
        prev = energy
    b = (qm.T @ m).double()
    evals, evecs = torch.linalg.eigh(b @ b.T)
    order = torch.argsort(evals, descending=True)[:k]
    s = evals[order].clamp_min(0).sqrt()
    u = evecs[:, order]
    keep = s > s[0] * 1e-12 if s.numel() else s > 0
    vh = torch.zeros(k, cols, dtype=torch.float64, device=m.device)
    vh[keep] = (u[:, keep].T @ b) / s[keep, None]
    up = ((qm.double() @ u) * s).to(torch.float32)
    down = vh.to(torch.float32)
    return up.contiguous(), down.contiguous(), _rel_error(m, up, down, m_norm)


def _orth(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the columns of a tall ``y``: Cholesky-QR in float64 (fast for thin matrices),
    falling back to Householder QR when the columns are (nearly) dependent."""
    y64 = y.double()
    r, info = torch.linalg.cholesky_ex(y64.T @ y64, upper=True)
    if int(info) == 0:
        d = torch.diagonal(r).abs()
        if float(d.min()) > 1e-6 * float(d.max()):
            q = torch.linalg.solve_triangular(r, y64, upper=True, left=False)
            return q.to(y.dtype), r.to(y.dtype)
    q, r = torch.linalg.qr(y)
    return q, r


def factored_svd(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact rank-``rank`` truncation of ``up @ down`` (``[out, R] @ [R, n]``) without forming the product.

    Returns ``(up_k [out, k], down_k [k, n], relative Frobenius error)`` with ``k = min(rank, R, out, n)``.
    """
    if rank <= 0:
        raise ConfigError(f"The output rank must be a positive integer; got {rank}.")
    up = up.to(torch.float32)
    down = down.to(torch.float32)
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    k = min(rank, s.numel())
    total = float(torch.linalg.vector_norm(s))
    err = float(torch.linalg.vector_norm(s[k:])) / total if total > 0 else 0.0
    new_up = (q1 @ u[:, :k]) * s[:k]
    new_down = (vh[:k] @ q2.T)
    return new_up.contiguous(), new_down.contiguous(), err
