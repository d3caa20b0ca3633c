"""Prompt pairs of the concept world: an unsafe caption and its safe twin that differ in one word.

For each of the seven unsafe concepts, :func:`world_pairs` writes captions of that concept at balanced
colours and positions (and a random background), and the same caption with the concept word swapped for the
word of its safe twin at the same place in the twin's word list ("a red gun on the left" -> "a red wrench on
the left"). The ``train`` split uses only training templates and words; the ``held_out`` split always
uses at least one held-out template or word, so that evaluation can test paraphrases and synonyms the
experts never saw. The base model knows both.

Public API: :func:`world_pairs`, :func:`pair_scenes`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import ConfigError
from ..prompts.checks import change_fraction
from ..prompts.pairs import PromptPair
from .captions import caption_choices, compose
from .spec import WORLD, Scene


def world_pairs(n_per_concept: int = 32, *, seed: int = 0, split: str = "train",
                concepts: Iterable[str] | str | None = None, background: bool | None = None) -> list[PromptPair]:
    """``n_per_concept`` pairs for each requested concept (all seven by default).

    ``concepts`` may name concepts by id, word or category. Each pair's extra fields: ``colour``,
    ``position``, ``background``, ``shape`` (the unsafe concept), ``safe_shape`` (its twin), ``held_out``
    (whether the captions use a held-out template or word), ``split`` and ``seed`` (a render seed for the
    pair: render both prompts from it). Deterministic for ``seed``.
    """
    if not isinstance(n_per_concept, int) or n_per_concept <= 0:
        raise ConfigError(f"world_pairs needs a positive number of pairs per concept; got {n_per_concept!r}.")
    if concepts is None:
        kinds = list(WORLD.concepts)
    else:
        names = [c for c in concepts.split(",")] if isinstance(concepts, str) else list(concepts)
        kinds = list(dict.fromkeys(WORLD.concept(c) for c in names if str(c).strip()))
        if not kinds:
            raise ConfigError("world_pairs got an empty list of concepts.")
    colours, positions, backgrounds = WORLD.ids("colour"), WORLD.ids("position"), WORLD.ids("background")
    combos = [(c, p) for c in colours for p in positions]
    out: list[PromptPair] = []
    for k, kind in enumerate(kinds):
        cat_index = [o.id for o in WORLD.concepts].index(kind.id)
        rng = np.random.default_rng([seed, cat_index, {"train": 0, "held_out": 1, "all": 2}.get(split, 3)])
        order = rng.permutation(len(combos))
        for i in range(n_per_concept):
            colour, position = combos[order[i % len(combos)]]
            unsafe_scene = Scene(kind.id, colour, position, backgrounds[int(rng.integers(len(backgrounds)))])
            safe_scene = unsafe_scene.replace(shape=kind.twin)
            choices = caption_choices(unsafe_scene, rng=rng, split=split, background=background)
            unsafe, safe = compose(unsafe_scene, choices), compose(safe_scene, choices)
            out.append(PromptPair(
                id=f"world-{kind.id}-{split}-{seed}-{i:04d}", category=[kind.category], concept=kind.id,
                unsafe=unsafe, safe=safe, minimality=change_fraction(unsafe, safe), source="world",
                synonyms=list(kind.all_words),
                extra={"colour": colour, "position": position, "background": unsafe_scene.background,
                       "shape": kind.id, "safe_shape": kind.twin, "held_out": bool(choices["held_out"]),
                       "split": split, "seed": int(rng.integers(2 ** 31 - 1))}))
    return out


def pair_scenes(pair: PromptPair) -> tuple[Scene, Scene]:
    """The (unsafe, safe) scenes a world pair describes."""
    e = pair.extra
    try:
        unsafe = Scene(e["shape"], e["colour"], e["position"], e["background"])
    except KeyError as err:
        raise ConfigError(f"Prompt pair {pair.id!r} is not a world pair: it lacks the {err.args[0]!r} field.") from err
    return unsafe, unsafe.replace(shape=e.get("safe_shape") or WORLD.twin_of(unsafe.shape))
