"""Choosing device, weight dtype and mixed precision from "auto" settings."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} was asked for, but CUDA is not available here; use --device cpu.")
    return dev


def bf16_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weight dtype of the frozen base model: fp32 on CPU, bf16/fp16 on GPUs."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if bf16_ok(device) else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}; use auto, fp32, fp16 or bf16.")
    return DTYPES[name]


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cpu":
            return "no"
        return "bf16" if bf16_ok(device) else "fp16"
    return name


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter: what diffusers' ``ModelMixin.dtype`` gives for
    the models this pack loads (none keeps modules in fp32 or casts layer-wise), without its walk over every
    submodule on each call (a tenth of a training step's time on the world model)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
