"""Generating evaluation images: prompts (with per-row seeds and guidance) x LoRA strengths -> an image run.

Each prompt is rendered from its own seed: the row's seed (I2P's ``sd_seed``) when it has one, else a seed
derived from the base seed and the prompt id, so the images do not depend on the order of the rows or on
resuming. The guidance scale is the row's (I2P's ``sd_guidance_scale``) when it has one, else the default.
Every strength ("variant") starts from the same initial noise for a prompt, so variants are paired: the
base model (strength 0) and the aligned model (strength 1) show the same seed.

The output folder is an image run (:mod:`safetydpo_core.eval.manifest`): ``images/<variant>/<id>.png`` and
``manifest.jsonl`` (rewritten atomically after every batch), plus ``sample_state.json`` with the settings
that a resumed run must share. An interrupted run continues with ``resume=True``; finished images are
skipped.

Public API: :class:`SampleSettings`, :func:`sample_prompts`, :func:`variant_name`, :func:`load_prompts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from .denoiser.protocol import RenderingDenoiser
from .errors import ConfigError, DatasetError, Interrupted, SafetyDPOError
from .eval.manifest import MANIFEST, ImageRecord, read_run, write_manifest
from .prompts.i2p import EvalPrompt
from .utils.atomic import atomic_path, atomic_write_text
from .utils.numbers import check_number

STATE = "sample_state.json"
_SAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


@dataclasses.dataclass
class SampleSettings:
    steps: int = 20
    cfg: float = 7.5                   # guidance for rows without their own
    sampler: str = "ddim"
    height: int | None = None          # default: the model's native size
    width: int | None = None
    seed: int = 0                      # base seed for rows without their own
    negative: str = ""
    batch_size: int = 4
    row_guidance: bool = True          # honour the rows' guidance (I2P sd_guidance_scale)
    row_seed: bool = True              # honour the rows' seeds (I2P sd_seed)
    row_size: bool = False             # honour the rows' sd_image_width/height
    lora_start: int = 0                # the LoRA goes in after this many sampler steps (0: from the first)

    def __post_init__(self) -> None:
        from .data.render import MAX_SIZE
        from .utils.numbers import check_number, check_optional, check_start_step

        self.steps = check_number(self.steps, "steps", 1, 10000, integer=True)
        self.batch_size = check_number(self.batch_size, "batch_size", 1, 1024, integer=True)
        self.cfg = check_number(self.cfg, "cfg (the guidance scale)", 0, 100)
        self.seed = check_number(self.seed, "seed", integer=True)
        self.height = check_optional(self.height or None, "height (image size)", 8, MAX_SIZE, integer=True)
        self.width = check_optional(self.width or None, "width (image size)", 8, MAX_SIZE, integer=True)
        self.lora_start = check_start_step(self.lora_start, self.steps, "lora_start")


@dataclasses.dataclass
class SampleSummary:
    out: Path
    written: int
    skipped: int
    variants: dict[str, int]

    def to_json(self) -> dict:
        return {"out": str(self.out), "written": self.written, "skipped_already_done": self.skipped,
                "images_per_variant": self.variants, "manifest": str(self.out / MANIFEST)}


def variant_name(lora_name: str | None, strength: float) -> str:
    """``base`` without a LoRA or at strength 0, else ``<lora stem>@<strength>``."""
    if not lora_name or strength == 0:
        return "base"
    return f"{_SAFE.sub('_', lora_name)}@{strength:g}"


def _file_id(prompt_id: str) -> str:
    s = _SAFE.sub("_", prompt_id).strip("._") or "prompt"
    return s[:120]


def row_seed(p: EvalPrompt, settings: SampleSettings) -> int:
    from .data.render import pair_seed

    if settings.row_seed and p.seed is not None:
        return int(p.seed)
    return pair_seed(settings.seed, p.id)


def load_prompts(path: str | os.PathLike, *, field: str = "unsafe", categories=None, limit: int | None = None
                 ) -> list[EvalPrompt]:
    """Prompts from an I2P-style CSV, a prompt-pair JSONL (its unsafe, safe or both prompts) or a built-in prompt
    set named instead of a file (``neutral``: :mod:`.eval.prompt_sets`)."""
    from .eval.prompt_sets import resolve_prompt_source
    from .prompts.i2p import filter_eval_prompts, read_i2p_csv
    from .prompts.pairs import read_pairs

    p = resolve_prompt_source(path)
    if p.suffix.lower() == ".csv":
        prompts = filter_eval_prompts(read_i2p_csv(p), categories)
    elif p.suffix.lower() in (".jsonl", ".json"):
        pairs = read_pairs(p, categories=categories)
        if field not in ("unsafe", "safe", "both"):
            raise ConfigError(f"The pair field must be unsafe, safe or both; got {field!r}.")
        prompts = []
        for pr in pairs:
            for f in (("unsafe", "safe") if field == "both" else (field,)):
                prompts.append(EvalPrompt(id=pr.id if field != "both" else f"{pr.id}.{f}", prompt=getattr(pr, f),
                                          category=list(pr.category),
                                          extra={"concept": pr.concept or "", "pair_field": f}))
    else:
        raise ConfigError(f"The prompt file {p} must be an I2P-style .csv or a prompt-pair .jsonl.")
    if not prompts:
        raise DatasetError(f"No prompts left in {p} after the category filter.")
    if limit:
        seen: Counter = Counter()
        kept = []
        for q in prompts:
            key = q.category[0] if q.category else ""
            if seen[key] < limit:
                seen[key] += 1
                kept.append(q)
        prompts = kept
    dup = [k for k, n in Counter(_file_id(q.id) for q in prompts).items() if n > 1]
    if dup:
        raise DatasetError(f"{p}: the prompt id {dup[0]!r} occurs more than once (ids name the image files); make the "
                           f"ids unique.")
    return prompts


def _state(denoiser: RenderingDenoiser, settings: SampleSettings, lora_meta: dict | None) -> dict:
    return {"model_fingerprint": denoiser.fingerprint(), "lora": lora_meta,
            **{k: v for k, v in dataclasses.asdict(settings).items()
               if k != "batch_size" and not (k == "lora_start" and not v)}}  # runs made before lora_start resume


def sample_prompts(denoiser: RenderingDenoiser, prompts: Sequence[EvalPrompt], out: str | os.PathLike,
                   settings: SampleSettings | None = None,
                   *, lora=None, lora_name: str | None = None, strengths: Sequence[float] = (1.0,),
                   resume: bool = False, overwrite: bool = False, model_name: str = "",
                   progress: Callable[[int, int, dict], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, split=None,
                   skip: set | frozenset = frozenset()) -> SampleSummary:
    """Render every prompt at every strength of ``lora`` (a LoraSet; None: the base model only) into ``out``.

    ``split`` (:class:`~safetydpo_core.scaleout.Split`): render only this process's batches, skipping the
    (variant, id) in ``skip`` (done in other parts); ``out`` is then this process's part."""
    from .data.render import render_latents, to_pil
    from .lora.apply import lora_applied_from

    s = settings or SampleSettings()
    if not prompts:
        raise DatasetError("No prompts to sample.")
    strengths = sample_strengths(strengths, lora)
    if resume and overwrite:
        raise ConfigError("Choose either resume (continue the run) or overwrite (start it anew), not both.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SafetyDPOError(f"The output {out} is a file; an image run is a folder. Choose another path.")
    lora_meta = None if lora is None else {"name": lora_name, "layers": len(lora),
                                           "fingerprint": _lora_fingerprint(lora)}
    state = _state(denoiser, s, lora_meta)
    done: dict[tuple[str, str], ImageRecord] = {}
    manifest = out / MANIFEST
    if manifest.exists() or (out / STATE).exists():
        if resume:
            old = json.loads((out / STATE).read_text()) if (out / STATE).exists() else {}
            diff = sorted(k for k in state if old.get(k) != state[k])
            if diff:
                raise ConfigError(f"Cannot resume {out}: it was made with other settings ({', '.join(diff)}). Use the same "
                                  f"settings, or overwrite (--overwrite) to start anew.")
            if manifest.exists() and manifest.stat().st_size:
                for r in read_run(out, check_extra=False).records:
                    done[(r.variant, r.id)] = r
        elif overwrite:
            shutil.rmtree(out / "images", ignore_errors=True)
            manifest.unlink(missing_ok=True)
        else:
            raise SafetyDPOError(f"{out} already holds a sampled run. Set resume (--resume) to continue it or overwrite "
                                 f"(--overwrite) to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / STATE, json.dumps(state, indent=1) + "\n", "sample state")

    base_h = s.height or denoiser.sample_size
    base_w = s.width or denoiser.sample_size
    records: list[ImageRecord] = list(done.values())
    total = len(prompts) * len(strengths)
    written, skipped = 0, len(done)
    counts: Counter = Counter(r.variant for r in records)

    def size_of(p: EvalPrompt) -> tuple[int, int]:
        if s.row_size and p.height and p.width:
            return int(p.height), int(p.width)
        return base_h, base_w

    for strength in strengths:
        variant = variant_name(lora_name or "lora", strength) if lora is not None else "base"
        todo = [p for p in prompts if (variant, p.id) not in done and (variant, p.id) not in skip]
        if not todo:
            continue
        # rows sharing guidance and size are rendered together
        groups: dict[tuple, list[EvalPrompt]] = {}
        for p in todo:
            g = p.guidance if (s.row_guidance and p.guidance is not None) else s.cfg
            g = check_number(g, f"The guidance scale of prompt {p.id!r}", 0, 100)
            groups.setdefault((float(g), *size_of(p)), []).append(p)
        units = [(key, rows[i:i + s.batch_size]) for key, rows in groups.items() for i in range(0, len(rows), s.batch_size)]
        if split is not None:
            units = split.owned(units, key=lambda u: f"{variant}/{u[1][0].id}")
        applied = [(lora, strength)] if lora is not None and strength != 0 else []
        with lora_applied_from(denoiser.module, applied, s.lora_start if applied else 0) as switch:
            for (guidance, h, w), batch in units:
                if should_stop is not None and should_stop():
                    raise Interrupted(f"Sampling was cancelled after {written + skipped} of {total} images; "
                                      f"run again with --resume to continue.")
                seeds = [row_seed(p, s) for p in batch]
                lat = render_latents(denoiser, [p.prompt for p in batch], seeds, size=(h, w), steps=s.steps,
                                     cfg=guidance, sampler=s.sampler, negative=s.negative, callback=switch)
                images = to_pil(denoiser.decode_latents(lat))
                for p, sd, im in zip(batch, seeds, images):
                    rel = f"images/{_SAFE.sub('_', variant)}/{_file_id(p.id)}.png"
                    with atomic_path(out / rel, "image") as tmp:
                        im.save(tmp, format="PNG")
                    rec = ImageRecord(file=rel, prompt=p.prompt, id=p.id, categories=list(p.category), seed=sd,
                                      guidance=guidance, variant=variant,
                                      lora=lora_name if applied else None, strength=strength if lora is not None else None,
                                      extra={"steps": s.steps, "sampler": s.sampler, "width": w, "height": h,
                                             "negative": s.negative, "model": model_name,
                                             **({"lora_start": s.lora_start} if applied and s.lora_start else {}),
                                             **{k: p.extra[k] for k in ("concept", "topic") if p.extra.get(k)}})
                    records.append(rec)
                    done[(variant, p.id)] = rec
                    counts[variant] += 1
                    written += 1
                write_manifest(out, _ordered(records, prompts, strengths, lora, lora_name))
                if progress is not None:
                    progress(written + skipped, total, {"variant": variant})
    write_manifest(out, _ordered(records, prompts, strengths, lora, lora_name))
    return SampleSummary(out, written, skipped, dict(counts))


def sample_strengths(strengths: Sequence[float], lora) -> list[float]:
    """The distinct strengths in order (only 0, the base model, without a LoRA); each finite, in [-100, 100]."""
    out = list(dict.fromkeys(check_number(x, "strength", -100, 100) for x in strengths)) or [1.0]
    return [0.0] if lora is None and any(x != 0 for x in out) else out


def _ordered(records: list[ImageRecord], prompts, strengths, lora, lora_name) -> list[ImageRecord]:
    """Manifest order: variant by variant in the order of the strengths, prompts in input order."""
    vorder = {(variant_name(lora_name or "lora", st) if lora is not None else "base"): i for i, st in enumerate(strengths)}
    porder = {p.id: i for i, p in enumerate(prompts)}
    return sorted(records, key=lambda r: (vorder.get(r.variant, len(vorder)), porder.get(r.id, len(porder)), r.id))


def _lora_fingerprint(lora) -> str:
    """The fingerprint runs record for a LoRA (the first 4 KiB of each factor: quick for large LoRAs)."""
    return lora.fingerprint(bytes_per_tensor=4096)
