"""ESD (Erased Stable Diffusion; Gandikota et al., ICCV 2023) as a LoRA objective of the pack's trainer.

ESD fine-tunes the model so that its prediction for a concept prompt ``c`` becomes the frozen model's
prediction guided *away* from ``c``::

    target = ref(x_t, "") - eta * (ref(x_t, c) - ref(x_t, ""))        loss = mean (pred(x_t, c) - target)^2

Here the frozen model is the reference of the rest of the pack: the same network with the LoRA switched
off (never a copy), and only the LoRA trains. ESD-u and ESD-x are target-layer presets
(:mod:`safetydpo_core.lora.targets`): ``esd-u`` every layer outside cross-attention, ``esd-x`` the
cross-attention projections. ESD needs no preference pairs: its data source is a list of concept prompts
(:class:`~.concept_prompts.ConceptPrompts`).

**Where x_t comes from, as ESD does it.** One micro-step: draw ``batch_size`` concept prompts (the seeded
order of the trainer), one Gaussian noise per prompt and one stop index ``k`` uniform in
``[0, esd_sample_steps)``; run ``k`` DDIM steps (deterministic, eta 0) of the *reference's* own generation
of the concept prompts from that noise, with classifier-free guidance ``esd_guidance`` (ESD: 3), and stop:
``x_t`` is the partly generated latent at the schedule's timestep ``t_k``. The reference's conditional and
unconditional predictions at ``(x_t, t_k)`` (one batched forward, the one that step ``k`` would have made)
give the target; the adapted model's prediction for ``c`` at the same point is trained towards it.

Departures from the official code, each deliberate:

* the generation runs on the frozen reference, as the current official (diffusers) ESD code does; the
  original CompVis code generated with the model being fine-tuned. Using the reference makes each micro-step's
  ``x_t`` a pure function of ``(seed, step, micro-step)``, so an interrupted run resumed from a checkpoint
  gives the same LoRA as an uninterrupted one (the trainer's guarantee);
* DDIM with "trailing" timestep spacing (``t_i = round(T - i T / n) - 1``, starting at ``T - 1`` where the
  latent is pure noise) through the Denoiser protocol, on both backends, rather than each pipeline's own
  default scheduler; ``esd_sample_steps`` is the official 50 by default;
* the loss is on a LoRA of the chosen rank, not on the full weights; ``batch_size`` prompts per micro-step
  share the stop index ``k`` (the official code uses one prompt);
* ``eta`` is the paper's: the official diffusers script's ``negative_guidance`` ``g`` uses the target
  ``ref(c) - g (ref(c) - ref(""))``, which is ``eta = g - 1`` here (its default 2 is ``eta = 1``).

**Epsilon and v-prediction.** ESD's arithmetic is done on whatever :meth:`predict` returns (epsilon for
epsilon models and for the ComfyUI backend, v for v-prediction diffusers models). At a fixed ``(x_t, t)``
the v that a noise estimate ``e`` implies is ``v = e / a_t - (s_t / a_t) x_t`` (``a_t = sqrt(alpha_bar_t)``,
``s_t = sqrt(1 - alpha_bar_t)``): an affine map with the *same* offset for every conditioning. The target is
an affine combination of predictions whose coefficients sum to one (``1 + eta`` and ``-eta``), so the
offsets cancel and the v-space target is exactly the v of the epsilon-space target: the same fixed point.
Only the loss's weighting differs: the squared error in v is ``1 / alpha_bar_t`` times the one in epsilon
(larger at high noise), as v-prediction models are themselves trained. Classifier-free guidance in the
generation is an affine combination of the same kind, so it too is the same in either space. The same holds
for any forward process ``x_t = a_t x0 + b_t eps`` whose predictions are affine in ``eps`` at fixed ``x_t``
(a flow model's velocity ``eps - x0`` included), and the DDIM step here only uses the protocol's ``add_noise``
and ``eps_from_prediction``, so a flow backend that provides those (with integer timesteps) runs ESD as it is;
the pack's backends are epsilon and v-prediction UNets today.

Public API: :class:`EsdTrainer`, :func:`train_esd`, :func:`partial_generation`, :func:`sampling_timesteps`.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ..denoiser.protocol import Conditioning, Denoiser
from ..errors import ConfigError
from ..lora.lora_set import LoraSet
from . import objectives
from .checkpoint import load_checkpoint
from .concept_prompts import ConceptPrompts
from .config import RESUME_KEYS, TrainConfig
from .distributed import ProcessGroup
from .trainer import ExpertTrainer, PairOrder, ProgressFn, StopFn, TrainResult, step_generator

__all__ = ["ConceptPrompts", "EsdTrainer", "train_esd", "partial_generation", "sampling_timesteps"]

# settings a resume must keep, beyond the trainer's own
_ESD_RESUME_KEYS = tuple(k for k in RESUME_KEYS if k.startswith("esd_"))


def sampling_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DDIM timesteps with "trailing" spacing, from ``T - 1`` down: ``round(T - i * T / steps) - 1``."""
    if not 0 < steps <= num_train_timesteps:
        raise ConfigError(f"esd_sample_steps must be between 1 and the model's {num_train_timesteps} timesteps; "
                          f"got {steps}.")
    return [int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1 for i in range(steps)]


