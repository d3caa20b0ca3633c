"""The diffusers backend of the Denoiser protocol for flow-matching transformers: SD3 / SD3.5 and Flux.1.

A ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` with its ``FlowMatchEulerDiscreteScheduler``, text
encoders and VAE (:func:`.loading.load_flow_components`), seen as the trainer, renderer and merger see the
UNet backend (:mod:`.diffusers_backend`):

* the schedule is flow matching (:mod:`.flow`): ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``,
  timesteps ``t = s * 1000``; training noise levels follow the scheduler's config (SD3: shifted logit-normal
  with ``shift``; Flux: ``use_dynamic_shifting``, the shift growing with the image's token count);
* conditioning is what the diffusers pipelines build (``StableDiffusion3Pipeline.encode_prompt`` /
  ``FluxPipeline.encode_prompt``): SD3 concatenates CLIP-L and CLIP-G penultimate states, pads them to the
  T5 width and appends T5's states (zeros without T5), with both CLIPs' projected pooled outputs; Flux takes
  T5's states and CLIP-L's pooled output, plus the distilled ``guidance`` of Flux.1-dev;
* latents stay in the unpacked ``[B, 16, h, w]`` layout of the VAE (and of ComfyUI); Flux's 2x2 packing into
  tokens (and the position ids) happens inside :meth:`DiffusersFlowDenoiser.predict`;
* layer names are diffusers'; :meth:`DiffusersFlowDenoiser.names` maps them to the fused ldm layers that
  ComfyUI and kohya use (:mod:`safetydpo_core.lora.transformer_names`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError, ModelError
from ..lora.peft_adapter import PeftLoraAdapter
from ..lora.targets import select_layers
from ..lora.transformer_names import BASE_MODEL_VERSIONS, TransformerNames, family_of_config, presets
from ..lora.unet_names import weight_modules
from ..utils.fingerprint import module_fingerprint
from . import flow
from .devices import weight_dtype
from .loading import DiffusersComponents
from .protocol import Conditioning, check_guidance

SAMPLERS = ("euler", "ddim")   # deterministic DDIM on a flow ODE is the Euler step
SCHEDULES = ("normal", "karras")
DEFAULT_CFG = {"sd3": 4.5, "flux": 1.0}


def flow_schedule_of(config) -> flow.FlowSchedule:
    """The training noise-level schedule of a ``FlowMatchEulerDiscreteScheduler`` config."""
    return flow.FlowSchedule(
        shift=float(config.get("shift", 1.0) or 1.0), dynamic=bool(config.get("use_dynamic_shifting", False)),
        base_shift=float(config.get("base_shift", 0.5) or 0.5), max_shift=float(config.get("max_shift", 1.15) or 1.15),
        base_seq_len=int(config.get("base_image_seq_len", 256) or 256),
        max_seq_len=int(config.get("max_image_seq_len", 4096) or 4096),
        num_train_timesteps=int(config.get("num_train_timesteps", flow.NUM_TRAIN_TIMESTEPS)))


class DiffusersFlowDenoiser:
    """A diffusers SD3 / Flux text-to-image model seen through the Denoiser protocol."""

    naming = "diffusers"
    prediction_type = "flow"
    schedule = "flow"

    def __init__(self, parts: DiffusersComponents, device: str | torch.device = "cpu", guidance: float | None = None):
        if parts.transformer is None:
            raise ModelError("DiffusersFlowDenoiser needs a transformer pipeline (SD3 or Flux).")
        self.parts = parts
        self.transformer = parts.transformer
        self.scheduler = parts.scheduler
        self.device = torch.device(device)
        tcfg = dict(self.transformer.config)
        tcfg["_class_name"] = type(self.transformer).__name__
        self.family = family_of_config(tcfg)
        self.flow = flow_schedule_of(self.scheduler.config)
        self.num_train_timesteps = self.flow.num_train_timesteps
        self.base_model_version = str(parts.info.get("base_model_version") or BASE_MODEL_VERSIONS[self.family])
        self.guidance_input = self.family == "flux" and bool(tcfg.get("guidance_embeds", False))
        what = f"the {type(self.transformer).__name__} of {parts.source}"
        self.guidance = check_guidance(guidance, self.guidance_input, what)
        self.default_cfg = DEFAULT_CFG[self.family]
        self.vae_scale_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae is not None else 8
        n_enc = len(parts.text_encoders)
        if self.family == "sd3" and n_enc not in (2, 3) or self.family == "flux" and n_enc != 2:
            raise ModelError(f"{what} came with {n_enc} text encoders; SD3 needs CLIP-L and CLIP-G (and optionally T5), "
                             f"Flux CLIP-L and T5.")
        self.max_sequence_length = int(parts.info.get("max_sequence_length") or (256 if self.family == "sd3" else 512))
        self._names: TransformerNames | None = None
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        guidance: float | None = None) -> "DiffusersFlowDenoiser":
        from .loading import load_components

        return cls(load_components(model, device=device, dtype=dtype), device=device, guidance=guidance)

    # -- the network --------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.transformer)

    @property
    def latent_channels(self) -> int:
        c = int(self.transformer.config.in_channels)
        return c // 4 if self.family == "flux" else c

    @property
    def patch(self) -> int:
        return 2  # SD3's patch size, Flux's 2x2 packing

    @property
    def sample_size(self) -> int:
        """Default image side in pixels."""
        if self.parts.info.get("sample_size"):
            return int(self.parts.info["sample_size"])
        s = getattr(self.transformer.config, "sample_size", None) or 128
        return int(s if isinstance(s, int) else s[0]) * self.vae_scale_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """Default image size in pixels, ``(height, width)``: a square of :attr:`sample_size`."""
        return (self.sample_size, self.sample_size)

    def names(self) -> TransformerNames:
        if self._names is None:
            self._names = TransformerNames(self.family, self.weight_shapes(), "diffusers")
        return self._names

    def layers(self, targets: str | Sequence[str] | None = None) -> dict[str, torch.nn.Module]:
        return select_layers(dict(self.transformer.named_modules()), targets, presets=presets(self.family, "diffusers"))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return weight_modules(self.transformer)

    def attach_lora(self, rank: int, alpha: float | None = None, targets: str | Sequence[str] | None = None,
                    init: str = "gaussian") -> PeftLoraAdapter:
        return PeftLoraAdapter(self.transformer, list(self.layers(targets)), rank=rank, alpha=alpha, init=init)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(p for n, p in self.transformer.named_parameters() if "lora_" not in n)
        return self._fingerprint

    # -- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def _clip(self, i: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states, pooled output) of CLIP encoder ``i`` (projected when it has a projection)."""
        tok, enc = self.parts.tokenizers[i], self.parts.text_encoders[i]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        out = enc(ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2], pooled

    @torch.no_grad()
    def _t5(self, i: int, prompts: list[str]) -> torch.Tensor:
        tok, enc = self.parts.tokenizers[i], self.parts.text_encoders[i]
        ids = tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return enc(ids)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """SD3: ``encoder_hidden_states`` ``[B, 77 + L, D]``, ``pooled_projections``; Flux: T5 states, CLIP-L
        pooled output and (Flux.1-dev) ``guidance`` ``[B]``. ``size`` is not used by these models."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ConfigError("No prompts to encode.")
        if self.family == "sd3":
            h1, p1 = self._clip(0, prompts)
            h2, p2 = self._clip(1, prompts)
            clip = torch.cat([h1, h2], dim=-1)
            width = int(self.transformer.config.joint_attention_dim)
            if len(self.parts.text_encoders) > 2:
                t5 = self._t5(2, prompts)
            else:
                t5 = torch.zeros((len(prompts), self.parts.tokenizers[0].model_max_length, width), device=self.device,
                                 dtype=clip.dtype)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            tensors = {"encoder_hidden_states": torch.cat([clip, t5], dim=-2).to(self.dtype),
                       "pooled_projections": torch.cat([p1, p2], dim=-1).to(self.dtype)}
        else:
            _, pooled = self._clip(0, prompts)
            tensors = {"encoder_hidden_states": self._t5(1, prompts).to(self.dtype),
                       "pooled_projections": pooled.to(self.dtype)}
            if self.guidance_input:
                tensors["guidance"] = torch.full((len(prompts),), float(self.guidance), device=self.device)
        return Conditioning(tensors)

    # -- the forward process ------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator, latent_shape: Sequence[int] | None = None,
                         t_range: tuple[float, float] | None = None) -> torch.Tensor:
        return self.flow.sample_timesteps(n, generator, latent_shape, t_range)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.add_noise(self.flow, x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.velocity(x0, noise)

    def unit_marginal(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.unit_marginal(self.flow, noise, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity predicted for ``x_t`` ``[B, C, h, w]`` at timesteps ``t`` (``sigma * 1000``)."""
        c = cond.tensors
        b = x_t.shape[0]
        if len(cond) != b:
            raise ConfigError(f"Conditioning batch {len(cond)} does not match the latent batch {b}.")
        t = t.reshape(-1).to(x_t.device, torch.float32)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        x = x_t.to(self.dtype)
        if self.family == "sd3":
            return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                                    pooled_projections=c["pooled_projections"], return_dict=False)[0]
        _, ch, h, w = x.shape
        if h % 2 or w % 2:
            raise ConfigError(f"Flux latents need an even size; got {h}x{w}.")
        packed = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), ch * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=self.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        img_ids = img_ids.reshape(-1, 3)
        ctx = c["encoder_hidden_states"]
        txt_ids = torch.zeros(ctx.shape[1], 3, device=x.device, dtype=self.dtype)
        guidance = c.get("guidance") if self.guidance_input else None
        if self.guidance_input and guidance is None:
            raise ConfigError("This Flux model has a guidance input; encode the prompts with this denoiser (its "
                              "conditioning carries the guidance).")
        out = self.transformer(hidden_states=packed, timestep=t / self.num_train_timesteps,
                               guidance=None if guidance is None else guidance.to(x.device, torch.float32),
                               pooled_projections=c["pooled_projections"], encoder_hidden_states=ctx,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by a velocity: ``x_t + (1 - s) v``."""
        s = flow._view(self.flow.sigma(t.detach().cpu()), x_t)
        return x_t + (1 - s) * pred

    # -- images -------------------------------------------------------------------------------------
    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        raise ConfigError("SD3 and Flux.1 have no cross-attention layers to edit (joint attention): UCE and the "
                          "other erasure baselines run on UNets only.")

    def last_token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        raise ConfigError("SD3 and Flux.1 have no cross-attention context (joint attention): UCE and the other "
                          "erasure baselines run on UNets only.")

    def prompt_embedder(self):
        raise ConfigError("The red-teaming attacks (Ring-A-Bell, UnlearnDiffAtk, concept inversion) work on the CLIP "
                          "text encoders of UNet models (SD1.x, SD2.x, SDXL); SD3 and Flux.1 also condition on T5 "
                          "and are not supported by them. Attack an SD1.x, SD2.x or SDXL model.")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * self.patch
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ConfigError(f"Image size {width}x{height} must be a positive multiple of {f} for this model.")
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` images in ``[0,1]`` -> normalised latents (``(z - shift) * scale``)."""
        vae = self._vae()
        x = images.to(self.device, torch.float32) * 2 - 1
        lat = vae.encode(x.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._vae()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    def _vae(self):
        if self.parts.vae is None:
            raise ConfigError(f"The model {self.parts.source} has no vae/; images cannot be encoded or decoded.")
        return self.parts.vae

    def make_sampler(self, name: str, schedule: str = "normal"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name not in SAMPLERS:
            raise ConfigError(f"Sampler {name!r} is not available for flow-matching models; choose one of "
                              f"{', '.join(SAMPLERS)} (both take the Euler step of the flow).")
        if schedule not in SCHEDULES:
            raise ConfigError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        extra = {"use_karras_sigmas": True} if schedule == "karras" else {}
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, **extra)

    @torch.no_grad()
    def sample(self, cond: Conditioning, uncond: Conditioning | None, noise: torch.Tensor, steps: int = 28,
               cfg: float | None = None, sampler: str = "euler", scheduler: str = "normal", callback=None) -> torch.Tensor:
        """Denoise ``noise`` (``[B,C,h,w]``) with the flow Euler sampler as the diffusers pipelines schedule it
        (SD3: the static shift; Flux: ``sigmas = linspace(1, 1/steps)`` and the resolution's ``mu``), with
        classifier-free guidance when ``cfg`` != 1 and ``uncond`` is given (Flux.1-dev's distilled guidance
        rides in the conditioning)."""
        import numpy as np

        if steps <= 0:
            raise ConfigError(f"Sampling steps must be positive; got {steps}.")
        cfg = self.default_cfg if cfg is None else cfg
        sched = self.make_sampler(sampler, scheduler)
        x = noise.to(self.device, torch.float32)
        if self.flow.dynamic:
            mu = flow.flux_mu((x.shape[-2] // 2) * (x.shape[-1] // 2), self.flow.base_shift, self.flow.max_shift,
                              self.flow.base_seq_len, self.flow.max_seq_len)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), device=self.device, mu=mu)
        else:
            sched.set_timesteps(steps, device=self.device)
        use_cfg = uncond is not None and cfg != 1.0
        both = Conditioning.cat([uncond, cond]) if use_cfg else cond
        for i, t in enumerate(sched.timesteps):
            xin = torch.cat([x, x]) if use_cfg else x
            tt = torch.full((xin.shape[0],), float(t), device=self.device)
            pred = self.predict(xin, tt, both).float()
            if use_cfg:
                pu, pc = pred.chunk(2)
                pred = pu + cfg * (pc - pu)
            x = sched.step(pred, t, x).prev_sample
            if callback is not None:
                callback(i + 1, steps)
        return x
