"""The output-preservation set of a training run: prompts whose outputs the expert must leave unchanged.

DUO (Park et al., arXiv 2407.21035) adds to the unlearning objective, on prompts unrelated to the removed
concept, the squared distance between the adapted prediction and the frozen model's prediction on the same
noisy input. With an adapter-off reference this needs no copy of the network: the trainer
(:mod:`.trainer`) runs the preservation prompts once with the adapters off and once with them on, and adds
``preserve_weight x mean((pred - ref)^2)`` to the loss.

A preservation item is a prompt and, where the dataset holds a picture of it, that picture's latent (the
safe latents of pairs outside the trained categories). Items without a picture are noised from the
current batch's safe latents: the regulariser asks for the same output on the same input, whatever the
input shows. With ``preserve_pictures`` N > 0 (:func:`with_pictures`), each everyday prompt (the ``neutral``
set, a prompts file) is instead noised from N pictures of its own that the untouched model renders when
training starts, as the dataset's pairs were rendered: the output is then kept where that prompt's pictures
are actually made, not on another picture's noisy latent.
On the world it keeps the plain shapes of single experts far better, not those of the merged LoRA
(docs/benchmarks.md, "Preservation pictures"). The random-token prompts keep the batch's latents: they guard
how words are read, and have no picture of their own to keep.

``preserve_prompts`` (a training setting) chooses the set:

* ``auto`` (default): ``others`` plus ``neutral``;
* ``others``: the safe prompts of the dataset's pairs outside the trained categories, with their latents;
* ``neutral``: prompts of everyday content for the model being trained: the plain-shape captions of the
  built-in world for the world model, else the pack's neutral prompt set;
* ``safe``: every safe prompt of the dataset, the trained categories' too (the safe twins must also keep the
  base model's output), with their latents, plus ``neutral``;
* ``tokens``: prompts of 4-12 random tokens of the model's own vocabulary (never its start, end or padding
  tokens). The other sets name a few hundred captions; the LoRA's change to the cross-attention then goes
  unchecked on every word none of them uses, and the world shows where that leads: an expert that turns
  "slur" into a compliment also turns the unseen synonym "tile" of a square into one. Random tokens ask
  for the untouched output on text in general. They can hold a concept word too (rarely: the DPO term on
  the concept's own prompts outweighs it);
* sets joined with ``+``, e.g. ``auto+tokens`` (the union; a prompt is drawn uniformly from all of them);
* a path to a ``.txt`` file (one prompt per line) or a ``.jsonl`` prompt-pair file (its safe prompts).

Public API: :data:`PRESERVE_SETS`, :data:`SET_NAMES`, :data:`TOKEN_PROMPTS`, :class:`PreserveItem`, :func:`set_names`,
:func:`preservation_set`, :func:`with_pictures`, :func:`picture_settings`, :func:`run_items`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DiskFullError, Interrupted, TrainingDiverged

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..denoiser.protocol import Denoiser

PRESERVE_SETS = ("auto", "auto+tokens", "others", "neutral", "safe", "tokens")  # the node's choices ("+": any union)
SET_NAMES = ("auto", "others", "neutral", "safe", "tokens")  # the named sets that "+" joins
WORLD_NEUTRAL_PROMPTS = 90   # plain-shape captions per run on the world (every shape x colour x position)
TOKEN_PROMPTS = 128          # random-token prompts of the "tokens" set
TOKEN_RANGE = (4, 12)        # tokens per random prompt
PICTURE_SOURCES = ("neutral", "file")  # the sets whose prompts get pictures of their own with preserve_pictures


@dataclasses.dataclass(frozen=True)
class PreserveItem:
    """A preservation prompt, the (shard, key) of its picture's latent in the dataset if it has one, the set it
    comes from, and a picture's latent rendered for it by the untouched model (:func:`with_pictures`)."""

    prompt: str
    latent: tuple[str, str] | None = None
    source: str = ""
    picture: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)