def _coeffs(denoiser: Denoiser, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)`` shaped like ``like``, read off the protocol's
    ``add_noise`` (so that any backend's schedule is used as it is)."""
    shape = (like.shape[0],) + (1,) * (like.dim() - 1)
    one = torch.ones(shape, dtype=torch.float32, device=like.device)
    zero = torch.zeros_like(one)
    return denoiser.add_noise(one, zero, t).float(), denoiser.add_noise(zero, one, t).float()


@torch.no_grad()
def partial_generation(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning, noise: torch.Tensor, steps: int,
                       stop: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``stop`` of ``steps`` DDIM steps of ``denoiser``'s generation of ``cond`` from ``noise`` (guidance
    ``guidance`` against ``uncond``) and stop. Returns ``(x_t, t, pred_uncond, pred_cond)``: the partial
    latent, its timestep per sample and the denoiser's two predictions there (run it with the adapter off)."""
    ts = sampling_timesteps(denoiser.num_train_timesteps, steps)
    if not 0 <= stop < steps:
        raise ConfigError(f"The stop index must be in [0, {steps}); got {stop}.")
    dev = torch.device(denoiser.device)
    b = noise.shape[0]
    both = Conditioning.cat([uncond, cond])
    x = noise.to(dev, torch.float32)
    for i in range(stop + 1):
        t = torch.full((2 * b,), ts[i], dtype=torch.long, device=dev)
        pred = denoiser.predict(torch.cat([x, x]), t, both).float()
        p_u, p_c = pred.chunk(2)
        if i == stop:
            return x, t[:b], p_u, p_c
        tb, tn = t[:b], torch.full((b,), ts[i + 1], dtype=torch.long, device=dev)
        eps = denoiser.eps_from_prediction(p_u + guidance * (p_c - p_u), x, tb).float()
        sa, sb = _coeffs(denoiser, tb, x)
        x0 = (x - sb * eps) / sa
        x = denoiser.add_noise(x0, eps, tn).float()  # DDIM, eta 0
    raise AssertionError("unreachable")


class EsdTrainer(ExpertTrainer):
    """The trainer with ESD's micro-step (see the module docstring) on :class:`ConceptPrompts`.

    Everything else is :class:`~.trainer.ExpertTrainer`'s: the seeded order and draws, LoRA initialisation,
    optimiser, checkpoints and resume, metrics, progress, cancel, divergence checks, data parallelism.
    """

    def __init__(self, denoiser: Denoiser, concepts: ConceptPrompts, config: TrainConfig, **kwargs):
        if config.objective != "esd":
            raise ConfigError(f"The ESD trainer needs objective 'esd'; got {config.objective!r}.")
        sampling_timesteps(denoiser.num_train_timesteps, config.esd_sample_steps)  # checks the setting
        super().__init__(denoiser, concepts, config, **kwargs)

    @property
    def concepts(self) -> ConceptPrompts:
        return self.dataset

    def _check_dataset(self) -> None:
        if len(self.concepts) == 0:
            raise ConfigError("concepts: there are no concept prompts to erase.")
        self.concepts.check(self.denoiser)

    def _size(self) -> tuple[int, int]:
        if self.concepts.size:
            return self.concepts.size
        return tuple(self.denoiser.default_size)

    def _micro_loss(self, adapter, order: PairOrder, step: int, micro: int, batch=None) -> objectives.ObjectiveOutput:
        # ``batch`` is always None here: ESD draws concept prompts, not pairs (and refuses the adversary)
        cfg, d = self.cfg, self.denoiser
        g = step_generator(cfg.seed, step, micro)
        first = (step * self.micro_steps + micro) * cfg.batch_size
        prompts = [self.concepts.prompts[order[first + b]] for b in range(cfg.batch_size)]
        size = self._size()
        noise = torch.randn((len(prompts), *d.latent_shape(*size)), generator=g)
        stop = int(torch.randint(0, cfg.esd_sample_steps, (1,), generator=g))
        cond = self._encode(prompts, size)
        uncond = self._encode([""] * len(prompts), size)
        with torch.no_grad(), adapter.disabled(), self._autocast():
            x_t, t, ref_u, ref_c = partial_generation(d, cond, uncond, noise, cfg.esd_sample_steps, stop,
                                                      cfg.esd_guidance)
        with self._autocast():
            pred = d.predict(x_t, t, cond)
        out = objectives.esd(pred, ref_c, ref_u, cfg.esd_eta)
        out.stats["timestep"] = float(t.float().mean())
        return out

    def _restore(self, path, adapter, opt, sched):
        old = load_checkpoint(path).get("config", {})
        new = self.cfg.to_dict()
        for k in _ESD_RESUME_KEYS:
            if old.get(k) != new.get(k):
                raise ConfigError(f"Cannot resume from {path}: it was trained with {k}={old.get(k)!r}, this run asks "
                                  f"for {k}={new.get(k)!r}. Use the same settings, or a new checkpoint folder.")
        return super()._restore(path, adapter, opt, sched)

    def metadata(self, history: list[dict]) -> dict[str, str]:
        meta = super().metadata(history)
        cfg, c = self.cfg, self.concepts
        for k in ("safetydpo_beta", "safetydpo_condition", "safetydpo_dataset_fingerprint", "safetydpo_dataset_pairs"):
            meta.pop(k, None)
        if c.categories:
            meta["safetydpo_category"] = ",".join(c.categories)
        else:
            meta.pop("safetydpo_category", None)
        final = history[-1] if history else {}
        meta.update({
            "ss_training_comment": "ESD concept erasure (LoRA), SafetyDPO pack",
            "safetydpo_objective": "esd",
            "safetydpo_method": {"esd-u": "esd-u", "esd-x": "esd-x"}.get(str(cfg.targets), f"esd ({cfg.targets})"),
            "safetydpo_esd_eta": f"{cfg.esd_eta:g}",
            "safetydpo_esd_sample_steps": str(cfg.esd_sample_steps),
            "safetydpo_esd_guidance": f"{cfg.esd_guidance:g}",
            "safetydpo_concepts": json.dumps(list(c.prompts[:64])),
            "safetydpo_concept_prompts": str(len(c)),
            "safetydpo_concepts_fingerprint": c.fingerprint(),
        })
        if final:
            meta["safetydpo_final_metrics"] = ",".join(f"{k}={final[k]:.4g}" for k in ("loss", "concept_shift", "guidance")
                                                       if k in final)
        return meta


def train_esd(denoiser: Denoiser, concepts: ConceptPrompts | str | Sequence[str], config: TrainConfig, *,
              checkpoint_dir: str | os.PathLike | None = None, metrics_path: str | os.PathLike | None = None,
              resume: bool = False, progress: ProgressFn | None = None, should_stop: StopFn | None = None,
              init_lora: LoraSet | None = None, group: ProcessGroup | None = None) -> TrainResult:
    """Train an ESD LoRA that erases ``concepts`` (a :class:`ConceptPrompts`, or a concept list such as
    ``"gun, rifle"``) with ``config`` (``objective="esd"``; ``targets`` ``esd-u`` or ``esd-x``)."""
    if not isinstance(concepts, ConceptPrompts):
        concepts = ConceptPrompts.from_text(concepts)
    trainer = EsdTrainer(denoiser, concepts, config, checkpoint_dir=checkpoint_dir, metrics_path=metrics_path,
                         progress=progress, should_stop=should_stop, init_lora=init_lora, group=group)
    return trainer.run(resume=resume)
