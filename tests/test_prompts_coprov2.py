"""CoProV2 CSV and I2P CSV import/export; the real CoProV2 training file when it is present."""

import os
from collections import Counter
from pathlib import Path

import pytest

from safetydpo_core.categories import CATEGORIES
from safetydpo_core.errors import DatasetError, SafetyDPOError
from safetydpo_core.prompts import PromptPair, read_pairs, write_pairs
from safetydpo_core.prompts.coprov2 import read_coprov2_csv, sniff_csv_columns, write_coprov2_csv
from safetydpo_core.prompts.i2p import (EvalPrompt, filter_eval_prompts, pairs_to_eval_prompts, read_i2p_csv,
                                        write_i2p_csv)

ROOT = Path(__file__).resolve().parents[1]


def coprov2_train():
    env = os.environ.get("SAFETYDPO_COPROV2")
    p = Path(env) if env else ROOT.parent / "shared" / "data" / "coprov2"
    return p / "CoProv2_train.csv" if p.is_dir() else p


GOOD = ('prompt,image,category\n'
        'a man stabbing a cook,u_idx_0000000_0.jpg,Violence\n'
        'a man hugging a cook,s_idx_0000000_0.jpg,Violence\n'
        '"a crowd, with a hate sign",u_idx_0000001_0.jpg,Hate\n'
        '"a crowd, with a welcome sign",s_idx_0000001_0.jpg,Hate\n'
        '"a crowd, with a hate sign",u_idx_0000001_0.jpg,Harrasment\n'
        '"a crowd, with a welcome sign",s_idx_0000001_0.jpg,Harrasment\n'
        'a pill pile,s_idx_0000002_0.jpg,self-harm\n'  # s before u is fine
        'an overdose,u_idx_0000002_0.jpg,self-harm\n')


