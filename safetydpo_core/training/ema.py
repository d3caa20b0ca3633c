"""The exponential moving average (EMA) of a LoRA's weights over a training run (``ema_decay``).

After every optimiser step ``k`` the average moves towards the weights: ``m_k = d * m_(k-1) + (1 - d) * w_k``
with ``m_0 = 0``, and the run exports ``m_k / (1 - d ** k)`` (bias-corrected, as Adam corrects its moments).
That is a weighted mean of the weights after each step taken, the last with weight ``(1 - d) / (1 - d ** k)``
and each earlier one ``d`` times the next, so the starting weights (zero, or an init LoRA) do not pull it back,
and a run of any length averages only what it trained. ``1 / (1 - d)`` steps is its horizon (0.95: about 20).

Why: with a constant learning rate the last step's LoRA carries the noise of the last few batches. On the
built-in world that noise flips plain-shape pictures that the LoRA should leave alone: the demo's two joint
fine-tunes averaged at decay 0.95 keep more of them unchanged, with the concepts still removed
(docs/benchmarks.md, "Averaged weights").

The average is kept per parameter, in the adapter's parameter order, in fp32; a checkpoint holds it (and the
step count), so a resumed run exports what an uninterrupted one would. Every process of a data-parallel run
takes the same optimiser steps from the same weights, so each keeps the same average without communicating.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ..errors import ConfigError


class WeightEMA:
    """The bias-corrected EMA of ``params`` with ``decay`` in (0, 1)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ConfigError(f"ema_decay must be above 0 and below 1 (0 switches the average off); got {decay!r}.")
        self.decay = float(decay)
        self.steps = 0
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor]) -> None:
        """Fold in the weights after one more optimiser step."""
        self.steps += 1
        for m, p in zip(self.sums, params):
            m.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def averaged(self) -> list[torch.Tensor]:
        """The bias-corrected average, one tensor per parameter (needs at least one step)."""
        if not self.steps:
            raise ValueError("the weight average has no steps yet")
        scale = 1.0 / (1.0 - self.decay ** self.steps)
        return [m * scale for m in self.sums]

    @contextlib.contextmanager
    def applied(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """``params`` hold the average inside the block and their own values again after it (no-op before any
        step: there is nothing to average)."""
        if not self.steps:
            yield
            return
        kept = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, self.averaged()):
                p.copy_(a.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "sums": [m.clone() for m in self.sums]}

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        sums = state.get("sums") if isinstance(state, dict) else None
        if sums is None:
            raise ConfigError(f"{where} holds no weight average (ema_decay); resume with the ema_decay it was trained "
                              f"with, or start over.")
        if len(sums) != len(self.sums) or any(a.shape != b.shape for a, b in zip(sums, self.sums)):
            raise ConfigError(f"{where}'s weight average does not match this run's LoRA parameters; resume with the "
                              f"same targets and rank, or start over.")
        self.steps = int(state["steps"])
        self.sums = [s.to(m.dtype).clone() for s, m in zip(sums, self.sums)]