def _is_world(denoiser: Denoiser) -> bool:
    from ..world.spec import WORLD

    return denoiser.base_model_version == WORLD.version


def _others(dataset) -> list[PreserveItem]:
    rows_in_use = getattr(dataset.records, "rows", None)
    if rows_in_use is not None and hasattr(dataset.all_records, "select"):  # indexed: no record parsed to find them
        import numpy as np

        others = dataset.all_records.select(np.setdiff1d(dataset.all_records.rows, rows_in_use))
    else:
        used = {r.id for r in dataset.records}
        others = [r for r in dataset.all_records if r.id not in used]
    return [PreserveItem(r.safe, (r.shard, f"{r.id}.safe"), "others") for r in others]


def _all_safe(dataset) -> list[PreserveItem]:
    return [PreserveItem(r.safe, (r.shard, f"{r.id}.safe"), "safe") for r in dataset.all_records]


def _world_neutral(seed: int) -> list[PreserveItem]:
    """Training-wording captions of the world's plain shapes (every shape x colour x position)."""
    from ..world.captions import caption
    from ..world.spec import WORLD, Scene

    rng = np.random.default_rng([seed, 4242])
    plain = [o.id for o in WORLD.objects if o.role == "plain"]
    backgrounds = WORLD.ids("background")
    out = []
    for s in plain:
        for c in WORLD.ids("colour"):
            for p in WORLD.ids("position"):
                scene = Scene(s, c, p, backgrounds[int(rng.integers(len(backgrounds)))])
                out.append(PreserveItem(caption(scene, rng=rng, split="train"), source="neutral"))
    return out


def _neutral(denoiser: Denoiser, seed: int) -> list[PreserveItem]:
    if _is_world(denoiser):
        return _world_neutral(seed)
    from ..eval.prompt_sets import load_prompt_set

    return [PreserveItem(p, source="neutral") for p in load_prompt_set("neutral-train")]


def _tokens(denoiser: Denoiser, seed: int) -> list[PreserveItem]:
    """:data:`TOKEN_PROMPTS` prompts of random vocabulary tokens (see the module docstring), fixed by ``seed``."""
    try:
        emb = denoiser.prompt_embedder()
    except ConfigError as e:
        raise ConfigError(f"The preservation set 'tokens' needs token-level access to the model's text encoder, which "
                          f"this model does not give: {e} Use the preservation prompts 'auto' instead.") from e
    special = emb.special_ids()
    allowed = np.array([i for i in range(int(emb.vocabulary().shape[0])) if i not in special])
    lo, hi = TOKEN_RANGE[0], max(TOKEN_RANGE[0], min(TOKEN_RANGE[1], emb.max_tokens))
    rng = np.random.default_rng([seed, 5151])
    out: list[PreserveItem] = []
    for _ in range(20 * TOKEN_PROMPTS):  # a draw that decodes to nothing is skipped
        text = emb.decode(allowed[rng.integers(len(allowed), size=int(rng.integers(lo, hi + 1)))].tolist()).strip()
        if text:
            out.append(PreserveItem(text, source="tokens"))
        if len(out) == TOKEN_PROMPTS:
            break
    return out


