"""Helpers every node module uses: input specs with tooltips, IMAGE <-> PIL, LORA_MODEL <-> LoraSet,
applying a LORA_MODEL to a MODEL with a check that every key lands, progress and Cancel.

ComfyUI is imported inside functions only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ._core import core, errors
from .types import CATEGORY, LoraModel, metadata_of

MAX_SEED = 0xFFFFFFFFFFFFFFFF
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.")
_LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
                  ".diff_b", ".diff")


# -- input specs ----------------------------------------------------------------------------------------
def INT(default: int, lo: int, hi: int, tooltip: str, step: int = 1, **kw) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip, **kw})


def FLOAT(default: float, lo: float, hi: float, tooltip: str, step: float = 0.01, **kw) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip, **kw})


def BOOL(default: bool, tooltip: str, **kw) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip, **kw})


def STRING(default: str, tooltip: str, multiline: bool = False, **kw) -> tuple:
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip, **kw})


def COMBO(options: Sequence[str], tooltip: str, default: str | None = None) -> tuple:
    opts = list(options)
    return (opts, {"default": default if default is not None else (opts[0] if opts else ""), "tooltip": tooltip})


def SOCKET(type_name: str, tooltip: str, **kw) -> tuple:
    return (type_name, {"tooltip": tooltip, **kw})


def SEED(tooltip: str, default: int = 0) -> tuple:
    return INT(default, 0, MAX_SEED, tooltip)


def category_choices(with_all: bool = True) -> list[str]:
    cats = list(core("categories").CATEGORIES)
    return (["all"] + cats) if with_all else cats


class Node:
    """Shared class attributes of the pack's V1 nodes.

    Every subclass's FUNCTION checks its INT and FLOAT inputs first, against the range its ``INPUT_TYPES``
    declares, with the core's one number validator (:func:`safetydpo_core.utils.numbers.check_number`):
    ComfyUI's own min/max check lets NaN through (every comparison with NaN is false), and a prompt sent
    through the API can carry any number.
    """

    CATEGORY = CATEGORY

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.__dict__.get("FUNCTION") or getattr(cls, "FUNCTION", None)
        fn = cls.__dict__.get(name) if name else None
        if fn is None or getattr(fn, "_checks_numbers", False):
            return
        import functools

        @functools.wraps(fn)
        def checked(self, *args, **kwargs):
            check_numeric_inputs(type(self), kwargs)
            return fn(self, *args, **kwargs)

        checked._checks_numbers = True
        setattr(cls, name, checked)


def numeric_specs(cls) -> dict:
    """``{input name: (type, options)}`` of the INT and FLOAT inputs a node declares."""
    spec = cls.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for k, v in (spec.get(group) or {}).items():
            if isinstance(v, tuple) and v and v[0] in ("INT", "FLOAT"):
                out[k] = (v[0], v[1] if len(v) > 1 and isinstance(v[1], dict) else {})
    return out


def check_numeric_inputs(cls, inputs: Mapping[str, Any]) -> None:
    """Refuse a NaN, infinite, non-numeric or out-of-range value of any INT/FLOAT input, naming the input."""
    check = core("utils.numbers").check_number
    for name, (typ, opts) in numeric_specs(cls).items():
        if name in inputs and inputs[name] is not None:
            inputs[name] = check(inputs[name], name, opts.get("min"), opts.get("max"), integer=typ == "INT")


# -- images ---------------------------------------------------------------------------------------------
def image_to_pil(images) -> list:
    """ComfyUI IMAGE ``[B,H,W,C]`` floats in 0..1 -> PIL RGB images."""
    import numpy as np
    from PIL import Image

    if images is None or getattr(images, "ndim", 0) != 4:
        raise errors().ConfigError("Expected an IMAGE batch [batch, height, width, channels].")
    arr = (images[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in arr]


def pil_to_image(pils: Sequence) -> Any:
    """PIL images of one size -> ComfyUI IMAGE ``[B,H,W,3]`` (one black 64x64 image when there is none)."""
    import numpy as np
    import torch

    arrs = [np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pils]
    return torch.from_numpy(np.stack(arrs)) if arrs else torch.zeros((1, 64, 64, 3))


def side_by_side(left, right):
    """Two IMAGE batches of the same size as one batch with ``left`` and ``right`` next to each other."""
    import torch

    if left.shape != right.shape:
        raise errors().ConfigError(f"Images of shapes {tuple(left.shape)} and {tuple(right.shape)} cannot be put side by side.")
    return torch.cat([left, right], dim=2)


# -- LoRA -----------------------------------------------------------------------------------------------
def lora_base_name(key: str) -> str:
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def lora_set_from_input(lora: Mapping, what: str, names=None):
    """A ``LORA_MODEL`` input as a :class:`LoraSet` (ldm naming), with its metadata; errors name the input."""
    e = errors()
    if not isinstance(lora, Mapping) or not lora:
        raise e.LoraError(f"{what}: expected a LORA_MODEL (a dict of tensors) with at least one layer.")
    from .comfy_lora_adapter import lora_from_comfy

    core("utils.numbers").check_finite_tensors(lora, f"{what} (a LORA_MODEL)", e.LoraError)
    try:
        return lora_from_comfy(lora, names=names, metadata=metadata_of(lora), source=what)
    except e.SafetyDPOError as err:
        msg = str(err)
        raise e.LoraError(msg if what in msg else f"{what}: {msg}") from err


def lora_model_from_set(lora_set, names=None) -> LoraModel:
    """A :class:`LoraSet` as this pack's ``LORA_MODEL`` (comfy-native keys, fp32 CPU tensors, metadata)."""
    from .comfy_lora_adapter import lora_to_comfy

    return LoraModel(lora_to_comfy(lora_set, names), lora_set.metadata)


