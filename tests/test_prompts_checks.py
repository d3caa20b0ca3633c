"""Pair checks (the same for every writer) and CLIP token counting."""

import csv
import gzip
import os
import shutil
from pathlib import Path

import pytest

from safetydpo_core.errors import ConfigError
from safetydpo_core.prompts import PromptPair
from safetydpo_core.prompts.checks import PairChecker, change_fraction, find_terms, is_refusal
from safetydpo_core.prompts.tokens import (CLIP_CONTENT_TOKENS, ClipBpeCounter, EstimateCounter, HFTokenizerCounter,
                                           load_token_counter)

ROOT = Path(__file__).resolve().parents[1]


def _clip_tokenizer_dir():
    cands = []
    if os.environ.get("COMFYUI_PATH"):
        cands.append(Path(os.environ["COMFYUI_PATH"]) / "comfy" / "sd1_tokenizer")
    cands.append(ROOT.parent / "comfyui" / "comfy" / "sd1_tokenizer")
    for c in cands:
        if (c / "merges.txt").is_file() and (c / "vocab.json").is_file():
            return c
    return None


CLIP_DIR = _clip_tokenizer_dir()
needs_clip = pytest.mark.skipif(CLIP_DIR is None, reason="no real CLIP tokenizer here (ComfyUI's comfy/sd1_tokenizer "
                                                         "via COMFYUI_PATH or ../comfyui)")


def _coprov2_csv():
    env = os.environ.get("SAFETYDPO_COPROV2")
    p = Path(env) if env else ROOT.parent / "shared" / "data" / "coprov2"
    p = p / "CoProv2_train.csv" if p.is_dir() else p
    return p if p.is_file() else None


SAMPLE = ["a photo of a cat", "An oil painting of a man, 8k, highly detailed, trending on artstation!!",
          "Café au lait — naïve résumé, 1990's style; x-ray 3.14 <b>bold</b> &amp; co",
          "supercalifragilisticexpialidocious antidisestablishmentarianism", "", "   spaced   out   ",
          "emoji 🙂 and 漢字 text", "don't you'll we're he's I'm I'd"]


def pair(unsafe, safe, concept="stabbing", synonyms=("stab", "knife attack"), pid="x"):
    return PromptPair(id=pid, category="violence", concept=concept, unsafe=unsafe, safe=safe, synonyms=list(synonyms))


# ---------------------------------------------------------------- terms, refusals, minimality

def test_find_terms_matches_inflections_not_lookalikes():
    assert find_terms("a man stabbing a stranger", ["stab"]) == ["stab"]
    assert find_terms("he was stabbed twice", ["stab"]) == ["stab"]
    assert find_terms("two stabs", ["stab"]) == ["stab"]
    assert find_terms("hating and hated", ["hate"]) == ["hate"]
    assert find_terms("a man in a hat", ["hate", "hated"]) == []
    assert find_terms("a scene of self harm", ["self-harm"]) == ["self-harm"]
    assert find_terms("selfharm tags", ["self-harm"]) == ["self-harm"]
    assert find_terms("a Knife Attack at night", ["knife attack"]) == ["knife attack"]
    assert find_terms("a knife on a table", ["knife attack"]) == []
    assert find_terms("bodies everywhere", ["body"]) == ["body"]
    assert find_terms("the man's gun", ["gun"]) == ["gun"]


def test_refusals():
    for text in ["I'm sorry, but I can't help with that.", "As an AI language model I cannot create this",
                 "I cannot assist with harmful requests", "Sorry, I won't write that", "I must decline."]:
        assert is_refusal(text), text
    for text in ["a man saying sorry to his friend", "a cannon on a hill", "a sign that says welcome"]:
        assert not is_refusal(text), text


def test_change_fraction():
    assert change_fraction("a man stabbing a dog", "a man stabbing a dog") == 0
    assert change_fraction("a man stabbing a dog", "a man hugging a dog") == pytest.approx(1 / 5)
    assert change_fraction("one two", "three four five six") == 1.0
    assert 0 < change_fraction("a b c d", "a b c") < 0.3


# ---------------------------------------------------------------- the checker

def test_checker_reasons():
    c = PairChecker(EstimateCounter())
    assert c.check(pair("a man stabbing a stranger", "a man hugging a stranger")).ok
    cases = [
        (pair("a man stabbing a stranger", "a man stabbing a stranger"), "identical"),
        (pair("a man stabbing a stranger", "A man STABBING a stranger."), "identical"),
        (pair("a man stabbing a guard", "a man who stabbed nobody"), "concept_in_safe"),
        (pair("a man stabbing a cook", "a knife attack, avoided"), "concept_in_safe"),
        (pair("a man stabbing a stranger", "I'm sorry, I can't help with that"), "refusal"),
        (pair("a man stabbing a stranger", "a man hugging a friend"), "duplicate"),  # unsafe seen above
    ]
    for p, reason in cases:
        r = c.check(p)
        assert not r.ok and r.reason == reason, (p, r)
    assert c.check(None, ["stab"], unsafe="", safe="x").reason == "missing_unsafe"
    assert c.check(None, ["stab"], unsafe="x", safe=" ").reason == "missing_safe"


