"""Merging N LoRA safety experts into one: Co-Merge (activation-aware, factor and delta readings) and the
standard merges (concatenation, linear/task arithmetic, TIES, DARE, magnitude pruning) with one interface.

Modules: :mod:`.experts` (loading, aligning names and shapes), :mod:`.calibration` (streaming activation
statistics from the base denoiser), :mod:`.comerge` (the Co-Merge readings), :mod:`.baselines` (the standard
merges), :mod:`.lowrank` (truncated and factored SVD), :mod:`.report` (winner shares, SVD error, retention),
:mod:`.api` (:func:`merge_experts`, :func:`merge_files`).

Typical use (what the ComfyUI nodes do)::

    experts = align_experts(loras, naming=denoiser.naming, names=denoiser.names())
    stats = calibrate(denoiser, prompts, experts=experts)           # Co-Merge only
    result = merge_experts(experts, "comerge", stats, MergeOptions())
    result.lora, result.report.summary()
"""

from .api import (AUTO_RANK, CALIBRATED, DESCRIPTIONS, METHODS, MergeFilesResult, MergeOptions, MergeResult, merge_experts,
                  merge_files, needs_calibration)
from .calibration import (CalibrationOptions, CalibrationStats, LayerStats, calibrate, calibration_prompts,
                          dataset_inputs, read_pairs_jsonl)
from .experts import align_experts, expert_categories, expert_label, layer_union, load_experts
from .report import LayerReport, MergeReport

__all__ = [
    "AUTO_RANK", "CALIBRATED", "DESCRIPTIONS", "METHODS", "CalibrationOptions", "CalibrationStats", "LayerReport", "LayerStats",
    "MergeFilesResult", "MergeOptions", "MergeReport", "MergeResult", "align_experts", "calibrate",
    "calibration_prompts", "dataset_inputs", "expert_categories", "expert_label", "layer_union", "load_experts",
    "merge_experts", "merge_files", "needs_calibration", "read_pairs_jsonl",
]
