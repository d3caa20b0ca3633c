"""Preference objectives on paired predictions.

Batch layout everywhere: the first half of the batch is the preferred (safe) image ``w``, the second half
the dispreferred (unsafe) image ``l`` of the same pairs, with the same noise and timestep per pair.

* :func:`diffusion_dpo` is Diffusion-DPO exactly as the official SafetyDPO / DiffusionDPO ``train.py``
  computes it: per-sample *mean* squared error, ``inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))``,
  ``loss = -logsigmoid(inside).mean()``, implicit accuracy ``(inside > 0).mean()``. ``beta`` 5000 matches
  the official default only with this mean reduction.
* :func:`mapo` is MaPO (Hong et al. 2024), reference-free, as in ``mapo-t2i/mapo`` ``compute_loss``.
* An optional SFT term (mean error on the preferred image) can be added to either.
* :func:`esd` is ESD (Gandikota et al., ICCV 2023), concept erasure without pairs: the adapted model's
  prediction for the concept prompt is pulled to the reference's prediction guided *away* from it,
  ``target = ref_uncond - eta * (ref_cond - ref_uncond)`` (the batch holds concept prompts only; see
  :mod:`.esd` for where ``x_t`` comes from).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    stats: dict[str, float]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, averaged over every non-batch dimension (as the official code)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))


def diffusion_dpo(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float,
                  sft_weight: float = 0.0) -> ObjectiveOutput:
    """Diffusion-DPO loss with the safe image preferred; see the module docstring."""
    m = per_sample_mse(model_pred, target)
    with torch.no_grad():
        r = per_sample_mse(ref_pred, target)
    m_w, m_l = m.chunk(2)
    r_w, r_l = r.chunk(2)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    loss = -F.logsigmoid(inside).mean()
    if sft_weight:
        loss = loss + sft_weight * m_w.mean()
    with torch.no_grad():
        reward_w = -0.5 * beta * (m_w - r_w)
        reward_l = -0.5 * beta * (m_l - r_l)
        stats = {
            "implicit_acc": float((inside > 0).float().mean()),
            "margin": float(inside.mean()),
            "reward_w": float(reward_w.mean()),
            "reward_l": float(reward_l.mean()),
            "m_w": float(m_w.mean()), "m_l": float(m_l.mean()),
            "r_w": float(r_w.mean()), "r_l": float(r_l.mean()),
        }
    return ObjectiveOutput(loss, stats)


def mapo(model_pred: torch.Tensor, target: torch.Tensor, beta: float = 0.1, snr_value: float = 0.5,
         num_train_timesteps: int = 1000, sft_weight: float = 0.0) -> ObjectiveOutput:
    """MaPO: ``mean(l_w) - beta * mean(logsigmoid(T * (s(l_w) - s(l_l))))``, ``s(l) = g*l / (exp(g*l) - 1)``."""
    m = per_sample_mse(model_pred, target)
    m_w, m_l = m.chunk(2)

    def score(x: torch.Tensor) -> torch.Tensor:
        gx = snr_value * x
        return gx / torch.expm1(gx).clamp_min(1e-12)

    log_odds = score(m_w) - score(m_l)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    loss = m_w.mean() - beta * ratio.mean()
    if sft_weight:
        loss = loss + sft_weight * m_w.mean()
    with torch.no_grad():
        stats = {"implicit_acc": float((log_odds > 0).float().mean()), "margin": float((log_odds * num_train_timesteps).mean()),
                 "m_w": float(m_w.mean()), "m_l": float(m_l.mean()), "ratio": float(ratio.mean())}
    return ObjectiveOutput(loss, stats)


def esd_target(ref_cond: torch.Tensor, ref_uncond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target ``ref_uncond - eta * (ref_cond - ref_uncond)`` (negative guidance away from the concept).

    It is affine in the predictions with coefficients that sum to one (``1 + eta`` and ``-eta``), so it is the
    same target whether the predictions are epsilon or v (see :mod:`.esd`).
    """
    return ref_uncond.float() - eta * (ref_cond.float() - ref_uncond.float())


def esd(model_pred: torch.Tensor, ref_cond: torch.Tensor, ref_uncond: torch.Tensor, eta: float) -> ObjectiveOutput:
    """ESD loss: mean squared error to :func:`esd_target` over every element (ESD's ``MSELoss``).

    Stats: ``esd_gap`` (the loss itself), ``concept_shift`` (how far the adapted prediction moved from the
    reference's for the concept) and ``guidance`` (the reference's conditional-unconditional gap, what the
    target pushes against).
    """
    with torch.no_grad():
        target = esd_target(ref_cond, ref_uncond, eta)
    m = per_sample_mse(model_pred, target)
    loss = m.mean()
    with torch.no_grad():
        stats = {"esd_gap": float(loss), "concept_shift": float(per_sample_mse(model_pred, ref_cond).mean()),
                 "guidance": float(per_sample_mse(ref_cond, ref_uncond).mean())}
    return ObjectiveOutput(loss, stats)
