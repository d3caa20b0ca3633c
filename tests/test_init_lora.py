"""Training from an existing LoRA (``train --init-lora``, the train node's init_lora, the demo's joint fine-tune):
padding to the run's rank keeps the update, the run starts where the LoRA is, and bad starting LoRAs are named."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import make_dataset
from safetydpo_core.cli.main import main
from safetydpo_core.data import PreferenceDataset
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import LoraError
from safetydpo_core.lora.io import save_lora
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.training import TrainConfig, train_expert
from safetydpo_core.training.init_lora import fit_init_lora, run_rank


@pytest.fixture(scope="module")
def root(sd15, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("init") / "pairs", sd15)


@pytest.fixture(scope="module")
def expert(sd15, root):
    """A trained rank-2 expert (its update is far from zero)."""
    data = PreferenceDataset(root, categories="violence", expect_fingerprint=sd15.fingerprint())
    return train_expert(sd15, data, TrainConfig(steps=4, rank=2, lr=1e-2, beta=500, seed=1)).lora


def _deltas(lora):
    return {n: l.delta() for n, l in lora.items()}


def test_padding_to_a_larger_rank_keeps_every_layer_s_update(sd15, expert):
    padded = fit_init_lora(expert, sd15, rank=5, seed=3)
    assert set(padded.layers) == set(expert.layers) and {l.rank for l in padded.layers.values()} == {5}
    before, after = _deltas(expert), _deltas(padded)
    for n in before:
        assert torch.allclose(before[n], after[n], atol=1e-6), n
    # the added rank can learn: its down rows are not zero (its up columns are)
    layer = next(iter(padded.layers.values()))
    assert layer.down[2:].abs().sum() > 0 and layer.up[:, 2:].abs().sum() == 0


def test_run_rank_is_raised_to_the_lora_s_and_never_lowered(expert):
    assert run_rank(TrainConfig(rank=1), expert).rank == 2
    assert run_rank(TrainConfig(rank=8), expert).rank == 8


def test_training_starts_from_the_init_lora(sd15, root, expert):
    data = PreferenceDataset(root, categories=None, expect_fingerprint=sd15.fingerprint())
    cfg = run_rank(TrainConfig(steps=1, rank=1, lr=1e-9, beta=500, seed=0, max_grad_norm=0), expert)
    res = train_expert(sd15, data, cfg, init_lora=expert)
    assert res.lora.max_rank == 2
    before, after = _deltas(expert), _deltas(res.lora)
    for n in before:
        assert torch.allclose(before[n], after[n], atol=1e-5), n
    # the first step already sees the init LoRA's preference: not the ln 2 of a LoRA that starts at zero
    assert abs(res.history[0]["loss"] - 0.6931) > 1e-3
    fresh = train_expert(sd15, data, TrainConfig(steps=1, rank=2, lr=1e-9, beta=500, seed=0, max_grad_norm=0))
    assert abs(fresh.history[0]["loss"] - 0.6931) < 1e-3


def test_a_rank_above_a_layer_s_size_caps_that_layer_and_keeps_the_run_s_scale(sd15, root):
    """Rank 40 on the tiny UNet's attention: layers of width 32 train at rank 32 (alpha scaled, so every layer's
    scale is alpha / 40), the 64-wide ones at 40; a fine-tune at a higher rank from that file keeps the capped
    layers at their size and pads the others."""
    from safetydpo_core.lora.targets import max_rank

    layers = sd15.layers("attn")
    assert {max_rank(m) for m in layers.values()} == {32, 64}
    data = PreferenceDataset(root, categories="violence", expect_fingerprint=sd15.fingerprint())
    res = train_expert(sd15, data, TrainConfig(steps=1, rank=40, alpha=20.0, lr=1e-3, beta=500, seed=0))
    for name, layer in res.lora.items():
        assert layer.rank == min(40, max_rank(layers[name])), name
        assert layer.scale == pytest.approx(0.5), name
    assert {l.rank for l in res.lora.layers.values()} == {32, 40}
    fitted = fit_init_lora(res.lora, sd15, rank=48)
    assert {n: l.rank for n, l in fitted.items()} == {n: min(48, max_rank(layers[n])) for n in res.lora.layers}
    before, after = _deltas(res.lora), _deltas(fitted)
    for n in before:
        assert torch.allclose(before[n], after[n], atol=1e-6), n


def test_a_starting_lora_with_more_rank_than_a_layer_has_is_refactored_exactly(sd15, expert):
    """A merge at rank 36 gives a 32-wide layer 36 factor rows (36 > 32 adds nothing): the fine-tune's
    adapter has 32 there, and the file's update is kept exactly."""
    name = next(n for n, l in expert.items() if l.down.shape[1] == 32 and l.up.shape[0] == 32)
    g = torch.Generator().manual_seed(0)
    big = LoraLayer(torch.randn(36, 32, generator=g), torch.randn(32, 36, generator=g) * 0.1, 9.0)
    lora = LoraSet({**expert.layers, name: big}, expert.naming)
    fitted = fit_init_lora(lora, sd15, rank=36)
    assert fitted.layers[name].rank == 32 and fitted.layers[name].scale == pytest.approx(1.0)
    assert torch.allclose(fitted.layers[name].delta(), big.delta(), atol=1e-4)
    assert all(fitted.layers[n].rank == 36 for n in expert.layers if n != name and
               min(expert.layers[n].up.shape[0], expert.layers[n].down.shape[1]) > 36)


