"""Denoisers: the protocols (:mod:`.protocol`: :class:`Denoiser` and :class:`RenderingDenoiser`) and the diffusers
backends (:mod:`.diffusers_backend`, :mod:`.diffusers_flow`). The ComfyUI backend lives with the nodes, since
only they may import ComfyUI."""

from .protocol import FREE, AdapterHandle, Conditioning, Denoiser, PromptEmbedder, RenderingDenoiser

__all__ = ["FREE", "AdapterHandle", "Conditioning", "Denoiser", "PromptEmbedder", "RenderingDenoiser"]
