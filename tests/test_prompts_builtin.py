"""The built-in writer and the concept catalogue: coverage, determinism, minimal edits, user concepts."""

import csv
import json
import os
from pathlib import Path

import pytest

from safetydpo_core.categories import CATEGORIES
from safetydpo_core.errors import ConfigError
from safetydpo_core.prompts.builtin_writer import BuiltinWriter
from safetydpo_core.prompts.catalogue import load_builtin_catalogue, load_catalogue, load_concepts_file
from safetydpo_core.prompts.checks import PairChecker, find_terms
from safetydpo_core.prompts.tokens import EstimateCounter

ROOT = Path(__file__).resolve().parents[1]


def writer(seed=0, catalogue=None, **kw):
    return BuiltinWriter(catalogue, PairChecker(EstimateCounter()), seed=seed, **kw)


def test_catalogue_covers_every_category():
    cat = load_builtin_catalogue()
    for c in CATEGORIES:
        concepts = cat.for_category(c)
        assert len(concepts) >= 15, c
        names = [x.name for x in concepts]
        assert len(set(names)) == len(names)
        for x in concepts:
            assert x.unsafe and x.safe and x.slot in cat.templates
            for phrase in x.safe:
                assert not find_terms(phrase, x.terms), (x.name, phrase)
    assert any(len(x.category) > 1 for x in cat.concepts)  # multi-category concepts exist


def test_pairs_pass_the_llm_checks_and_change_only_the_unsafe_part():
    pairs, report = writer(seed=3).generate(None, 30)
    assert report.complete and len(pairs) == 30 * 7
    assert report.attempts() == len(pairs) + len(report.rejects)
    cat = load_builtin_catalogue()
    fresh = PairChecker(EstimateCounter())  # the same checker the LLM writer uses, from scratch
    ids = set()
    for p in pairs:
        assert p.id not in ids
        ids.add(p.id)
        concept = cat.find(p.concept)
        r = fresh.check(p, concept.terms)
        assert r.ok, (p, r)
        assert p.source == "builtin" and p.synonyms == concept.synonyms and p.category[0] in concept.category
        assert 0 < p.minimality < 0.8
        # the safe twin is the unsafe prompt with one unsafe phrase swapped for its replacement
        swaps = [(u, s) for u in concept.unsafe for s in cat.safe_phrases(concept)
                 if u in p.unsafe.lower() or u[0].upper() + u[1:] in p.unsafe]
        assert any(p.unsafe.replace(u, s).replace(u[0].upper() + u[1:], s[0].upper() + s[1:]) == p.safe
                   for u, s in swaps), p


def test_deterministic_for_a_seed_and_independent_per_category():
    a, _ = writer(seed=7).generate(["hate", "sexual"], 12)
    b, _ = writer(seed=7).generate(["hate", "sexual"], 12)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    c, _ = writer(seed=8).generate(["hate", "sexual"], 12)
    assert {p.unsafe for p in a} != {p.unsafe for p in c}
    only_sexual, _ = writer(seed=7).generate(["sexual"], 12)
    assert [p.id for p in only_sexual] == [p.id for p in a if p.category[0] == "sexual"]
    more, _ = writer(seed=7).generate(["hate"], 20)
    assert [p.id for p in more][:12] == [p.id for p in a if p.category[0] == "hate"]


def test_shortfall_is_reported_not_hidden(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("violence: tiny concept -> a calm scene\n", encoding="utf-8")
    cat = load_catalogue([f], builtin=False)
    cat.templates = {"thing": ["{x}"], "action": ["{x}"]}
    pairs, report = writer(catalogue=cat, max_attempts=3).generate(["violence"], 4)
    assert len(pairs) == 1 and report.accepted["violence"] == 1
    assert report.shortfall == {"violence": 3}
    assert report.reasons["duplicate"] == 11 and report.attempts() == 12
    assert "violence by 3" in report.summary()


def test_user_concepts_from_text_and_json(tmp_path):
    t = tmp_path / "mine.txt"
    t.write_text("# my concepts\n"
                 "violence: sword fight = swordfight, dueling -> a fencing lesson; a sword dance\n"
                 "\n"
                 "Harrasment, hate: sneering at a neighbor = sneer\n"
                 "violence: stabbing = shanking\n", encoding="utf-8")
    cs = load_concepts_file(t)
    assert [c.name for c in cs] == ["sword fight", "sneering at a neighbor", "stabbing"]
    assert cs[0].synonyms == ["swordfight", "dueling"] and cs[0].safe == ["a fencing lesson", "a sword dance"]
    assert cs[0].slot == "thing" and cs[1].slot == "action" and cs[1].category == ["harassment", "hate"]
    j = tmp_path / "mine.json"
    j.write_text(json.dumps({"concepts": [{"category": "shocking", "concept": "haunted morgue", "synonyms": ["morgue"],
                                           "unsafe": ["a haunted morgue"], "safe": ["a quiet library"]}]}),
                 encoding="utf-8")
    cat = load_catalogue([t, j])
    stab = cat.find("stabbing", "violence")
    assert "shanking" in stab.synonyms and "stab" in stab.synonyms  # merged into the built-in concept
    assert cat.find("haunted morgue") is not None and cat.find("sword fight") is not None
    pairs, report = writer(catalogue=load_catalogue([j], builtin=False)).generate(["shocking"], 3)
    assert report.complete and all(p.concept == "haunted morgue" and "quiet library" in p.safe for p in pairs)
    # a user concept without safe phrases uses the neutral defaults of its slot
    pairs, _ = writer(catalogue=load_catalogue([t], builtin=False)).generate(["hate"], 2)
    defaults = load_builtin_catalogue().safe_defaults["action"]
    assert all(any(d in p.safe for d in defaults) for p in pairs)


@pytest.mark.parametrize("text,fragment", [
    ("violence sword fight\n", "line 1: expected 'CATEGORY: CONCEPT"),
    ("# ok\nweapons: sword fight\n", "line 2 (concept 'sword fight'): Unknown category 'weapons'"),
    ("violence: sword fight = sword -> a sword dance\n", "contains 'sword'"),
    ("violence:  = x\n", "line 1: a concept needs a non-empty"),
])
def test_bad_concept_files_name_the_line(tmp_path, text, fragment):
    f = tmp_path / "bad.txt"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_concepts_file(f)
    assert fragment in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_concepts_file(tmp_path / "none.txt")
    j = tmp_path / "bad.json"
    j.write_text('{"concepts": [{"category": "hate"', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1: not valid JSON"):
        load_concepts_file(j)


def test_builtin_text_is_not_coprov2_text():
    env = os.environ.get("SAFETYDPO_COPROV2")
    p = Path(env) if env else ROOT.parent / "shared" / "data" / "coprov2"
    p = p / "CoProv2_train.csv" if p.is_dir() else p
    if not p.is_file():
        pytest.skip(f"CoProV2 CSV not found at {p} (set SAFETYDPO_COPROV2)")
    with open(p, encoding="utf-8", newline="") as f:
        coprov2 = {" ".join(r["prompt"].lower().split()) for r in csv.DictReader(f)}
    pairs, _ = writer(seed=0).generate(None, 40)
    ours = {" ".join(x.lower().split()) for pr in pairs for x in (pr.unsafe, pr.safe)}
    assert not ours & coprov2
