"""Fingerprints that tie datasets and LoRAs to the model and data they were made from, and the SHA-256 of a
file (weights, LoRA files behind a cached result).

The model fingerprint does not depend on layer names, tensor order or storage dtype beyond fp16
precision, so the same checkpoint gives the same fingerprint whether diffusers or ComfyUI loaded it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch


def tensor_digest(t: torch.Tensor, sample: int = 64) -> str:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    head = flat[:sample]
    tail = flat[max(0, n - sample):]
    vals = torch.cat([head, tail]).to(device="cpu", dtype=torch.float16).float().numpy().round(2)
    h = hashlib.sha256()
    h.update(str([s for s in t.shape if s != 1]).encode())
    h.update(str(n).encode())
    h.update(vals.tobytes())
    return h.hexdigest()[:16]


def module_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """Order- and name-independent digest of a model's weights (shapes plus sampled values)."""
    digests = sorted(tensor_digest(t) for t in tensors if t.dim() >= 2 and t.device.type != "meta")
    h = hashlib.sha256("\n".join(digests).encode())
    return h.hexdigest()[:16]



def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
