"""LoRA key formats: a :class:`LoraSet` to a flat state dict and back.

Written formats:

* ``kohya`` (default for files): ``lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha``.
  ComfyUI's ``LoraLoader``, A1111/Forge, kohya's scripts and diffusers' ``load_lora_weights`` read it.
  The path is in diffusers naming for SD1.x/2.x and in LDM naming for SDXL, as kohya writes them.
  For SD3/SD3.5 and Flux.1 the path is the original checkpoint's (LDM naming, fused q/k/v as
  ``joint_blocks_0_x_block_attn_qkv`` / ``double_blocks_0_img_attn_qkv`` / ``single_blocks_0_linear1``), as
  kohya's sd-scripts writes them; ComfyUI reads both families this way, diffusers reads the Flux files.
* ``comfy``: ``diffusion_model.<ldm path>.lora_down.weight / .lora_up.weight / .alpha`` - what ComfyUI's
  ``SaveLoRA`` writes and what flows between nodes as ``LORA_MODEL``.
* ``peft``: diffusers' own format, ``transformer.<diffusers path>.lora_A.weight / .lora_B.weight`` (``unet.``
  for UNets), scale folded into ``lora_B`` (alpha = rank, no alpha key): what ``pipe.load_lora_weights`` of
  diffusers reads for SD3 (which has no kohya converter) and what ComfyUI maps onto the fused SD3/Flux layers.

Read formats: all of the above (peft files also with a ``base_model.model.`` prefix, scale 1 unless the file
says otherwise). Text-encoder keys are reported and skipped.

Full-rank difference weights: with ``diff=True`` a layer is written as one ``<prefix><path>.diff`` tensor of
the weight's shape (the update ``scale * up @ down``), the key ComfyUI's LoRA loader (``comfy/lora.py``:
``("diff", ...)`` patches) and A1111's ``network_full`` read. Reading a ``.diff`` layer gives an exact
factorisation (one factor the update, the other an identity, rank ``min(out, in)``), so every tool of the
pack handles such files; weight diffs of 1-D tensors (norms) and bias diffs are refused.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from ..errors import LoraError
from .lora_set import LoraLayer, LoraSet
from .unet_names import UNetNames, flat

log = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.")

_KOHYA_RE = re.compile(r"^lora_unet_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|lora_mid\.weight|diff|diff_b)$")
_COMFY_RE = re.compile(r"^diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|lora_mid\.weight|diff|diff_b)$")
_PEFT_RE = re.compile(r"^(?:unet\.|transformer\.|base_model\.model\.)?(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")


def default_key_style(base_model_version: str) -> tuple[str, str]:
    """(format, naming) that kohya itself writes for a base model family."""
    if base_model_version.startswith(("sdxl", "sd3", "flux")):
        return "kohya", "ldm"
    return "kohya", "diffusers"


def to_state_dict(lora: LoraSet, fmt: str = "kohya", naming: str | None = None,
                  names: UNetNames | None = None, dtype: torch.dtype | None = None,
                  diff: bool = False) -> dict[str, torch.Tensor]:
    """Flatten ``lora`` into ``fmt`` keys (``kohya`` or ``comfy``), converting the naming if needed; with
    ``diff`` as full-rank ``.diff`` weights (see the module docstring)."""
    if fmt == "comfy":
        naming = "ldm"
    elif fmt == "peft":
        naming = "diffusers"
    naming = naming or lora.naming
    if naming != lora.naming:
        if names is None:
            raise LoraError(f"Converting LoRA names from {lora.naming} to {naming} needs the model's layer names.")
        lora = names.convert_lora(lora, naming)
    if fmt == "peft":
        if diff:
            raise LoraError("Full-rank .diff weights have no diffusers/peft form; write them with fmt 'kohya' or 'comfy'.")
        return _to_peft(lora, "transformer." if hasattr(names, "family") else "unet.", dtype)
    prefix = {"kohya": KOHYA_PREFIX, "comfy": COMFY_PREFIX}.get(fmt)
    if prefix is None:
        raise LoraError(f"Unknown LoRA key format {fmt!r}; use 'kohya', 'comfy' or 'peft'.")
    sd: dict[str, torch.Tensor] = {}
    for name, layer in lora.items():
        base = prefix + (flat(name) if fmt == "kohya" else name)
        if diff:
            w = layer.delta(torch.float32).reshape(layer.weight_shape())
            sd[f"{base}.diff"] = w.to(dtype or torch.float32).detach().contiguous().cpu()
            continue
        down, up = layer.down, layer.up
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        sd[f"{base}.lora_down.weight"] = down.detach().contiguous().cpu()
        sd[f"{base}.lora_up.weight"] = up.detach().contiguous().cpu()
        sd[f"{base}.alpha"] = torch.tensor(layer.alpha, dtype=down.dtype if dtype is None else dtype)
    return sd


def _to_peft(lora: LoraSet, prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """diffusers/peft keys, the scale folded into ``lora_B`` (peft's default alpha = rank gives scale 1)."""
    sd: dict[str, torch.Tensor] = {}
    for name, layer in lora.items():
        down, up = layer.down, layer.up * layer.scale
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        sd[f"{prefix}{name}.lora_A.weight"] = down.detach().contiguous().cpu()
        sd[f"{prefix}{name}.lora_B.weight"] = up.detach().contiguous().cpu()
    return sd
def exact_factors(diff: torch.Tensor, what: str = "diff") -> LoraLayer:
    """A full weight difference ``[out, in]`` (or ``[out, in, kh, kw]``) as a LoRA layer with the same update
    exactly: the smaller side becomes an identity factor (rank ``min(out, in*kh*kw)``, scale 1)."""
    if diff.dim() not in (2, 4):
        raise LoraError(f"{what}: a full difference of shape {tuple(diff.shape)} (a norm or bias) is not supported; "
                        f"only linear and convolution weights can be read.")
    d = diff.float() if diff.dtype not in (torch.float32, torch.float64) else diff
    out, inner = d.shape[0], int(d[0].numel())
    flat_d = d.reshape(out, inner)
    if out <= inner:  # up = I (out x out), down = the difference
        down = flat_d.reshape(d.shape) if d.dim() == 4 else flat_d
        up = torch.eye(out, dtype=d.dtype)
        up = up.reshape(out, out, 1, 1) if d.dim() == 4 else up
        return LoraLayer(down.clone(), up, float(out))
    down = torch.eye(inner, dtype=d.dtype)  # down = I (in x in), up = the difference
    if d.dim() == 4:
        down = down.reshape(inner, *d.shape[1:])
        return LoraLayer(down, flat_d.reshape(out, inner, 1, 1).clone(), float(inner))
    return LoraLayer(down, flat_d.clone(), float(inner))


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """``kohya``, ``comfy`` or ``peft`` from the keys; a :class:`LoraError` for anything else."""
    keys = [k for k in sd if not k.startswith(_TE_PREFIXES)]
    if not keys:
        raise LoraError("The LoRA has no UNet layers (only text-encoder keys or nothing at all).")
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfy"
    if any(_PEFT_RE.match(k) for k in keys):
        return "peft"
    raise LoraError(f"Unknown LoRA key format (first key {keys[0]!r}); expected kohya 'lora_unet_*', "
                    f"ComfyUI 'diffusion_model.*' or diffusers/peft '*.lora_A.weight' keys.")


def from_state_dict(sd: Mapping[str, torch.Tensor], names: UNetNames | None = None,
                    metadata: Mapping[str, str] | None = None, source: str = "LoRA") -> LoraSet:
    """Parse a flat LoRA state dict in any supported format into a :class:`LoraSet`.

    kohya keys need ``names`` (the model's layer names) to undo the dot-to-underscore flattening.
    """
    fmt = detect_format(sd)
    skipped_te = [k for k in sd if k.startswith(_TE_PREFIXES)]
    if skipped_te:
        log.warning("%s: skipping %d text-encoder keys (only UNet layers are used)", source, len(skipped_te))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    naming = "ldm" if fmt == "comfy" else "diffusers"
    unknown = []
    for k, v in sd.items():
        if k.startswith(_TE_PREFIXES):
            continue
        m = {"kohya": _KOHYA_RE, "comfy": _COMFY_RE, "peft": _PEFT_RE}[fmt].match(k)
        if not m:
            unknown.append(k)
            continue
        parts.setdefault(m[1], {})[m[2]] = v
    if unknown:
        raise LoraError(f"{source}: key {unknown[0]!r} is not a LoRA key of the {fmt} format ({len(unknown)} such keys).")
    layers: dict[str, LoraLayer] = {}
    namings = set()
    naming_of: dict[str, str] = {}
    for raw, p in parts.items():
        if "diff" in p and set(p) == {"diff"}:
            layer = exact_factors(p["diff"], f"{source}: layer {raw!r}")
        else:
            layer = _factor_layer(raw, p, fmt, metadata, source)
        name = raw
        if fmt == "kohya":
            if names is None:
                raise LoraError(f"{source}: kohya keys need the model's layer names to be read; load it with a model.")
            layer_naming, name = names.resolve_flat(raw)
            namings.add(layer_naming)
            naming_of[name] = layer_naming
        layers[name] = layer
    if fmt == "kohya":
        if len(namings) > 1:
            assert names is not None
            merged: dict[str, LoraLayer] = {}
            for nm in namings:  # each naming's layers converted on their own, then together
                part = LoraSet({n: l for n, l in layers.items() if naming_of[n] == nm}, nm)
                merged.update(names.convert_lora(part, "diffusers").layers)
            layers = merged
            naming = "diffusers"
        else:
            naming = namings.pop()
    return LoraSet(layers, naming, dict(metadata or {}))


def _factor_layer(raw: str, p: Mapping[str, torch.Tensor], fmt: str, metadata, source: str) -> LoraLayer:
    """One layer's down/up/alpha tensors (kohya/comfy or peft names) as a float :class:`LoraLayer`."""
    extra = set(p) - {"lora_down.weight", "lora_up.weight", "alpha", "lora_A", "lora_B"}
    if extra:
        raise LoraError(f"{source}: layer {raw!r} uses {sorted(extra)}, which this pack does not support "
                        f"(plain LoRA and full weight diffs only: no DoRA, LoCon mid weights or bias diffs).")
    if fmt == "peft":
        down, up = p.get("lora_A"), p.get("lora_B")
    else:
        down, up = p.get("lora_down.weight"), p.get("lora_up.weight")
    if down is None or up is None:
        raise LoraError(f"{source}: layer {raw!r} lacks its {'down/A' if down is None else 'up/B'} matrix.")
    rank = down.shape[0]
    alpha = p.get("alpha")
    if alpha is not None:
        alpha_v = float(alpha.float().item())
    elif fmt == "peft" and metadata and f"alpha:{raw}" in metadata:
        alpha_v = float(metadata[f"alpha:{raw}"])
    else:
        alpha_v = float(rank)  # ComfyUI and kohya: no alpha key means scale 1
    return LoraLayer(down.float() if down.dtype not in (torch.float32, torch.float64) else down,
                     up.float() if up.dtype not in (torch.float32, torch.float64) else up, alpha_v)
