"""Denoisers: the protocol (:mod:`.protocol`) and the diffusers backend (:mod:`.diffusers_backend`).
The ComfyUI backend lives with the nodes, since only they may import ComfyUI."""

from .protocol import AdapterHandle, Conditioning, Denoiser

__all__ = ["AdapterHandle", "Conditioning", "Denoiser"]
