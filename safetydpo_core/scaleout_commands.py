"""``render``, ``sample``, ``eval`` and ``attack`` as a :class:`~.scaleout.Split`: each command's reader of finished items,
its share of the work (the command's own function, told which batches are this process's) and its join
into exactly the files one process writes.

* render: parts are preference datasets; the join adds their pairs to ``OUT`` in the order of the pair file
  through :class:`~.data.preference_dataset.PreferenceDatasetWriter` (same shards, manifest and header as one
  process), moves the previews and writes ``summary.json``.
* sample: parts are image runs; the join moves the images and writes ``manifest.jsonl`` and
  ``sample_state.json`` in the one-process order.
* attack: parts are attack folders (``p<rank>/run/``) of this process's prompt chunks; the join is
  :func:`~.attacks.runner.run_attack`'s own (records in chunk order, pictures, tensors, then the report).
* eval: parts hold ``per_image.jsonl`` (the per-picture verdicts, the expensive part); the join writes
  ``OUT/per_image.jsonl`` in the one-process order, and the main process then finishes the evaluation
  (preservation, FID/KID, reports) from it as a resumed one-process evaluation does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .scaleout import Split, ids_digest

if TYPE_CHECKING:
    from .denoiser.protocol import RenderingDenoiser

__all__ = ["open_split", "render_split", "sample_split", "eval_split"]


def open_split(args, what: str, out, ids: Sequence[str], skip_args: Sequence[str] = (),
               resume: bool | None = None) -> Split | None:
    """The command's split (None for a plain one-process run); sets ``args.device`` to this process's device.
    ``resume``: the command's ``--resume`` unless given (``attack`` always resumes)."""
    ignore = {"func", "_parser", "_argv", "resume", "overwrite", "device", "out", *skip_args}
    key = {k: v for k, v in sorted(vars(args).items()) if k not in ignore}
    split = Split.open(out, key={**key, "items": ids_digest(ids), "what": what}, what=what,
                       resume=args.resume if resume is None else resume,
                       overwrite=args.overwrite, device=getattr(args, "device", "auto") or "auto")
    if split is not None and split.device is not None and hasattr(args, "device"):
        args.device = split.device
    return split


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


# -- render ------------------------------------------------------------------------------------------------
def _render_done(root: Path) -> set[str]:
    from .data.preference_dataset import _read_manifest

    return {r.id for r in _read_manifest(root / "manifest.jsonl")[0]}


def render_split(split: Split, denoiser: RenderingDenoiser, pairs, out, settings, *, resume: bool, overwrite: bool,
                 judge=None, progress=None, previews: bool = True):
    """This process's share of ``render_pairs``, then (main process) the join. Returns the summary on the main
    process, None on the others."""
    from .data.render import render_pairs
    from .errors import DatasetError

    manifest = Path(out) / "manifest.jsonl"
    if manifest.exists() and manifest.stat().st_size and not (resume or overwrite):
        raise DatasetError(f"The dataset folder {out} already holds a dataset. Use --resume to continue it or "
                           f"--overwrite to replace it.")
    skip = split.gather(_render_done, also=[Path(out)] if resume else [])
    render_pairs(denoiser, pairs, split.part, settings, resume=True, judge=judge, progress=progress,
                 previews=previews, split=split, skip=skip)
    return split.finish(lambda parts: _join_render(parts, pairs, out, resume=resume, overwrite=overwrite,
                                                   previews=previews))


def _join_render(parts: list[Path], pairs, out, *, resume: bool, overwrite: bool, previews: bool):
    from .data.preference_dataset import PreferenceDatasetWriter, _read_manifest
    from .data.render import RenderSummary
    from .utils.atomic import atomic_write_text
    from safetensors import safe_open

    found: dict[str, tuple[Path, object]] = {}
    dropped: Counter = Counter()
    header: dict = {}
    for part in parts:
        for r in _read_manifest(part / "manifest.jsonl")[0]:
            found.setdefault(r.id, (part, r))
        if (part / "summary.json").exists():
            dropped.update(json.loads((part / "summary.json").read_text()).get("dropped", {}))
        if not header and (part / "dataset.json").exists():
            header = json.loads((part / "dataset.json").read_text())
    out = Path(out)
    if resume and (out / "summary.json").exists():
        dropped.update(json.loads((out / "summary.json").read_text()).get("dropped", {}))
    rendered = 0
    handle = (None, None)
    with PreferenceDatasetWriter(out, model_fingerprint=header.get("model_fingerprint", ""),
                                 settings=header.get("settings", {}), resume=resume, overwrite=overwrite,
                                 previews=previews) as writer:
        skipped = sum(1 for p in pairs if p.id in writer.done_ids)
        for p in pairs:
            if p.id in writer.done_ids or p.id not in found:
                continue
            part, r = found[p.id]
            if handle[0] != part / r.shard:  # one shard open at a time: memory bounded by one shard
                handle = (part / r.shard, safe_open(str(part / r.shard), framework="pt"))
            safe, unsafe = handle[1].get_tensor(f"{r.id}.safe"), handle[1].get_tensor(f"{r.id}.unsafe")
            extra = dict(r.extra)
            for rel in extra.get("previews", []) if previews else []:
                _move(part / rel, out / rel)
            writer.add(id=r.id, category=r.category, concept=r.concept, unsafe=r.unsafe, safe=r.safe,
                       safe_latent=safe, unsafe_latent=unsafe, seed=r.seed, height=r.height, width=r.width, **extra)
            rendered += 1
        writer.flush()
        per_cat = writer.per_category()
    summary = RenderSummary(out, rendered, skipped, dict(dropped), per_cat)
    atomic_write_text(out / "summary.json", json.dumps(summary.to_json(), indent=1) + "\n", "render summary")
    return summary


