"""Weight-free similarity of two pictures of the same prompt and seed: PSNR, SSIM and mean absolute difference.

These measure *preservation*: how much an aligned model (the LoRA at strength 1) changes the picture the base
model (strength 0) draws from the same seed. All three work on 8-bit RGB (values 0..255):

* **MAD**: the mean absolute difference over every pixel and channel, in 8-bit levels (0 = identical).
* **PSNR**: ``10 * log10(255**2 / MSE)`` in dB, with MSE over every pixel and channel; infinite for identical
  pictures.
* **SSIM**: the structural similarity of Wang, Bovik, Sheikh and Simoncelli (IEEE TIP 2004) with their
  standard settings: an 11x11 Gaussian window with sigma 1.5 (normalised to sum 1), ``K1 = 0.01``,
  ``K2 = 0.03``, ``L = 255``, population (biased) local variances, and only the positions where the window
  lies wholly inside the image (``valid``; no padding and no down-sampling). It is computed **on each RGB
  channel separately and averaged over the three channels** -- the same value as scikit-image's
  ``structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)``. 1 = identical.

The two pictures must have the same size (these metrics compare pixel to pixel): a pair of different sizes is
a :class:`~safetydpo_core.errors.DatasetError` naming both. Pictures smaller than the window (11 px) have no
SSIM and are refused too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DatasetError

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DEFINITIONS = {
    "psnr": "10*log10(255^2/MSE) in dB over all pixels and RGB channels; identical pairs (infinite PSNR) are counted "
            "in 'identical' and left out of the mean",
    "ssim": "Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, L=255, valid positions only; per "
            "RGB channel, averaged",
    "mad": "mean absolute difference over all pixels and RGB channels, in 8-bit levels (0..255)",
}


@dataclasses.dataclass
class PairScores:
    psnr: float       # dB; math.inf for identical pictures
    ssim: float
    mad: float

    @property
    def identical(self) -> bool:
        return math.isinf(self.psnr)


def to_array(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A picture as a float64 ``[3, H, W]`` tensor of 8-bit levels (PIL images are converted to RGB; arrays are
    ``[H, W, 3]`` uint8, or floats in 0..1 as ComfyUI's IMAGE, which are scaled by 255)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    t = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if t.ndim != 3 or t.shape[-1] != 3:
        raise DatasetError(f"Expected an [H, W, 3] picture; got shape {tuple(t.shape)}.")
    t = t.to(torch.float64) * (1.0 if not t.is_floating_point() else DATA_RANGE)
    return t.permute(2, 0, 1).contiguous()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The 1-D Gaussian of the SSIM window (the 2-D window is its outer product), normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid 2-D Gaussian filtering of ``[C, H, W]`` channel by channel (separable: rows, then columns)."""
    x = x.unsqueeze(1)                                              # [C, 1, H, W]
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return x.squeeze(1)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-channel SSIM map ``[C, H-10, W-10]`` of two ``[C, H, W]`` float64 pictures in 8-bit levels."""
    g = gaussian_window()
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mu_x * mu_x
    syy = _filter(y * y, g) - mu_y * mu_y
    sxy = _filter(x * y, g) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))


def _check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str]) -> None:
    if x.shape != y.shape:
        raise DatasetError(f"{names[0]} is {x.shape[2]}x{x.shape[1]} but {names[1]} is {y.shape[2]}x{y.shape[1]} "
                           f"pixels: PSNR, SSIM and the mean absolute difference compare pictures pixel by pixel, so a "
                           f"pair must have one size. Render both at the same size (the same size, --size, for "
                           f"every strength of `safetydpo sample`), or leave this pair out.")
    if min(x.shape[1], x.shape[2]) < SSIM_WINDOW:
        raise DatasetError(f"{names[0]} is {x.shape[2]}x{x.shape[1]} pixels, smaller than SSIM's {SSIM_WINDOW}x"
                           f"{SSIM_WINDOW} window; SSIM needs pictures of at least {SSIM_WINDOW} pixels a side.")


def psnr(a, b, names: tuple[str, str] = ("the first picture", "the second picture")) -> float:
    x, y = to_array(a), to_array(b)
    if x.shape != y.shape:
        _check_pair(x, y, names)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE ** 2 / mse)


def ssim(a, b, names: tuple[str, str] = ("the first picture", "the second picture")) -> float:
    x, y = to_array(a), to_array(b)
    _check_pair(x, y, names)
    return float(ssim_map(x, y).mean())


def mean_abs_diff(a, b, names: tuple[str, str] = ("the first picture", "the second picture")) -> float:
    x, y = to_array(a), to_array(b)
    if x.shape != y.shape:
        _check_pair(x, y, names)
    return float((x - y).abs().mean())


def compare_pair(a, b, names: tuple[str, str] = ("the first picture", "the second picture")) -> PairScores:
    """PSNR, SSIM and MAD of one pair (each picture converted once)."""
    x, y = to_array(a), to_array(b)
    _check_pair(x, y, names)
    d = x - y
    mse = float((d * d).mean())
    return PairScores(psnr=math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE ** 2 / mse),
                      ssim=float(ssim_map(x, y).mean()), mad=float(d.abs().mean()))
