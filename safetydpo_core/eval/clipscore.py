"""CLIPScore: how well an image matches its prompt, with the definitions papers use.

For each image we keep ``cos`` = cosine similarity of the CLIP image and prompt embeddings, and report:

* ``clipscore``: the mean of ``100 * cos`` with no clamp, as SafetyDPO's ``test.py`` (which uses open_clip
  ViT-H-14 ``laion2b_s32b_b79k``; give that model's transformers folder to compare with the paper);
* ``clip_s``: Hessel et al. 2021, ``2.5 * max(cos, 0)`` (the paper used ViT-B/32);

torchmetrics' ``CLIPScore`` is ``max(100 * cos, 0)``. Prompts longer than CLIP's 77 tokens are truncated.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from .clip import ClipEmbedder


def clip_s(cos: float) -> float:
    return 2.5 * max(cos, 0.0)


class ClipScorer:
    def __init__(self, clip: ClipEmbedder):
        self.clip = clip

    @classmethod
    def from_path(cls, clip_dir, device="cpu", help_text: str = "") -> "ClipScorer":
        return cls(ClipEmbedder(clip_dir, device=device, help_text=help_text))

    @torch.no_grad()
    def cosines(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        a = self.clip.images(images)
        b = self.clip.texts(prompts)
        return [float(x) for x in (a * b).sum(-1).cpu()]

    def info(self) -> dict:
        return {"clip": self.clip.info(), "clipscore": "mean of 100 * cos (SafetyDPO test.py, no clamp)",
                "clip_s": "mean of 2.5 * max(cos, 0) (Hessel et al. 2021)"}
