"""Adversarial training against concept inversion: the adversary's soft tokens and their share of the loss.

Concept inversion (Pham et al., 2023; :mod:`..attacks.inversion`) brings an erased concept back through a
new token embedding learned against the aligned model: the LoRA has learned to redraw the concept's word,
not the concept. AdvUnlearn (Zhang et al., arXiv 2405.15234) trains against that attack: an adversary keeps
such a token and improves it against the current model while the model learns to stay safe when prompted
with it. Here, with ``adv_weight`` > 0:

* the adversary holds one input embedding ``v_c`` per category, started (``adv_init``) at a random
  vocabulary token (where the attack starts) or at the concept word's own embedding, and restarted there
  every ``adv_reset`` optimiser steps (a new attack each time, as the attack is run anew on each model);
* before each optimiser step the adversary attacks the current LoRA: ``adv_steps`` Adam steps (step size
  ``adv_lr`` x the root-mean-square entry of the vocabulary's embeddings) that lower the adapted model's
  denoising error on the unsafe latents of the step's first micro-step (the base model's own pictures of
  those prompts: the attack's target), each pair's unsafe prompt with its concept word replaced by its
  category's token (the attack's :func:`..attacks.inversion.placeholder_layout`). Every process computes
  the same step on the same pairs, so the tokens need no synchronising;
* in each micro-step the trainer adds the pair once more under those adversarial prompts, with
  ``adv_weight`` x the term ``adv_objective`` names: ``dpo``, the DPO objective there (safe preferred: the
  LoRA learns to draw the safe twin for the adversary's token too), or ``anchor``, the squared distance to
  the untouched model's prediction for the pair's safe prompt.

The vectors, their Adam state and restart steps are part of the checkpoint, and every draw comes from the
step's generator, so a resumed or data-parallel run repeats an uninterrupted one. The adversary needs
token-level access to the text encoder (the Denoiser's ``prompt_embedder()``, as the white-box attacks).

Public API: :data:`ADV_INITS`, :class:`Adversary`.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..categories import CATEGORIES
from ..denoiser.protocol import FREE, Conditioning, Denoiser
from ..errors import ConfigError, SafetyDPOError

ADV_INITS = ("random", "concept")
ADV_OBJECTIVES = ("dpo", "anchor")


class Adversary:
    """Per-category adversarial token embeddings for one training run (see the module docstring)."""

    def __init__(self, denoiser: Denoiser, records: Sequence, *, lr: float, reset: int, init: str, seed: int):
        from ..attacks.unlearndiff import allowed_vocabulary
        from .preservation import _is_world

        if init not in ADV_INITS:
            raise ConfigError(f"adv_init must be one of {', '.join(ADV_INITS)}; got {init!r}.")
        try:
            self.embedder = denoiser.prompt_embedder()
        except (AttributeError, NotImplementedError, SafetyDPOError) as e:
            raise ConfigError(f"adv_weight > 0 needs token-level access to the model's text encoder, which this model "
                              f"does not give ({e}). Set adv_weight to 0.") from e
        self.vocab, self.allowed, _ = allowed_vocabulary(self.embedder)
        self.step_size = float(lr) * float(self.vocab[self.allowed].pow(2).mean().sqrt())
        self.reset, self.init, self.seed = int(reset), init, int(seed)
        self.world = _is_world(denoiser)
        self._layouts: dict[str, tuple[list[int], list[int]]] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.optimizers: dict[str, torch.optim.Adam] = {}
        self.born: dict[str, int] = {}
        # one token per category in use, made on every process alike (the first pair of each gives its concept)
        self.first = self._first_of_each(records)
        for cat in self.first:
            self._start(cat, 0)

    @staticmethod
    def key(record) -> str:
        """The adversary's token a pair uses: its first category's."""
        return record.category[0] if record.category else "all"

    @staticmethod
    def _first_of_each(records: Sequence) -> dict:
        if hasattr(records, "column"):  # an indexed dataset: from the index, parsing one record per category set
            import numpy as np

            cats = records.column("cats")
            _, first = np.unique(cats, return_index=True)
            found = [records[int(i)] for i in sorted(first)]
        else:
            found = list(records)
        out: dict = {}
        for r in found:
            out.setdefault(Adversary.key(r), r)
        return dict(sorted(out.items()))

    # -- the adversarial prompts -------------------------------------------------------------------
    def _layout(self, record) -> tuple[list[int], list[int]]:
        """(content ids with one :data:`FREE` position where the concept word was, the word's own ids)."""
        if record.id not in self._layouts:
            from ..attacks.base import AttackPrompt
            from ..attacks.inversion import placeholder_layout
            from ..attacks.wording import concept_words

            emb = self.embedder
            if record.concept.strip() and record.category:
                p = AttackPrompt(record.id, record.unsafe, record.category, record.concept, record.safe, record.seed)
                ids = placeholder_layout(emb, p, self.world)[0]
                own = emb.token_ids([concept_words(p, self.world)[0] or record.concept])[0]
            else:  # no concept named: the token goes in front of the prompt
                ids = ([FREE] + emb.token_ids([record.unsafe])[0])[: emb.max_tokens]
                own = []
            if len(self._layouts) < 100_000:
                self._layouts[record.id] = (ids, own)
            return ids, own
        return self._layouts[record.id]

    def _start(self, cat: str, step: int) -> None:
        own = self._layout(self.first[cat])[1]
        if self.init == "concept" and own:
            v = self.vocab[own].mean(0).clone()
        else:
            from .trainer import step_generator

            index = CATEGORIES.index(cat) if cat in CATEGORIES else len(CATEGORIES)
            g = step_generator(self.seed, step, index, domain=5)  # a token of its own per category and restart
            v = self.vocab[int(self.allowed[torch.randint(len(self.allowed), (1,), generator=g)])].clone()
        v.requires_grad_(True)
        self.vectors[cat] = v
        self.optimizers[cat] = torch.optim.Adam([v], lr=self.step_size)
        self.born[cat] = step

    def begin(self, step: int) -> None:
        """Restart the tokens that are ``reset`` steps old (called by every process before each step)."""
        for cat in list(self.vectors):
            if step - self.born[cat] >= self.reset:
                self._start(cat, step)

    def conditioning(self, records: Sequence, size: tuple[int, int], grad: bool = False) -> Conditioning:
        """The adversarial prompt of each record (its category's token in place of the concept word); with
        ``grad`` it carries gradients back to the tokens."""
        vs = [self.vectors[self.key(r)][None] for r in records]
        with self.embedder.gradients() if grad else torch.no_grad():
            return self.embedder.encode([self._layout(r)[0] for r in records], vs, size=size)

    # -- the adversary's steps ----------------------------------------------------------------------
    def attack(self, denoiser: Denoiser, records: Sequence, unsafe: torch.Tensor, size: tuple[int, int],
               steps: int, g: torch.Generator, t_range: tuple[int, int] | None = None) -> float:
        """``steps`` Adam steps of the tokens of ``records``' categories that lower the adapted model's denoising
        error on ``unsafe`` (the pairs' unsafe latents) under the adversarial prompts, each at its own noise and
        timestep from ``g`` (in ``t_range``, the training's ``timestep_range``); returns the last error. Only the
        tokens move (the LoRA's gradients are not touched)."""
        from ..attacks.unlearndiff import denoising_loss

        cats = sorted({self.key(r) for r in records})
        loss = torch.zeros(())
        for _ in range(steps):
            noise = torch.randn(unsafe.shape, generator=g)
            t = denoiser.sample_timesteps(len(records), g, latent_shape=tuple(unsafe.shape[1:]), t_range=t_range)
            loss = denoising_loss(denoiser, unsafe, self.conditioning(records, size, grad=True), t, noise).mean()
            grads = torch.autograd.grad(loss, [self.vectors[c] for c in cats], allow_unused=True)
            for cat, gr in zip(cats, grads):
                if gr is None or not torch.isfinite(gr).all():  # a non-finite step is skipped, never applied
                    continue
                self.vectors[cat].grad = gr
                self.optimizers[cat].step()
                self.vectors[cat].grad = None
        return float(loss.detach())

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {cat: {"vector": v.detach().clone(), "adam": copy.deepcopy(self.optimizers[cat].state_dict()),
                      "born": self.born[cat]} for cat, v in self.vectors.items()}

    def load_state_dict(self, state: dict) -> None:
        for cat, s in state.items():
            v = s["vector"].clone().requires_grad_(True)
            self.vectors[cat], self.born[cat] = v, int(s["born"])
            self.optimizers[cat] = torch.optim.Adam([v], lr=self.step_size)
            self.optimizers[cat].load_state_dict(s["adam"])
