"""The ``safetydpo`` command line on flow-matching transformers (tiny Flux.1-dev- and SD3.5-style diffusers folders):
pairs -> render -> train (two experts) -> merge (Co-Merge, calibrated) -> sample base and aligned -> eval, and the
guidance and key-format options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from safetydpo_core.cli.main import main
from safetydpo_core.tiny_models import build_tiny_flow_pipeline


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return str(build_tiny_flow_pipeline(tmp_path_factory.mktemp("cli_flux") / "model", kind="flux", seed=5))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return str(build_tiny_flow_pipeline(tmp_path_factory.mktemp("cli_sd3") / "model", kind="sd3", seed=6))


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


def test_flux_pairs_render_train_merge_sample_eval(flux, tmp_path, capsys):
    from safetydpo_core.eval.testing import build_tiny_clip, write_q16_embeddings

    w = tmp_path
    assert main(["pairs", "--categories", "sexual,violence", "--per-category", "2", "--seed", "1", "--out",
                 str(w / "pairs.jsonl"), "--no-progress"]) == 0
    assert main(["pairs", "--from-jsonl", str(w / "pairs.jsonl"), "--format", "i2p", "--out", str(w / "eval.csv"),
                 "--no-progress"]) == 0
    assert main(["render", "--model", flux, "--pairs", str(w / "pairs.jsonl"), "--out", str(w / "data"), "--steps", "2",
                 "--device", "cpu", "--no-previews"]) == 0
    rendered = json.loads((w / "data" / "config.json").read_text())
    assert rendered["cfg"] == 1.0 and rendered["guidance"] == 3.5  # Flux.1-dev: no CFG, distilled guidance 3.5
    for cat in ("sexual", "violence"):
        assert main(["train", "--model", flux, "--data", str(w / "data"), "--out", str(w / f"{cat}.safetensors"),
                     "--category", cat, "--steps", "2", "--rank", "2", "--lr", "1e-3", "--device", "cpu"]) == 0
        keys, meta = _keys(w / f"{cat}.safetensors")
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
        assert meta["ss_base_model_version"] == "flux1" and meta["safetydpo_guidance"] == "3.5"
    assert main(["merge", "--model", flux, "--experts", str(w / "sexual.safetensors"), str(w / "violence.safetensors"),
                 "--calibration", str(w / "pairs.jsonl"), "--calibration-inputs", "4", "--calibration-size", "32",
                 "--out", str(w / "merged.safetensors"), "--device", "cpu"]) == 0
    keys, meta = _keys(w / "merged.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys and meta["ss_base_model_version"] == "flux1"
    assert main(["sample", "--model", flux, "--prompts", str(w / "eval.csv"), "--out", str(w / "base"), "--steps", "2",
                 "--ignore-row-guidance", "--device", "cpu"]) == 0
    assert main(["sample", "--model", flux, "--prompts", str(w / "eval.csv"), "--out", str(w / "aligned"), "--steps", "2",
                 "--ignore-row-guidance", "--lora", str(w / "merged.safetensors"), "--strength", "1",
                 "--device", "cpu"]) == 0
    assert json.loads((w / "aligned" / "config.json").read_text())["cfg"] == 1.0
    weights = w / "weights"
    build_tiny_clip(weights / "clip-vit-large-patch14")
    write_q16_embeddings(weights / "q16" / "prompts.npy", np.random.default_rng(0).normal(size=(2, 16)))
    capsys.readouterr()
    assert main(["eval", str(w / "base"), str(w / "aligned"), "--out", str(w / "report"), "--weights-dir", str(weights),
                 "--q16", "on", "--clipscore", "on", "--nudenet", "off", "--device", "cpu"]) == 0
    assert "Comparison with `base`" in capsys.readouterr().out


def test_guidance_and_key_formats(flux, sd3, tmp_path, capsys):
    w = tmp_path
    assert main(["pairs", "--categories", "violence", "--per-category", "1", "--out", str(w / "pairs.jsonl"),
                 "--no-progress"]) == 0
    # a guidance value for a model without a guidance input: refused, nothing written
    capsys.readouterr()
    assert main(["render", "--model", sd3, "--guidance", "3.5", "--pairs", str(w / "pairs.jsonl"), "--out",
                 str(w / "data"), "--steps", "1", "--device", "cpu"]) == 2
    assert "no guidance input" in capsys.readouterr().err and not (w / "data").exists()
    assert main(["render", "--model", sd3, "--pairs", str(w / "pairs.jsonl"), "--out", str(w / "data"), "--steps", "1",
                 "--device", "cpu", "--no-previews"]) == 0
    assert json.loads((w / "data" / "config.json").read_text())["cfg"] == 4.5  # SD3's usual guidance scale
    # diffusers' own keys for SD3 (what pipe.load_lora_weights reads), kohya's by default
    assert main(["train", "--model", sd3, "--data", str(w / "data"), "--out", str(w / "peft.safetensors"), "--steps", "1",
                 "--rank", "2", "--format", "peft", "--device", "cpu"]) == 0
    keys, _ = _keys(w / "peft.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys and not any(".alpha" in k for k in keys)
    assert main(["train", "--model", sd3, "--data", str(w / "data"), "--out", str(w / "kohya.safetensors"), "--steps", "1",
                 "--rank", "2", "--device", "cpu"]) == 0
    keys, meta = _keys(w / "kohya.safetensors")
    assert "lora_unet_joint_blocks_0_context_block_attn_qkv.alpha" in keys and meta["ss_base_model_version"] == "sd3"
    # a dataset of another architecture (SD3 pairs for Flux) is refused, even with a model mismatch allowed
    capsys.readouterr()
    assert main(["train", "--model", flux, "--data", str(w / "data"), "--out", str(w / "x.safetensors"), "--steps", "1",
                 "--allow-model-mismatch", "--device", "cpu"]) == 2
    assert "another architecture" in capsys.readouterr().err and not (w / "x.safetensors").exists()