def test_bad_starting_loras_are_named(sd15, tiny_sdxl, expert, root):
    with pytest.raises(LoraError, match="rank 2, above the run's rank 1"):
        fit_init_lora(expert, sd15, rank=1)
    name = sorted(expert.layers)[0]
    bad = LoraSet({**expert.layers, name: LoraLayer(expert.layers[name].down * float("nan"),
                                                     expert.layers[name].up, expert.layers[name].alpha)}, expert.naming)
    with pytest.raises(LoraError, match=f"NaN or infinite values in layer '{name}'"):
        fit_init_lora(bad, sd15, rank=2)
    other = DiffusersDenoiser.from_pretrained(tiny_sdxl)
    with pytest.raises(LoraError, match="Start only from a LoRA made for this model"):
        fit_init_lora(expert, other, rank=2)


def test_cli_init_lora(tiny_sd15, sd15, root, expert, tmp_path, capsys):
    init = tmp_path / "merged.safetensors"
    save_lora(expert, init, names=sd15.names())
    out = tmp_path / "tuned.safetensors"
    args = ["train", "--model", str(tiny_sd15), "--data", str(root), "--out", str(out), "--steps", "2", "--lr", "1e-3",
            "--beta", "500", "--init-lora", str(init)]
    assert main(args) == 0
    with safe_open(str(out), "pt") as f:  # --rank's default (4) is above the LoRA's rank 2: the run pads to 4
        assert f.metadata()["ss_network_dim"] == "4"
    assert json.loads(out.with_suffix(".config.json").read_text())["init_lora"] == str(init)
    # a LoRA whose shapes do not fit this model, and a file that is not there, are refused; nothing is written
    name = sorted(expert.layers)[0]
    l = expert.layers[name]
    wrong = LoraSet({**expert.layers, name: LoraLayer(torch.zeros(l.rank, l.down.shape[1] + 8), l.up, l.alpha)},
                    expert.naming)
    other = tmp_path / "other_model.safetensors"
    save_lora(wrong, other, names=sd15.names())
    bad_out = tmp_path / "bad.safetensors"
    base = args[:6] + [str(bad_out)] + ["--steps", "1", "--init-lora"]
    assert main(base + [str(other)]) == 2
    assert "Start only from a LoRA made for this model" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not bad_out.exists() and not bad_out.with_suffix(".config.json").exists()
