"""The ComfyUI backend of the Denoiser protocol: the ``MODEL`` (+ ``CLIP``, + ``VAE``) a graph loaded.

:class:`ComfyDenoiser` lets the core trainer, renderer and merger work on a ComfyUI ``ModelPatcher``
exactly as they work on a diffusers model (:mod:`safetydpo_core.denoiser.diffusers_backend`,
:mod:`safetydpo_core.denoiser.diffusers_flow`):

* it trains on the loaded weights, following ComfyUI's own recipe (``TrainLoraNode``): a clone of the
  patcher, weight wrappers on every weight and bias (:mod:`.comfy_lora_adapter`), work under
  ``torch.inference_mode(False)``, the patcher loaded with ``load_models_gpu(..., force_full_load=True)``,
  bf16 autocast where ComfyUI says the device supports it; the reference pass switches the adapters off;
* layer names are "ldm" (the module path inside ``diffusion_model``: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``,
  ``joint_blocks.0.x_block.attn.qkv``, ``double_blocks.0.img_attn.qkv``); :meth:`ComfyDenoiser.names` converts
  to diffusers names;
* the MODEL's own ``model_sampling`` decides the schedule (:func:`.comfy_transformers.sampling_kind`), not the
  model's name:

  - discrete EPS / V-prediction: timesteps are integers ``t`` in ``[0, num_train_timesteps)``; ``x_t`` is the
    *variance-preserving* noisy latent ``sqrt(a_t) x0 + sqrt(1 - a_t) eps``, as in the diffusers backend, and
    :meth:`predict` feeds ComfyUI ``x_t / sqrt(a_t)`` at ``sigma_t = sqrt((1 - a_t) / a_t)``. ``apply_model``
    returns the denoised ``x0``; the prediction returned is epsilon, ``(x - x0) / sigma``, exact for EPS and
    V-prediction models alike, so ``prediction_type`` is ``"epsilon"`` and :meth:`target` is the noise;
  - flow matching (``CONST``, SD3 / Flux): ``t = sigma * 1000`` (continuous), ``x_t = (1 - sigma) x0 + sigma
    noise`` is what ComfyUI's ``noise_scaling`` gives, and the velocity ``(x_t - x0) / sigma = noise - x0`` is
    returned (``prediction_type`` ``"flow"``); training noise levels from :func:`.comfy_transformers.flow_schedule`;

* conditioning goes through the graph's ``CLIP``: for UNets ``c_crossattn`` (and for SDXL ``y``, from the
  pooled output and size conditioning); for SD3 / Flux the model's own ``extra_conds`` (``c_crossattn``, ``y``
  and Flux.1-dev's distilled ``guidance``), batched in a :class:`Conditioning`;
* rendering uses ComfyUI's samplers (``comfy.sample.sample``) and the graph's ``VAE``.

The graph's ``MODEL`` is never changed: everything happens on a clone, and :meth:`ComfyDenoiser.release`
(the end of :meth:`ComfyDenoiser.session`) unloads the clone, takes every wrapper off the shared modules
and frees memory. Parameters that ComfyUI's weight wrappers do not reach (the transformers' RMS-norm scales)
are lent out as normal tensors only while a trainable forward runs
(:meth:`.comfy_lora_adapter.ComfyLoraAdapter.grad_safe`). Supported: see
:data:`.comfy_transformers.SUPPORTED`; anything else raises a :class:`ModelError` saying what is.

ComfyUI is imported inside functions only, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.utils.checkpoint

from . import comfy_transformers as ct
from .comfy_lora_adapter import ComfyLoraAdapter, lora_from_comfy, lora_to_comfy
from ._core import core, from_core

# the core, whichever way the pack was imported (nodes/_core.py)
flow = core("denoiser.flow")
Conditioning, check_guidance, uniform_timesteps = from_core("denoiser.protocol", "Conditioning", "check_guidance",
                                                            "uniform_timesteps")
ConfigError, LoraError, ModelError = from_core("errors", "ConfigError", "LoraError", "ModelError")
select_layers = from_core("lora.targets", "select_layers")
presets = from_core("lora.transformer_names", "presets")
base_model_version = from_core("lora.base_model", "base_model_version")
UNetNames, weight_modules = from_core("lora.unet_names", "UNetNames", "weight_modules")
module_fingerprint, tensor_digest = from_core("utils.fingerprint", "module_fingerprint", "tensor_digest")

__all__ = ["ComfyDenoiser", "diffusers_unet_config", "lora_from_comfy", "lora_to_comfy",
           "comfy_progress"]

_MODEL_KWARGS = ("c_crossattn", "y", "guidance")  # what predict() hands to apply_model
_SDXL_SIZE_KEYS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")


def _comfy():
    """ComfyUI's modules, imported on first use (the pack must import without ComfyUI)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return comfy, UNetModel


