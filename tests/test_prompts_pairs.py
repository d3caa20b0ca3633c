"""The JSONL pair contract: PromptPair, read_pairs / write_pairs / PairWriter (atomic, resumable), filtering."""

import json

import pytest

from safetydpo_core.errors import ConfigError, DatasetError, SafetyDPOError
from safetydpo_core.prompts import PairWriter, PromptPair, filter_pairs, make_pair_id, read_pairs, write_pairs


def _pair(i, cat="violence", **kw):
    return PromptPair(id=f"p{i}", category=cat, concept="stabbing", unsafe=f"a man stabbing a stranger {i}",
                      safe=f"a man hugging a stranger {i}", **kw)


def test_round_trip_keeps_every_field(tmp_path):
    pairs = [_pair(0, minimality=0.125, source="builtin", synonyms=["stab"]),
             PromptPair(id="p1", category=["Harrasment", "hate"], concept="", unsafe="u ü", safe="s ß",
                        extra={"seed": 7, "note": {"x": 1}})]
    out = tmp_path / "pairs.jsonl"
    assert write_pairs(pairs, out) == 2
    lines = out.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert list(first)[:5] == ["id", "category", "concept", "unsafe", "safe"]
    assert first["category"] == ["violence"]  # always a list of canonical ids when written
    assert json.loads(lines[1])["category"] == ["harassment", "hate"]
    back = read_pairs(out)
    assert back == pairs
    assert back[1].extra == {"seed": 7, "note": {"x": 1}}


def test_read_accepts_a_category_string_in_any_spelling(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": "a", "category": "Illegal Activity", "concept": "x", "unsafe": "u", "safe": "s"}\n'
                 '{"id": 2, "category": "sexual, shocking", "unsafe": "u2", "safe": "s2"}\n', encoding="utf-8")
    a, b = read_pairs(f)
    assert a.category == ["illegal_activity"]
    assert b.id == "2" and b.category == ["sexual", "shocking"] and b.concept == ""


