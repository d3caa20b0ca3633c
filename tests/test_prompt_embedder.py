"""The Denoiser protocol's prompt embedder (token-level access to the text encoders, for the attacks), in both
backends: the diffusers backend on the world model and tiny SD1.5/SDXL pipelines, the ComfyUI backend on tiny
SD1.5/SDXL MODEL/CLIP triples built as ComfyUI's executor builds them (COMFYUI_PATH).

Checked: conditioning from token ids equals ``encode_prompts`` of the text; a position given as its own
vocabulary row (a free embedding) changes nothing; gradients reach the free rows through the text encoder
and the denoiser's ``predict``; the ComfyUI graph's models are untouched afterwards; bad input is refused.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_support import (assert_same_state, backend_module, diffusion_state, import_comfy, requires_comfyui,
                             tiny_sd15, tiny_sdxl)
from safetydpo_core.denoiser.protocol import FREE, Denoiser, PromptEmbedder
from safetydpo_core.errors import ConfigError

PROMPTS = ["a photo of a cat", "a red house at night"]


def _cond_close(a, b, atol=1e-5):
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.allclose(a.tensors[k].float(), b.tensors[k].float(), atol=atol), k


def _check_embedder(den, prompts, size=None):
    assert isinstance(den, Denoiser)
    emb = den.prompt_embedder()
    assert isinstance(emb, PromptEmbedder)
    vocab = emb.vocabulary()
    assert vocab.dim() == 2 and vocab.shape[1] == emb.dim and not vocab.requires_grad
    ids = emb.token_ids(prompts)
    assert all(0 < len(s) <= emb.max_tokens for s in ids)
    assert emb.decode(ids[0]).replace(" ", "") == prompts[0].replace(" ", "")
    assert not set(i for s in ids for i in s) & emb.special_ids()
    _cond_close(emb.encode(ids, size=size), den.encode_prompts(prompts, size=size))
    # a position given as its own vocabulary row changes nothing
    freed = [list(s) for s in ids]
    freed[0][1] = FREE
    rows = [vocab[ids[0][1]][None].clone(), None]
    _cond_close(emb.encode(freed, rows, size=size), den.encode_prompts(prompts, size=size), atol=1e-4)
    # and gradients reach it through the text encoder and the denoiser
    c, h, w = den.latent_shape(*(size or (32, 32)))
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))

    def loss(rows):
        return den.predict(x, torch.tensor([100, 700]), emb.encode(freed, [rows, None], size=size)).float().pow(2).mean()

    start = (vocab[ids[0][1]][None] + 0.1).clone()
    with emb.gradients():
        f = start.clone().requires_grad_(True)
        loss(f).backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    # the gradient is the true one: a central difference along it agrees
    d = f.grad / f.grad.norm()
    eps = 1e-2 * float(vocab.norm(dim=1).mean())
    with torch.no_grad():
        fd = (loss(start + eps * d) - loss(start - eps * d)) / (2 * eps)
    assert float(fd) == pytest.approx(float(f.grad.norm()), rel=0.1)
    # bad input
    with pytest.raises(ConfigError, match="free"):
        emb.encode(freed, [None, None], size=size)
    with pytest.raises(ConfigError, match="at most"):
        emb.encode([[ids[0][0]] * (emb.max_tokens + 1)], size=size)
    return emb


def test_world_model_embedder():
    from safetydpo_core.world import load_world_model

    den = load_world_model()
    emb = _check_embedder(den, ["a red nude on the left", "a blue comb at the top on a gray background"])
    assert emb.max_tokens == 22 and emb.dim == 64
    assert emb.decode(emb.token_ids(["a crimson gun in the middle"])[0]) == "a crimson gun in the middle"


@pytest.mark.parametrize("kind", ["tiny_sd15", "tiny_sdxl"])
def test_diffusers_tiny_pipelines(kind, request):
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser

    den = DiffusersDenoiser.from_pretrained(request.getfixturevalue(kind))
    emb = _check_embedder(den, PROMPTS)
    assert emb.dim == sum(e.get_input_embeddings().embedding_dim for e in den.parts.text_encoders)


@requires_comfyui
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfy_backend_embedder(kind):
    cd = backend_module("comfy_denoiser")
    mp, clip, vae = {"sd15": lambda: tiny_sd15(seed=5), "sdxl": lambda: tiny_sdxl(seed=6)}[kind]()
    before = diffusion_state(mp)
    with torch.no_grad():
        clip_before = {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    try:
        with torch.inference_mode():  # as a node runs
            den = cd.ComfyDenoiser(mp, clip, vae, default_size=(64, 64))
            with den.session(training=True):
                emb = _check_embedder(den, PROMPTS, size=(64, 64))
                assert emb.max_tokens == 75
                assert emb.dim == (32 if kind == "sd15" else 16 + 32)
            # nothing is left on the modules: no wrapper, no flag
            assert not den._input_grads
            for m in list(mp.model.modules()) + list(clip.cond_stage_model.modules()):
                for attr in ("weight_function", "bias_function"):
                    assert not m.__dict__.get(attr), (type(m).__name__, attr)
        assert_same_state(before, mp)
        after = clip.cond_stage_model.state_dict()
        assert all(torch.equal(clip_before[k], after[k]) for k in clip_before)
    finally:
        import_comfy().comfy.model_management.unload_all_models()