def unmatched_lora_keys(model, lora: Mapping) -> list[str]:
    """Keys of ``lora`` that ComfyUI would not load into ``model`` ("lora key not loaded")."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return [k for k in lora if lora_base_name(k) not in key_map]


def apply_lora(model, lora: Mapping, strength: float, what: str):
    """A clone of ``model`` with ``lora`` patched in at ``strength`` (ComfyUI's own LoRA loading); refuses a
    LoRA with keys that would not load, naming the input and a key. Text-encoder keys are left out (the
    safety LoRAs adapt the UNet only) with a warning."""
    import logging

    import comfy.sd

    if not isinstance(lora, Mapping) or not lora:
        raise errors().LoraError(f"{what}: expected a LORA_MODEL (a dict of tensors) with at least one layer.")
    core("utils.numbers").check_finite_tensors(lora, f"{what} (a LORA_MODEL)", errors().LoraError)
    te = [k for k in lora if k.startswith(_TE_PREFIXES)]
    if te:
        logging.getLogger(__name__).warning("%s: %d text-encoder keys are not applied (UNet only); use core Load LoRA "
                                            "to apply them to the CLIP too.", what, len(te))
        lora = {k: v for k, v in lora.items() if not k.startswith(_TE_PREFIXES)}
        if not lora:
            raise errors().LoraError(f"{what}: the LoRA has text-encoder keys only; nothing to apply to the model.")
    bad = unmatched_lora_keys(model, lora)
    if bad:
        raise errors().LoraError(
            f"{what}: {len(bad)} of {len(lora)} keys do not match a layer of this model (e.g. {bad[0]!r}); the LoRA "
            f"was made for another model architecture.")
    if strength == 0:
        return model.clone()
    patched, _ = comfy.sd.load_lora_for_models(model, None, dict(lora), float(strength), 0)
    return patched


def comfy_stop() -> bool:
    """``should_stop`` for the core: raises ComfyUI's own interrupt when the user pressed Cancel, so the
    prompt ends as "interrupted" (the core saves its checkpoint on the way out)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def comfy_progress(total: int):
    from .comfy_denoiser import comfy_progress as make

    return make(max(1, int(total)))


def denoiser(model, clip=None, vae=None, guidance=None):
    from .comfy_denoiser import ComfyDenoiser

    return ComfyDenoiser(model, clip, vae, guidance=guidance)


def GUIDANCE() -> tuple:
    """The optional ``guidance`` socket of the nodes that encode prompts themselves (a FLOAT input, not a widget)."""
    return FLOAT(3.5, 0.0, 100.0, "Distilled guidance for guidance-distilled models (Flux.1-dev: 3.5 when unconnected, "
                                  "as ComfyUI's Flux conditioning defaults to; 0 = that default). Connect a float only "
                                  "for such a model: any other model refuses it.", step=0.1, forceInput=True)