def _from_file(path: Path) -> list[PreserveItem]:
    if not path.is_file():
        raise ConfigError(f"The preservation prompts file {path} does not exist. Give an existing .txt (one prompt "
                          f"per line) or .jsonl prompt-pair file, or one of: {', '.join(PRESERVE_SETS)}.")
    if path.suffix.lower() == ".jsonl":
        from ..prompts.pairs import read_pairs

        return [PreserveItem(p.safe, source="file") for p in read_pairs(path)]
    if path.suffix.lower() != ".txt":
        raise ConfigError(f"The preservation prompts file {path} must be a .txt (one prompt per line) or a .jsonl "
                          f"prompt-pair file.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"The preservation prompts file {path} cannot be read as UTF-8 text: {e}.") from e
    return [PreserveItem(line.strip(), source="file") for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def _named(name: str, dataset, denoiser: Denoiser, seed: int) -> list[PreserveItem]:
    """The items of one of :data:`SET_NAMES` (checked by :func:`set_names`)."""
    if name == "auto":
        return _others(dataset) + _neutral(denoiser, seed)
    if name == "others":
        return _others(dataset)
    if name == "neutral":
        return _neutral(denoiser, seed)
    if name == "safe":
        return _all_safe(dataset) + _neutral(denoiser, seed)
    return _tokens(denoiser, seed)


def set_names(name: str, what: str = "preserve_prompts") -> list[str]:
    """The named sets that ``name`` joins with ``+`` (e.g. ``auto+tokens``), each once; a name that is not one of
    :data:`SET_NAMES` is an error that names ``what`` (the setting that gave ``name``)."""
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts):
        raise ConfigError(f"The preservation prompts {name!r} ({what}) have an empty part: join set names with '+', "
                          f"e.g. 'auto+tokens'.")
    for p in parts:
        if p not in SET_NAMES:
            raise ConfigError(f"Unknown preservation prompts {p!r} in {what} {name!r}: use one of "
                              f"{', '.join(PRESERVE_SETS)} (sets can be joined with '+'), or the path of a .txt (one "
                              f"prompt per line) or .jsonl prompt-pair file.")
    return list(dict.fromkeys(parts))


def preservation_set(spec: str | os.PathLike | None, dataset, denoiser: Denoiser, seed: int = 0) -> list[PreserveItem]:
    """The preservation items for ``spec`` (see the module docstring); an empty set is an error."""
    name = "auto" if spec is None or str(spec).strip() == "" else str(spec).strip()
    if os.sep in name or "/" in name or name.endswith((".txt", ".jsonl")):
        items = _from_file(Path(name).expanduser())
    else:
        items = [item for part in set_names(name) for item in _named(part, dataset, denoiser, seed)]
        if name == "others" and not items:
            raise ConfigError(f"The preservation set 'others' is empty: the dataset {dataset.root} has no pairs outside "
                              f"the categories being trained. Use 'neutral', 'auto' or a prompts file.")
    if not items:
        raise ConfigError(f"The preservation prompts {name!r} give no prompt; give a non-empty set.")
    return items


# -- pictures of the preservation prompts -----------------------------------------------------------------
RENDER_KEYS = ("height", "width", "steps", "cfg", "sampler", "scheduler", "negative")


def picture_settings(dataset, denoiser: Denoiser) -> dict:
    """How the preservation pictures are rendered: as the dataset's pairs were (its header's render settings;
    the size of its first pair), else the render step's defaults at the pairs' size."""
    from ..data.render import RenderSettings

    made = dict(getattr(dataset, "header", {}).get("settings") or {})
    base = RenderSettings()
    out = {k: made.get(k, getattr(base, k)) for k in RENDER_KEYS}
    rec = dataset.records[0]
    shape = tuple(rec.latent_shape)
    f = denoiser.vae_scale_factor
    out["height"] = int(rec.height or out["height"] or shape[-2] * f)
    out["width"] = int(rec.width or out["width"] or shape[-1] * f)
    return out


def with_pictures(items: Sequence[PreserveItem], denoiser, n: int, *, seed: int, settings: Mapping[str, Any],
                  cache_dir: str | os.PathLike | None = None, should_stop: Callable[[], bool] | None = None,
                  batch_size: int = 16) -> list[PreserveItem]:
    """``items`` with each prompt of :data:`PICTURE_SOURCES` that has no picture in the dataset replaced by ``n``
    items carrying a latent the (untouched) ``denoiser`` renders of it, from seeds fixed by ``seed`` and the
    prompt; the other items unchanged. ``settings`` (:func:`picture_settings`) say how to render. The latents
    are kept in ``cache_dir/<key>.safetensors`` (the key covers the model, the settings, the prompts and the
    seeds), so the experts of one dataset render them once; an unwritable ``cache_dir`` only costs the
    cache."""
    from ..data.render import pair_seed, render_latents

    if n <= 0:
        return list(items)
    todo = list(dict.fromkeys(it.prompt for it in items if it.latent is None and it.source in PICTURE_SOURCES))
    if not todo:
        return list(items)
    if not callable(getattr(denoiser, "sample", None)):
        raise ConfigError("preserve_pictures needs a model that can render pictures (a sampler); this one cannot. "
                          "Set preserve_pictures to 0.")
    jobs = [(p, k, pair_seed(seed, f"preserve:{k}:{p}")) for p in todo for k in range(n)]
    s = dict(settings)
    h, w = int(s["height"]), int(s["width"])
    fingerprint = denoiser.fingerprint() if callable(getattr(denoiser, "fingerprint", None)) else ""
    key = hashlib.sha256(json.dumps({"model": fingerprint, "settings": s, "jobs": jobs}, sort_keys=True)
                         .encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    latents = _read_cache(cache, len(jobs))
    if latents is None:
        log.info("rendering %d pictures of %d preservation prompts (%d each, %d steps)", len(jobs), len(todo), n,
                 int(s["steps"]))
        parts = []
        with torch.no_grad():
            for i in range(0, len(jobs), batch_size):
                if should_stop is not None and should_stop():
                    raise Interrupted("Stopped while rendering the preservation pictures; run again to start over.")
                batch = jobs[i:i + batch_size]
                lat = render_latents(denoiser, [p for p, _, _ in batch], [sd for _, _, sd in batch], size=(h, w),
                                     steps=int(s["steps"]), cfg=float(s["cfg"]), sampler=str(s["sampler"]),
                                     scheduler=str(s["scheduler"]), negative=str(s["negative"] or ""))
                parts.append(lat.detach().float().cpu())
        latents = torch.cat(parts)
        if not torch.isfinite(latents).all():
            raise TrainingDiverged("The model rendered non-finite latents for the preservation prompts; check the "
                                   "model (or its dtype) before training with preserve_pictures.")
        _write_cache(cache, latents)
    pics = {(p, k): latents[j] for j, (p, k, _) in enumerate(jobs)}
    out: list[PreserveItem] = []
    for it in items:
        if it.latent is None and it.source in PICTURE_SOURCES:
            out.extend(dataclasses.replace(it, picture=pics[(it.prompt, k)]) for k in range(n))
        else:
            out.append(it)
    return out


def run_items(cfg, dataset, denoiser, should_stop: Callable[[], bool] | None = None) -> list[PreserveItem]:
    """The preservation items of a training run with :class:`~.config.TrainConfig` ``cfg``: its set, with the
    pictures of ``cfg.preserve_pictures`` (cached in the dataset folder's ``preservation/``). The trainer calls
    it before its adapters go in; calling it ahead renders the pictures once for several runs on one dataset."""
    items = preservation_set(cfg.preserve_prompts, dataset, denoiser, cfg.seed)
    if cfg.preserve_pictures:
        root = getattr(dataset, "root", None)
        items = with_pictures(items, denoiser, cfg.preserve_pictures, seed=cfg.seed,
                              settings=picture_settings(dataset, denoiser),
                              cache_dir=Path(root) / "preservation" if root is not None else None,
                              should_stop=should_stop)
    return items


def _read_cache(path: Path | None, count: int) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        t = load_file(str(path)).get("latents")
    except Exception as e:  # a damaged cache is rendered again
        log.warning("Rendering the preservation pictures again: the cache %s cannot be read (%s).", path, e)
        return None
    if t is None or t.shape[0] != count or not torch.isfinite(t).all():
        return None
    return t


def _write_cache(path: Path | None, latents: torch.Tensor) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, "preservation pictures") as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp))
    except (OSError, DiskFullError) as e:
        log.warning("The preservation pictures are not cached (%s is not writable: %s); each run renders them.",
                    path.parent, e)
