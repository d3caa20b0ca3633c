"""FID and KID between two sets of features (Inception pool3, :mod:`.inception`), in numpy (float64).

**FID** (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the two sets:
``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`` with the sample means and the sample covariances
(``np.cov``, denominator n - 1), as pytorch-fid. pytorch-fid takes ``Tr((S1 S2)^(1/2))`` from
``scipy.linalg.sqrtm``; here it is computed exactly from eigenvalues instead, without scipy: the eigenvalues
of ``S1 S2`` are those of the symmetric positive semi-definite ``S1^(1/2) S2 S1^(1/2)``, and, with the centred
features ``A1``, ``A2`` (``S = A^T A / (n - 1)``), the squared singular values of ``A1 A2^T`` divided by
``(n1 - 1)(n2 - 1)``. So with fewer images than feature dimensions (the usual case: a few hundred images,
2048 dimensions) the trace is the nuclear norm of the small ``n1 x n2`` matrix ``A1 A2^T`` over
``sqrt((n1 - 1)(n2 - 1))`` (milliseconds, where sqrtm of a 2048x2048 matrix takes minutes on a CPU), and
otherwise the eigenvalues of the ``d x d`` matrix above. Both are exact for the singular covariances of
fewer images than dimensions, where sqrtm needs its ``eps`` fallback; the tests check agreement with
pytorch-fid's formula. Tiny negative results of rounding are clipped to 0. With few images FID is biased
upward and noisy (its estimate depends on n): compare FIDs of equally many images only.

**KID** (Binkowski et al. 2018) is the squared MMD with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
estimated without bias (the diagonals of ``K_XX`` and ``K_YY`` left out) on ``subsets`` random subsets of
``m = min(subset_size, n1, n2)`` features drawn without replacement from each set, and averaged; the standard
deviation over the subsets is reported too. This is torch-fidelity's ``kid_features_to_metric`` (the same
random draws for the same seed, its default seed 2020) and clean-fid's ``kernel_distance``, except that
torch-fidelity refuses sets smaller than the subset size where this, like clean-fid, uses smaller subsets.
KID can be slightly negative when the two sets come from one distribution.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ConfigError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed


@dataclasses.dataclass
class GaussianStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_stats(features: np.ndarray, what: str = "the features", covariance: bool = True) -> GaussianStats:
    """Mean and sample covariance of ``[n, d]`` features (``covariance=False``: the mean only, for :func:`fid`)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"FID needs at least 2 images in {what}; got {f.shape[0] if f.ndim == 2 else 0}.")
    return GaussianStats(f.mean(axis=0), np.cov(f, rowvar=False) if covariance else np.empty((0, 0)), f.shape[0])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    if a.mu.shape != b.mu.shape:
        raise ConfigError(f"Feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); FID compares features of one "
                          f"network.")
    diff = a.mu - b.mu
    root = _sqrt_psd(a.sigma)
    eig = np.linalg.eigvalsh(root @ b.sigma @ root)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    value = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)
    return max(value, 0.0)


def fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """FID between two ``[n, d]`` feature sets."""
    s1 = gaussian_stats(features_1, "the first set", covariance=False)
    s2 = gaussian_stats(features_2, "the second set", covariance=False)
    if s1.mu.shape != s2.mu.shape or min(s1.n, s2.n) > s1.mu.shape[0]:
        return frechet_distance(gaussian_stats(features_1, "the first set"), gaussian_stats(features_2, "the second set"))
    a = np.asarray(features_1, dtype=np.float64) - s1.mu
    b = np.asarray(features_2, dtype=np.float64) - s2.mu
    tr_covmean = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt((s1.n - 1) * (s2.n - 1))
    diff = s1.mu - s2.mu
    value = float(diff @ diff + (a * a).sum() / (s1.n - 1) + (b * b).sum() / (s2.n - 1) - 2 * tr_covmean)
    return max(value, 0.0)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased squared-MMD estimate with the KID kernel between two equally large feature sets."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


@dataclasses.dataclass
class KIDResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kid(features_1: np.ndarray, features_2: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> KIDResult:
    """KID between two ``[n, d]`` feature sets (mean and standard deviation over the subsets)."""
    f1 = np.asarray(features_1, dtype=np.float64)
    f2 = np.asarray(features_2, dtype=np.float64)
    if subsets < 1 or subset_size < 2:
        raise ConfigError(f"KID needs at least 1 subset of at least 2 images; got {subsets} subsets of {subset_size}.")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ConfigError(f"KID needs at least 2 images in each set; got {f1.shape[0]} and {f2.shape[0]}.")
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(x, y)
    return KIDResult(float(values.mean()), float(values.std()), subsets, m)
