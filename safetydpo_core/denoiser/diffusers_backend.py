"""The diffusers backend of the Denoiser protocol: ``UNet2DConditionModel`` + scheduler + CLIP encoders.

Handles epsilon and v-prediction, SD1.x/2.x conditioning (one CLIP text encoder) and SDXL conditioning
(two encoders: penultimate hidden states concatenated, pooled CLIP-G embedding and size ``time_ids``),
latent models with a VAE and pixel-space models without one. LoRA adapters come from peft.

:meth:`DiffusersDenoiser.from_pretrained` opens any supported folder: for an SD3 / Flux pipeline (a
``transformer/`` instead of a ``unet/``) it returns the flow-matching backend,
:class:`~.diffusers_flow.DiffusersFlowDenoiser`.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from ..errors import ConfigError, ModelError
from ..lora.base_model import base_model_version
from ..lora.peft_adapter import PeftLoraAdapter
from ..lora.targets import select_layers
from ..lora.unet_names import UNetNames, weight_modules
from ..utils.fingerprint import module_fingerprint
from .devices import weight_dtype
from .loading import DiffusersComponents, load_components
from .protocol import Conditioning, check_guidance, uniform_timesteps

SAMPLERS = ("ddim", "euler", "dpmpp_2m")
SCHEDULES = ("normal", "karras")


def base_model_version_of(unet_config: Mapping, info: Mapping | None = None) -> str:
    """kohya's ``ss_base_model_version`` for a UNet config (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``...)."""
    if info and info.get("base_model_version"):
        return str(info["base_model_version"])
    cad = unet_config.get("cross_attention_dim")
    if cad == 768 and list(unet_config.get("block_out_channels", [])) != [320, 640, 1280, 1280]:
        cad = None  # SD1's width on another UNet: not SD1
    return base_model_version(cross_attention_dim=cad, sdxl=unet_config.get("addition_embed_type") == "text_time",
                              default="custom")


