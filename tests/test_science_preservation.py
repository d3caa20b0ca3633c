"""benchmarks/science_preservation.py: random changes of a LoRA's size, the LoRA on one guidance branch, and the
squared differences per timestep band, on the world model with random LoRA weights."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import science_preservation  # noqa: E402
from safetydpo_core.lora.apply import lora_applied  # noqa: E402
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet  # noqa: E402


@pytest.fixture(scope="module")
def world():
    from safetydpo_core.world.model import load_world_model

    den = load_world_model()
    shapes = {k: v for k, v in den.weight_shapes().items() if k in den.layers("attn")}
    g = torch.Generator().manual_seed(0)
    lora = LoraSet({k: LoraLayer(torch.randn(2, v[1], generator=g) * 0.1, torch.randn(v[0], 2, generator=g) * 0.1, 2.0)
                    for k, v in shapes.items()}, "diffusers")
    return den, lora


def test_random_like_keeps_each_layers_norm_times_k_in_another_direction(world):
    _, lora = world
    a = science_preservation.random_like(lora, 0.5, seed=3)
    b = science_preservation.random_like(lora, 0.5, seed=3)
    c = science_preservation.random_like(lora, 0.5, seed=4)
    assert set(a.layers) == set(lora.layers)
    for name, layer in lora.items():
        want = layer.delta().norm() * 0.5
        assert torch.allclose(a.layers[name].delta().norm(), want, rtol=1e-4)
        assert torch.equal(a.layers[name].up, b.layers[name].up)  # the same for a seed
        assert not torch.equal(a.layers[name].up, c.layers[name].up)
        cos = torch.nn.functional.cosine_similarity(a.layers[name].delta().flatten(), layer.delta().flatten(), dim=0)
        assert abs(float(cos)) < 0.5  # not the LoRA's own direction


def test_lora_on_one_branch_changes_only_that_half(world):
    from safetydpo_core.denoiser.protocol import Conditioning

    den, lora = world
    cond = Conditioning.cat([den.encode_prompts(["", ""]), den.encode_prompts(["a red circle", "a blue square"])])
    x = torch.randn((4,) + tuple(den.latent_shape(32, 32)), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 300, 500, 300])
    with torch.no_grad():
        base = den.predict(x, t, cond)
        with lora_applied(den.module, [(lora, 1.0)]):
            full = den.predict(x, t, cond)
        assert not torch.allclose(base, full, atol=1e-5)  # the LoRA does change the prediction
        for branch, changed in (("u", slice(0, 2)), ("c", slice(2, 4))):
            kept = slice(2, 4) if branch == "u" else slice(0, 2)
            with science_preservation.lora_on_branch(den, lora, branch):
                got = den.predict(x, t, cond)
            assert torch.allclose(got[changed], full[changed], atol=1e-5)
            assert torch.allclose(got[kept], base[kept], atol=1e-5)
        after = den.predict(x, t, cond)
    assert torch.allclose(after, base, atol=1e-6)  # the untouched model again after the block
    with pytest.raises(ValueError, match="branch"):
        with science_preservation.lora_on_branch(den, lora, "both"):
            pass


def test_band_errors_are_zero_for_no_change_and_grow_with_the_change(world):
    den, lora = world
    zero = science_preservation.random_like(lora, 1e-12)
    prompts = ["a red circle in the center", "a blue square on the left"]
    errors = science_preservation.band_errors(den, {"none": zero, "lora": lora, "double": lora.scaled(2.0)}, prompts,
                                              cfg=3.0, steps=4, noises=1)
    assert list(errors["lora"]) == [f"{lo}-{hi}" for lo, hi in science_preservation.BANDS]
    for band in errors["lora"]:
        c0, g0 = errors["none"][band]
        c1, g1 = errors["lora"][band]
        c2, g2 = errors["double"][band]
        assert c0 < 1e-12 and g0 < 1e-12
        assert 0 < c1 < c2 and 0 < g1 < g2


def test_a_folder_that_is_not_a_finished_demo_is_named(tmp_path):
    with pytest.raises(SystemExit, match="not a finished `safetydpo demo` folder"):
        science_preservation.main(["--demos", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--floor"):
        science_preservation.main(["--demos", str(tmp_path), "--out", str(tmp_path / "out"), "--floor", "0"])


def test_main_measures_a_demo_folder_and_reads_its_cache_back(tmp_path, world, capsys):
    import dataclasses
    import json

    from safetydpo_core.lora.io import save_lora
    from safetydpo_core.world.demo import DemoSettings
    from safetydpo_core.world.judge import load_judge
    from safetydpo_core.world.lora_eval import cached_evaluation, eval_sets, evaluate_lora

    den, lora = world
    s = DemoSettings.preset(quick=True, unrelated_per_wording=2, eval_steps=4)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text(json.dumps({"settings": dataclasses.asdict(s)}))
    save_lora(lora, demo / "merged.safetensors", names=den.names())
    sets = {"unrelated": eval_sets(s)["unrelated"]}
    cached_evaluation(demo / "eval" / "base.pt",
                      lambda: evaluate_lora(den, load_judge(), None, sets, steps=s.eval_steps, cfg=s.cfg))
    out = tmp_path / "out"
    assert science_preservation.main(["--demos", str(demo), "--out", str(out), "--floor", "1", "--noises", "1"]) == 0
    row = json.loads((out / "results.json").read_text())[str(demo)]
    for key in ("preservation", "branch_c", "branch_u", "random_k1"):
        assert 0 <= row[key] <= 1
    assert set(row["bands"]) == {"lora", "random x1"}
    assert all(len(b) == len(science_preservation.BANDS) for b in row["bands"].values())
    assert "| on the prompt's branch c only |" in capsys.readouterr().out
    cache = out / "demo" / "merged"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix != ".sha256"}
    assert science_preservation.main(["--demos", str(demo), "--out", str(out), "--floor", "1", "--noises", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix != ".sha256"} == stamps  # read back
    assert json.loads((out / "results.json").read_text())[str(demo)] == row
    save_lora(lora.scaled(0.5), demo / "merged.safetensors", names=den.names())  # another file, the same name
    with pytest.raises(SystemExit, match="holds results for another file named merged.safetensors"):
        science_preservation.main(["--demos", str(demo), "--out", str(out), "--floor", "1", "--noises", "1"])
