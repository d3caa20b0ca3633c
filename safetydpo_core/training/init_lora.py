"""Starting a training run from an existing LoRA instead of from zero.

What it is for: the **joint fine-tune** of a merged LoRA. Co-Merge keeps, weight by weight, the most active
expert, which keeps the experts' effect on IP but loses part of what their SFT and output-preservation terms
taught (unsafe prompts drawn as the safe twin in place, unrelated content unchanged; docs/benchmarks.md). A
short run of the same objective on every category's pairs, started from the merged LoRA, puts that back.
It is also how an expert is continued on new data.

The trainer's adapters have one rank for every layer, except that a layer smaller than it gets its own
largest rank (:func:`~..lora.targets.layer_rank`). :func:`fit_init_lora` converts the starting LoRA to the
model's layer naming (refusing a LoRA made for another model, with the layer at fault), and brings every
layer to that rank: padded, the added ``down`` rows seeded random, the added ``up`` columns zero and alpha
scaled with the rank, so the padded LoRA applies exactly the update of the original and the added rank can
still learn; or, for a layer the file gives more rank than the layer has (a merge at a high rank), refactored
exactly by an SVD of its update, whose rank cannot exceed the layer's. :func:`run_rank` is the rule for the run's rank: the configured rank, raised to the
starting LoRA's where that is larger (one rule for the command line and the nodes).

Public API: :func:`run_rank`, :func:`fit_init_lora`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..errors import LoraError
from ..lora.lora_set import LoraLayer, LoraSet
from ..lora.targets import shape_max_rank

if TYPE_CHECKING:
    from ..denoiser.protocol import Denoiser
    from .config import TrainConfig


def run_rank(cfg: "TrainConfig", init: LoraSet) -> "TrainConfig":
    """``cfg`` with its rank raised to the starting LoRA's largest rank where that is larger."""
    if not len(init):
        raise LoraError("The starting LoRA (init LoRA) has no layers.")
    return cfg if init.max_rank <= cfg.rank else dataclasses.replace(cfg, rank=init.max_rank)


def fit_init_lora(init: LoraSet, denoiser: "Denoiser", rank: int, *, seed: int = 0,
                  what: str = "the init LoRA") -> LoraSet:
    """``init`` in ``denoiser``'s naming, every layer padded to ``rank`` without changing its update."""
    if init.max_rank > rank:
        raise LoraError(f"{what} has rank {init.max_rank}, above the run's rank {rank}; train with rank >= "
                        f"{init.max_rank}.")
    for name, layer in init.items():
        if not (torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all()):
            raise LoraError(f"{what} holds NaN or infinite values in layer {name!r}; it cannot be trained further.")
    lora = init
    if lora.naming != denoiser.naming:
        try:
            lora = denoiser.names().convert_lora(lora, denoiser.naming)
        except LoraError as e:
            raise LoraError(f"{what}: {e} Start only from a LoRA made for this model.") from e
    try:
        lora.check_fits(denoiser.weight_shapes(), "model being trained")
    except LoraError as e:
        raise LoraError(f"{what}: {e} Start only from a LoRA made for this model.") from e
    g = torch.Generator().manual_seed(int(seed) + 7919)
    shapes = denoiser.weight_shapes()
    layers = {}
    for name in sorted(lora.layers):
        layer = lora.layers[name]
        target = min(rank, shape_max_rank(shapes[name]))
        if layer.rank > target:
            layer = _exact_rank(layer, target)
        extra = target - layer.rank
        if extra == 0:
            layers[name] = LoraLayer(layer.down.float().clone(), layer.up.float().clone(), layer.alpha)
            continue
        down_new = torch.randn((extra, *layer.down.shape[1:]), generator=g) / target
        up_new = torch.zeros((layer.up.shape[0], extra, *layer.up.shape[2:]))
        layers[name] = LoraLayer(torch.cat([layer.down.float(), down_new]), torch.cat([layer.up.float(), up_new], dim=1),
                                 layer.alpha * target / layer.rank)
    return LoraSet(layers, lora.naming, dict(lora.metadata))


def _exact_rank(layer: LoraLayer, rank: int) -> LoraLayer:
    """``layer`` refactored at ``rank`` (at least the rank of its update) with the same update: the exact
    truncated SVD of ``scale * up @ down`` (:func:`~..merge.lowrank.factored_svd`), alpha = rank (scale 1)."""
    from ..merge.lowrank import factored_svd

    out = layer.up.shape[0]
    up, down, _ = factored_svd(layer.up.reshape(out, -1) * layer.scale, layer.down.reshape(layer.rank, -1), rank)
    return LoraLayer(down.reshape(rank, *layer.down.shape[1:]), up.reshape(out, rank, *layer.up.shape[2:]), float(rank))
