"""Shared fixtures: tiny random-weight diffusers models built from configs, and small preference datasets.

Nothing is downloaded; models are built once per test session in a temporary folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# at most 2 threads, the cores shared among pytest-xdist's workers; OMP_NUM_THREADS, when set, wins (on a loaded
# shared machine 1 thread is many times faster)
_threads = os.environ.get("OMP_NUM_THREADS", "")
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0
                      else max(1, min(2, (os.cpu_count() or 1) // max(1, _workers))))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from safetydpo_core.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd15") / "model", kind="sd15", seed=0)


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    """The tiny SD1.5 through the diffusers backend, one per test module (a module may define its own)."""
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser

    return DiffusersDenoiser.from_pretrained(tiny_sd15)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from safetydpo_core.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "model", kind="sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred(tmp_path_factory) -> Path:
    from safetydpo_core.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_vpred") / "model", kind="sd15", seed=1,
                               prediction_type="v_prediction")


def make_dataset(root: Path, denoiser, n_per_category: int = 4, categories=("violence", "sexual"), seed: int = 0,
                 shard_size: int = 3) -> Path:
    """A small preference dataset with structured latents: safe = +pattern, unsafe = -pattern (+ noise)."""
    from safetydpo_core.data import PreferenceDatasetWriter

    g = torch.Generator().manual_seed(seed)
    c, h, w = denoiser.latent_shape(32, 32)
    with PreferenceDatasetWriter(root, model_fingerprint=denoiser.fingerprint(), shard_size=shard_size,
                                 previews=False, settings={"source": "test"}) as wr:
        for ci, cat in enumerate(categories):
            pattern = torch.randn(c, h, w, generator=g)
            for i in range(n_per_category):
                jitter = 0.1 * torch.randn(c, h, w, generator=g)
                wr.add(id=f"{cat}-{i}", category=[cat], concept=f"concept{ci}", unsafe=f"a photo of a {['cat', 'dog'][ci % 2]} at night",
                       safe=f"a photo of a {['cat', 'dog'][ci % 2]}", safe_latent=pattern + jitter,
                       unsafe_latent=-pattern + jitter, seed=i, height=32, width=32)
    return root


class GradCallHook:
    """Delegates to a denoiser; on its forward passes with gradients (the trainer's policy passes, the
    adversary's), ``hook(output, k)`` for the k-th one (from 1) gives the output, or raises."""

    def __init__(self, den, hook):
        self._den, self._hook, self._calls = den, hook, 0

    def __getattr__(self, name):
        return getattr(self._den, name)

    def predict(self, x_t, t, cond):
        out = self._den.predict(x_t, t, cond)
        if torch.is_grad_enabled():
            self._calls += 1
            return self._hook(out, self._calls)
        return out