class DiffusersDenoiser:
    """A diffusers text-to-image model seen through the Denoiser protocol."""

    naming = "diffusers"
    schedule = "discrete"
    guidance_input = False
    default_cfg = 7.5

    def __init__(self, parts: DiffusersComponents, device: str | torch.device = "cpu", guidance: float | None = None):
        if parts.unet is None:
            raise ModelError(f"{parts.source} is a transformer pipeline; open it with DiffusersDenoiser.from_pretrained().")
        self.guidance = check_guidance(guidance, False, f"the UNet model {parts.source}")
        self.parts = parts
        self.unet = parts.unet
        self.scheduler = parts.scheduler
        self.device = torch.device(device)
        cfg = self.scheduler.config
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"Prediction type {self.prediction_type!r} is not supported yet (epsilon and v_prediction are).")
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.base_model_version = base_model_version_of(self.unet.config, parts.info)
        self.is_sdxl = self.unet.config.get("addition_embed_type") == "text_time"
        self.vae_scale_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae is not None else 1
        self._names: UNetNames | None = None
        self._fingerprint: str | None = None
        self._alphas = self.scheduler.alphas_cumprod.to(torch.float32)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, config: str | os.PathLike | None = None,
                        guidance: float | None = None):
        """The denoiser of a local model: this class for UNet pipelines and checkpoints, the flow-matching
        backend for SD3 / Flux pipelines. ``guidance``: the distilled guidance of models that take one."""
        parts = load_components(model, device=device, dtype=dtype, config=config)
        if parts.transformer is not None:
            from .diffusers_flow import DiffusersFlowDenoiser

            return DiffusersFlowDenoiser(parts, device=device, guidance=guidance)
        return cls(parts, device=device, guidance=guidance)

    # -- the network --------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.unet

    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.unet)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Default image side in pixels."""
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0]) * self.vae_scale_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """Default image size in pixels, ``(height, width)``: a square of :attr:`sample_size`."""
        return (self.sample_size, self.sample_size)

    def names(self) -> UNetNames:
        if self._names is None:
            self._names = UNetNames(self.weight_shapes(), dict(self.unet.config))
        return self._names

    def layers(self, targets: str | Sequence[str] | None = None) -> dict[str, torch.nn.Module]:
        return select_layers(dict(self.unet.named_modules()), targets)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return weight_modules(self.unet)

    def attach_lora(self, rank: int, alpha: float | None = None, targets: str | Sequence[str] | None = None,
                    init: str = "gaussian") -> PeftLoraAdapter:
        names = list(self.layers(targets))
        return PeftLoraAdapter(self.unet, names, rank=rank, alpha=alpha, init=init)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(p for _, p in self.unet.named_parameters() if "lora_" not in _)
        return self._fingerprint

    # -- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("No prompts to encode.")
        hidden, pooled = self._text_hidden(prompts)
        tensors = {"encoder_hidden_states": hidden}
        if self.is_sdxl:
            h, w = size or (self.sample_size, self.sample_size)
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).repeat(len(prompts), 1)
            tensors["text_embeds"] = pooled.to(self.dtype)
            tensors["time_ids"] = time_ids
        return Conditioning(tensors)

    def _text_hidden(self, prompts: list[str], length: int | None = None):
        """The context ``[B, L, D]`` (every encoder's hidden states, concatenated) and the last encoder's pooled
        output; ``length`` tokens per prompt (default: the tokenizer's window)."""
        hidden, pooled = [], None
        for i, (tok, enc) in enumerate(zip(self.parts.tokenizers, self.parts.text_encoders)):
            ids = tok(prompts, padding="max_length", max_length=min(length or tok.model_max_length, tok.model_max_length),
                      truncation=True, return_tensors="pt").input_ids.to(self.device)
            if self.is_sdxl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if i == len(self.parts.text_encoders) - 1:
                    pooled = out[0]
            else:
                hidden.append(enc(ids)[0])
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled

    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Text tokens of each prompt in the first encoder's window (0: the tokenizer makes nothing of it)."""
        if not self.parts.tokenizers:
            raise ModelError("This model has no tokenizer; load it from a pipeline folder with its tokenizer.")
        tok = self.parts.tokenizers[0]
        special = set(tok.all_special_ids)
        out = []
        for p in prompts:
            ids = tok(str(p), add_special_tokens=False).input_ids[: tok.model_max_length - 2]
            out.append(len(ids) if any(i not in special for i in ids) else 0)
        return out

    @torch.no_grad()
    def last_token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """The context at each prompt's last text token. CLIP's text encoders are causal, so the context up to
        that token does not depend on what follows: the prompts are encoded only as long as the longest needs
        (a few tokens for concept words instead of the full window), with the same result."""
        prompts = list(prompts)
        counts = self.prompt_token_counts(prompts)
        hidden, _ = self._text_hidden(prompts, length=max(counts) + 2)
        return torch.stack([hidden[i, n] for i, n in enumerate(counts)])

    def prompt_embedder(self):
        """Token-level access to the text encoder(s), for the attacks (:mod:`.diffusers_embedder`)."""
        from .diffusers_embedder import DiffusersPromptEmbedder

        return DiffusersPromptEmbedder(self)

    # -- the forward process ------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator, latent_shape=None,
                         t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """Integer timesteps uniform in ``t_range`` (default ``[0, T)``)."""
        return uniform_timesteps(self.num_train_timesteps, n, generator, t_range)

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alphas.to(like.device)[t.long().to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().reshape(shape).to(like.dtype), (1 - a).sqrt().reshape(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sa, sb = self._coeffs(t, x0)
        return sa * x0 + sb * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        sa, sb = self._coeffs(t, x0)
        return sa * noise - sb * x0

    def unit_marginal(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Variance preserving: unit-variance latents noised to any ``t`` are distributed as ``noise`` itself."""
        return noise

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = cond.tensors
        if len(cond) != x_t.shape[0]:
            raise ConfigError(f"Conditioning batch {len(cond)} does not match the latent batch {x_t.shape[0]}.")
        kw = {}
        if self.is_sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
        t = t.to(x_t.device)
        return self.unet(x_t.to(self.dtype), t, encoder_hidden_states=c["encoder_hidden_states"], **kw).sample

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return pred
        sa, sb = self._coeffs(t, x_t)
        return sb * x_t + sa * pred

    # -- images -------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % (f * 8) or width % (f * 8):
            raise ConfigError(f"Image size {width}x{height} must be a multiple of {f * 8} for this model.")
        return (self.latent_channels, height // f, width // f)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` images in ``[0,1]`` -> scaled latents (pixels in ``[-1,1]`` without a VAE)."""
        x = images.to(self.device, torch.float32) * 2 - 1
        vae = self.parts.vae
        if vae is None:
            return x
        lat = vae.encode(x.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``[B,3,H,W]`` images in ``[0,1]``."""
        vae = self.parts.vae
        if vae is None:
            x = latents.float()
        else:
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            x = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    def make_sampler(self, name: str, schedule: str = "normal"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
        if name not in classes:
            raise ConfigError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
        if schedule not in SCHEDULES:
            raise ConfigError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if schedule == "karras":
            if name == "ddim":
                raise ConfigError("The karras schedule needs the euler or dpmpp_2m sampler.")
            return classes[name].from_config(self.scheduler.config, use_karras_sigmas=True)
        return classes[name].from_config(self.scheduler.config)

    @torch.no_grad()
    def sample(self, cond: Conditioning, uncond: Conditioning | None, noise: torch.Tensor, steps: int = 20,
               cfg: float = 7.5, sampler: str = "ddim", scheduler: str = "normal", callback=None) -> torch.Tensor:
        """Denoise ``noise`` (``[B,C,h,w]``, unit variance) under ``cond`` with classifier-free guidance."""
        if steps <= 0:
            raise ConfigError(f"Sampling steps must be positive; got {steps}.")
        sched = self.make_sampler(sampler, scheduler)
        sched.set_timesteps(steps, device=self.device)
        x = noise.to(self.device, torch.float32) * sched.init_noise_sigma
        use_cfg = uncond is not None and cfg != 1.0
        both = Conditioning.cat([uncond, cond]) if use_cfg else cond
        for i, t in enumerate(sched.timesteps):
            xin = torch.cat([x, x]) if use_cfg else x
            xin = sched.scale_model_input(xin, t)
            tt = torch.full((xin.shape[0],), int(t), device=self.device, dtype=torch.long)
            pred = self.predict(xin, tt, both).float()
            if use_cfg:
                pu, pc = pred.chunk(2)
                pred = pu + cfg * (pc - pu)
            x = sched.step(pred, t, x).prev_sample
            if callback is not None:
                callback(i + 1, steps)
        return x