def test_small_csv_merges_multi_category_pairs(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text(GOOD, encoding="utf-8")
    pairs = read_coprov2_csv(f)
    assert [p.id for p in pairs] == ["coprov2-0000000", "coprov2-0000001", "coprov2-0000002"]
    assert pairs[1].category == ["hate", "harassment"] and pairs[1].unsafe == "a crowd, with a hate sign"
    assert pairs[2].unsafe == "an overdose" and pairs[2].safe == "a pill pile"
    assert pairs[0].minimality == pytest.approx(0.2) and pairs[0].source == "coprov2"
    # export and read back: same pairs, CoProV2 spellings, one u/s couple per category
    out = tmp_path / "out.csv"
    assert write_coprov2_csv(pairs, out) == 3
    text = out.read_text(encoding="utf-8")
    assert "Harrasment" in text and "self-harm" in text and text.count("\n") == 1 + 2 * 4
    assert read_coprov2_csv(out) == pairs
    with pytest.raises(SafetyDPOError, match="already exists"):
        write_coprov2_csv(pairs, out)


def test_export_numbers_non_coprov2_ids(tmp_path):
    pairs = [PromptPair(id="coprov2-0000005", category="hate", concept="", unsafe="u5", safe="s5"),
             PromptPair(id="builtin-x", category=["sexual", "shocking"], concept="c", unsafe="ux", safe="sx")]
    out = tmp_path / "o.csv"
    write_coprov2_csv(pairs, out)
    back = read_coprov2_csv(out)
    assert [p.id for p in back] == ["coprov2-0000005", "coprov2-0000006"]
    assert back[1].category == ["sexual", "shocking"]


@pytest.mark.parametrize("body,fragment", [
    ("prompt,image\nx,u_idx_0_0.jpg\n", "missing column(s) category"),
    ("prompt,image,category\na,u_idx_0000000_0.jpg,Hate\nb,s_idx_0000000_0.jpg\n", "line 3: expected 3 fields"),
    ("prompt,image,category\na,u_idx_0000000_0.jpg,Hate\nb,img_0000000.jpg,Hate\n", "line 3: image 'img_0000000.jpg'"),
    ("prompt,image,category\na,u_idx_0000000_0.jpg,Hate\nb,s_idx_0000000_0.jpg,Weapons\n", "line 3: Unknown category 'Weapons'"),
    ("prompt,image,category\na,u_idx_0000000_0.jpg,Hate\n,s_idx_0000000_0.jpg,Hate\n", "line 3: the prompt is empty"),
    ("prompt,image,category\na,u_idx_0000000_0.jpg,Hate\nb,s_idx_0000000_0.jpg,Hate\nc,u_idx_0000000_0.jpg,Violence\n",
     "line 4: image u_idx_0000000_0.jpg has a different prompt than on line 2"),
    ("prompt,image,category\na,u_idx_0000000_0.jpg,Hate\nb,s_idx_0000000_0.jpg,Hate\nc,u_idx_0000001_0.jpg,Hate\n",
     "line 4: pair 1 has no safe row"),
    ("prompt,image,category\n", "has a header but no rows"),
    ("", "is empty"),
    ('prompt,image,category\n"a multi\nline prompt,u_idx_0000000_0.jpg,Hate\n', "line 2: expected 3 fields"),
])
def test_broken_csv_names_the_line(tmp_path, body, fragment):
    f = tmp_path / "bad.csv"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_coprov2_csv(f)
    assert fragment in str(e.value)
    assert str(f) in str(e.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_coprov2_csv(tmp_path / "none.csv")
    f = tmp_path / "latin.csv"
    f.write_bytes("prompt,image,category\ncaf\xe9,u_idx_0_0.jpg,Hate\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_coprov2_csv(f)


def test_real_coprov2_train_counts(tmp_path):
    src = coprov2_train()
    if not src.is_file():
        pytest.skip(f"CoProv2_train.csv not found at {src}; set SAFETYDPO_COPROV2 to its path or folder")
    seen = []
    pairs = read_coprov2_csv(src, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert len(pairs) == 15690 and len({p.id for p in pairs}) == 15690
    counts = Counter(c for p in pairs for c in p.category)
    assert set(counts) == set(CATEGORIES)
    assert counts == {"hate": 4393, "sexual": 2712, "violence": 2141, "shocking": 2115, "illegal_activity": 1923,
                      "harassment": 1801, "self_harm": 958}
    multi = Counter(len(p.category) for p in pairs if len(p.category) > 1)
    assert multi == {2: 293, 3: 24, 4: 4}
    assert all(p.unsafe != p.safe for p in pairs)
    # JSONL round trip of the whole set
    out = tmp_path / "coprov2.jsonl"
    write_pairs(pairs, out)
    assert read_pairs(out) == pairs
    assert sniff_csv_columns(src) == ["prompt", "image", "category"]


# ---------------------------------------------------------------- I2P

I2P = ("prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
       "prompt_toxicity,lexica_url,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,sd_model\n"
       '"a dark, scary alley","shocking, violence",1,80.0,0.0,70.0,10,0.12,https://x,12345,7.0,512,512,1.5\n'
       "a quiet street,illegal activity,0,10.0,0.0,0.0,0,0.01,https://y,42,7.5,512,768,1.5\n")


def test_i2p_read_write_and_filter(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text(I2P, encoding="utf-8")
    ps = read_i2p_csv(f)
    assert [p.category for p in ps] == [["shocking", "violence"], ["illegal_activity"]]
    assert ps[0].prompt == "a dark, scary alley" and ps[0].seed == 12345 and ps[0].guidance == 7.0
    assert ps[1].height == 768 and ps[0].extra["hard"] == "1" and ps[0].extra["lexica_url"] == "https://x"
    assert [p.prompt for p in filter_eval_prompts(ps, "violence")] == ["a dark, scary alley"]
    out = tmp_path / "out.csv"
    assert write_i2p_csv(ps, out) == 2
    back = read_i2p_csv(out)
    assert [(b.prompt, b.category, b.seed, b.guidance, b.width, b.height) for b in back] == \
           [(p.prompt, p.category, p.seed, p.guidance, p.width, p.height) for p in ps]
    assert back[0].extra["hard"] == "1" and back[0].id == ps[0].id


def test_pairs_export_to_i2p_as_unsafe_prompts_only(tmp_path):
    pairs = [PromptPair(id="a", category=["self_harm", "illegal_activity"], concept="c", unsafe="U1", safe="S1")]
    ev = pairs_to_eval_prompts(pairs, seed=3)
    assert ev == [EvalPrompt(id="a", prompt="U1", category=["self_harm", "illegal_activity"], seed=3,
                             extra={"concept": "c"})]
    out = tmp_path / "e.csv"
    write_i2p_csv(pairs, out)
    text = out.read_text(encoding="utf-8")
    assert "U1" in text and "S1" not in text and '"self-harm, illegal activity"' in text
    assert read_i2p_csv(out)[0].id == "a"


@pytest.mark.parametrize("body,fragment", [
    ("text,categories\nx,hate\n", "missing column prompt"),
    ("prompt,categories,sd_seed\nx,hate,abc\n", "line 2: sd_seed 'abc' is not an integer"),
    ("prompt,categories\nx,hate\ny,weapons\n", "line 3: Unknown category 'weapons'"),
    ("prompt,categories\nx,hate,extra\n", "line 2: expected 2 fields, found 3"),
])
def test_i2p_errors_name_the_line(tmp_path, body, fragment):
    f = tmp_path / "bad.csv"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_i2p_csv(f)
    assert fragment in str(e.value)
