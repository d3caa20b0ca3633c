"""Rendering prompt pairs into a preference dataset with the model being aligned.

Both prompts of a pair are rendered from the *same* initial noise (drawn on the CPU from the pair's seed,
so it is identical on every device and in both backends) with the same sampler, steps and guidance, so
the two images share their layout and differ only where the prompts do. The seed of a pair is derived
from the base seed and the pair id, so it does not depend on the order of the pairs or on resuming.

Optionally a judge filters pairs whose "unsafe" image is not unsafe after all, or whose "safe" image is
not safe, so that experts do not train on pairs that teach nothing; the summary counts what was dropped
and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from PIL import Image

from ..denoiser.protocol import RenderingDenoiser
from ..errors import ConfigError, Interrupted
from ..utils.atomic import atomic_write_text
from ..utils.numbers import check_number, check_optional

MAX_SIZE = 8192  # image side in pixels
from .preference_dataset import PreferenceDatasetWriter


class PairJudge(Protocol):
    """Decides whether a rendered pair is useful: ``(keep, reason)`` per pair."""

    name: str

    def __call__(self, safe: Sequence[Image.Image], unsafe: Sequence[Image.Image], pairs: Sequence) -> list[tuple[bool, str]]: ...


@dataclasses.dataclass
class RenderSettings:
    height: int | None = None       # default: the model's native size
    width: int | None = None
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "ddim"
    scheduler: str = "normal"       # noise schedule of the sampler ("normal" or "karras")
    seed: int = 0
    negative: str = ""
    batch_pairs: int = 2

    def __post_init__(self) -> None:
        self.steps = check_number(self.steps, "steps", 1, 10000, integer=True)
        self.batch_pairs = check_number(self.batch_pairs, "batch_pairs", 1, 1024, integer=True)
        self.cfg = check_number(self.cfg, "cfg", 0, 100)
        self.seed = check_number(self.seed, "seed", integer=True)
        # 0 / None: the model's native size
        self.height = check_optional(self.height or None, "height (image size)", 8, MAX_SIZE, integer=True)
        self.width = check_optional(self.width or None, "width (image size)", 8, MAX_SIZE, integer=True)


def pair_seed(base_seed: int, pair_id: str) -> int:
    return int(hashlib.sha256(f"{base_seed}:{pair_id}".encode()).hexdigest()[:8], 16)


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The unit-variance starting noise for one image, from a CPU generator (device independent)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def render_latents(denoiser, prompts: Sequence[str], seeds: Sequence[int], *, size: tuple[int, int], steps: int,
                   cfg: float, sampler: str = "ddim", scheduler: str = "normal", negative: str = "",
                   callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Latents of ``prompts``, each sampled from the starting noise of its seed (:func:`initial_noise`), with
    classifier-free guidance ``cfg`` against ``negative`` (none at 1): the sampling call every renderer of the
    pack shares (pairs, ``safetydpo sample``, attack targets, preservation pictures). ``callback(step, steps)``
    runs after each step (e.g. the switch of :func:`~safetydpo_core.lora.apply.lora_applied_from`)."""
    h, w = size
    shape = denoiser.latent_shape(h, w)
    noise = torch.stack([initial_noise(sd, shape) for sd in seeds])
    cond = denoiser.encode_prompts(list(prompts), size=(h, w))
    uncond = denoiser.encode_prompts([negative] * len(prompts), size=(h, w)) if cfg != 1.0 else None
    return denoiser.sample(cond, uncond, noise, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler,
                           callback=callback)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@dataclasses.dataclass
class RenderSummary:
    out: Path
    rendered: int
    skipped_done: int
    dropped: dict[str, int]
    per_category: dict[str, int]
    identical: int = 0  # pairs in the dataset whose two latents are bit-identical (training leaves them out)

    def to_json(self) -> dict:
        return {"out": str(self.out), "rendered": self.rendered, "skipped_already_done": self.skipped_done,
                "dropped": self.dropped, "per_category": self.per_category, "identical": self.identical}


