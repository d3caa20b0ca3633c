"""Captions of the concept world: templates, synonyms and paraphrases, and a parser back to attributes.

A caption is composed from choices: a template, one word for the object kind, one for the colour, one
phrase for the position and one word for the background. Words and templates come in two splits: the
training split (what the SafetyDPO experts are trained on) and the held-out split (paraphrases and synonyms
that only evaluation uses). The base model was trained on both, so it understands held-out captions.

Public API: :func:`caption`, :func:`caption_choices`, :func:`compose`, :func:`parse_caption`,
:func:`training_caption` (with attributes sometimes left out, for training the base model),
:data:`TRAIN_TEMPLATES`, :data:`HELD_OUT_TEMPLATES`.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ..errors import ConfigError
from .spec import WORLD, Scene

TRAIN_TEMPLATES = (
    "a {c} {s} {p}",
    "a {c} {s} {p} on a {b} background",
    "{p} there is a {c} {s}",
    "a picture of a {c} {s} {p}",
    "a {c} {s} {p}, {b} background",
)
HELD_OUT_TEMPLATES = (
    "an image showing a {c} {s} {p} against a {b} backdrop",
    "a drawing of a {c} {s} placed {p}",
)
TEMPLATE_WORDS = tuple(dict.fromkeys(w for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES
                                     for w in re.findall(r"[a-z]+", t.replace("{c}", "").replace("{s}", "")
                                                         .replace("{p}", "").replace("{b}", ""))))
SPLITS = ("train", "held_out", "all")
_ATTRS = (("s", "shape"), ("c", "colour"), ("p", "position"), ("b", "background"))


def _rng(seed: int | None, rng: np.random.Generator | None) -> np.random.Generator:
    if rng is not None:
        return rng
    return np.random.default_rng(seed)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def caption_choices(scene: Scene | Mapping, *, seed: int | None = None, rng: np.random.Generator | None = None,
                    split: str = "train", background: bool | None = None) -> dict:
    """Random choices for a caption of ``scene``: template and the word used for each attribute.

    ``split="train"`` uses only training templates and words; ``"held_out"`` uses at least one held-out
    template or word (the others random from all); ``"all"`` draws from both. ``background`` forces a
    template with (True) or without (False) the background; None lets the template decide.
    Words are returned as ``(attribute, index into all_words)`` so that a twin can reuse the index.
    """
    if split not in SPLITS:
        raise ConfigError(f"Unknown caption split {split!r}; use one of {', '.join(SPLITS)}.")
    scene = Scene.from_value(scene)
    r = _rng(seed, rng)
    held_slot = None
    if split == "held_out":
        held_slot = _pick(r, ("template", "s", "c", "p", "b") if background is not False else ("template", "s", "c", "p"))

    def template_pool(held: bool | None):
        pool = {True: HELD_OUT_TEMPLATES, False: TRAIN_TEMPLATES, None: TRAIN_TEMPLATES + HELD_OUT_TEMPLATES}[held]
        if background is not None:
            pool = tuple(t for t in pool if ("{b}" in t) == background) or pool
        return pool

    if split == "train":
        template = _pick(r, template_pool(False))
    elif held_slot == "template":
        template = _pick(r, template_pool(True))
    else:
        template = _pick(r, template_pool(None))
    if held_slot == "b" and "{b}" not in template:
        template = _pick(r, tuple(t for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES if "{b}" in t))
    out = {"template": template}
    for key, attr in _ATTRS:
        value = WORLD.get(attr, getattr(scene, attr))
        n_train = len(value.words)
        if split == "train":
            idx = int(r.integers(n_train))
        elif held_slot == key:
            idx = n_train + int(r.integers(len(value.held_out_words)))
        else:
            idx = int(r.integers(len(value.all_words)))
        out[key] = idx
    out["held_out"] = is_held_out(out, scene)
    return out


def is_held_out(choices: Mapping, scene: Scene) -> bool:
    """True when a caption uses a held-out template or any held-out word."""
    if choices["template"] in HELD_OUT_TEMPLATES:
        return True
    for key, attr in _ATTRS:
        if key in choices and choices[key] is not None and ("{%s}" % key) in choices["template"]:
            if choices[key] >= len(WORLD.get(attr, getattr(scene, attr)).words):
                return True
    return False


def compose(scene: Scene | Mapping, choices: Mapping, *, omit: tuple[str, ...] = ()) -> str:
    """The caption text for ``scene`` under ``choices`` (from :func:`caption_choices`).

    ``omit`` may name ``colour`` and/or ``position`` to leave them out of the sentence.
    """
    scene = Scene.from_value(scene)
    words = {}
    for key, attr in _ATTRS:
        value = WORLD.get(attr, getattr(scene, attr))
        idx = int(choices[key]) % len(value.all_words)
        words[key] = "" if attr in omit else value.all_words[idx]
    text = choices["template"].format(**words)
    text = re.sub(r"\s+", " ", text).strip().replace(" ,", ",")
    text = re.sub(r"\bplaced$", "", text).strip()
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(scene: Scene | Mapping, *, seed: int | None = None, rng: np.random.Generator | None = None,
            split: str = "train", background: bool | None = None) -> str:
    """A random caption of ``scene`` from the given split (see :func:`caption_choices`)."""
    return compose(scene, caption_choices(scene, seed=seed, rng=rng, split=split, background=background))


def training_caption(scene: Scene | Mapping, rng: np.random.Generator, *, p_empty: float = 0.1,
                     p_omit_colour: float = 0.08, p_omit_position: float = 0.08) -> str:
    """A caption for training the base model: any template and word, sometimes with the colour or the
    position left out, and with probability ``p_empty`` the empty caption (for classifier-free guidance)."""
    if r_float(rng) < p_empty:
        return ""
    ch = caption_choices(scene, rng=rng, split="all")
    omit = []
    if r_float(rng) < p_omit_colour:
        omit.append("colour")
    if r_float(rng) < p_omit_position:
        omit.append("position")
    return compose(scene, ch, omit=tuple(omit))


def r_float(rng: np.random.Generator) -> float:
    return float(rng.random())


def _phrase_table() -> list[tuple[str, str, str]]:
    rows = []
    for attr in ("shape", "colour", "position", "background"):
        for vid in WORLD.ids(attr):
            for phrase in WORLD.get(attr, vid).all_words:
                rows.append((phrase, attr, vid))
    rows.sort(key=lambda r: -len(r[0]))
    return rows


_TABLE = _phrase_table()


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption asks for: ``{"shape", "colour", "position", "background"}`` -> id or None.

    Longest phrases win (``on the left side`` before ``on the left``). A caption naming two different
    values of one attribute raises a :class:`ConfigError`.
    """
    if not isinstance(text, str):
        raise ConfigError(f"A world caption must be a string; got {type(text).__name__}.")
    s = " " + re.sub(r"[^a-z]+", " ", text.lower()).strip() + " "
    found: dict[str, str | None] = {"shape": None, "colour": None, "position": None, "background": None}
    for phrase, attr, vid in _TABLE:
        pat = " " + phrase + " "
        while pat in s:
            if found[attr] is not None and found[attr] != vid:
                raise ConfigError(f"The caption {text!r} names two {attr}s ({found[attr]} and {vid}); "
                                  f"world captions describe one object.")
            found[attr] = vid
            s = s.replace(pat, " | ", 1)
    return found