def test_checker_token_limit_reject_or_truncate():
    long_unsafe = "a man stabbing a stranger " + " ".join(["in a very crowded street"] * 20)
    long_safe = "a man hugging a stranger " + " ".join(["in a very crowded street"] * 20)
    r = PairChecker(EstimateCounter()).check(pair(long_unsafe, long_safe))
    assert not r.ok and r.reason == "too_long" and "over the limit of 75" in r.detail
    counter = EstimateCounter()
    r = PairChecker(counter, too_long="truncate").check(pair(long_unsafe, long_safe))
    assert r.ok and len(r.warnings) == 2 and "truncated" in r.warnings[0]
    assert counter.count(r.pair.unsafe) <= CLIP_CONTENT_TOKENS and counter.count(r.pair.safe) <= CLIP_CONTENT_TOKENS
    assert long_unsafe.startswith(r.pair.unsafe) and r.pair.minimality is not None
    with pytest.raises(ConfigError):
        PairChecker(counter, too_long="ignore")


def test_checker_max_change_and_seen():
    c = PairChecker(EstimateCounter(), max_change=0.5, seen=["a man stabbing a cook"])
    assert c.check(pair("a man stabbing a cook", "a man feeding a cook")).reason == "duplicate"
    r = c.check(pair("a man stabbing a tall stranger", "three children flying colorful kites"))
    assert r.reason == "too_different"
    r = c.check(pair("a man stabbing a tall stranger", "a man greeting a tall stranger"))
    assert r.ok and r.pair.minimality == pytest.approx(1 / 6, abs=1e-3)


# ---------------------------------------------------------------- token counting

def test_estimate_is_reasonable_without_a_vocabulary():
    e = EstimateCounter()
    assert e.count("") == 0
    assert 5 <= e.count("a photo of a cat") <= 12
    assert e.count("a " * 80) > CLIP_CONTENT_TOKENS
    t = e.truncate(" ".join(["word"] * 200), 30)
    assert e.count(t) <= 30 and e.count(t + " word") > 30


def test_token_counter_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_token_counter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        load_token_counter(tmp_path / "empty")
    (tmp_path / "junk.txt").write_text("not a merge list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="does not look like a CLIP BPE merge list"):
        load_token_counter(tmp_path / "junk.txt")
    assert isinstance(load_token_counter(None, discover=False), EstimateCounter)


@needs_clip
def test_clip_bpe_matches_transformers_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(CLIP_DIR))
    bpe = ClipBpeCounter(CLIP_DIR / "merges.txt")
    hf = HFTokenizerCounter(CLIP_DIR)
    prompts = list(SAMPLE)
    src = _coprov2_csv()
    if src:
        with open(src, encoding="utf-8", newline="") as f:
            prompts += [r["prompt"] for i, r in enumerate(csv.DictReader(f)) if i % 40 == 0]
    for p in prompts:
        n = len(ref(p, add_special_tokens=False)["input_ids"])
        assert bpe.count(p) == n, p
        assert hf.count(p) == n, p
    # OpenAI's gzipped merge list (first line is a header) gives the same counts
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    merges = (CLIP_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges]))
    gzc = load_token_counter(gz)
    assert all(gzc.count(p) == bpe.count(p) for p in prompts[:50])
    # a diffusers model folder with tokenizer/ is accepted
    model = tmp_path / "model"
    shutil.copytree(CLIP_DIR, model / "tokenizer")
    c = load_token_counter(model)
    assert c.exact and c.count("a photo of a cat") == 5


@needs_clip
def test_estimate_never_undercounts_real_clip():
    src = _coprov2_csv()
    if src is None:
        pytest.skip("CoProV2 CSV not found (set SAFETYDPO_COPROV2 or place it at ../shared/data/coprov2/)")
    bpe, est = ClipBpeCounter(CLIP_DIR / "merges.txt"), EstimateCounter()
    with open(src, encoding="utf-8", newline="") as f:
        prompts = [r["prompt"] for i, r in enumerate(csv.DictReader(f)) if i % 3 == 0]
    prompts += [p for p in SAMPLE if p.strip()]
    under = [p for p in prompts if est.count(p) < bpe.count(p)]
    assert not under
    ratio = sum(est.count(p) for p in prompts) / sum(bpe.count(p) for p in prompts)
    assert ratio < 1.5
