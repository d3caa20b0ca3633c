"""Apply LoRA sets to a module's weights at given strengths, for inference, and take them off again.

``W' = W + sum_i strength_i * (alpha_i / r_i) * up_i @ down_i`` is written into the weights inside a
``with`` block; the original weights are kept aside and restored bit for bit on exit.
:func:`lora_applied_from` does the same from a given sampling step on: the first steps of every sampling
call run the untouched model (they settle the picture's layout and the choices the prompt leaves open), the
rest run with the LoRAs (docs/benchmarks.md, "The LoRA from a later step"); :func:`lora_withheld_until` gives
the same sampling inside a block where the LoRAs stay applied (the attacks, attacks/runner.py). This is how
``safetydpo sample`` (sampling.py) and the concept world's evaluation (world/lora_eval.py) run a model
with experts applied; training, rendering and merge calibration use the denoisers' own adapters instead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

from ..errors import LoraError
from .lora_set import LoraSet


def _updates(modules: dict[str, torch.nn.Module], loras: Sequence[tuple[LoraSet, float]]
             ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, weight, strength * update)`` for each layer of each ``(lora, strength)`` (strength 0 left out), the
    update in float32 and the weight's shape; a layer the model lacks or that does not fit is an error."""
    for lora, strength in loras:
        if strength == 0:
            continue
        for name, layer in lora.items():
            w = getattr(modules.get(name), "weight", None)
            if w is None:
                raise LoraError(f"LoRA layer {name!r} does not exist in this model; the LoRA was made for another model.")
            delta = layer.delta(torch.float32).to(w.device)
            if delta.numel() != w.numel() or delta.shape[0] != w.shape[0]:
                raise LoraError(f"LoRA layer {name!r} does not fit: update {tuple(layer.weight_shape())} vs weight {tuple(w.shape)}.")
            yield name, w, strength * delta.reshape(w.shape)


@contextlib.contextmanager
@torch.no_grad()
def lora_applied(module: torch.nn.Module, loras: Sequence[tuple[LoraSet, float]]) -> Iterator[None]:
    """Patch ``module``'s weights with each ``(lora, strength)`` for the duration of the block."""
    modules = dict(module.named_modules())
    backups: dict[str, torch.Tensor] = {}
    try:
        for name, w, update in _updates(modules, loras):
            if name not in backups:
                backups[name] = w.detach().clone()
            w.copy_((w.float() + update).to(w.dtype))
        yield
    finally:
        for name, orig in backups.items():
            modules[name].weight.copy_(orig)


@contextlib.contextmanager
def lora_applied_from(module: torch.nn.Module, loras: Sequence[tuple[LoraSet, float]], start: int
                      ) -> Iterator[Callable[[int, int], None] | None]:
    """:func:`lora_applied` from sampling step ``start`` on. Yields the callback ``(step, steps)`` to pass to every
    sampler call in the block (``None`` when ``start`` is 0: the LoRAs are in from the first step). Each call
    starts with the untouched weights; the LoRAs go in when its step ``start`` is done and come out after its
    last step. The original weights are back on exit whatever happened."""
    if start < 0:
        raise LoraError(f"The LoRA's start step must be >= 0; got {start}.")
    if start == 0:
        with lora_applied(module, loras):
            yield None
        return
    active: list = []

    def off() -> None:
        while active:
            active.pop().__exit__(None, None, None)

    def callback(step: int, steps: int) -> None:
        if step == start and step < steps and not active:
            cm = lora_applied(module, loras)
            cm.__enter__()
            active.append(cm)
        if step >= steps:
            off()

    try:
        yield callback
    finally:
        off()


@contextlib.contextmanager
@torch.no_grad()
def lora_withheld_until(module: torch.nn.Module, loras: Sequence[tuple[LoraSet, float]], start: int
                        ) -> Iterator[Callable[[int, int], None] | None]:
    """Inside a :func:`lora_applied` block of the same ``loras``: every sampling call in this block runs its
    first ``start`` steps without them, as :func:`lora_applied_from` does. For a model that must keep its LoRAs
    applied around the sampling (a white-box attack optimises against them) and be sampled as it is deployed.
    Yields the callback ``(step, steps)`` (``None`` when ``start`` is 0). The weights without the LoRAs are the
    applied ones minus the updates (equal to the untouched weights up to float rounding); the applied weights
    are back, bit for bit, on exit."""
    if start < 0:
        raise LoraError(f"The LoRA's start step must be >= 0; got {start}.")
    if start == 0:
        yield None
        return
    modules = dict(module.named_modules())
    applied: dict[str, torch.Tensor] = {}
    without: dict[str, torch.Tensor] = {}
    for name, w, update in _updates(modules, loras):
        if name not in applied:
            applied[name] = w.detach().clone()
            without[name] = w.detach().float().clone()
        without[name] -= update

    def put(weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():  # also when the sampler calls back outside no_grad
            for name, v in weights.items():
                modules[name].weight.copy_(v.to(modules[name].weight.dtype))

    def callback(step: int, steps: int) -> None:
        if step == start and step < steps:
            put(applied)
        if step >= steps:
            put(without)

    put(without)
    try:
        yield callback
    finally:
        put(applied)