@pytest.mark.parametrize("line,fragment", [
    ('{"id": "a", "category": "hate", "unsafe": "u"}', "missing field(s) safe"),
    ('{"id": "a", "category": "nonsense", "unsafe": "u", "safe": "s"}', "Unknown category 'nonsense'"),
    ('{"id": "a", "category": "hate", "unsafe": "", "safe": "s"}', "'unsafe' must be a non-empty string"),
    ('{"id": "a", "category": "hate", "unsafe": "u", "safe": "s", "minimality": "low"}', "'minimality' must be a number"),
    ('{"id": "a", "category": "hate", "unsafe": "u", "safe": "s"', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "ok", "category": "hate", "unsafe": "u0", "safe": "s0"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_pairs(f)
    assert f"{f}, line 3" in str(e.value) and fragment in str(e.value)


def test_duplicate_ids_missing_and_empty_files(tmp_path):
    f = tmp_path / "dup.jsonl"
    rec = '{"id": "x", "category": "hate", "unsafe": "u", "safe": "s"}\n'
    f.write_text(rec + rec, encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2: id 'x' already used on line 1"):
        read_pairs(f)
    with pytest.raises(DatasetError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="is empty"):
        read_pairs(tmp_path / "empty.jsonl")
    assert read_pairs(tmp_path / "empty.jsonl", allow_empty=True) == []
    with pytest.raises(DatasetError, match="share the id"):
        write_pairs([_pair(1), _pair(1)], tmp_path / "o.jsonl")


def test_filter_by_category(tmp_path):
    pairs = [_pair(0, "violence"), _pair(1, ["hate", "harassment"]), _pair(2, "sexual")]
    assert [p.id for p in filter_pairs(pairs, "Harrasment")] == ["p1"]
    assert [p.id for p in filter_pairs(pairs, ["violence", "sexual"])] == ["p0", "p2"]
    assert len(filter_pairs(pairs, "all")) == 3 and len(filter_pairs(pairs, None)) == 3
    f = tmp_path / "p.jsonl"
    write_pairs(pairs, f)
    assert [p.id for p in read_pairs(f, categories="hate")] == ["p1"]
    with pytest.raises(DatasetError, match="no pairs of the categories"):
        read_pairs(f, categories="shocking")
    with pytest.raises(ConfigError):
        filter_pairs(pairs, "nonsense")


def test_existing_output_refused_unless_overwrite_or_resume(tmp_path):
    f = tmp_path / "p.jsonl"
    write_pairs([_pair(0)], f)
    before = f.read_bytes()
    with pytest.raises(SafetyDPOError, match="already exists.*--overwrite.*--resume"):
        write_pairs([_pair(1)], f)
    assert f.read_bytes() == before  # nothing lost
    with pytest.raises(ConfigError, match="not both"):
        write_pairs([_pair(1)], f, overwrite=True, resume=True)
    assert write_pairs([_pair(1), _pair(2)], f, resume=True) == 2
    assert [p.id for p in read_pairs(f)] == ["p0", "p1", "p2"]
    assert write_pairs([_pair(2), _pair(3)], f, resume=True) == 1  # p2 is already there
    assert [p.id for p in read_pairs(f)] == ["p0", "p1", "p2", "p3"]
    assert write_pairs([_pair(9)], f, overwrite=True) == 1
    assert [p.id for p in read_pairs(f)] == ["p9"]
    with pytest.raises(ConfigError, match="is a folder"):
        write_pairs([_pair(0)], tmp_path)


def test_resume_drops_a_torn_last_line_and_keeps_the_rest(tmp_path):
    f = tmp_path / "p.jsonl"
    write_pairs([_pair(0), _pair(1)], f)
    f.write_text(f.read_text(encoding="utf-8") + '{"id": "p2", "category": ["viol', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 3"):
        read_pairs(f)  # strict reading names the torn line
    assert write_pairs([_pair(2)], f, resume=True) == 1
    assert [p.id for p in read_pairs(f)] == ["p0", "p1", "p2"]


def test_pair_writer_checkpoints_and_keeps_pairs_after_a_failure(tmp_path):
    f = tmp_path / "p.jsonl"
    with pytest.raises(RuntimeError, match="endpoint died"):
        with PairWriter(f, flush_every=2) as w:
            for i in range(3):
                w.add(_pair(i))
                if i == 1:  # a checkpoint happened after the second pair
                    assert [p.id for p in read_pairs(f)] == ["p0", "p1"]
            raise RuntimeError("endpoint died")
    assert [p.id for p in read_pairs(f)] == ["p0", "p1", "p2"]  # written on the way out
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]  # no temp files left
    # a failure before any new pair leaves an existing file untouched
    before = f.read_bytes()
    with pytest.raises(RuntimeError):
        with PairWriter(f, overwrite=True):
            raise RuntimeError("model did not load")
    assert f.read_bytes() == before
    with PairWriter(f, resume=True) as w:
        assert [p.id for p in w.existing] == ["p0", "p1", "p2"]
        assert w.add(_pair(1)) is False and w.add(_pair(5)) is True
    assert w.skipped == 1 and [p.id for p in read_pairs(f)] == ["p0", "p1", "p2", "p5"]


def test_make_pair_id_is_stable_and_content_based():
    a = make_pair_id("builtin", "Harrasment", "u", "s")
    assert a == make_pair_id("builtin", ["harassment"], "u", "s")
    assert a.startswith("builtin-harassment-") and len(a.rsplit("-", 1)[1]) == 12
    assert a != make_pair_id("builtin", "harassment", "u", "s2")
    assert make_pair_id("llm:some/model", "hate", "u", "s").startswith("llm-hate-")


def test_pair_validation():
    with pytest.raises(ConfigError, match="no category"):
        PromptPair(id="a", category=[], concept="c", unsafe="u", safe="s")
    with pytest.raises(ConfigError, match="'safe' must be"):
        PromptPair(id="a", category="hate", concept="c", unsafe="u", safe="  ")
    p = PromptPair(id="a", category="hate", concept="c", unsafe="u", safe="s", synonyms="x, y")
    assert p.synonyms == ["x", "y"]
