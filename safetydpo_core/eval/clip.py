"""Loading a local transformers CLIP folder (safetensors only, offline) and embedding images and texts.

Used by Q16 (image embeddings against its two prompt embeddings) and CLIPScore (image vs. prompt). The
image preprocessing is the folder's ``preprocessor_config.json`` when present (for OpenAI's checkpoints:
resize the short side to 224 with bicubic filtering, centre crop, CLIP mean/std), else the same recipe at
the vision tower's input size. Embeddings are the projected features (OpenAI CLIP's ``encode_image`` /
``encode_text``), L2-normalised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .weights import CLIP_FOLDER_HELP, MissingWeights

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def check_clip_folder(path: str | os.PathLike, help_text: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingWeights(f"The CLIP folder {p} does not exist. {help_text}")
    if not p.is_dir():
        raise MissingWeights(f"{p} is a file; a CLIP model must be a transformers folder ({CLIP_FOLDER_HELP}). {help_text}")
    cfg = p / "config.json"
    if not cfg.exists():
        raise MissingWeights(f"The CLIP folder {p} has no config.json. {help_text}")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except ValueError as e:
        raise MissingWeights(f"{cfg} is not valid JSON ({e}). {help_text}") from e
    if model_type != "clip":
        raise MissingWeights(f"{p} holds a {model_type!r} model, not a CLIP model (config.json model_type 'clip'). {help_text}")
    if not any(p.glob("*.safetensors")):
        bins = [q.name for q in p.glob("*.bin")]
        extra = (f" It has {', '.join(bins)}: pickled weights are refused; use a copy with model.safetensors."
                 if bins else "")
        raise MissingWeights(f"The CLIP folder {p} has no .safetensors weights.{extra} {help_text}")
    return p


class ClipEmbedder:
    """A CLIP model from a local folder; ``images()`` and ``texts()`` return L2-normalised embeddings."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", help_text: str = "",
                 dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel

        self.path = check_clip_folder(path, help_text)
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True,
                                                   dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise MissingWeights(f"The CLIP folder {self.path} cannot be loaded: {e}. {help_text}") from e
        self.embed_dim = int(self.model.config.projection_dim)
        self._processor = None
        self._tokenizer = None

    # -- preprocessing ------------------------------------------------------------------------------
    def _image_processor(self):
        if self._processor is None:
            from transformers import CLIPImageProcessor

            if (self.path / "preprocessor_config.json").exists():
                self._processor = CLIPImageProcessor.from_pretrained(str(self.path), local_files_only=True)
            else:
                side = int(self.model.config.vision_config.image_size)
                self._processor = CLIPImageProcessor(size={"shortest_edge": side},
                                                     crop_size={"height": side, "width": side},
                                                     image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
        return self._processor

    def _text_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise MissingWeights(f"The CLIP folder {self.path} has no usable tokenizer ({e}); CLIPScore needs "
                                     f"vocab.json, merges.txt and tokenizer_config.json beside the weights.") from e
        return self._tokenizer

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    # -- embeddings ---------------------------------------------------------------------------------
    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pix = self._image_processor()(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        f = self._features(self.model.get_image_features(pixel_values=pix.to(self.device, self.model.dtype))).float()
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self._text_tokenizer()
        max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        f = self._features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                        attention_mask=enc["attention_mask"].to(self.device))).float()
        return f / f.norm(dim=-1, keepdim=True)

    def info(self) -> dict:
        cfg = self.model.config
        return {"path": str(self.path), "name_or_path": getattr(cfg, "_name_or_path", ""),
                "embed_dim": self.embed_dim, "image_size": int(cfg.vision_config.image_size),
                "vision_layers": int(cfg.vision_config.num_hidden_layers),
                "vision_width": int(cfg.vision_config.hidden_size),
                "patch_size": int(cfg.vision_config.patch_size)}