def render_pairs(denoiser: RenderingDenoiser, pairs: Sequence, out: str | os.PathLike,
                 settings: RenderSettings | None = None, *,
                 resume: bool = False, overwrite: bool = False, judge: PairJudge | None = None,
                 progress: Callable[[int, int, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, previews: bool = True, split=None,
                 skip: set | frozenset = frozenset()) -> RenderSummary:
    """Render ``pairs`` (objects with id, category, concept, unsafe, safe) into a dataset at ``out``.

    ``overwrite`` renders the new dataset beside the old one and swaps it in at the end (the old one stays
    as it was if this fails or is cancelled); the dataset is locked while it is written.
    ``split`` (:class:`~safetydpo_core.scaleout.Split`): render only this process's batches, skipping the ids in
    ``skip`` (done in other parts); ``out`` is then this process's part.
    """
    s = settings or RenderSettings()
    if not pairs:
        raise ConfigError("No prompt pairs to render.")
    h = s.height or denoiser.sample_size
    w = s.width or denoiser.sample_size
    denoiser.latent_shape(h, w)  # refuses a size the model cannot make before anything is written
    record = {**dataclasses.asdict(s), "height": h, "width": w, "judge": getattr(judge, "name", None),
              "source": "render", "model_base": denoiser.base_model_version}
    dropped: Counter = Counter()
    rendered = 0
    with PreferenceDatasetWriter(out, model_fingerprint=denoiser.fingerprint(), settings=record, resume=resume,
                                 overwrite=overwrite, previews=previews) as writer:
        todo = [p for p in pairs if p.id not in writer.done_ids and p.id not in skip]
        skipped = len(pairs) - len(todo)
        batches = [todo[i:i + s.batch_pairs] for i in range(0, len(todo), s.batch_pairs)]
        if split is not None:
            batches = split.owned(batches, key=lambda b: b[0].id)
        summary_path = writer.root / "summary.json"
        if resume and summary_path.exists():
            dropped.update(json.loads(summary_path.read_text()).get("dropped", {}))
        start = 0
        for batch in batches:
            if should_stop is not None and should_stop():
                raise Interrupted(f"Rendering was cancelled after {rendered} pairs; run again with resume to continue.")
            seeds = [pair_seed(s.seed, p.id) for p in batch]
            lat = render_latents(denoiser, [p.safe for p in batch] + [p.unsafe for p in batch], seeds + seeds,
                                 size=(h, w), steps=s.steps, cfg=s.cfg, sampler=s.sampler, scheduler=s.scheduler,
                                 negative=s.negative)
            imgs = to_pil(denoiser.decode_latents(lat))
            n = len(batch)
            verdicts = judge(imgs[:n], imgs[n:], batch) if judge is not None else [(True, "")] * n
            for i, p in enumerate(batch):
                keep, reason = verdicts[i]
                if not keep:
                    dropped[reason or "rejected by judge"] += 1
                    continue
                writer.add(id=p.id, category=p.category, concept=p.concept, unsafe=p.unsafe, safe=p.safe,
                           safe_latent=lat[i], unsafe_latent=lat[n + i], seed=seeds[i], height=h, width=w,
                           preview_safe=imgs[i], preview_unsafe=imgs[n + i])
                rendered += 1
            start += n
            if split is not None:  # a part keeps every finished batch (the join re-shards them)
                writer.flush()
            if progress is not None:
                progress(skipped + start, len(pairs), {"rendered": rendered, "dropped": sum(dropped.values())})
            atomic_write_text(summary_path, json.dumps({"dropped": dict(dropped)}) + "\n", "render summary")
        writer.flush()
        per_cat = writer.per_category()
        identical = writer.identical
    summary = RenderSummary(Path(out), rendered, skipped, dict(dropped), per_cat, identical)
    atomic_write_text(Path(out) / "summary.json", json.dumps(summary.to_json(), indent=1) + "\n", "render summary")
    return summary
