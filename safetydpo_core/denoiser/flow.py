"""Flow matching (rectified flow), as SD3 / SD3.5 and Flux.1 are trained, for the Denoiser protocol.

The forward process mixes the clean latent and the noise linearly: ``x_t = (1 - sigma) x0 + sigma noise``
with ``sigma`` in ``(0, 1]``, and the network predicts the velocity ``v = noise - x0`` (what ComfyUI's
``CONST`` sampling and diffusers' ``FlowMatchEulerDiscreteScheduler`` assume). Timesteps in the protocol
are continuous for these models: ``t = sigma * num_train_timesteps`` (floats in ``(0, 1000]``), so that a
``timestep_range`` and the calibration's "top 30 % of the schedule" mean the same fraction of the noise
levels for every model family.

Training timesteps follow the families' own recipes (:class:`FlowSchedule`):

* SD3 / SD3.5: ``u`` from a logit-normal (mean 0, std 1, as the SD3 paper and the diffusers / kohya
  trainers use), then the schedule's shift ``sigma = s u / (1 + (s - 1) u)`` with ``s`` = 3.0;
* Flux.1: the same ``u``, then the resolution-dependent shift: ``mu`` rises linearly with the number of
  image tokens from ``base_shift`` = 0.5 at 256 tokens to ``max_shift`` = 1.15 at 4096 tokens, and the shift
  is ``s = exp(mu)`` (``flux_time_shift`` in ComfyUI, ``use_dynamic_shifting`` in diffusers).

A restricted range (``t_range``) is drawn from the same density cut to the range (inverse CDF), so the
draws stay a pure function of the generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
_EPS = 1e-6


def time_shift(shift: float, u: torch.Tensor) -> torch.Tensor:
    """SD3's shift of the noise level ``u`` in ``[0, 1]`` (identity for ``shift`` = 1)."""
    if shift == 1.0:
        return u
    return shift * u / (1 + (shift - 1) * u)


def inverse_time_shift(shift: float, sigma: torch.Tensor) -> torch.Tensor:
    if shift == 1.0:
        return sigma
    return sigma / (shift - (shift - 1) * sigma)


def flux_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
            max_seq_len: int = 4096) -> float:
    """Flux's ``mu`` for an image of ``image_tokens`` tokens (linear in the token count, as diffusers and
    ComfyUI's ModelSamplingFlux compute it)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_tokens * m + (base_shift - m * base_seq_len)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """How a flow-matching model draws its training noise levels (see the module docstring)."""

    shift: float = 1.0                 # static shift (SD3: 3.0); with ``dynamic`` the shift comes from the size
    dynamic: bool = False              # Flux: the shift depends on the number of image tokens
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch: int = 2                     # latent pixels per token side
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self) -> None:
        if not (self.shift > 0 and self.logit_std > 0 and self.patch > 0):
            raise ConfigError(f"Invalid flow schedule {self}: shift, logit_std and patch must be positive.")

    def shift_for(self, latent_shape: Sequence[int] | None) -> float:
        """The shift for latents of shape ``(..., h, w)`` (the static shift unless ``dynamic``)."""
        if not self.dynamic:
            return float(self.shift)
        if latent_shape is None or len(latent_shape) < 2:
            raise ConfigError("A resolution-dependent flow schedule needs the latent size to draw timesteps.")
        h, w = int(latent_shape[-2]), int(latent_shape[-1])
        tokens = math.ceil(h / self.patch) * math.ceil(w / self.patch)
        return math.exp(flux_mu(tokens, self.base_shift, self.max_shift, self.base_seq_len, self.max_seq_len))

    # -- timesteps <-> sigmas ---------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) / self.num_train_timesteps

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.to(torch.float64) * self.num_train_timesteps).to(torch.float32)

    def sample_sigmas(self, n: int, generator: torch.Generator, latent_shape: Sequence[int] | None = None,
                      t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """``n`` training noise levels (float64), shifted logit-normal, restricted to ``t_range`` (timesteps)."""
        T = self.num_train_timesteps
        lo, hi = t_range if t_range is not None else (0, T)
        if not 0 <= lo < hi:
            raise ConfigError(f"timestep range must be (lo, hi) with 0 <= lo < hi; got {t_range!r}.")
        shift = self.shift_for(latent_shape)
        s_lo, s_hi = torch.tensor([lo / T, min(hi, T) / T], dtype=torch.float64).clamp(0, 1)
        u_lo, u_hi = inverse_time_shift(shift, torch.stack([s_lo, s_hi]))
        p_lo, p_hi = self._cdf(u_lo), self._cdf(u_hi)
        p = p_lo + (p_hi - p_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        p = p.clamp(_EPS, 1 - _EPS)
        u = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(p))
        sigma = time_shift(shift, u)
        return sigma.clamp(max(s_lo.item(), _EPS), s_hi.item())

    def _cdf(self, u: torch.Tensor) -> torch.Tensor:
        """CDF of the logit-normal at ``u`` (0 at 0, 1 at 1)."""
        u = u.clamp(0, 1)
        if float(u) <= 0:
            return torch.tensor(0.0, dtype=torch.float64)
        if float(u) >= 1:
            return torch.tensor(1.0, dtype=torch.float64)
        z = (torch.log(u) - torch.log1p(-u) - self.logit_mean) / self.logit_std
        return torch.special.ndtr(z)

    def sample_timesteps(self, n: int, generator: torch.Generator, latent_shape: Sequence[int] | None = None,
                         t_range: tuple[float, float] | None = None) -> torch.Tensor:
        return self.timesteps(self.sample_sigmas(n, generator, latent_shape, t_range))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- the forward process ------------------------------------------------------------------------------------
def _view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape((-1,) + (1,) * (like.dim() - 1)).to(device=like.device, dtype=like.dtype)


def add_noise(schedule: FlowSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise``."""
    s = _view(schedule.sigma(t.detach().cpu()), x0)
    return (1 - s) * x0 + s * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``noise - x0``."""
    return noise - x0


def unit_marginal(schedule: FlowSchedule, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A draw of ``x_t`` for unit-variance latents from noise alone: ``sqrt((1 - s)^2 + s^2) noise``."""
    s = _view(schedule.sigma(t.detach().cpu()), noise)
    return noise * ((1 - s) ** 2 + s ** 2).sqrt()
