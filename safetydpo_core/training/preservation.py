"""The output-preservation set of a training run: prompts whose outputs the expert must leave unchanged.

DUO (Park et al., arXiv 2407.21035) adds to the unlearning objective, on prompts unrelated to the removed
concept, the squared distance between the adapted prediction and the frozen model's prediction on the same
noisy input. With an adapter-off reference this needs no copy of the network: the trainer
(:mod:`.trainer`) runs the preservation prompts once with the adapters off and once with them on, and adds
``preserve_weight x mean((pred - ref)^2)`` to the loss.

A preservation item is a prompt and, where the dataset holds a picture of it, that picture's latent (the
safe latents of pairs outside the trained categories). Items without a picture are noised from the
current batch's safe latents: the regulariser asks for the same output on the same input, whatever the
input shows.

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

Public API: :data:`PRESERVE_SETS`, :data:`TOKEN_PROMPTS`, :class:`PreserveItem`, :func:`preservation_set`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..denoiser.protocol import Denoiser

PRESERVE_SETS = ("auto", "auto+tokens", "others", "neutral", "safe", "tokens")  # the node's choices ("+": any union)
WORLD_NEUTRAL_PROMPTS = 90   # plain-shape captions per run on the world (every shape x colour x position)
TOKEN_PROMPTS = 128          # random-token prompts of the "tokens" set
TOKEN_RANGE = (4, 12)        # tokens per random prompt


@dataclasses.dataclass(frozen=True)
class PreserveItem:
    """A preservation prompt and the (shard, key) of its picture's latent in the dataset, if it has one."""

    prompt: str
    latent: tuple[str, str] | None = None


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
    return [PreserveItem(r.safe, (r.shard, f"{r.id}.safe")) for r in others]


def _all_safe(dataset) -> list[PreserveItem]:
    return [PreserveItem(r.safe, (r.shard, f"{r.id}.safe")) for r in dataset.all_records]


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
                out.append(PreserveItem(caption(scene, rng=rng, split="train")))
    return out


def _neutral(denoiser: Denoiser, seed: int) -> list[PreserveItem]:
    if _is_world(denoiser):
        return _world_neutral(seed)
    from ..eval.prompt_sets import load_prompt_set

    return [PreserveItem(p) for p in load_prompt_set("neutral-train")]


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
            out.append(PreserveItem(text))
        if len(out) == TOKEN_PROMPTS:
            break
    return out


def _from_file(path: Path) -> list[PreserveItem]:
    if not path.is_file():
        raise ConfigError(f"The preservation prompts file {path} does not exist. Give an existing .txt (one prompt "
                          f"per line) or .jsonl prompt-pair file, or one of: {', '.join(PRESERVE_SETS)}.")
    if path.suffix.lower() == ".jsonl":
        from ..prompts.pairs import read_pairs

        return [PreserveItem(p.safe) for p in read_pairs(path)]
    if path.suffix.lower() != ".txt":
        raise ConfigError(f"The preservation prompts file {path} must be a .txt (one prompt per line) or a .jsonl "
                          f"prompt-pair file.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"The preservation prompts file {path} cannot be read as UTF-8 text: {e}.") from e
    return [PreserveItem(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _named(name: str, dataset, denoiser: Denoiser, seed: int) -> list[PreserveItem]:
    if name == "auto":
        return _others(dataset) + _neutral(denoiser, seed)
    if name == "others":
        return _others(dataset)
    if name == "neutral":
        return _neutral(denoiser, seed)
    if name == "safe":
        return _all_safe(dataset) + _neutral(denoiser, seed)
    if name == "tokens":
        return _tokens(denoiser, seed)
    raise ConfigError(f"Unknown preservation prompts {name!r}: use one of {', '.join(PRESERVE_SETS)} (sets can be joined "
                      f"with '+'), or the path of a .txt (one prompt per line) or .jsonl prompt-pair file.")


def preservation_set(spec: str | os.PathLike | None, dataset, denoiser: Denoiser, seed: int = 0) -> list[PreserveItem]:
    """The preservation items for ``spec`` (see the module docstring); an empty set is an error."""
    name = "auto" if spec is None or str(spec).strip() == "" else str(spec).strip()
    if os.sep in name or "/" in name or name.endswith((".txt", ".jsonl")):
        items = _from_file(Path(name).expanduser())
    else:
        parts = [p.strip() for p in name.split("+")]
        if any(not p for p in parts):
            raise ConfigError(f"The preservation prompts {name!r} have an empty part: join set names with '+', "
                              f"e.g. 'auto+tokens'.")
        items = [item for part in dict.fromkeys(parts) for item in _named(part, dataset, denoiser, seed)]
        if name == "others" and not items:
            raise ConfigError(f"The preservation set 'others' is empty: the dataset {dataset.root} has no pairs outside "
                              f"the categories being trained. Use 'neutral', 'auto' or a prompts file.")
    if not items:
        raise ConfigError(f"The preservation prompts {name!r} give no prompt; give a non-empty set.")
    return items
