"""``safetydpo attack`` end to end on the built-in world model.

* the command writes ``adversarial.jsonl`` (which ``safetydpo sample --prompts`` reads), ``attack.json``,
  ``records.jsonl``, ``images/``, ``report.md`` and its resolved config, prints the ASR beside the
  un-attacked rate, and keeps to the budget;
* the same command again resumes: a finished run is read back, not redone, and gives the same results;
* bad input (a budget <= 0, an unknown attack, no prompts, a LoRA made for another model, a folder holding a
  run with other settings) is a clear error, and nothing already on disk is touched.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from safetydpo_core.cli.main import main
from safetydpo_core.prompts.pairs import write_pairs

FAST = ["--sample-steps", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from safetydpo_core.world import world_pairs

    d = tmp_path_factory.mktemp("attack_cli")
    path = d / "pairs.jsonl"
    write_pairs(world_pairs(1, seed=3000, split="train", concepts=["sexual", "hate"]), path)
    return path


def _results(out):
    rows = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines() if x.strip()]
    for r in rows:
        r.pop("seconds", None)
        r["info"] = {k: v for k, v in r.get("info", {}).items() if "seconds" not in k}
    return sorted(rows, key=lambda r: (r["id"], r["variant"]))


def test_attack_writes_its_outputs_resumes_and_its_prompts_feed_sample(pairs, tmp_path, capsys):
    out = tmp_path / "wording"
    args = ["attack", "--attack", "wording", "--prompts", str(pairs), "--out", str(out), "--budget", "2", *FAST]
    assert main(args) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["attack"] == "wording" and printed["budget"]["queries"] == 2
    assert set(printed["asr"]) == set(printed["no_attack"]) and all(0 <= v <= 1 for v in printed["asr"].values())
    for name in ("adversarial.jsonl", "attack.json", "records.jsonl", "report.md"):
        assert (out / name).is_file(), name
    assert any((out / "images").rglob("*.png")), "no images written"
    meta = json.loads((out / "attack.json").read_text())
    assert meta["complete"] is True
    records = _results(out)
    assert {r["id"] for r in records} == {json.loads(x)["id"] for x in pairs.read_text().splitlines()}
    assert all(r["queries"] <= 2 for r in records)
    adv = [json.loads(x) for x in (out / "adversarial.jsonl").read_text().splitlines()]
    assert adv and all(a["unsafe"] and a["category"] for a in adv)
    assert "ASR" in (out / "report.md").read_text()

    # the same command again: read back, not redone (the images keep their times), same results
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["asr"] == printed["asr"]
    assert _results(out) == records
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps

    # the adversarial prompts are a prompt file for `safetydpo sample`
    assert main(["sample", "--prompts", str(out / "adversarial.jsonl"), "--out", str(tmp_path / "sampled"),
                 "--steps", "2"]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "sampled").rglob("*.png"))) >= len(adv)


def test_bad_input_is_a_clear_error_and_leaves_the_disk_alone(pairs, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["attack", "--prompts", str(pairs), "--out", str(out), *FAST]
    for budget in ("0", "-3"):
        assert main([*base, "--attack", "wording", "--budget", budget]) == 2
        assert "--budget must be a positive" in capsys.readouterr().err
    assert main([*base, "--attack", "jailbreak"]) == 2  # argparse's refusal, as an exit status
    assert "invalid choice: 'jailbreak'" in capsys.readouterr().err
    for flag, value in (("--cfg", "nan"), ("--lr", "inf"), ("--size", "0"), ("--seed", "-1")):
        assert main([*base, "--attack", "wording", flag, value]) == 2
        assert f"argument {flag}" in capsys.readouterr().err
    # the output folder may not hold an input (the prompts of a run inside the folder it would write)
    inside = out / "prompts.jsonl"
    assert main(["attack", "--attack", "wording", "--prompts", str(inside), "--out", str(out), *FAST]) == 2
    assert "write over its own input" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["attack", "--attack", "wording", "--prompts", str(empty), "--out", str(out), *FAST]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    no_concept = tmp_path / "no_concept.jsonl"
    no_concept.write_text(json.dumps({"id": "a", "category": ["sexual"], "unsafe": "a nude"}) + "\n")
    assert main(["attack", "--attack", "wording", "--prompts", str(no_concept), "--out", str(out), *FAST]) == 2
    assert "no concept" in capsys.readouterr().err

    # a LoRA made for an SD1.5 UNet (kohya keys of layers the world model does not have)
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    foreign = tmp_path / "sd15_lora.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768, generator=g),
               f"{key}.lora_up.weight": torch.randn(320, 4, generator=g), f"{key}.alpha": torch.tensor(4.0)},
              str(foreign))
    assert main([*base, "--attack", "wording", "--lora", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "error" in err
    assert main([*base, "--attack", "wording", "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a later LoRA start needs a LoRA to switch, and a step the sampling reaches (FAST samples 4 steps)
    assert main([*base, "--attack", "wording", "--lora-start", "2"]) == 2
    assert "no --lora was given" in capsys.readouterr().err
    assert main([*base, "--attack", "wording", "--lora", str(foreign), "--lora-start", "4"]) == 2
    err = capsys.readouterr().err
    assert "lora_start (4) must be below the number of sampling steps (4)" in err
    assert not out.exists(), "a refused run wrote its output folder"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["attack", "--attack", "wording", "--prompts", str(pairs), "--out", str(busy), "--budget", "1",
                 *FAST]) == 2
    assert "holds no attack run" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"

    # a second run on a folder another run is writing (its lock beside the folder) is refused, and the lock kept
    from safetydpo_core.utils.lock import output_lock

    with output_lock(out, what="attack run"):
        assert main([*base, "--attack", "wording", "--budget", "1"]) == 2
        assert "lock" in capsys.readouterr().err
    assert not out.exists()