# -- sample ------------------------------------------------------------------------------------------------
def _run_records(root: Path) -> list:
    """The records of an image run's manifest, tolerating an empty or torn last line (a killed process)."""
    from .eval.manifest import MANIFEST, record_from_dict

    path = root / MANIFEST
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        rec = record_from_dict(d, f"{path}, line {i}")
        if (root / rec.file).is_file():
            out.append(rec)
    return out


def sample_split(split: Split, denoiser: RenderingDenoiser, prompts, out, settings, *, lora=None, lora_name=None,
                 strengths=(1.0,), resume: bool, overwrite: bool, model_name: str = "", progress=None):
    """This process's share of ``sample_prompts``, then (main process) the join."""
    from .sampling import sample_prompts

    skip = split.gather(lambda p: {(r.variant, r.id) for r in _run_records(p)}, also=[Path(out)] if resume else [])
    sample_prompts(denoiser, prompts, split.part, settings, lora=lora, lora_name=lora_name, strengths=strengths,
                   resume=True, model_name=model_name, progress=progress, split=split, skip=skip)
    return split.finish(lambda parts: _join_sample(parts, prompts, out, lora=lora, lora_name=lora_name,
                                                   strengths=strengths, resume=resume, overwrite=overwrite))


def _join_sample(parts: list[Path], prompts, out, *, lora, lora_name, strengths, resume: bool, overwrite: bool):
    from .eval.manifest import MANIFEST, write_manifest
    from .sampling import STATE, SampleSummary, _ordered, sample_strengths
    from .utils.atomic import atomic_write_text

    out = Path(out)
    strengths = sample_strengths(strengths, lora)
    if overwrite and not resume:
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / MANIFEST).unlink(missing_ok=True)
    records = _run_records(out) if resume else []
    have = {(r.variant, r.id) for r in records}
    skipped, written = len(records), 0
    state = None
    for part in parts:
        if state is None and (part / STATE).exists():
            state = (part / STATE).read_text(encoding="utf-8")
        for r in _run_records(part):
            if (r.variant, r.id) in have:
                continue
            _move(part / r.file, out / r.file)
            records.append(r)
            have.add((r.variant, r.id))
            written += 1
    out.mkdir(parents=True, exist_ok=True)
    if state is not None:
        atomic_write_text(out / STATE, state, "sample state")
    write_manifest(out, _ordered(records, prompts, strengths, lora, lora_name))
    return SampleSummary(out, written, skipped, dict(Counter(r.variant for r in records)))


# -- eval --------------------------------------------------------------------------------------------------
def _eval_lines(root: Path) -> dict[str, str]:
    """``_key`` -> the line of ``per_image.jsonl`` (a torn last line is left out: that picture is scored again)."""
    path = root / "per_image.jsonl"
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.setdefault(json.loads(line)["_key"], line)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def eval_split(split: Split, runs, evaluator, out, *, categories=None, resume: bool, progress=None) -> bool:
    """This process's share of the per-picture scoring, then (main process) the join into ``OUT/per_image.jsonl``.
    Returns True on the main process, which then finishes the evaluation with ``resume=True``."""
    from .eval.evaluate import _cache_key, evaluate_runs

    fp = evaluator.fingerprint()
    final = _eval_lines(Path(out)) if resume and _state_fp(Path(out)) == fp else {}
    skip = split.gather(lambda p: set(_eval_lines(p)))
    evaluate_runs(runs, evaluator, split.part, resume=True, categories=categories, progress=progress, split=split,
                  skip=skip | set(final))

    def join(parts: list[Path]) -> bool:
        from .utils.atomic import atomic_write_text

        lines = dict(final)
        new: dict[str, str] = {}
        for part in parts:
            for k, line in _eval_lines(part).items():
                new.setdefault(k, line)
        order = [_cache_key(run, rec) for run in runs for rec in run.records
                 if not categories or set(categories) & set(rec.categories)]
        text = "".join(line + "\n" for line in lines.values())
        text += "".join(new[k] + "\n" for k in order if k in new and k not in lines)
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "eval_state.json", json.dumps({"fingerprint": fp}) + "\n", "evaluation state")
        atomic_write_text(Path(out) / "per_image.jsonl", text, "per-image results")
        return True

    return bool(split.finish(join))


def _state_fp(out: Path) -> str | None:
    try:
        return json.loads((out / "eval_state.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None
