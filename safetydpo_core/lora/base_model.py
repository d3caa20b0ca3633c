"""kohya's ``ss_base_model_version`` (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``, ``sdxl_refiner_v1-0``, ``sd3``,
``flux1``), derived in one place from what a model or a LoRA shows: the transformer family, SDXL's extra
conditioning, or the UNet's cross-attention width. A1111/Forge and civitai read it; :mod:`.io` picks the
default key style from it."""

from __future__ import annotations

from .transformer_names import BASE_MODEL_VERSIONS, family_of_names

# the UNet families by cross-attention width (context_dim)
_BY_WIDTH = {2048: "sdxl_base_v1-0", 1280: "sdxl_refiner_v1-0", 1024: "sd_v2", 768: "sd_v1"}


def base_model_version(*, family: str | None = None, cross_attention_dim: int | None = None, sdxl: bool = False,
                       default: str = "sd_v1") -> str:
    """The version of a transformer ``family`` (``sd3``, ``flux``), of an SDXL UNet (``sdxl``: it has SDXL's
    size conditioning), or of a UNet by its cross-attention width; ``default`` when none of these tells."""
    if family is not None:
        return BASE_MODEL_VERSIONS[family]
    if sdxl:
        return "sdxl_base_v1-0"
    return _BY_WIDTH.get(cross_attention_dim, default)  # type: ignore[arg-type]


def base_model_version_of_lora(lora) -> str:
    """The version an ldm-named :class:`LoraSet` was made for: SD3 / Flux.1 from their block names, the UNets
    from the width of a cross-attention key projection (``sd_v1`` when it has none)."""
    family = family_of_names(lora.layers)
    if family is not None:
        return base_model_version(family=family)
    width = next((layer.in_features for name, layer in lora.items() if name.endswith("attn2.to_k")), None)
    return base_model_version(cross_attention_dim=width)
