"""The Denoiser protocol: what the trainer, the merger and the renderer need from a diffusion model.

Two backends implement it: :mod:`.diffusers_backend` (a diffusers ``UNet2DConditionModel`` with its
scheduler and CLIP text encoders) and the ComfyUI backend in the ``nodes`` package (the ``MODEL`` a graph
loaded). The core never sees more than this:

* ``module`` and ``layers(targets)``: the network to adapt and its named target layers, in ``naming``;
* ``attach_lora(...)``: trainable adapters that can be switched off, so that the reference of DPO is the
  same network with adapters disabled;
* ``encode_prompts(prompts)``: a :class:`Conditioning` (a dict of batched tensors);
* ``add_noise(x0, noise, t)`` and ``target(x0, noise, t)``: the forward process and what the prediction
  should equal (epsilon, or v for v-prediction models);
* ``predict(x_t, t, cond)``: the network's prediction for integer timesteps ``t`` in ``[0, T)``;
* ``eps_from_prediction(pred, x_t, t)``: the noise a prediction stands for (sampling loops of the core);
* ``prompt_token_counts(prompts)`` and ``last_token_embeddings(prompts)``: the number of text tokens of each
  prompt, and the cross-attention context (what the keys and values are computed from) of each prompt at its
  last text token (concept erasure: :mod:`safetydpo_core.erase`);
* ``sample(...)``, ``encode_images(...)``, ``decode_latents(...)``: rendering.
"""

from __future__ import annotations

import dataclasses
from typing import ContextManager, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..lora.lora_set import LoraSet


@dataclasses.dataclass
class Conditioning:
    """Batched conditioning tensors, all with the batch on dim 0 (names are backend-specific)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def repeat(self, n: int) -> "Conditioning":
        """The whole batch ``n`` times over: ``[c0, c1, c0, c1]`` for n=2."""
        return Conditioning({k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.tensors.items()})

    def index(self, idx) -> "Conditioning":
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return Conditioning(out)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items], 0) for k in keys})


@runtime_checkable
class AdapterHandle(Protocol):
    """Trainable LoRA adapters attached to a denoiser's layers."""

    naming: str

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def disabled(self) -> ContextManager[None]: ...

    def export(self) -> LoraSet: ...

    def load(self, lora: LoraSet) -> None: ...

    def remove(self) -> None: ...


@runtime_checkable
class Denoiser(Protocol):
    """A text-conditioned diffusion network with its noise schedule."""

    naming: str
    prediction_type: str
    num_train_timesteps: int
    base_model_version: str
    device: torch.device

    @property
    def module(self) -> torch.nn.Module: ...

    def layers(self, targets: str | Sequence[str] | None = None) -> dict[str, torch.nn.Module]: ...

    def attach_lora(self, rank: int, alpha: float | None = None, targets: str | Sequence[str] | None = None) -> AdapterHandle: ...

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """Conditioning for ``prompts``; ``size`` (pixels, h x w) is used by SDXL-style size conditioning."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The epsilon that ``pred`` (the output of :meth:`predict` at ``x_t``, ``t``) stands for."""
        ...

    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Text tokens of each prompt within the encoder's window (start, end, padding and unknown tokens not
        counted): 0 for a prompt the tokenizer turns into nothing."""
        ...

    def last_token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, D]``: the context the cross-attention layers see for each prompt, at its last text token
        (position ``n`` of the context, the start token at position 0 for a prompt of no tokens)."""
        ...

    def fingerprint(self) -> str: ...

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]: ...
