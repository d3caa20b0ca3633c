"""Access to ``safetydpo_core`` from the nodes, however the pack was imported.

ComfyUI imports the pack under a module name derived from its folder path, with ``safetydpo_core`` as a
sub-package (``<pack>.safetydpo_core``); tests and tools may import ``nodes/`` on its own next to an
installed ``safetydpo_core``. :func:`core` returns the right module in both cases, imported on first use,
so importing a node module stays cheap (ComfyUI imports every pack at start-up). It is the nodes' one way
to the core: ``core("lora.keys").to_state_dict(...)`` inside a function, or ``a, b = from_core("lora.keys", "a", "b")``
at the top of a module that only the nodes' functions import (comfy_denoiser.py and its helpers).
"""

from __future__ import annotations

import importlib
from types import ModuleType

_PARENT = (__package__ or "").rpartition(".")[0]
_BASE: str | None = None


def _base() -> str:
    global _BASE
    if _BASE is None:
        if _PARENT:
            try:
                importlib.import_module(f"{_PARENT}.safetydpo_core")
                _BASE = f"{_PARENT}.safetydpo_core"
            except ModuleNotFoundError as e:
                if e.name != f"{_PARENT}.safetydpo_core":
                    raise
                _BASE = "safetydpo_core"
        else:
            _BASE = "safetydpo_core"
    return _BASE


def core(sub: str = "") -> ModuleType:
    """``safetydpo_core.<sub>`` (``core("training.trainer")``), the copy that belongs to this pack."""
    return importlib.import_module(f"{_base()}.{sub}" if sub else _base())


def from_core(sub: str, *names: str):
    """``from safetydpo_core.<sub> import <names>``, from this pack's copy: ``a, b = from_core("x.y", "a", "b")``
    (one name: the object itself)."""
    module = core(sub)
    found = tuple(getattr(module, n) for n in names)
    return found[0] if len(found) == 1 else found


def errors() -> ModuleType:
    return core("errors")
