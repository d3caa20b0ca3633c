"""The "Erase Concepts (UCE)" node: UCE's closed-form cross-attention edit of the loaded MODEL, as a LORA_MODEL.

The node runs :func:`safetydpo_core.erase.erase_concepts` (method ``uce``, the same settings as
``safetydpo erase``) on ``ComfyDenoiser(model, clip)`` inside its session, so the weights it reads are the
loaded model's own (with any LoRA already patched into the MODEL). It takes seconds. The LoRA is the
exact update (rank = number of erased concepts) unless a rank is chosen, or full-rank ``.diff`` weights;
the MODEL output has it applied at strength 1. The loaded MODEL is never changed. ESD is trained by the
train node (objective ``esd-x`` / ``esd-u``).
"""

from __future__ import annotations

import json

from ._core import core
from .common import BOOL, FLOAT, INT, SOCKET, STRING, Node, apply_lora, comfy_progress, denoiser, lora_model_from_set
from .types import LORA_MODEL, LoraModel


class EraseConceptsUCE(Node):
    DESCRIPTION = ("Erases concepts from the loaded model with UCE (Unified Concept Editing, Gandikota et al. 2024): "
                   "a closed-form edit of the cross-attention keys and values that maps each concept to its guide "
                   "and keeps the preserved concepts, in seconds. Outputs the edit as a LoRA (exact by default) "
                   "and the model with it applied; the loaded MODEL itself is not changed.")
    RETURN_TYPES = (LORA_MODEL, "MODEL", "STRING")
    RETURN_NAMES = ("lora", "model", "report")
    OUTPUT_TOOLTIPS = ("The edit as a LORA_MODEL (save it with Save LoRA, merge it, apply it).",
                       "A copy of the input MODEL with the edit applied at strength 1.",
                       "What was done: concepts, guides, rank and the export's relative error, time (JSON).")
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The loaded model to edit (SD1.x, SD2.x or SDXL UNet). It is not changed."),
            "clip": SOCKET("CLIP", "The checkpoint's text encoder, to embed the concepts."),
            "concepts": STRING("", "Concepts to erase, separated by commas or new lines (e.g. gun, rifle).",
                               multiline=True),
            "guide": STRING("", "What each concept becomes: one guide per concept (same order), one for all, or empty "
                                "for the unconditional (nothing in particular).", multiline=True),
            "preserve": STRING("", "Concepts to keep unchanged, separated by commas or new lines (may be empty).",
                               multiline=True),
            "lamb": FLOAT(0.5, 0.0001, 1e6, "Pull towards the original weights (UCE's lambda; 0.5 as the official "
                                            "code). Larger: a gentler edit.", step=0.05, round=False),
            "erase_scale": FLOAT(1.0, 0.0001, 1e6, "Weight of the erase terms.", step=0.05, round=False),
            "preserve_scale": FLOAT(1.0, 0.0, 1e6, "Weight of the preserve terms.", step=0.05, round=False),
            "rank": INT(0, 0, 4096, "LoRA rank: 0 = exact (the edit has rank = number of concepts); a smaller rank "
                                    "keeps the best approximation and reports its error."),
            "full_diff": BOOL(False, "Output full-rank difference weights (.diff keys) instead of LoRA factors; "
                                     "ComfyUI and A1111 load them."),
        }}

    def erase(self, model, clip, concepts, guide, preserve, lamb, erase_scale, preserve_scale, rank, full_diff):
        er = core("erase")
        settings = er.EraseSettings(method="uce", concepts=concepts, guide=guide, preserve=preserve, rank=int(rank),
                                    full_diff=bool(full_diff), lamb=float(lamb), erase_scale=float(erase_scale),
                                    preserve_scale=float(preserve_scale))
        den = denoiser(model, clip)
        bar = comfy_progress(1)
        with den.session(training=False):
            result = er.erase_concepts(den, settings, progress=lambda d, n: bar(d, n))
        if full_diff:
            sd = core("lora.keys").to_state_dict(result.lora, fmt="comfy", diff=True)
            lora = LoraModel(sd, {**result.lora.metadata, "safetydpo_key_kind": "diff"})
        else:
            lora = lora_model_from_set(result.lora)
        report = dict(result.report, full_diff=bool(full_diff))
        return (lora, apply_lora(model, lora, 1.0, "the UCE edit"), json.dumps(report, indent=1))
