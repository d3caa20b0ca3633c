"""What the ComfyUI denoiser backend needs to know about a loaded MODEL beyond the UNets: its architecture, how
its own ``model_sampling`` noises and predicts, and, for the flow-matching transformers (SD3 / SD3.5 MMDiT,
Flux.1), their conditioning, their layer names and their diffusers config.

* :func:`architecture`: ``unet`` (SD1.x/2.x, SDXL), ``sd3`` (``comfy.model_base.SD3`` with ComfyUI's MMDiT) or
  ``flux`` (``comfy.model_base.Flux`` with the Flux.1 transformer: dev with its guidance input, schnell without;
  not Flux.2, nor the Fill/Depth/Canny models with extra input channels); anything else is a
  :class:`ModelError` that lists what can be trained.
* :func:`sampling_kind`: ``epsilon``, ``v_prediction`` or ``flow``, read from the MODEL's ``model_sampling``
  object (whatever model it is, including one a ModelSamplingSD3/Flux/Discrete node patched), never from a
  list of model names: the discrete EPS/V sampling (``ModelSamplingDiscrete`` with ``EPS``/``V_PREDICTION``) or
  the flow sampling (``ModelSamplingDiscreteFlow`` / ``ModelSamplingFlux`` with ``CONST``).
* :func:`flow_schedule`: the training noise levels that go with a flow ``model_sampling``: its static shift
  (SD3's 3.0, or whatever a ModelSamplingSD3 node set), or for ``ModelSamplingFlux`` the resolution-dependent
  shift of ComfyUI's ModelSamplingFlux node (base 0.5 at 256 tokens up to the model's shift at 4096 tokens),
  unless a node patched the sampling, whose shift then holds at every size.
* :func:`transformer_conditioning`: the prompt conditioning of SD3/Flux through the graph's CLIP and the
  model's own ``extra_conds`` (``c_crossattn``, ``y`` = the pooled output, Flux.1-dev's ``guidance``).
* :func:`transformer_names`: the layer names in both namings, checked against ComfyUI's own diffusers map
  (``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``).
* :func:`rope_with_grad`: ComfyUI's Flux attention rotates q and k with comfy_kitchen's fused RoPE op, which has
  no backward; while a trainable forward runs, that op is called through an autograd function whose backward
  is the same op with the rotations transposed (the forward stays ComfyUI's, bit for bit).
* :class:`InplaceGuard`: lets autograd through ComfyUI's in-place residual additions in the Flux blocks.

ComfyUI is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import torch

from ._core import from_core

# the core, whichever way the pack was imported (nodes/_core.py)
FlowSchedule = from_core("denoiser.flow", "FlowSchedule")
ConfigError, LoraError, ModelError = from_core("errors", "ConfigError", "LoraError", "ModelError")
TransformerNames = from_core("lora.transformer_names", "TransformerNames")
weight_modules = from_core("lora.unet_names", "weight_modules")

SUPPORTED = ("SD1.x, SD2.x and SDXL (UNet), SD3 / SD3.5 (MMDiT) and Flux.1 dev / schnell (and their fine-tunes), "
             "with discrete EPS / V-prediction or flow-matching sampling")
_CONDITIONING_KEYS = ("c_crossattn", "y", "guidance")


def architecture(base) -> str:
    """``unet``, ``sd3`` or ``flux`` for a ``comfy.model_base`` model; a :class:`ModelError` otherwise."""
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.model_base as mb
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    arch = type(getattr(base, "model_config", None)).__name__
    what = f"{type(base).__name__} ({arch})"
    dm = getattr(base, "diffusion_model", None)
    if isinstance(dm, UNetModel):
        if type(base) is not mb.BaseModel and not isinstance(base, (mb.SDXL, mb.SDXLRefiner)):
            raise ModelError(f"The model {what} is not supported yet: it needs conditioning beyond text. "
                             f"Supported: {SUPPORTED}.")
        if getattr(base, "concat_keys", ()):
            raise ModelError(f"The model {what} is an inpainting/instruct model (extra input channels); it is not "
                             f"supported yet. Supported: {SUPPORTED}.")
        return "unet"
    if type(base) is mb.SD3 and isinstance(dm, mmdit.MMDiT):
        return "sd3"
    if type(base) is mb.Flux and type(dm) is comfy.ldm.flux.model.Flux:
        p = dm.params
        if p.global_modulation or p.yak_mlp or p.mlp_silu_act or p.txt_norm:
            raise ModelError(f"The model {what} is a Flux-family model with another block layout (Flux.2-style); only "
                             f"Flux.1 can be trained. Supported: {SUPPORTED}.")
        if int(p.in_channels) != int(p.out_channels):
            raise ModelError(f"The model {what} takes {p.in_channels} input channels for {p.out_channels} output "
                             f"channels (a Fill / Depth / Canny model conditioned on an image); it is not supported "
                             f"yet. Supported: {SUPPORTED}.")
        return "flux"
    raise ModelError(f"The model {what} is not supported yet. Supported: {SUPPORTED}.")


def sampling_kind(ms) -> str | None:
    """``epsilon``, ``v_prediction`` or ``flow`` from a ``model_sampling`` object; None for anything else."""
    import comfy.model_sampling as S

    cls = type(ms)
    if (isinstance(ms, S.ModelSamplingDiscrete) and cls.sigma is S.ModelSamplingDiscrete.sigma
            and cls.timestep is S.ModelSamplingDiscrete.timestep and cls.noise_scaling is S.EPS.noise_scaling
            and cls.calculate_input is S.EPS.calculate_input and float(getattr(ms, "sigma_data", 1.0)) == 1.0):
        if cls.calculate_denoised is S.EPS.calculate_denoised:
            return "epsilon"
        if cls.calculate_denoised is S.V_PREDICTION.calculate_denoised:
            return "v_prediction"
        return None
    if (isinstance(ms, (S.ModelSamplingDiscreteFlow, S.ModelSamplingFlux))
            and cls.sigma in (S.ModelSamplingDiscreteFlow.sigma, S.ModelSamplingFlux.sigma)
            and cls.calculate_input is S.CONST.calculate_input and cls.calculate_denoised is S.CONST.calculate_denoised
            and cls.noise_scaling is S.CONST.noise_scaling):
        return "flow"
    return None


def flow_schedule(ms, patched: bool) -> FlowSchedule:
    """The training noise levels for a flow ``model_sampling`` (see the module docstring)."""
    import comfy.model_sampling as S

    if isinstance(ms, S.ModelSamplingFlux):
        mu = float(ms.shift)
        if patched:  # a ModelSamplingFlux node chose the shift for its size: keep it
            return FlowSchedule(shift=math.exp(mu))
        return FlowSchedule(dynamic=True, base_shift=0.5, max_shift=mu)
    return FlowSchedule(shift=float(ms.shift))


# -- conditioning --------------------------------------------------------------------------------------------
def _tokenizer(clip, key: str):
    """The tokenizer of one entry (``l``, ``g``, ``t5xxl``) of the token dict of ``clip``."""
    return getattr(clip.tokenizer, key, None) or getattr(clip.tokenizer, f"clip_{key}", None)


def _same_length(clip, prompts: Sequence[str]) -> list[dict]:
    """Token dicts of ``prompts`` padded to the longest, per encoder: a single-window tokenizer (T5) by its
    ``min_length`` option, a windowed one (CLIP's 77 tokens) by appending windows of the empty prompt (each
    window is encoded on its own, so the prompt's own windows encode as they would alone)."""
    tokens = [clip.tokenize(str(p)) for p in prompts]
    windows = [{k: len(v) for k, v in t.items()} for t in tokens]
    lengths = [{k: sum(len(w) for w in v) for k, v in t.items()} for t in tokens]
    if all(l == lengths[0] for l in lengths):
        return tokens
    options = {}
    for key in lengths[0]:
        longest = max(l[key] for l in lengths)
        tok = _tokenizer(clip, key)
        if tok is not None and max(w[key] for w in windows) == 1 and getattr(tok, "embedding_key", None):
            options[f"{tok.embedding_key}_min_length"] = longest
    if options:
        tokens = [clip.tokenize(str(p), tokenizer_options=options) for p in prompts]
    empty = clip.tokenize("")
    for key in tokens[0]:
        most = max(len(t[key]) for t in tokens)
        for t in tokens:
            while len(t[key]) < most and empty.get(key):
                t[key] = list(t[key]) + [empty[key][0]]
    return tokens


def transformer_conditioning(base, clip, prompts: Sequence[str], guidance: float | None,
                             latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``c_crossattn`` ``[B, L, D]``, ``y`` ``[B, P]`` and (guidance models) ``guidance`` ``[B]`` for ``prompts``,
    through the graph's CLIP and the model's ``extra_conds``. Prompts of different token counts are padded
    to the longest (:func:`_same_length`), so that they batch."""
    tokens = _same_length(clip, prompts)
    per_prompt = []
    for p, tok in zip(prompts, tokens):
        out = clip.encode_from_tokens(tok, return_pooled=True, return_dict=True)
        if out.get("pooled_output") is None:
            raise ModelError("This CLIP gives no pooled output, which SD3 and Flux need; use the checkpoint's text encoders.")
        kw = {"cross_attn": out["cond"].detach().float().clone(), "pooled_output": out["pooled_output"].detach().float().clone(),
              "device": torch.device("cpu"), "noise": torch.zeros((1, base.latent_format.latent_channels, *latent_hw))}
        if guidance is not None:
            kw["guidance"] = float(guidance)
        else:
            kw["guidance"] = None
        conds = base.extra_conds(**kw)
        per_prompt.append({k: c.cond for k, c in conds.items() if k in _CONDITIONING_KEYS})
    keys = per_prompt[0].keys()
    shapes = {k: {tuple(c[k].shape) for c in per_prompt} for k in keys}
    bad = [k for k, s in shapes.items() if len(s) > 1]
    if bad:
        raise ConfigError(f"The prompts' text encodings differ in shape ({bad[0]}: {sorted(shapes[bad[0]])}) and cannot "
                          f"be batched; shorten the longest prompts.")
    out = {k: torch.cat([c[k].float().cpu() for c in per_prompt], 0) for k in keys}
    return out


# -- names and configs ---------------------------------------------------------------------------------------
def transformer_names(family: str, diffusion_model: torch.nn.Module, unet_config: Mapping) -> TransformerNames:
    """The layer names of a ComfyUI SD3 / Flux diffusion model in both namings, checked against ComfyUI's own
    diffusers map (fused q/k/v slices included)."""
    import comfy.utils

    names = TransformerNames(family, weight_modules(diffusion_model), "ldm")
    comfy_map = (comfy.utils.mmdit_to_diffusers if family == "sd3" else comfy.utils.flux_to_diffusers)(dict(unet_config))
    wrong = []
    for rel in names.relations:
        offset = 0
        for part, rows in rel.parts:
            target = comfy_map.get(f"{part}.weight")
            want = f"{rel.ldm}.weight"
            if isinstance(target, tuple):
                key, slice_ = target[0], target[1]
                ok = key == want and (slice_ is None or (rel.fused and tuple(slice_) == (0, offset, rows))
                                      or (not rel.fused and tuple(slice_) == (0, 0, rows)))
                ok = ok and (len(target) < 3) == (not rel.swap)
            else:
                ok = target == want and not rel.fused and not rel.swap
            if not ok:
                wrong.append((part, rel.ldm, target))
            offset += rows
    if wrong:
        part, ldm, target = wrong[0]
        raise LoraError(f"Layer names disagree with ComfyUI's: {part!r} -> {ldm!r} here, {target!r} in ComfyUI "
                        f"({len(wrong)} layers).")
    return names


def diffusers_transformer_config(family: str, unet_config: Mapping, diffusion_model: torch.nn.Module | None = None) -> dict:
    """The diffusers ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` config of a ComfyUI SD3 / Flux model."""
    c = dict(unet_config)
    if family == "sd3":
        depth = int(c["depth"])
        ctx = c.get("context_embedder_config") or {}
        cfg = {"_class_name": "SD3Transformer2DModel", "sample_size": int(c.get("pos_embed_max_size") or 96) // 2 * 2,
               "patch_size": int(c.get("patch_size", 2)), "in_channels": int(c.get("in_channels", 16)),
               "out_channels": int(c.get("out_channels") or c.get("in_channels", 16)), "num_layers": depth,
               "attention_head_dim": 64, "num_attention_heads": depth, "caption_projection_dim": 64 * depth,
               "joint_attention_dim": int(ctx.get("params", {}).get("in_features", 4096)),
               "pooled_projection_dim": int(c.get("adm_in_channels") or 2048),
               "pos_embed_max_size": int(c.get("pos_embed_max_size") or 96)}
        if c.get("qk_norm"):
            cfg["qk_norm"] = "rms_norm"
        if c.get("x_block_self_attn_layers"):
            cfg["dual_attention_layers"] = list(c["x_block_self_attn_layers"])
        return cfg
    patch = int(c.get("patch_size", 2))
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": int(c["in_channels"]) * patch * patch,
            "num_layers": int(c["depth"]), "num_single_layers": int(c["depth_single_blocks"]),
            "attention_head_dim": int(c["hidden_size"]) // int(c["num_heads"]), "num_attention_heads": int(c["num_heads"]),
            "joint_attention_dim": int(c["context_in_dim"]), "pooled_projection_dim": int(c["vec_in_dim"]),
            "guidance_embeds": bool(c.get("guidance_embed", False)), "axes_dims_rope": list(c["axes_dim"])}


def block_lists(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that gradient checkpointing wraps, one by one (UNet levels or transformer blocks)."""
    dm = diffusion_model
    out: list[torch.nn.Module] = []
    for attr in ("input_blocks", "middle_block", "output_blocks", "joint_blocks", "double_blocks", "single_blocks"):
        m = getattr(dm, attr, None)
        if m is None:
            continue
        out.extend(list(m) if isinstance(m, torch.nn.ModuleList) else [m])
    return out


# -- autograd through ComfyUI's fused RoPE ---------------------------------------------------------------
class _RopeWithGrad(torch.autograd.Function):
    """ComfyUI's RoPE op (comfy_kitchen's ``apply_rope``, which has no backward) with its backward: RoPE rotates
    each pair of channels, so the gradient is the same op with every 2x2 rotation transposed."""

    @staticmethod
    def forward(ctx, op, xq, xk, freqs_cis):
        ctx.op = op
        ctx.save_for_backward(freqs_cis)
        return op(xq, xk, freqs_cis)

    @staticmethod
    def backward(ctx, gq, gk):
        (freqs_cis,) = ctx.saved_tensors
        dq, dk = ctx.op(gq.contiguous(), gk.contiguous(), freqs_cis.transpose(-1, -2).contiguous())
        return None, dq, dk, None


@contextlib.contextmanager
def rope_with_grad() -> Iterator[None]:
    """Within this block the Flux attention's RoPE (``comfy.ldm.flux.math.apply_rope``) can be differentiated;
    the forward is ComfyUI's own op, bit for bit. Outside it, ComfyUI's function is in place again."""
    try:
        import comfy.ldm.flux.math as fmath
    except ImportError:  # pragma: no cover - a ComfyUI without Flux
        yield
        return
    op = fmath.apply_rope
    if getattr(op, "_safetydpo_grad", False):
        yield
        return

    def apply_rope(xq, xk, freqs_cis):
        if torch.is_grad_enabled():
            return _RopeWithGrad.apply(op, xq, xk, freqs_cis)
        return op(xq, xk, freqs_cis)

    apply_rope._safetydpo_grad = True
    fmath.apply_rope = apply_rope
    try:
        yield
    finally:
        fmath.apply_rope = op


class InplaceGuard:
    """ComfyUI's Flux blocks add their residuals in place (``img += ...``, ``x += ...``) into the tensors their
    LayerNorms saved for backward, which autograd refuses ("modified by an inplace operation"). While installed,
    each LayerNorm of the diffusion model normalises a copy of its input when a gradient is being recorded, so
    the saved tensor is not the one modified; values are unchanged, inference pays nothing. Installed as an
    instance ``forward`` on the shared modules (as gradient checkpointing is) and removed by :meth:`remove`."""

    def __init__(self) -> None:
        self.modules: list[torch.nn.Module] = []

    def install(self, diffusion_model: torch.nn.Module) -> None:
        if self.modules:
            return
        for module in diffusion_model.modules():
            if isinstance(module, torch.nn.LayerNorm) and "forward" not in module.__dict__:
                orig = module.forward

                def forward(x, *args, _orig=orig, **kwargs):
                    if torch.is_grad_enabled() and isinstance(x, torch.Tensor):
                        x = x.clone()
                    return _orig(x, *args, **kwargs)

                module.forward = forward
                self.modules.append(module)

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []
