"""The Denoiser protocols: what the trainer, the merger, the erasure baselines, the attacks and the renderer need
from a diffusion model.

Two backends implement them: the diffusers backend (:mod:`.diffusers_backend` for ``UNet2DConditionModel``
pipelines, :mod:`.diffusers_flow` for the ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` ones) and
the ComfyUI backend in the ``nodes`` package (the ``MODEL`` a graph loaded). The core never sees more than
:class:`Denoiser` (training, calibration and merging, concept erasure, attacks on conditioning) and, where it
makes pictures, :class:`RenderingDenoiser`:

* ``module``, ``names()`` and ``layers(targets)``: the network to adapt, its layer names in both namings and
  its named target layers, in ``naming``; ``weight_shapes()`` and ``fingerprint()`` of its weights;
* the geometry: ``latent_channels``, ``vae_scale_factor`` (pixels per latent cell, 1 in pixel space),
  ``sample_size`` (the default image side), ``default_size`` (the default ``(height, width)``) and
  ``latent_shape(height, width)``; ``dtype`` and ``device`` of the network;
* ``attach_lora(...)``: trainable adapters that can be switched off, so that the reference of DPO is the
  same network with adapters disabled;
* ``encode_prompts(prompts)``: a :class:`Conditioning` (a dict of batched tensors);
* ``sample_timesteps(n, generator, latent_shape, t_range)``: the training timesteps of this model family;
* ``add_noise(x0, noise, t)`` and ``target(x0, noise, t)``: the forward process and what the prediction
  should equal (epsilon, v for v-prediction models, the velocity ``noise - x0`` for flow matching);
  ``unit_marginal(noise, t)``: ``x_t`` for unit-variance latents drawn from the noise alone (calibration);
* ``predict(x_t, t, cond)``: the network's prediction at timesteps ``t`` in ``[0, T)``;
* ``eps_from_prediction(pred, x_t, t)``: the noise a prediction stands for (sampling loops of the core);
* ``prompt_token_counts(prompts)`` and ``last_token_embeddings(prompts)``: the number of text tokens of each
  prompt, and the cross-attention context (what the keys and values are computed from) of each prompt at its
  last text token (concept erasure: :mod:`safetydpo_core.erase`);
* ``prompt_embedder()``: a :class:`PromptEmbedder`, token-level access to the text encoder(s) for the
  red-teaming attacks (:mod:`safetydpo_core.attacks`): the vocabulary's input embeddings, token ids and
  text, and conditioning from token ids with some positions given as (differentiable) input embeddings
  (the flow backend raises a ConfigError: the attacks need a CLIP-conditioned UNet);
* :class:`RenderingDenoiser` adds ``sample(...)``, ``encode_images(...)``, ``decode_latents(...)`` and the
  model's usual guidance scale ``default_cfg``: rendering (:mod:`safetydpo_core.data.render`,
  :mod:`safetydpo_core.sampling`, the world's evaluation, the white-box attacks' targets).

Two kinds of schedule (``schedule``):

* ``"discrete"`` (SD1.x/2.x, SDXL): integer timesteps drawn uniformly from ``[0, num_train_timesteps)``,
  variance-preserving ``x_t``; ``prediction_type`` is ``epsilon`` or ``v_prediction``;
* ``"flow"`` (SD3 / SD3.5, Flux.1): continuous timesteps ``t = sigma * num_train_timesteps``,
  ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0`` (``prediction_type`` ``"flow"``), training
  noise levels from the family's shifted logit-normal (:mod:`.flow`).

Models with a guidance input (guidance-distilled Flux.1-dev) say so in ``guidance_input`` and carry the
``guidance`` value they condition on; giving a guidance value to any other model is an error.

Every backend implements every member (``tests/test_protocol.py`` checks it for each one); callers use them
directly, never through fallbacks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, ContextManager, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..lora.lora_set import LoraSet

if TYPE_CHECKING:
    from ..lora.transformer_names import TransformerNames
    from ..lora.unet_names import UNetNames


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

    def sample_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Each tensor's name and shape without the batch dimension: conditionings with equal ones stack with
        :meth:`cat`."""
        return tuple((k, tuple(v.shape[1:])) for k, v in sorted(self.tensors.items()))

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


FREE = -1  # in PromptEmbedder.encode(): a position whose input embedding is given, not looked up


@runtime_checkable
class PromptEmbedder(Protocol):
    """Token-level access to a denoiser's text encoder(s), for attacks that search or optimise prompts in the
    encoder's input-embedding space (Ring-A-Bell, UnlearnDiffAtk, concept inversion).

    A prompt is a list of *content* token ids: no start, end or padding tokens (the embedder adds them) and at
    most ``max_tokens`` of them. An input embedding is ``dim`` wide; with several text encoders (SDXL) it is
    the concatenation of each encoder's token embedding for the same id (their tokenizers share one
    vocabulary), in a fixed order.

    * ``vocabulary()``: ``[V, dim]`` input embeddings of every token id (float32, CPU, detached);
    * ``special_ids()``: ids that are not words (start, end, padding, unknown): never candidates;
    * ``token_ids(prompts)``: the content ids of each prompt, truncated to ``max_tokens``;
    * ``decode(ids)``: the text of content ids (tokenizing it again gives these ids for ordinary words);
    * ``encode(ids, free, size)``: the :class:`Conditioning` that ``encode_prompts`` would give for these
      ids, where the id :data:`FREE` marks positions whose input embedding is the next row of ``free[b]``
      (``[n_free, dim]``; gradients flow back to it);
    * ``gradients()``: a context in which :meth:`encode` and the denoiser's ``predict`` carry gradients back
      to their inputs while every network weight stays frozen (a backend may need to prepare for that).
    """

    max_tokens: int
    dim: int

    def vocabulary(self) -> torch.Tensor: ...

    def special_ids(self) -> set[int]: ...

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode(self, ids: Sequence[Sequence[int]], free: Sequence[torch.Tensor | None] | None = None,
               size: tuple[int, int] | None = None) -> Conditioning: ...

    def gradients(self) -> ContextManager[None]: ...


