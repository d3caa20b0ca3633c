"""Checks of numbers that come from users, and of tensors that come from files.

One validator, :func:`check_number`, is used by the command-line parsers (through
``cli.common.number``), by the settings dataclasses of the core (render, sample, train, merge) and by the
ComfyUI nodes (every INT/FLOAT input against the range its spec declares). It refuses NaN and infinities
explicitly: a plain ``x < 0`` check lets NaN through because every comparison with NaN is false.
:func:`check_start_step` checks a LoRA's first sampling step against the step count, for the sample, demo
and attack settings and the Safe Sampler.

:func:`check_finite_tensors` finds the first tensor holding NaN or an infinity and names it (file and key),
for latents and LoRA weights read from disk.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch

from ..errors import ConfigError, SafetyDPOError


def describe_range(lo=None, hi=None, *, integer: bool = False, lo_open: bool = False, hi_open: bool = False) -> str:
    kind = "an integer" if integer else "a finite number"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return kind + (" " + " and ".join(parts) if parts else "")


def check_number(value, name: str, lo=None, hi=None, *, integer: bool = False, lo_open: bool = False,
                 hi_open: bool = False, error: type[Exception] = ConfigError):
    """``value`` as an int (``integer``) or float, if it is finite and within ``[lo, hi]`` (open ends with
    ``lo_open``/``hi_open``); otherwise ``error`` naming ``name``, the value and the allowed range."""
    want = describe_range(lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open)

    def bad() -> Exception:
        return error(f"{name} must be {want}; got {value!r}.")

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, str):
            try:
                value = float(value.strip()) if not integer else int(value.strip(), 10)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise bad() from None
    if not math.isfinite(x):
        raise bad()
    if integer:
        if x != int(x):
            raise bad()
        out = int(value)
        x = out
    else:
        out = x
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise bad()
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise bad()
    return out


def check_optional(value, name: str, lo=None, hi=None, **kw):
    """:func:`check_number`, but ``None`` passes (a setting left at its default)."""
    return None if value is None else check_number(value, name, lo, hi, **kw)


def check_start_step(value, steps: int, name: str) -> int:
    """A LoRA's first sampling step (``lora_start``: the steps before it run the untouched model): an integer
    from 0 to below ``steps``, since at or past the last step the LoRA would never be on. ``name`` names the
    setting as the user wrote it."""
    start = check_number(value, name, 0, 10000, integer=True)
    if start >= steps:
        raise ConfigError(f"{name} ({start}) must be below the number of sampling steps ({steps}): the LoRA would "
                          f"never be on.")
    return start


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in order) whose floating-point tensor holds NaN or an infinity, else None."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return key
    return None


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], where: str,
                         error: type[Exception] = SafetyDPOError) -> None:
    """Refuse NaN or infinite values in any of ``tensors``, naming ``where`` (a file) and the key."""
    key = first_nonfinite(tensors)
    if key is not None:
        t = tensors[key]
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise error(f"{where}: the tensor {key!r} holds non-finite values ({n_nan} NaN, {n_inf} infinite of "
                    f"{t.numel()}). The file is damaged or was made by a run that diverged; make it again.")
