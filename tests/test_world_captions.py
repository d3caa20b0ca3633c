"""Captions, the caption parser, the tokenizer's vocabulary and the world's prompt pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safetydpo_core.errors import ConfigError
from safetydpo_core.prompts.checks import find_terms
from safetydpo_core.prompts.pairs import PromptPair
from safetydpo_core.world import WORLD, Scene, caption, parse_caption, world_pairs
from safetydpo_core.world.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, caption_choices, compose, training_caption
from safetydpo_core.world.dataset import random_scenes, scene_of


def _held_out_words() -> set[str]:
    out = set()
    for attr in ("shape", "colour", "position", "background"):
        for vid in WORLD.ids(attr):
            out.update(WORLD.get(attr, vid).held_out_words)
    return out


def _contains_phrase(text: str, phrase: str) -> bool:
    return f" {phrase} " in " " + text.replace(",", " ") + " "


@pytest.mark.parametrize("split", ["train", "held_out", "all"])
def test_parsing_a_caption_gives_back_its_scene(split):
    rng = np.random.default_rng(1)
    for row in random_scenes(300, seed=5):
        scene = scene_of(row)
        text = caption(scene, rng=rng, split=split)
        got = parse_caption(text)
        assert (got["shape"], got["colour"], got["position"]) == (scene.shape, scene.colour, scene.position), text
        assert got["background"] in (None, scene.background), text


def test_train_captions_use_no_held_out_wording_and_held_out_captions_always_do():
    held = _held_out_words()
    rng = np.random.default_rng(2)
    for row in random_scenes(300, seed=6):
        scene = scene_of(row)
        ch = caption_choices(scene, rng=rng, split="train")
        text = compose(scene, ch)
        assert not ch["held_out"] and ch["template"] in TRAIN_TEMPLATES
        # a held-out position phrase may contain a training phrase ("on the left side"), so look at longest matches
        assert not any(_contains_phrase(text, w) for w in held if len(w.split()) == 1), text
        ch = caption_choices(scene, rng=rng, split="held_out")
        text = compose(scene, ch)
        assert ch["held_out"]
        assert ch["template"] in HELD_OUT_TEMPLATES or any(_contains_phrase(text, w) for w in held), text


def test_training_captions_sometimes_leave_attributes_out():
    rng = np.random.default_rng(3)
    scene = Scene("gore", "purple", "top", "gray")
    caps = [training_caption(scene, rng) for _ in range(400)]
    parsed = [parse_caption(c) for c in caps if c]
    assert 20 < caps.count("") < 70  # about 10% empty captions for classifier-free guidance
    assert all(p["shape"] == "gore" for p in parsed)
    assert any(p["colour"] is None for p in parsed) and any(p["position"] is None for p in parsed)
    assert sum(p["colour"] == "purple" for p in parsed) > 0.8 * len(parsed)


def test_articles_follow_the_next_word():
    assert caption(Scene("outfit", "green", "top", "gray"), seed=0, split="train").count(" a e") == 0
    scene = Scene("circle", "red", "left", "white")
    ch = {"template": TRAIN_TEMPLATES[0], "s": 2, "c": 0, "p": 0, "b": 0}  # "orb" is a held-out word of circle
    assert compose(scene, ch) == "a red orb on the left"
    assert compose(scene.replace(colour="blue"), dict(ch, c=1)) == "an azure orb on the left"


def test_parser_refuses_two_values_of_one_attribute_and_non_strings():
    with pytest.raises(ConfigError, match="two colours"):
        parse_caption("a red blue circle")
    with pytest.raises(ConfigError, match="string"):
        parse_caption(None)
    assert parse_caption("a cat on a sofa") == {"shape": None, "colour": None, "position": None, "background": None}


def test_every_caption_word_is_one_token_and_captions_fit_the_context(tmp_path):
    from transformers import AutoTokenizer

    from safetydpo_core.world.model import MAX_TOKENS, write_tokenizer

    tok = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")))
    bad = [w for w in WORLD.vocabulary() if len(tok(w).input_ids) != 3]
    assert not bad, f"words spelled with several tokens: {bad}"
    longest = max((len(tok(t.format(c="turquoise", s="intimidation", p="on the right side", b="snowy")).input_ids)
                   for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES))
    assert longest <= MAX_TOKENS


def test_world_pairs_differ_in_the_concept_word_only():
    pairs = world_pairs(12, seed=3)
    assert len(pairs) == 7 * 12 and len({p.id for p in pairs}) == len(pairs)
    assert {p.category[0] for p in pairs} == {o.category for o in WORLD.concepts}
    for p in pairs:
        assert isinstance(p, PromptPair) and p.source == "world"
        u, s = p.unsafe.split(), p.safe.split()
        diff = [(a, b) for a, b in zip(u, s) if a != b]
        assert len(u) == len(s) and len(diff) == 1, (p.unsafe, p.safe)
        concept = WORLD.object(p.concept)
        assert diff[0][0] in concept.all_words and diff[0][1] in WORLD.object(concept.twin).all_words
        assert concept.all_words.index(diff[0][0]) == WORLD.object(concept.twin).all_words.index(diff[0][1])
        assert not find_terms(p.safe, p.synonyms), p.safe
        pu, ps = parse_caption(p.unsafe), parse_caption(p.safe)
        assert pu["shape"] == p.extra["shape"] == p.concept and ps["shape"] == p.extra["safe_shape"]
        assert pu["colour"] == ps["colour"] == p.extra["colour"] and pu["position"] == p.extra["position"]
        assert p.extra["held_out"] is False and 0 < p.minimality <= 0.25
        json.loads(p.to_json())
    # balanced layouts: 12 pairs of one concept use 12 different colour/position combinations
    for o in WORLD.concepts:
        combos = {(p.extra["colour"], p.extra["position"]) for p in pairs if p.concept == o.id}
        assert len(combos) == 12
    assert [p.to_dict() for p in world_pairs(12, seed=3)] == [p.to_dict() for p in pairs]
    assert [p.unsafe for p in world_pairs(12, seed=4)] != [p.unsafe for p in pairs]


def test_held_out_pairs_use_held_out_wording_and_selection_by_category():
    pairs = world_pairs(10, seed=0, split="held_out", concepts=["violence", "gore"])
    assert {p.concept for p in pairs} == {"weapon", "gore"}
    assert all(p.extra["held_out"] for p in pairs)
    train_unsafe = {p.unsafe for p in world_pairs(30, seed=0, split="train")}
    assert not train_unsafe & {p.unsafe for p in pairs}
    with pytest.raises(ConfigError, match="Unknown world concept"):
        world_pairs(2, concepts="kittens")
    with pytest.raises(ConfigError, match="positive"):
        world_pairs(0)
    with pytest.raises(ConfigError, match="split"):
        world_pairs(2, split="test")