@runtime_checkable
class Denoiser(Protocol):
    """A text-conditioned diffusion network with its noise schedule (see the module docstring)."""

    naming: str
    prediction_type: str
    schedule: str
    num_train_timesteps: int
    base_model_version: str
    device: torch.device
    guidance_input: bool
    guidance: float | None

    # -- the network --------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's weights."""
        ...

    def names(self) -> "UNetNames | TransformerNames":
        """The network's layer names in both namings (diffusers and LDM), with their weight shapes."""
        ...

    def layers(self, targets: str | Sequence[str] | None = None) -> dict[str, torch.nn.Module]: ...

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    def fingerprint(self) -> str: ...

    def attach_lora(self, rank: int, alpha: float | None = None, targets: str | Sequence[str] | None = None) -> AdapterHandle: ...

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int: ...

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell along a side (1 for a pixel-space model)."""
        ...

    @property
    def sample_size(self) -> int:
        """The default image side in pixels."""
        ...

    @property
    def default_size(self) -> tuple[int, int]:
        """The default image size in pixels, ``(height, width)``."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(channels, h, w)`` of the latent of a ``height`` x ``width`` image (an error for a size the model
        cannot take)."""
        ...

    # -- conditioning -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """Conditioning for ``prompts``; ``size`` (pixels, h x w) is used by SDXL-style size conditioning."""
        ...

    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Text tokens of each prompt within the encoder's window (start, end, padding and unknown tokens not
        counted): 0 for a prompt the tokenizer turns into nothing."""
        ...

    def last_token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, D]``: the context the cross-attention layers see for each prompt, at its last text token
        (position ``n`` of the context, the start token at position 0 for a prompt of no tokens)."""
        ...

    def prompt_embedder(self) -> PromptEmbedder:
        """Token-level access to the text encoder(s) (see :class:`PromptEmbedder`), for the attacks."""
        ...

    # -- the forward process ------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator, latent_shape: Sequence[int] | None = None,
                         t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """``n`` training timesteps drawn with ``generator`` (a pure function of it), within ``t_range``."""
        ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def unit_marginal(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` as the forward process gives it for unit-variance latents, drawn from ``noise`` alone: the
        noise itself for variance-preserving schedules, ``sqrt((1 - s)^2 + s^2) noise`` for flow matching."""
        ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The epsilon that ``pred`` (the output of :meth:`predict` at ``x_t``, ``t``) stands for."""
        ...


@runtime_checkable
class RenderingDenoiser(Denoiser, Protocol):
    """A :class:`Denoiser` that also makes pictures: sampling, and the VAE both ways (the identity map to
    ``[-1, 1]`` pixels for a pixel-space model)."""

    default_cfg: float  # the model's usual classifier-free guidance scale (7.5 UNets, 4.5 SD3, 1.0 Flux.1)

    def sample(self, cond: Conditioning, uncond: Conditioning | None, noise: torch.Tensor, steps: int = ...,
               cfg: float = ..., sampler: str = ..., scheduler: str = "normal",
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Denoise ``noise`` (``[B, C, h, w]``, unit variance) under ``cond`` with classifier-free guidance
        ``cfg`` against ``uncond`` (the defaults are the backend's), calling ``callback(step, steps)`` after
        each step; returns latents."""
        ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in ``[0, 1]`` -> scaled latents."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``[B, 3, H, W]`` images in ``[0, 1]``."""
        ...


SCHEDULES = ("discrete", "flow")
GUIDANCE_DEFAULT = 3.5  # the distilled guidance Flux.1-dev is trained and sampled with (diffusers, ComfyUI, kohya)


def uniform_timesteps(num_train_timesteps: int, n: int, generator: torch.Generator,
                      t_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Integer timesteps uniform in ``t_range`` (default the whole discrete schedule)."""
    lo, hi = t_range or (0, num_train_timesteps)
    return torch.randint(int(lo), min(int(hi), num_train_timesteps), (n,), generator=generator)


def check_guidance(value: float | None, has_input: bool, model: str) -> float | None:
    """The guidance a denoiser conditions on: ``value``, the default for guidance models, or an error when a
    value is given to a model without a guidance input (``0``/``None`` mean "the model's default")."""
    from ..errors import ConfigError

    if value is not None and (not isinstance(value, (int, float)) or value != value or value < 0):
        raise ConfigError(f"guidance must be a number >= 0; got {value!r}.")
    if not has_input:
        if value:
            raise ConfigError(f"guidance={value:g} was given, but {model} has no guidance input: only guidance-distilled "
                              f"models (Flux.1-dev and its fine-tunes) take one. Leave guidance at 0 (the default) and use "
                              f"the classifier-free guidance scale (cfg) instead.")
        return None
    return float(value) if value else GUIDANCE_DEFAULT
