"""Socket type names of the pack's own data, and the ``LORA_MODEL`` dict that carries metadata.

Custom types are plain strings to ComfyUI: a link is allowed between sockets with the same name.

* ``SAFETYDPO_PAIRS``: a ``list`` of :class:`safetydpo_core.prompts.PromptPair` (id, category, concept,
  unsafe, safe).
* ``SAFETYDPO_DATASET``: a ``dict`` ``{"path": <dataset folder>, "pairs": n, "per_category": {...},
  "model_fingerprint": ...}``; the folder is a preference dataset in the format the command line writes.
* ``SAFETYDPO_METRICS``: a ``dict`` ``{"kind": "training", "history": [per-step rows], "category": ...,
  "steps": n, "checkpoint_dir": ...}``, what the loss-plot node draws.
* ``SAFETYDPO_EXPERTS``: a ``list`` of ``(LORA_MODEL, weight)`` built by the expert-list node.
* ``LORA_MODEL`` is ComfyUI's own type (core ``TrainLoraNode`` / ``SaveLoRA`` / ``LoraModelLoader``): a
  ``dict`` of CPU tensors with comfy-native keys ``diffusion_model.<ldm path>.lora_up.weight`` /
  ``.lora_down.weight`` / ``.alpha``. This pack passes a :class:`LoraModel`, a ``dict`` subclass whose
  ``metadata`` attribute carries the safetensors metadata (category, training settings, ...) from the
  trainer to the save node; any plain ``dict`` from other nodes is accepted too.
"""

from __future__ import annotations

from typing import Mapping

PAIRS = "SAFETYDPO_PAIRS"
DATASET = "SAFETYDPO_DATASET"
METRICS = "SAFETYDPO_METRICS"
EXPERTS = "SAFETYDPO_EXPERTS"
LORA_MODEL = "LORA_MODEL"
CATEGORY = "SafetyDPO"


class LoraModel(dict):
    """A ``LORA_MODEL`` dict (tensor per key) with string ``metadata`` alongside; a plain dict to everyone else."""

    def __init__(self, tensors: Mapping = (), metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}


def metadata_of(lora: Mapping) -> dict[str, str]:
    """The metadata riding on a ``LORA_MODEL`` dict (empty for plain dicts from other nodes)."""
    return dict(getattr(lora, "metadata", None) or {})
