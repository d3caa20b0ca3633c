"""Co-Merge: N safety experts into one LoRA, calibrated on the loaded MODEL.

The node converts each ``LORA_MODEL`` to a core :class:`LoraSet`, aligns them with the model's layers,
runs the core calibration (:func:`safetydpo_core.merge.calibrate`) through the ComfyUI denoiser backend on
prompts from the connected pairs (or latents of a dataset), then :func:`safetydpo_core.merge.merge_experts`
with the chosen method; the merged LoRA and the merge report come out.
"""

from __future__ import annotations

from . import live_view, paths
from ._core import core, errors
from .common import (COMBO, GUIDANCE, INT, SEED, SOCKET, Node, comfy_progress, comfy_stop, denoiser,
                     lora_model_from_set, lora_set_from_input)
from .types import DATASET, EXPERTS, LORA_MODEL, PAIRS

SLOTS = 7
PROMPT_FIELDS = ("unsafe", "safe", "both")


def methods() -> list[str]:
    return list(core("merge.api").METHODS)


class CoMerge(Node):
    DESCRIPTION = ("Merges safety experts (one LoRA per category) into one safety LoRA. 'comerge' (the default) keeps, "
                   "for every weight, the expert that is most active on calibration prompts run through the loaded "
                   "model; the other methods are the standard merges (concat, linear, TIES, DARE, magnitude). Connect "
                   "experts to the slots and/or an expert list; the report shows how much each expert contributed.")
    RETURN_TYPES = (LORA_MODEL, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The merged safety LoRA.", "The merge report: method, options, per-expert shares and "
                                                  "retention, per-layer figures.")
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        slots = {f"expert_{i}": SOCKET(LORA_MODEL, f"Safety expert {i} (any order; leave unused slots empty).")
                 for i in range(1, SLOTS + 1)}
        return {"required": {
            "model": SOCKET("MODEL", "The model the experts were trained on (calibration runs it; names its layers)."),
            "clip": SOCKET("CLIP", "The checkpoint's text encoder (encodes the calibration prompts)."),
            "method": COMBO(methods(), "comerge: Co-Merge factor reading (rank = the experts' rank); comerge-delta: "
                                       "Co-Merge on full updates then SVD to 'rank'; concat: exact, rank = sum; linear, "
                                       "ties, dare, dare-ties, magnitude: standard merges then SVD to 'rank'.",
                            default="comerge-delta"),
            "rank": INT(0, 0, 1024, "Output rank for the SVD methods (0 = auto: the sum of the experts' ranks, at "
                                    "most 64). Must be 0 for comerge and concat."),
            "calibration_inputs": INT(32, 1, 100000, "How many calibration inputs to run through the model "
                                                     "(Co-Merge methods only)."),
            "calibration_size": INT(0, 0, 4096, "Calibration image size in pixels (0 = the model's native size; "
                                                "smaller is faster). Ignored with a dataset.", step=8),
            "prompt_field": COMBO(PROMPT_FIELDS, "Which prompts of the pairs calibrate: the unsafe ones (what the "
                                                 "experts were trained on), the safe ones, or both."),
            "seed": SEED("Seed of the calibration draws (and of DARE's random drop)."),
        }, "optional": {
            "pairs": SOCKET(PAIRS, "Calibration prompts: the experts' prompt pairs (needed by the Co-Merge methods "
                                   "unless a dataset is connected)."),
            "dataset": SOCKET(DATASET, "Calibration on a preference dataset's latents instead of prompts with noise."),
            "experts": SOCKET(EXPERTS, "More experts, with weights, from the expert-list node."),
            **slots,
            "guidance": GUIDANCE(),
        }}

    def merge(self, model, clip, method, rank, calibration_inputs, calibration_size, prompt_field, seed, pairs=None,
              dataset=None, experts=None, guidance=None, **slots):
        e = errors()
        merge = core("merge")
        data_path = paths.dataset_folder(dataset, "dataset") if dataset is not None else None
        if method not in merge.METHODS:
            raise e.ConfigError(f"method must be one of {', '.join(merge.METHODS)}; got {method!r}.")
        if rank and method in ("comerge", "concat"):
            raise e.ConfigError(f"{method} sets the output rank itself (comerge: the experts' rank; concat: their sum); "
                                f"set rank to 0, or use comerge-delta / linear to choose a rank.")
        given = [(f"expert_{i}", slots.get(f"expert_{i}"), 1.0) for i in range(1, SLOTS + 1)
                 if slots.get(f"expert_{i}") is not None]
        given += [(f"experts[{j}]", lora, w) for j, (lora, w) in enumerate(experts or [])]
        if not given:
            raise e.ConfigError("No experts connected: connect LORA_MODELs to expert_1... or an expert list.")
        den = denoiser(model, clip, guidance=guidance)
        names = den.names()
        sets = [lora_set_from_input(lora, what) for what, lora, _ in given]
        for (what, _, _), s in zip(given, sets):
            s.metadata.setdefault("safetydpo_source", what)
        sets = merge.align_experts(sets, "ldm", names, den.weight_shapes(), "the connected model")
        weights = [w for _, _, w in given]
        opts = merge.MergeOptions(rank=int(rank) or merge.AUTO_RANK, weights=weights, seed=int(seed))
        opts.validate(method, len(sets))
        stats = None
        if merge.needs_calibration(method):
            cats = list(dict.fromkeys(c for s in sets for c in merge.expert_categories(s)))
            copts = merge.CalibrationOptions(num_inputs=int(calibration_inputs), seed=int(seed),
                                             size=int(calibration_size) or None,
                                             rank_stats="none" if method == "comerge-delta" else "experts")
            inputs = prompts = None
            if data_path is not None:
                copts.size = None
                inputs = merge.dataset_inputs(data_path, cats, copts.num_inputs, copts.seed)
            elif pairs:
                rows = [p.to_dict() for p in pairs]
                prompts = merge.calibration_prompts(rows, cats, copts.num_inputs, copts.seed, prompt_field,
                                                    source="the connected pairs")
            else:
                raise e.ConfigError(f"{method} needs calibration prompts: connect the experts' prompt pairs (or a "
                                    f"dataset), or choose a method that needs none (concat, linear, ties, dare, ...).")
            with den.session(training=False):
                stats = merge.calibrate(den, prompts, experts=sets, options=copts, inputs=inputs,
                                        progress=comfy_progress(copts.num_inputs), should_stop=comfy_stop)
            stats.info["categories"] = cats
        result = merge.merge_experts(sets, method, stats, opts, progress=comfy_progress(len(merge.layer_union(sets))),
                                     should_stop=comfy_stop)
        result.lora.metadata["ss_base_model_version"] = den.base_model_version
        report = result.report.summary()
        live_view.merge_report(method, report)
        # the report also rides in the node's UI output (shown on the node, and again when the result is cached)
        return {"ui": {"text": [report]}, "result": (lora_model_from_set(result.lora), report)}
