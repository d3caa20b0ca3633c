"""benchmarks/science_adversary_change.py: the demo's merged LoRA with the adversarial fine-tune's change from the
merge cut to its top directions or scaled, written exactly, beside links to the demo's other files, made once."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import science_adversary_change as sac  # noqa: E402
from safetydpo_core.lora.io import load_lora, save_lora  # noqa: E402
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet  # noqa: E402


def _world():
    from safetydpo_core.world.model import load_world_model

    den = load_world_model()
    shapes = {k: v for k, v in den.weight_shapes().items() if k in den.layers("esd-u")}
    linear = [k for k, v in shapes.items() if len(v) == 2][:2]
    conv = [k for k, v in shapes.items() if len(v) == 4][:1]
    return den, {k: shapes[k] for k in linear + conv}


def _lora(shapes, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for k, v in shapes.items():
        down = torch.randn(rank, *v[1:], generator=g) if len(v) == 4 else torch.randn(rank, v[1], generator=g)
        up = torch.randn(v[0], rank, 1, 1, generator=g) if len(v) == 4 else torch.randn(v[0], rank, generator=g)
        layers[k] = LoraLayer(down, up, float(rank))
    return LoraSet(layers, "diffusers")


def test_the_rewritten_merged_lora_is_the_sum_with_the_change_cut_or_scaled():
    _, shapes = _world()
    plain, adv, merge = _lora(shapes, 0), _lora(shapes, 1), _lora(shapes, 2)
    share = 0.5
    whole, kept = sac.rewritten_merged(plain, adv, merge, share, "s1")
    assert kept == pytest.approx(1.0)
    for n in shapes:  # c = 1: the demo's sum, (1 - a) plain + a adversary
        assert torch.allclose(whole[n].delta(), 0.5 * plain[n].delta() + 0.5 * adv[n].delta(), atol=1e-4)
    none, kept = sac.rewritten_merged(plain, adv, merge, share, "s0")
    assert kept == 0.0
    for n in shapes:  # c = 0: the adversarial fine-tune's change gone, its start (the merge) kept
        assert torch.allclose(none[n].delta(), 0.5 * plain[n].delta() + 0.5 * merge[n].delta(), atol=1e-4)
    full, kept = sac.rewritten_merged(plain, adv, merge, share, "r8")  # the change has rank <= 8: nothing cut
    assert kept == pytest.approx(1.0, abs=1e-5)
    for n in shapes:
        assert torch.allclose(full[n].delta(), whole[n].delta(), atol=1e-3)
    top, kept = sac.rewritten_merged(plain, adv, merge, 0.3, "r1")
    energy = total = 0.0
    for n in shapes:
        change = (adv[n].delta() - merge[n].delta()).double()
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
        cut = (u[:, :1] * s[:1]) @ vh[:1]
        expect = 0.7 * plain[n].delta() + 0.3 * (merge[n].delta() + cut.float())
        assert torch.allclose(top[n].delta(), expect, atol=1e-3)
        assert top[n].rank == 4 + 4 + 1
        energy, total = energy + float(s[0] ** 2), total + float(s.pow(2).sum())
    assert kept == pytest.approx(energy / total, rel=1e-4) and 0 < kept < 1
    twice, kept2 = sac.rewritten_merged(plain, adv, merge, 0.3, "r1x2")  # the top direction, multiplied by 2
    for n in shapes:
        assert torch.allclose(twice[n].delta() - top[n].delta(), top[n].delta() - 0.7 * plain[n].delta()
                              - 0.3 * merge[n].delta(), atol=1e-3)
    assert kept2 == pytest.approx(4 * kept, rel=1e-4)


@pytest.mark.parametrize("bad", ["r0", "s1.5", "x2", "r", "s-1", "r2.5", "r2x0", "r2x", "s0.5x2"])
def test_a_variant_that_is_not_r_k_or_s_c_is_refused_by_name(bad, capsys):
    with pytest.raises(ValueError, match="r<k>"):
        sac.parse_variant(bad)
    with pytest.raises(SystemExit) as e:
        sac.main(["--demos", "d", "--out", "o", "--variants", bad])
    assert e.value.code == 2 and bad in capsys.readouterr().err


def test_an_unknown_attack_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sac.main(["--demos", str(tmp_path), "--out", str(tmp_path / "out"), "--attacks", "inversion,jailbreak"])
    assert e.value.code == 2 and "jailbreak" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_demo_without_the_adversary_is_refused(tmp_path):
    (tmp_path / "merged.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit, match="adversary.safetensors"):
        sac.main(["--demos", str(tmp_path), "--out", str(tmp_path / "out")])


def test_variant_demo_writes_the_rewritten_lora_once_and_links_the_rest(tmp_path):
    den, shapes = _world()
    names = den.names()
    demo = tmp_path / "demo"
    (demo / "eval").mkdir(parents=True)
    for f, seed in (("finetuned", 0), ("adversary", 1), ("comerge", 2), ("merged", 3)):
        save_lora(_lora(shapes, seed), demo / f"{f}.safetensors", names=names)
    (demo / "demo.json").write_text(json.dumps({"settings": {"seed": 0, "adversary_share": 0.4}}))
    for f in ("base.pt", "merged.pt"):
        (demo / "eval" / f).write_bytes(b"cached")

    folder = sac.variant_demo(demo, "r2", tmp_path / "out")
    assert folder == tmp_path / "out" / "demo" / "r2"
    record = json.loads((folder / "variant.json").read_text())
    assert record["variant"] == "r2" and record["adversary_share"] == 0.4 and 0 < record["change_energy_kept"] < 1
    made = load_lora(folder / "merged.safetensors", names=names)
    expect, _ = sac.rewritten_merged(*(load_lora(demo / f"{f}.safetensors", names=names)
                                       for f in ("finetuned", "adversary", "comerge")), 0.4, "r2")
    for n in shapes:
        assert torch.allclose(made[n].delta(), expect[n].delta(), atol=1e-5)
    assert (folder / "adversary.safetensors").is_symlink() and (folder / "eval" / "base.pt").is_symlink()
    assert not (folder / "eval" / "merged.pt").exists()  # evaluated anew
    stamp = (folder / "merged.safetensors").stat().st_mtime_ns
    assert sac.variant_demo(demo, "r2", tmp_path / "out") == folder
    assert (folder / "merged.safetensors").stat().st_mtime_ns == stamp
