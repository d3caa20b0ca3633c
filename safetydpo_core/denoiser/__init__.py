"""Denoisers: the protocol (:mod:`.protocol`) and the diffusers backend (:mod:`.diffusers_backend`).
The ComfyUI backend lives with the nodes, since only they may import ComfyUI."""

from .protocol import FREE, AdapterHandle, Conditioning, Denoiser, PromptEmbedder

__all__ = ["FREE", "AdapterHandle", "Conditioning", "Denoiser", "PromptEmbedder"]
