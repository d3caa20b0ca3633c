"""Trainable LoRA adapters on a diffusers UNet through peft, switchable for the DPO reference pass.

The reference model of Diffusion-DPO is the same network with its adapters switched off: peft's LoRA
layers call only their base layer when disabled, so the reference prediction is exactly the untouched
model's, and no copy of the network is ever made.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ..errors import ConfigError, LoraError
from .lora_set import LoraLayer, LoraSet
from .targets import layer_rank

ADAPTER_NAME = "safetydpo"


class PeftLoraAdapter:
    """Rank-``rank`` LoRA on ``target_names`` of ``module``; the handle the trainer works with. A layer smaller
    than ``rank`` gets its own largest rank, at the run's scale (:func:`~.targets.layer_rank`; peft's
    ``rank_pattern`` and ``alpha_pattern``)."""

    naming = "diffusers"

    def __init__(self, module: torch.nn.Module, target_names: Sequence[str], rank: int, alpha: float | None = None,
                 init: str = "gaussian", dtype: torch.dtype = torch.float32):
        if rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer; got {rank}.")
        self.module = module
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive; got {self.alpha}.")
        capped = {n: layer_rank(module.get_submodule(n), self.rank) for n in target_names}
        capped = {n: r for n, r in capped.items() if r < self.rank}
        # peft matches a pattern as "(.*\.)?(pattern)$": "^" makes it this one module, not every name ending so
        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights=init, target_modules=list(target_names),
                         rank_pattern={"^" + re.escape(n): r for n, r in capped.items()},
                         alpha_pattern={"^" + re.escape(n): self.alpha * r / self.rank for n, r in capped.items()})
        inject_adapter_in_model(cfg, module, adapter_name=ADAPTER_NAME)
        self.layers: dict[str, PeftLoraLayer] = {
            n: m for n, m in module.named_modules() if isinstance(m, PeftLoraLayer) and ADAPTER_NAME in m.lora_A}
        missing = set(target_names) - set(self.layers)
        if missing:
            raise LoraError(f"peft did not adapt {sorted(missing)[:3]}")
        for layer in self.layers.values():
            layer.lora_A[ADAPTER_NAME].to(dtype)
            layer.lora_B[ADAPTER_NAME].to(dtype)
        self._enabled = True

    def parameters(self) -> list[torch.nn.Parameter]:
        ps = []
        for layer in self.layers.values():
            for p in (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight):
                p.requires_grad_(True)
                ps.append(p)
        return ps

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for n, layer in self.layers.items():
            out[f"{n}.lora_down.weight"] = layer.lora_A[ADAPTER_NAME].weight
            out[f"{n}.lora_up.weight"] = layer.lora_B[ADAPTER_NAME].weight
        return out

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.enable_adapters(enabled)
        self._enabled = enabled

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the module is the untouched base model (the DPO reference)."""
        prev = self._enabled
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(prev)

    def export(self) -> LoraSet:
        layers = {}
        for n, layer in self.layers.items():
            layers[n] = LoraLayer(layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                                  layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                                  float(layer.lora_alpha[ADAPTER_NAME]))
        return LoraSet(layers, "diffusers")

    @torch.no_grad()
    def load(self, lora: LoraSet) -> None:
        """Copy the factors of ``lora`` into the adapters (same layers, ranks and alphas required)."""
        if lora.naming != "diffusers":
            raise LoraError("This adapter uses diffusers layer names; convert the LoRA first.")
        extra = set(lora.layers) - set(self.layers)
        if extra:
            raise LoraError(f"LoRA layer {sorted(extra)[0]!r} is not among the adapted layers of this model.")
        for n, layer in self.layers.items():
            if n not in lora.layers:
                raise LoraError(f"The LoRA lacks layer {n!r}, which this adapter trains.")
            src = lora.layers[n]
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            if tuple(src.down.shape) != tuple(a.shape) or tuple(src.up.shape) != tuple(b.shape):
                raise LoraError(f"LoRA layer {n!r} has down {tuple(src.down.shape)} / up {tuple(src.up.shape)}; "
                                f"the adapter has {tuple(a.shape)} / {tuple(b.shape)} (rank {self.rank}).")
            scale_fix = src.alpha / float(layer.lora_alpha[ADAPTER_NAME])
            a.copy_(src.down.to(a.dtype))
            b.copy_((src.up * scale_fix).to(b.dtype))

    def remove(self) -> None:
        """Take the adapters out again; the module is bit-for-bit what it was before."""
        for name, layer in list(self.layers.items()):
            parent_name, _, child = name.rpartition(".")
            parent = self.module.get_submodule(parent_name) if parent_name else self.module
            setattr(parent, child, layer.get_base_layer())
        self.layers = {}
        for m in self.module.modules():
            if isinstance(m, BaseTunerLayer):
                raise LoraError("peft layers remain after removing the adapters")
        if hasattr(self.module, "peft_config"):
            with contextlib.suppress(Exception):
                del self.module.peft_config
