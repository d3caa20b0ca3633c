"""Small random-weight CLIP folders, Q16 embedding files and FID Inception weights, for tests and offline demos.

The folders have exactly the layout of a real transformers CLIP checkpoint (config.json, model.safetensors,
preprocessor_config.json, tokenizer files), so Q16 and CLIPScore run through the same loading and scoring
code as with real weights; :func:`write_random_inception` writes a weights file with the keys and shapes of
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, so FID/KID run through the same loading and feature
code. The numbers they give mean nothing: the weights are random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def build_tiny_clip(directory: str | os.PathLike, seed: int = 0, embed_dim: int = 16, image_size: int = 32,
                    words=None) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from ..tiny_models import BASE_WORDS, write_word_tokenizer

    d = Path(directory)
    write_word_tokenizer(d, words or BASE_WORDS)
    vocab = json.loads((d / "vocab.json").read_text())
    n = len(vocab)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=embed_dim)
    CLIPModel(cfg).eval().save_pretrained(d, safe_serialization=True)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True}), encoding="utf-8")
    return d


def write_q16_embeddings(path: str | os.PathLike, embeddings: np.ndarray | torch.Tensor) -> Path:
    """Save ``[2, D]`` prompt embeddings as ``.npy`` or ``.safetensors`` (by the suffix)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(embeddings.detach().cpu() if torch.is_tensor(embeddings) else embeddings, dtype=np.float32)
    if p.suffix == ".npy":
        np.save(p, arr, allow_pickle=False)
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": torch.from_numpy(arr)}, str(p))
    return p


def write_random_inception(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random FID Inception-v3 weights file (``.pth`` saved as a plain state dict, or ``.safetensors``, by the
    suffix). Convolutions get He-normal weights and the batch norms random affine maps and statistics, so the
    2048-d features keep a usable scale through the 94 convolutions (PyTorch's default initialisation lets them
    shrink towards zero)."""
    from .inception import FIDInceptionV3

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.05 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
                m.bias.zero_()
    state = model.state_dict()
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(p))
    else:
        torch.save(state, p)
    return p