def comfy_progress(total: int, node_id=None) -> Callable[..., None]:
    """A ``progress(step, total, ...)`` callback for the core (the trainer passes a metrics dict too) that
    drives ComfyUI's progress bar. In the server the bar's hook also raises on Cancel."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def progress(step: int, total_: int | None = None, *_) -> None:
        bar.update_absolute(step, total_)

    return progress


def diffusers_unet_config(unet_config: Mapping) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of a ComfyUI LDM UNet config (``model.model_config.unet_config``)."""
    ch = int(unet_config["model_channels"])
    mult = list(unet_config["channel_mult"])
    levels = len(mult)
    nres = list(unet_config["num_res_blocks"])
    if len(nres) != levels:
        nres = [nres[0]] * levels
    depth = list(unet_config.get("transformer_depth", [0] * sum(nres)))
    # ComfyUI pops transformer_depth_output from its end while it builds output_blocks 0, 1, ...
    depth_out = list(reversed(unet_config.get("transformer_depth_output", [0] * sum(n + 1 for n in nres))))
    down_depth, up_depth, i, j = [], [], 0, 0
    for lvl in range(levels):
        down_depth.append(max(depth[i:i + nres[lvl]] or [0]))
        i += nres[lvl]
    up_nres = list(reversed(nres))
    for lvl in range(levels):
        up_depth.append(max(depth_out[j:j + up_nres[lvl] + 1] or [0]))
        j += up_nres[lvl] + 1
    channels = [ch * m for m in mult]
    heads_n, head_ch = unet_config.get("num_heads", -1), unet_config.get("num_head_channels", -1)
    heads = [heads_n if head_ch == -1 else max(1, c // head_ch) for c in channels]
    mid = unet_config.get("transformer_depth_middle", 1)
    cfg = {
        "sample_size": int(unet_config.get("image_size", 32)) * 2,
        "in_channels": int(unet_config.get("in_channels", 4)),
        "out_channels": int(unet_config.get("out_channels", 4)),
        "layers_per_block": nres[0] if len(set(nres)) == 1 else nres,
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in down_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in up_depth],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if (mid is None or mid >= 0) else None,
        "transformer_layers_per_block": [max(1, d) for d in down_depth],
        "reverse_transformer_layers_per_block": [max(1, d) for d in up_depth],
        "cross_attention_dim": unet_config.get("context_dim"),
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": bool(unet_config.get("use_linear_in_transformer", False)),
        "norm_num_groups": 32,
    }
    adm = unet_config.get("adm_in_channels")
    if adm:
        cfg.update({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                    "projection_class_embeddings_input_dim": int(adm)})
    return cfg


class ComfyDenoiser:
    """A ComfyUI ``MODEL`` (with its ``CLIP`` and ``VAE``) seen through the Denoiser protocol."""

    naming = "ldm"
    _input_grads = False  # set by the prompt embedder's gradients(): predict() keeps the caller's grad mode

    def __init__(self, model, clip=None, vae=None, compute_dtype: str | torch.dtype = "auto",
                 default_size: tuple[int, int] | None = None, guidance: float | None = None):
        comfy, _ = _comfy()
        base = getattr(model, "model", None)
        if base is None or not hasattr(model, "clone") or not hasattr(model, "add_weight_wrapper"):
            raise ModelError(f"Expected a ComfyUI MODEL (a ModelPatcher); got {type(model).__name__}.")
        self.patcher = model
        self.clip = clip
        self.vae = vae
        arch = type(getattr(base, "model_config", None)).__name__
        what = f"{type(base).__name__} ({arch})"
        self.arch = ct.architecture(base)
        ms = model.get_model_object("model_sampling")
        kind = ct.sampling_kind(ms)
        if kind is None:
            raise ModelError(f"The model {what} with the sampling {type(ms).__name__} is not supported yet: only "
                             f"discrete-schedule EPS and V-prediction sampling and flow-matching (CONST) sampling can "
                             f"be trained. Supported: {ct.SUPPORTED}.")
        self.model_prediction_type = kind
        mb = comfy.model_base
        if kind == "flow":
            self.schedule, self.prediction_type = "flow", "flow"
            self.flow = ct.flow_schedule(ms, patched="model_sampling" in model.object_patches)
            self._sigmas = None
            self.num_train_timesteps = self.flow.num_train_timesteps
        else:
            self.schedule, self.prediction_type = "discrete", "epsilon"
            self.flow = None
            self._sigmas = ms.sigmas.detach().float().cpu().clone()
            self.num_train_timesteps = int(self._sigmas.shape[0])
        if self.arch == "unet":
            self.base_model_version = base_model_version(
                cross_attention_dim=base.model_config.unet_config.get("context_dim"), sdxl=isinstance(base, mb.SDXL))
        else:
            self.base_model_version = base_model_version(family=self.arch)
        self.is_sdxl = isinstance(base, (mb.SDXL, mb.SDXLRefiner))
        self.guidance_input = self.arch == "flux" and bool(base.diffusion_model.params.guidance_embed)
        self.guidance = check_guidance(guidance, self.guidance_input, f"the model {what}")
        self.default_cfg = {"unet": 7.5, "sd3": 4.5, "flux": 1.0}[self.arch]
        self.device = torch.device(model.load_device)
        if compute_dtype == "auto":
            use_bf16 = comfy.model_management.should_use_bf16(self.device)
            compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"Training dtype must be float32 or bfloat16; got {compute_dtype}.")
        self.compute_dtype = compute_dtype
        self.default_size = default_size or ((1024, 1024) if (self.is_sdxl or self.arch != "unet") else (512, 512))
        self._mp = None
        self._adapter: ComfyLoraAdapter | None = None
        self._names = None
        self._fingerprint: str | None = None
        self._checkpointed: list[torch.nn.Module] = []
        self._inplace_guard = ct.InplaceGuard()

    # -- the working clone --------------------------------------------------------------------------
    def _working(self):
        """The denoiser's own clone of the graph's patcher (the graph's object is never touched)."""
        if self._mp is None:
            mp = self.patcher.clone()
            if self.compute_dtype != mp.model_dtype():
                mp.set_model_compute_dtype(self.compute_dtype)
            self._mp = mp
        return self._mp

    def _is_loaded(self, mp) -> bool:
        mm = _comfy()[0].model_management
        return (mp.model.current_weight_patches_uuid == mp.patches_uuid
                and any(lm.model is mp for lm in mm.current_loaded_models))

    def load(self, training: bool = False):
        """Load the working clone on the device (fully: ``force_full_load``); returns it."""
        mm = _comfy()[0].model_management
        mp = self._working()
        if self.adapter is not None:
            self.adapter.freeze_base()
        if not self._is_loaded(mp) or (training and mp.model.model_lowvram):
            # TrainLoraNode asks for "everything" (1e20) so that nothing else stays on the device.
            mm.load_models_gpu([mp], memory_required=1e20 if training else 0, force_full_load=True)
        return mp

    def release(self) -> None:
        """Unload the working clone, take wrappers and checkpointing off the shared modules, free memory.

        The adapter (if any) keeps its parameters; predicting again reloads the model.
        """
        mm = _comfy()[0].model_management
        self.set_gradient_checkpointing(False)
        self._inplace_guard.remove()
        if self.adapter is not None:
            self.adapter.restore_base()
        mp = self._mp
        if mp is not None:
            for i in range(len(mm.current_loaded_models) - 1, -1, -1):
                lm = mm.current_loaded_models[i]
                if lm.model is mp:
                    mm.current_loaded_models.pop(i)
                    lm.model_unload(unpatch_weights=True)
            ours = set()
            for fns in mp.weight_wrapper_patches.values():
                ours.update(id(f) for f in fns)
            for fns in self.patcher.weight_wrapper_patches.values():  # the graph's own wrappers stay
                ours.difference_update(id(f) for f in fns)
            for module in mp.model.modules():
                for attr in ("weight_function", "bias_function"):
                    fns = module.__dict__.get(attr)
                    if fns:
                        module.__dict__[attr] = [f for f in fns if id(f) not in ours]
        mm.cleanup_models_gc()
        mm.soft_empty_cache()

    @contextlib.contextmanager
    def session(self, training: bool = True) -> Iterator["ComfyDenoiser"]:
        """Work on the model: inference mode off, the clone fully loaded; on exit unloaded and memory freed.

        The trainer runs inside this block (ComfyUI runs nodes under ``torch.inference_mode()``, in which
        nothing can be trained).
        """
        with torch.inference_mode(False):
            self.load(training=training)
            try:
                yield self
            finally:
                self.release()

    # -- the network --------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def dtype(self) -> torch.dtype:
        return self.patcher.model_dtype()

    @property
    def latent_channels(self) -> int:
        return int(self.patcher.model.latent_format.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is not None:
            f = self.vae.spacial_compression_encode()
            return int(f if isinstance(f, int) else f[-1])
        return 8

    @property
    def sample_size(self) -> int:
        return int(self.default_size[0])

    def layers(self, targets: str | Sequence[str] | None = None) -> dict[str, torch.nn.Module]:
        if self.arch == "unet":
            return select_layers(dict(self.module.named_modules()), targets)
        return select_layers(dict(self.module.named_modules()), targets, presets=presets(self.arch, "ldm"))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return weight_modules(self.module)

    def diffusers_config(self) -> dict:
        """The diffusers config of the network: ``UNet2DConditionModel``'s, or the SD3 / Flux transformer's."""
        unet_config = self.patcher.model.model_config.unet_config
        if self.arch != "unet":
            return ct.diffusers_transformer_config(self.arch, unet_config)
        return diffusers_unet_config(unet_config)

    def names(self):
        """Layer names in both namings, from ComfyUI's own diffusers<->LDM map (checked against ours): a
        :class:`UNetNames`, or for SD3 / Flux a :class:`~safetydpo_core.lora.transformer_names.TransformerNames`."""
        if self._names is None and self.arch != "unet":
            self._names = ct.transformer_names(self.arch, self.module, self.patcher.model.model_config.unet_config)
        if self._names is None:
            import comfy.utils

            unet_config = self.patcher.model.model_config.unet_config
            cfg = self.diffusers_config()
            ldm_modules = {n: m for n, m in self.module.named_modules()
                           if isinstance(getattr(m, "weight", None), torch.Tensor)}
            drop = "class_embedding." if cfg.get("addition_embed_type") == "text_time" else "add_embedding."
            shapes, comfy_map = {}, {}
            for d_key, l_key in comfy.utils.unet_to_diffusers(unet_config).items():
                d_mod, _, d_param = d_key.rpartition(".")
                l_mod, _, _ = l_key.rpartition(".")
                if d_param != "weight" or d_key.startswith(drop) or l_mod not in ldm_modules:
                    continue
                shapes[d_mod] = tuple(ldm_modules[l_mod].weight.shape)
                comfy_map[d_mod] = l_mod
            names = UNetNames(shapes, cfg)
            wrong = [d for d, l in comfy_map.items() if names.to_ldm[d] != l]
            if wrong:
                d = wrong[0]
                raise LoraError(f"Layer names disagree with ComfyUI's: {d!r} -> {names.to_ldm[d]!r} here, "
                                f"{comfy_map[d]!r} in ComfyUI ({len(wrong)} layers).")
            self._names = names
        return self._names

    def attach_lora(self, rank: int, alpha: float | None = None, targets: str | Sequence[str] | None = None,
                    init: str = "gaussian") -> ComfyLoraAdapter:
        """Trainable LoRA on ``targets`` (see :mod:`safetydpo_core.lora.targets`); one adapter at a time."""
        if self._adapter is not None and self._adapter.layers:
            raise ConfigError("A LoRA adapter is already attached to this model; remove() it first.")
        names = list(self.layers(targets))
        if self.arch == "flux":
            self._inplace_guard.install(self.module)
        self._adapter = ComfyLoraAdapter(
            self._working(), names, rank=rank, alpha=alpha, init=init, device=self.device,
            metadata={"ss_base_model_version": self.base_model_version}, names_provider=self.names)
        return self._adapter

    @property
    def adapter(self) -> ComfyLoraAdapter | None:
        return self._adapter if self._adapter is not None and self._adapter.layers else None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each UNet block in backward (``torch.utils.checkpoint``, non-reentrant), as ComfyUI does.

        The reference pass must run before the policy pass (the adapter flag is read again in backward).
        """
        if not enabled:
            for m in self._checkpointed:
                m.__dict__.pop("forward", None)
            self._checkpointed = []
            return
        if self._checkpointed:
            return
        for block in ct.block_lists(self.module):
            orig = block.forward

            def run(*args, _orig=orig, **kwargs):  # recomputed in backward: lend the parameters again
                if self.arch == "flux":  # Flux's blocks add into their inputs, which checkpointing keeps
                    args = tuple(_copy_float(a) for a in args)
                    kwargs = {k: _copy_float(v) for k, v in kwargs.items()}
                with self._grad_safe():
                    return _orig(*args, **kwargs)

            def forward(*args, _orig=orig, _run=run, **kwargs):
                if torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_run, *args, use_reentrant=False, **kwargs)
                return _orig(*args, **kwargs)

            block.forward = forward
            self._checkpointed.append(block)

    def _grad_safe(self):
        """While a trainable forward runs: the parameters the weight wrappers do not reach, as normal tensors."""
        adapter = self.adapter
        if adapter is None or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(adapter.grad_safe())
        if self.arch == "flux":
            stack.enter_context(ct.rope_with_grad())
        return stack

    def fingerprint(self) -> str:
        """Digest of the diffusion model's base weights (as the diffusers backend computes it on the same
        checkpoint), combined with a digest of the weight patches (LoRAs, merges) the MODEL carries."""
        if self._fingerprint is None:
            mp = self.patcher
            tensors = []
            for name, p in self.module.named_parameters():
                bk = mp.backup.get(f"diffusion_model.{name}")
                tensors.append(bk.weight if bk is not None else p)
            fp = module_fingerprint(tensors)
            if mp.patches:
                h = hashlib.sha256(fp.encode())
                for key in sorted(mp.patches):
                    h.update(key.encode())
                    for entry in mp.patches[key]:
                        h.update(repr([e for e in entry if isinstance(e, (int, float, str))]).encode())
                        for t in _tensors_in(entry):
                            h.update(tensor_digest(t).encode())
                fp = h.hexdigest()[:16]
            self._fingerprint = fp
        return self._fingerprint

    # -- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """Encode prompts with the graph's CLIP: ``c_crossattn`` ``[B, 77k, D]``; for SDXL also ``y``
        ``[B, adm]`` (pooled output plus size conditioning for ``size`` = (height, width) in pixels,
        default :attr:`default_size`), ``pooled_output`` and ``size`` (kept for sampling). For SD3 / Flux:
        ``c_crossattn``, ``y`` (the pooled output) and for Flux.1-dev ``guidance`` ``[B]``, from the model's
        ``extra_conds``."""
        import comfy.conds

        prompts = list(prompts)
        if not prompts:
            raise ConfigError("No prompts to encode.")
        if self.clip is None:
            raise ConfigError("This model has no CLIP attached; connect the CLIP of the checkpoint to encode prompts.")
        if self.arch != "unet":
            h, w = size or self.default_size
            f = self.vae_scale_factor
            with torch.inference_mode(False), torch.no_grad():
                return Conditioning(ct.transformer_conditioning(self.patcher.model, self.clip, prompts, self.guidance,
                                                                (max(1, h // f), max(1, w // f))))
        with torch.inference_mode(False), torch.no_grad():  # normal tensors out, usable in training
            conds, pooled = [], []
            for p in prompts:
                out = self.clip.encode_from_tokens(self.clip.tokenize(str(p)), return_pooled=True, return_dict=True)
                conds.append(out["cond"].detach().float().clone())
                pooled.append(None if out.get("pooled_output") is None else out["pooled_output"].detach().float().clone())
            first = comfy.conds.CONDCrossAttn(conds[0])
            cross = first.concat([comfy.conds.CONDCrossAttn(c) for c in conds[1:]]) if len(conds) > 1 else conds[0]
            tensors = {"c_crossattn": cross.float().cpu()}
            if self.is_sdxl:
                if any(p is None for p in pooled):
                    raise ModelError("This CLIP gives no pooled output, which SDXL needs; use the checkpoint's CLIP.")
                h, w = size or self.default_size
                pooled_b = torch.cat(pooled, 0).float()
                sizes = {"height": h, "width": w, "crop_h": 0, "crop_w": 0, "target_height": h, "target_width": w}
                y = self.patcher.model.encode_adm(pooled_output=pooled_b, device=pooled_b.device,
                                                  prompt_type="positive", **sizes)
                tensors["y"] = y.float().cpu()
                tensors["pooled_output"] = pooled_b.cpu()
                tensors["size"] = torch.tensor([[sizes[k] for k in _SDXL_SIZE_KEYS]] * len(prompts), dtype=torch.float32)
        return Conditioning(tensors)

    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Text tokens of each prompt in the CLIP's first window (ComfyUI's word ids: 0 marks start, end and
        padding tokens); 0 for a prompt the tokenizer makes nothing of."""
        if self.clip is None:
            raise ConfigError("This model has no CLIP attached; connect the CLIP of the checkpoint to encode prompts.")
        out = []
        for p in prompts:
            per_encoder = self.clip.tokenize(str(p), return_word_ids=True)
            first = next(iter(per_encoder.values()))[0]
            out.append(sum(1 for tok in first if len(tok) > 2 and tok[2] > 0))
        return out

    @torch.no_grad()
    def last_token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``c_crossattn`` of each prompt at its last text token (the start token for a prompt of no tokens)."""
        prompts = list(prompts)
        counts = self.prompt_token_counts(prompts)
        ctx = self.encode_prompts(prompts).tensors["c_crossattn"]
        return torch.stack([ctx[i, n] for i, n in enumerate(counts)])

    def prompt_embedder(self):
        """Token-level access to the graph's CLIP, for the attacks (:mod:`.comfy_prompt_embedder`)."""
        from .comfy_prompt_embedder import ComfyPromptEmbedder

        if self.flow is not None:
            raise ConfigError("The red-teaming attacks (Ring-A-Bell, UnlearnDiffAtk, concept inversion) work on the "
                              "CLIP text encoders of UNet models (SD1.x, SD2.x, SDXL); this flow-matching model (SD3 / "
                              "Flux.1) is not supported by them. Attack an SD1.x, SD2.x or SDXL checkpoint.")
        return ComfyPromptEmbedder(self)

    # -- the forward process ------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator, latent_shape: Sequence[int] | None = None,
                         t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """Uniform integers for discrete sampling; the flow schedule's shifted logit-normal draws otherwise."""
        if self.flow is not None:
            return self.flow.sample_timesteps(n, generator, latent_shape, t_range)
        return uniform_timesteps(self.num_train_timesteps, n, generator, t_range)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.flow is not None:
            t = t.reshape(-1).detach().double().cpu()
            if t.numel() and (float(t.min()) <= 0 or float(t.max()) > self.num_train_timesteps):
                raise ConfigError(f"Flow timesteps must lie in (0, {self.num_train_timesteps}]; got "
                                  f"{float(t.min()):g}..{float(t.max()):g}.")
            return (t / self.num_train_timesteps).float().to(like.device)
        t = t.reshape(-1).long().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ConfigError(f"Timesteps must lie in [0, {self.num_train_timesteps}); got {int(t.min())}..{int(t.max())}.")
        return self._sigmas[t].to(like.device)

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._sigma(t, like).double()
        a = 1.0 / (1.0 + s * s)  # alphas_cumprod
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().reshape(shape).to(like.dtype), (1 - a).sqrt().reshape(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow is not None:
            return flow.add_noise(self.flow, x0, noise, t)
        sa, sb = self._coeffs(t, x0)
        return sa * x0 + sb * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.velocity(x0, noise) if self.flow is not None else noise

    def unit_marginal(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.unit_marginal(self.flow, noise, t) if self.flow is not None else noise

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Epsilon (discrete sampling) or the flow velocity (flow sampling) predicted for ``x_t`` at timesteps
        ``t`` (fp32, on the device)."""
        b = x_t.shape[0]
        if len(cond) != b:
            raise ConfigError(f"Conditioning batch {len(cond)} does not match the latent batch {b}.")
        t = t.reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        if self.guidance_input and "guidance" not in cond.tensors:
            raise ConfigError("This Flux model has a guidance input; encode the prompts with this denoiser (its "
                              "conditioning carries the guidance).")
        # ComfyUI runs nodes in inference mode, where nothing trains. Leaving it re-enables autograd
        # whatever the caller said, so the caller's grad mode is taken first (no_grad for the reference).
        want_grad = torch.is_grad_enabled() and (self.adapter is not None or self._input_grads)
        with torch.inference_mode(False), torch.set_grad_enabled(want_grad):
            mp = self.load()
            dev = self.device
            sigma = self._sigma(t, x_t).to(dev)
            view = (-1,) + (1,) * (x_t.dim() - 1)
            x = x_t.to(dev, torch.float32)
            if self.flow is None:  # ComfyUI's EPS input: x0 + sigma * eps = x_t / sqrt(a_t)
                x = x * (1.0 + sigma * sigma).sqrt().view(view)
            kwargs = {k: v.to(dev) for k, v in cond.tensors.items() if k in _MODEL_KWARGS}
            options = dict(mp.model_options.get("transformer_options", {}))
            options.update({"sigmas": sigma, "cond_or_uncond": [0]})
            # bf16 autocast where ComfyUI says the device has bf16; otherwise the caller's autocast (if
            # any) is left as it is (autocast(enabled=False) would switch it off).
            autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if self.compute_dtype == torch.bfloat16
                        else contextlib.nullcontext())
            with autocast, self._grad_safe():
                denoised = mp.model.apply_model(x, sigma, transformer_options=options, **kwargs)
            return (x - denoised.float()) / sigma.view(view)

    def eps_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow is not None:
            s = self._sigma(t, x_t).reshape((-1,) + (1,) * (x_t.dim() - 1)).to(x_t.dtype)
            return x_t + (1 - s) * pred
        return pred

    # -- images -------------------------------------------------------------------------------------
    def _need_vae(self):
        if self.vae is None:
            raise ConfigError("This model has no VAE attached; connect the VAE of the checkpoint.")
        return self.vae

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        m = f * (1 if self.arch == "unet" else 2)  # the transformers take 2x2 latent patches
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ConfigError(f"Image size {width}x{height} must be a positive multiple of {m} for this model.")
        return (self.latent_channels, height // f, width // f)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` images in ``[0,1]`` -> latents as the UNet sees them (``process_latent_in``), on the CPU."""
        vae = self._need_vae()
        pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu()
        with torch.inference_mode(False), torch.no_grad():
            raw = vae.encode(pixels)
            return self.patcher.model.process_latent_in(raw.float().cpu()).clone()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the UNet sees them -> ``[B,3,H,W]`` images in ``[0,1]``, on the CPU."""
        vae = self._need_vae()
        with torch.inference_mode(False), torch.no_grad():
            raw = self.patcher.model.process_latent_out(latents.detach().float().cpu())
            img = vae.decode(raw)
            return img.float().reshape(-1, *img.shape[-3:]).permute(0, 3, 1, 2).clamp(0, 1).cpu().clone()

    def _conditioning(self, cond: Conditioning) -> list:
        c = cond.tensors
        extras = {}
        if self.arch != "unet":
            extras = {"pooled_output": c["y"].float()}
            if "guidance" in c:
                extras["guidance"] = float(c["guidance"].reshape(-1)[0])
        elif self.is_sdxl:
            if "pooled_output" not in c or "size" not in c:
                raise ConfigError("SDXL conditioning for sampling needs the pooled output and size from encode_prompts().")
            size = c["size"][0].tolist()
            extras = {"pooled_output": c["pooled_output"].float(), **{k: int(v) for k, v in zip(_SDXL_SIZE_KEYS, size)}}
        return [[c["c_crossattn"].float(), extras]]

    @torch.no_grad()
    def sample(self, cond: Conditioning, uncond: Conditioning | None, noise: torch.Tensor, steps: int = 20,
               cfg: float = 7.5, sampler: str = "euler", scheduler: str = "normal", seed: int = 0,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Denoise ``noise`` (``[B,C,h,w]``, unit variance) with ComfyUI's sampler ``sampler`` / ``scheduler``
        and classifier-free guidance; returns latents as the UNet sees them, on the CPU.

        With an adapter attached and enabled, sampling uses it.
        """
        import comfy.sample
        import comfy.samplers

        if steps <= 0:
            raise ConfigError(f"Sampling steps must be positive; got {steps}.")
        if sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise ConfigError(f"Unknown sampler {sampler!r}; ComfyUI has: {', '.join(comfy.samplers.KSampler.SAMPLERS)}.")
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ConfigError(f"Unknown scheduler {scheduler!r}; ComfyUI has: {', '.join(comfy.samplers.KSampler.SCHEDULERS)}.")
        b = noise.shape[0]
        for what, c in (("conditioning", cond), ("negative conditioning", uncond)):
            if c is not None and len(c) not in (1, b):
                raise ConfigError(f"The {what} has batch {len(c)}; the noise has batch {b}.")
        if uncond is None:
            uncond, cfg = cond, 1.0
        mp = self._working() if self.adapter is not None else self.patcher
        noise = noise.detach().float().cpu()
        latent = torch.zeros_like(noise)

        def on_step(step, x0, x, total):
            if callback is not None:
                callback(step + 1, total)

        samples = comfy.sample.sample(mp, noise, int(steps), float(cfg), sampler, scheduler,
                                      self._conditioning(cond), self._conditioning(uncond), latent,
                                      denoise=1.0, callback=on_step, disable_pbar=True, seed=int(seed))
        return self.patcher.model.process_latent_in(samples.float().cpu()).clone()


def _copy_float(x):
    return x.clone() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _tensors_in(obj, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors inside a ModelPatcher patch entry (tuples, lists, weight adapters)."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors_in(o, depth + 1)
    elif hasattr(obj, "weights"):
        yield from _tensors_in(getattr(obj, "weights"), depth + 1)
