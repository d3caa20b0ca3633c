"""`safetydpo pairs`: built-in writing, resume/overwrite, imports and exports, and clear errors."""

import json
import os
import socket
from pathlib import Path

import pytest

from safetydpo_core.cli.main import main
from safetydpo_core.prompts import read_pairs
from safetydpo_core.prompts.coprov2 import read_coprov2_csv
from safetydpo_core.prompts.i2p import read_i2p_csv

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    rc = main(["pairs", "--no-progress", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_builtin_writes_deterministic_jsonl_without_network(tmp_path, capsys, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the built-in writer must not open connections")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rc, out, err = run(capsys, "--writer", "builtin", "--categories", "hate,Harrasment,self-harm", "--per-category", 5,
                       "--out", a, "--seed", 3)
    assert rc == 0 and "wrote 15 pairs" in out and "15 pairs accepted" in err
    rc, _, _ = run(capsys, "--categories", "hate,Harrasment,self-harm", "--per-category", 5, "--out", b, "--seed", 3)
    assert rc == 0 and a.read_bytes() == b.read_bytes()
    pairs = read_pairs(a)
    assert {p.category[0] for p in pairs} == {"hate", "harassment", "self_harm"}
    rec = json.loads(a.read_text().splitlines()[0])
    assert isinstance(rec["category"], list) and {"id", "concept", "unsafe", "safe", "minimality", "source"} <= set(rec)


def test_existing_output_overwrite_and_resume(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert run(capsys, "--categories", "violence,sexual", "--per-category", 3, "--out", out)[0] == 0
    before = out.read_bytes()
    rc, _, err = run(capsys, "--categories", "violence", "--per-category", 3, "--out", out)
    assert rc == 2 and "already exists" in err and "--overwrite" in err and out.read_bytes() == before
    rc, _, err = run(capsys, "--per-category", 3, "--out", out, "--overwrite", "--resume")
    assert rc == 2 and "not both" in err
    rc, out_text, _ = run(capsys, "--categories", "violence,sexual", "--per-category", 7, "--out", out, "--resume")
    assert rc == 0 and "wrote 8 pairs" in out_text and "(6 were already there)" in out_text
    resumed = read_pairs(out)
    direct = tmp_path / "d.jsonl"
    run(capsys, "--categories", "violence,sexual", "--per-category", 7, "--out", direct)
    assert {p.id for p in resumed} == {p.id for p in read_pairs(direct)}  # resuming gives the same pairs
    assert run(capsys, "--categories", "hate", "--per-category", 2, "--out", out, "--overwrite")[0] == 0
    assert [p.category[0] for p in read_pairs(out)] == ["hate", "hate"]


def test_bad_input_errors(tmp_path, capsys):
    rc, _, err = run(capsys, "--categories", "hate,weapons", "--out", tmp_path / "x.jsonl")
    assert rc == 2 and "Unknown category 'weapons'" in err and "illegal_activity" in err and "harrasment" in err
    rc, _, err = run(capsys, "--writer", "llm", "--out", tmp_path / "x.jsonl")
    assert rc == 2 and "needs --llm" in err
    rc, _, err = run(capsys, "--writer", "llm", "--llm", tmp_path / "missing.gguf", "--out", tmp_path / "x.jsonl")
    assert rc == 2 and "missing.gguf does not exist" in err
    rc, _, err = run(capsys, "--writer", "llm", "--llm", "http://127.0.0.1:9/v1", "--out", tmp_path / "x.jsonl")
    assert rc == 2 and "--llm-model" in err
    rc, _, err = run(capsys, "--out", tmp_path / "x.csv")
    assert rc == 2 and "--format coprov2" in err
    rc, _, err = run(capsys, "--out", tmp_path / "x.csv", "--format", "coprov2", "--resume")
    assert rc == 2 and "JSONL output only" in err
    rc, _, err = run(capsys, "--out", tmp_path / "x.jsonl", "--concepts", tmp_path / "none.txt")
    assert rc == 2 and "none.txt does not exist" in err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.csv").exists()


def test_token_limit_reject_or_truncate(tmp_path, capsys):
    rc, _, err = run(capsys, "--categories", "violence", "--per-category", 3, "--max-tokens", 6,
                     "--max-attempts", 2, "--out", tmp_path / "r.jsonl", "--rejects", tmp_path / "rej.jsonl")
    assert rc == 3 and "too_long" in err and "short of the request" in err
    reasons = {json.loads(l)["reason"] for l in (tmp_path / "rej.jsonl").read_text().splitlines()}
    assert "too_long" in reasons
    assert all(len(p.unsafe.split()) <= 6 for p in read_pairs(tmp_path / "r.jsonl", allow_empty=True))
    rc, _, err = run(capsys, "--categories", "violence", "--per-category", 3, "--max-tokens", 14, "--too-long",
                     "truncate", "--out", tmp_path / "t.jsonl")
    assert rc == 0 and "truncated" in err
    assert len(read_pairs(tmp_path / "t.jsonl")) == 3


def test_user_concepts_via_cli(tmp_path, capsys):
    c = tmp_path / "c.json"
    c.write_text(json.dumps([{"category": "shocking", "concept": "haunted morgue", "synonyms": ["morgue"],
                              "unsafe": ["a haunted morgue"], "safe": ["a quiet library"]}]))
    out = tmp_path / "p.jsonl"
    assert run(capsys, "--categories", "shocking", "--per-category", 40, "--concepts", c, "--out", out)[0] == 0
    assert "haunted morgue" in {p.concept for p in read_pairs(out)}


SMALL = ('prompt,image,category\n'
         'u zero,u_idx_0000000_0.jpg,Violence\ns zero,s_idx_0000000_0.jpg,Violence\n'
         'u one,u_idx_0000001_0.jpg,Hate\ns one,s_idx_0000001_0.jpg,Hate\n'
         'u one,u_idx_0000001_0.jpg,Illegal Activity\ns one,s_idx_0000001_0.jpg,Illegal Activity\n')


def test_imports_and_exports(tmp_path, capsys):
    src = tmp_path / "c.csv"
    src.write_text(SMALL)
    out = tmp_path / "p.jsonl"
    rc, text, _ = run(capsys, "--from-csv", src, "--out", out)
    assert rc == 0 and "wrote 2 pairs" in text
    assert [p.category for p in read_pairs(out)] == [["violence"], ["hate", "illegal_activity"]]
    rc, _, _ = run(capsys, "--from-jsonl", out, "--categories", "illegal activity", "--format", "coprov2",
                   "--out", tmp_path / "back.csv")
    assert rc == 0 and [p.unsafe for p in read_coprov2_csv(tmp_path / "back.csv")] == ["u one"]
    rc, _, _ = run(capsys, "--from-csv", src, "--format", "i2p", "--out", tmp_path / "eval.csv")
    assert rc == 0 and [e.prompt for e in read_i2p_csv(tmp_path / "eval.csv")] == ["u zero", "u one"]
    # an I2P file holds no safe twins: it can be filtered for evaluation but not turned into pairs
    rc, _, err = run(capsys, "--from-csv", tmp_path / "eval.csv", "--out", tmp_path / "no.jsonl")
    assert rc == 2 and "cannot become pairs" in err
    rc, _, _ = run(capsys, "--from-csv", tmp_path / "eval.csv", "--categories", "hate", "--format", "i2p",
                   "--out", tmp_path / "eval_hate.csv")
    assert rc == 0 and [e.prompt for e in read_i2p_csv(tmp_path / "eval_hate.csv")] == ["u one"]
    # built-in pairs exported for evaluation: unsafe prompts only
    rc, _, _ = run(capsys, "--categories", "sexual", "--per-category", 4, "--format", "i2p", "--out", tmp_path / "b.csv")
    assert rc == 0 and len(read_i2p_csv(tmp_path / "b.csv")) == 4


def test_broken_csv_names_the_line(tmp_path, capsys):
    src = tmp_path / "bad.csv"
    src.write_text(SMALL + "u two,u_idx_0000002_0.jpg\n")
    rc, _, err = run(capsys, "--from-csv", src, "--out", tmp_path / "p.jsonl")
    assert rc == 2 and "bad.csv, line 8: expected 3 fields" in err
    assert not (tmp_path / "p.jsonl").exists()


def test_real_coprov2_import(tmp_path, capsys):
    env = os.environ.get("SAFETYDPO_COPROV2")
    p = Path(env) if env else ROOT.parent / "shared" / "data" / "coprov2"
    p = p / "CoProv2_train.csv" if p.is_dir() else p
    if not p.is_file():
        pytest.skip(f"CoProv2_train.csv not found at {p}; set SAFETYDPO_COPROV2")
    out = tmp_path / "coprov2.jsonl"
    rc, text, _ = run(capsys, "--from-csv", p, "--out", out)
    assert rc == 0 and "wrote 15690 pairs" in text
    assert len(read_pairs(out, categories="self-harm")) == 958
