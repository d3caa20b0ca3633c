"""benchmarks/science_strength.py: the scaled copy of a demo's merged LoRA, beside links to the demo's other files
(its cached evaluations but the merged LoRA's), made once."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import science_strength  # noqa: E402
from safetydpo_core.lora.io import load_lora, save_lora  # noqa: E402
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet  # noqa: E402


def test_scaled_demo_scales_every_update_and_links_the_rest(tmp_path):
    from safetydpo_core.world.model import load_world_model

    den = load_world_model()
    names = den.names()
    shapes = {k: v for k, v in den.weight_shapes().items() if k in den.layers("attn")}
    g = torch.Generator().manual_seed(0)
    lora = LoraSet({k: LoraLayer(torch.randn(2, v[1], generator=g), torch.randn(v[0], 2, generator=g), 2.0)
                    for k, v in shapes.items()}, "diffusers")
    demo = tmp_path / "demo"
    (demo / "eval").mkdir(parents=True)
    save_lora(lora, demo / "merged.safetensors", names=names)
    (demo / "demo.json").write_text(json.dumps({"settings": {"seed": 0}}))
    for f in ("base.pt", "merged.pt"):
        (demo / "eval" / f).write_bytes(b"cached")
    (demo / "report.json").write_text("{}")

    folder = science_strength.scaled_demo(demo, 0.8, tmp_path / "out")
    assert folder == tmp_path / "out" / "demo" / "strength_0.8"
    scaled = load_lora(folder / "merged.safetensors", names=names)
    original = load_lora(demo / "merged.safetensors", names=names)
    for name in original.layers:
        assert torch.allclose(scaled[name].delta(), 0.8 * original[name].delta(), atol=1e-5)
    assert (folder / "demo.json").is_symlink() and (folder / "eval" / "base.pt").is_symlink()
    assert not (folder / "eval" / "merged.pt").exists() and not (folder / "report.json").exists()  # evaluated anew
    stamp = (folder / "merged.safetensors").stat().st_mtime_ns
    assert science_strength.scaled_demo(demo, 0.8, tmp_path / "out") == folder  # made once
    assert (folder / "merged.safetensors").stat().st_mtime_ns == stamp


def test_a_folder_that_is_not_a_finished_demo_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a finished `safetydpo demo` folder"):
        science_strength.main(["--demos", str(tmp_path), "--out", str(tmp_path / "out")])


def test_a_later_start_gets_a_folder_of_its_own_with_the_start_recorded(tmp_path):
    from safetydpo_core.world.model import load_world_model

    den = load_world_model()
    names = den.names()
    (name, shape), = [(k, v) for k, v in den.weight_shapes().items() if k in den.layers("attn")][:1]
    lora = LoraSet({name: LoraLayer(torch.ones(2, shape[1]), torch.ones(shape[0], 2), 2.0)}, "diffusers")
    demo = tmp_path / "demo"
    (demo / "eval").mkdir(parents=True)
    save_lora(lora, demo / "merged.safetensors", names=names)
    record = {"demo_version": 1, "settings": {"seed": 0, "steps": 20}}
    (demo / "demo.json").write_text(json.dumps(record))

    folder = science_strength.scaled_demo(demo, 0.9, tmp_path / "out", lora_start=10)
    assert folder.name == "strength_0.9_from_step_10"
    assert not (folder / "demo.json").is_symlink()
    assert json.loads((folder / "demo.json").read_text())["settings"] == {"seed": 0, "steps": 20, "lora_start": 10}
    assert json.loads((demo / "demo.json").read_text()) == record  # the demo's own record untouched
    assert science_strength.scaled_demo(demo, 0.9, tmp_path / "out") != folder  # from step 0: another folder


def test_attack_asr_reads_the_attacks_already_run_and_runs_none_again(tmp_path, monkeypatch):
    (tmp_path / "attacks").mkdir()
    (tmp_path / "attacks" / "results.json").write_text(json.dumps({"table": {
        "merged": {"inversion": {"asr": 0.25}, "wording": {"asr": 0.05}},
        "merged from step 10": {"inversion": {"asr": 0.4}}}}))
    monkeypatch.setattr(science_strength.subprocess, "run", lambda *a, **k: pytest.fail("an attack was run again"))
    assert science_strength.attack_asr(tmp_path, ["inversion", "wording"], 1) == {"inversion": 0.25, "wording": 0.05}
    assert science_strength.attack_asr(tmp_path, ["inversion"], 1, lora_start=10) == {"inversion": 0.4}
