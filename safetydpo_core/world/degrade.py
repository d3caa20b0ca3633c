"""Degradations like those of a small diffusion model's pictures, for the world's judge: it is trained on
renders degraded this way (``tools/world/train_judge.py``) and its robustness is measured on them
(:func:`safetydpo_core.world.evaluate.judge_robustness`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _blur_kernel(sigma: float = 1.0) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    return (k[:, None] * k[None, :]).expand(3, 1, 5, 5).contiguous()


_KERNEL = _blur_kernel()


def degrade(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Degrade ``[B, 3, H, W]`` images in ``[0, 1]`` the way a small diffusion model's pictures are degraded:
    a shift of up to a pixel, partial Gaussian blur, tone and per-channel gain changes, blotchy low-frequency
    noise and fine grain. ``strength`` scales every effect (0 = none)."""
    b = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(b, *shape, generator=g)

    if strength <= 0:
        return x
    shifts = torch.randint(-1, 2, (b, 2), generator=g)
    x = torch.stack([torch.roll(F.pad(xi[None], (1, 1, 1, 1), mode="replicate")[0], (int(s[0]), int(s[1])), (1, 2))[:, 1:-1, 1:-1]
                     for xi, s in zip(x, shifts)])
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), _KERNEL, groups=3)
    w = u(0, 1, 1, 1, 1) * (torch.rand(b, 1, 1, 1, generator=g) < 0.6) * strength
    x = x + w.clamp(0, 1) * (blurred - x)
    contrast = 1 + u(-0.15, 0.1, 1, 1, 1) * strength
    bright = u(-0.06, 0.06, 1, 1, 1) * strength
    gain = 1 + u(-0.05, 0.05, 3, 1, 1) * strength
    x = ((x - 0.5) * contrast + 0.5 + bright) * gain
    size = x.shape[-1]
    lowres = 4 if torch.rand(1, generator=g).item() < 0.5 else 8
    blotch = F.interpolate(torch.randn(b, 3, lowres, lowres, generator=g), size=(size, size), mode="bilinear",
                           align_corners=False)
    x = x + blotch * u(0, 0.07, 1, 1, 1) * strength
    x = x + torch.randn(x.shape, generator=g) * u(0, 0.06, 1, 1, 1) * strength
    return x.clamp(0, 1)
