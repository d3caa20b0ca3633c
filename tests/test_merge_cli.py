"""``safetydpo merge`` end to end on a tiny SD1.5 model, with experts in kohya, ComfyUI and diffusers/peft keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safetydpo_core.cli.main import main
from safetydpo_core.lora.io import load_lora, save_lora
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.lora.unet_names import UNetNames


@pytest.fixture(scope="module")
def setup(tiny_sd15, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_cli")
    names = UNetNames.from_config(tiny_sd15 / "unet" / "config.json")
    shapes = names.shapes["diffusers"]
    attn = {n: s for n, s in shapes.items() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    cross = {n: s for n, s in attn.items() if ".attn2." in n}

    def expert(seed, rank, alpha, layers):
        g = torch.Generator().manual_seed(seed)
        return LoraSet({n: LoraLayer(torch.randn(rank, s[1], generator=g) / rank ** 0.5,
                                     torch.randn(s[0], rank, generator=g) * 0.2, alpha) for n, s in layers.items()},
                       "diffusers")

    e1 = expert(1, 4, 2.0, attn)
    e2 = expert(2, 8, 8.0, cross)
    e3 = expert(3, 2, 2.0, attn)
    p1 = save_lora(e1, d / "violence.safetensors", names=names, metadata={"safetydpo_category": "violence"})
    p2 = save_lora(e2, d / "sexual.safetensors", names=names, fmt="comfy", metadata={"safetydpo_category": "sexual"})
    peft_sd = {}
    for n, l in e3.items():
        peft_sd[f"unet.{n}.lora_A.weight"] = l.down
        peft_sd[f"unet.{n}.lora_B.weight"] = l.up
    p3 = d / "hate_peft.safetensors"
    save_file(peft_sd, str(p3), metadata={"safetydpo_category": "hate"})
    pairs = d / "pairs.jsonl"
    rows = [{"id": f"{c}{i}", "category": [c], "concept": c, "unsafe": f"a {w} man at night {i}", "safe": f"a man {i}"}
            for i in range(4) for c, w in (("violence", "red"), ("sexual", "blue"), ("hate", "green"))]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return {"dir": d, "names": names, "experts": [e1, e2, e3], "paths": [p1, p2, p3], "pairs": pairs,
            "model": tiny_sd15}


def _sum(experts):
    out = {}
    for e in experts:
        for n, l in e.items():
            out[n] = out.get(n, 0) + l.delta()
    return out


def test_concat_from_three_key_styles_is_exact(setup, capsys):
    out = setup["dir"] / "concat.safetensors"
    rc = main(["merge", "--model", str(setup["model"]), "--experts", *map(str, setup["paths"]), "--method", "concat",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    merged = load_lora(out, names=setup["names"])
    want = _sum(setup["experts"])
    assert set(merged.layers) == set(want)
    for n, d in want.items():
        assert torch.allclose(merged[n].delta(), d, atol=1e-5), n
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert meta["safetydpo_merge_method"] == "concat"
    assert [e["file"] for e in json.loads(meta["safetydpo_merge_experts"])] == [p.name for p in setup["paths"]]
    assert meta["safetydpo_category"] == "violence,sexual,hate"
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["overall"]["sum_deviation"] < 1e-5
    assert (setup["dir"] / "concat.report.txt").exists() and (setup["dir"] / "concat.config.json").exists()
    assert "violence" in capsys.readouterr().out


@pytest.mark.parametrize("method,extra", [("comerge", ["--aggregate", "vote"]),
                                          ("comerge-delta", ["--rank", "6", "--normalize", "mean"])])
def test_comerge_with_calibration_prompts(setup, capsys, method, extra):
    out = setup["dir"] / f"{method}.safetensors"
    stats = setup["dir"] / f"{method}.stats.safetensors"
    args = ["merge", "--model", str(setup["model"]), "--experts", *map(str, setup["paths"]), "--method", method,
            "--calibration", str(setup["pairs"]), "--calibration-inputs", "6", "--calibration-batch", "3",
            "--stats", str(stats), "--out", str(out), "--device", "cpu", *extra]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    assert stats.exists()
    merged = load_lora(out, names=setup["names"])
    ranks = set(merged.ranks.values())
    assert ranks == ({4, 8} if method == "comerge" else {6})   # comerge: the largest rank present in each layer
    report = json.loads((setup["dir"] / f"{method}.report.json").read_text())
    shares = report["overall"]["shares"]
    assert set(shares) == {"violence", "sexual", "hate"} and abs(sum(shares.values()) - 1) < 1e-9
    assert report["calibration"]["num_inputs"] == 6 and report["calibration"]["categories"] == ["violence", "sexual", "hate"]
    for layer in report["layers"]:
        assert abs(sum(layer["shares"].values()) - 1) < 1e-9
        if ".attn1." in layer["layer"]:
            assert layer["shares"]["sexual"] == 0.0     # the sexual expert adapts cross-attention only
    with safe_open(str(out), framework="pt") as f:
        opts = json.loads(f.metadata()["safetydpo_merge_options"])
    assert opts["aggregate"] == ("vote" if method == "comerge" else "mean")
    # a second run reuses the cached statistics and gives the same file content
    out2 = setup["dir"] / f"{method}-again.safetensors"
    args[args.index("--out") + 1] = str(out2)
    assert main(args) == 0
    again = load_lora(out2, names=setup["names"])
    assert again.allclose(merged, rtol=0, atol=0)


def test_refusals(setup, capsys, tiny_sdxl):
    base = ["merge", "--model", str(setup["model"]), "--device", "cpu", "--experts", *map(str, setup["paths"])]
    d = setup["dir"]
    assert main(base + ["--method", "concat", "--rank", "4", "--out", str(d / "x.safetensors")]) == 2
    assert "concat is exact" in capsys.readouterr().err
    assert main(base + ["--method", "comerge", "--out", str(d / "y.safetensors")]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert main(base + ["--method", "linear", "--weights", "1", "2", "--out", str(d / "z.safetensors")]) == 2
    assert "one per expert" in capsys.readouterr().err
    # an expert of another base model: same layer names, another cross-attention width
    names = setup["names"]
    layer = next(n for n in names.shapes["diffusers"] if n.endswith("attn2.to_k"))
    out_f, in_f = names.shapes["diffusers"][layer]
    alien = LoraSet({layer: LoraLayer(torch.randn(4, in_f * 2), torch.randn(out_f, 4), 4.0)}, "diffusers")
    alien_path = save_lora(alien, d / "alien.safetensors", names=names)
    assert main(base + [str(alien_path), "--method", "linear", "--out", str(d / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert layer in err and f"({out_f}, {in_f * 2})" in err and f"({out_f}, {in_f})" in err
    assert "alien.safetensors" in err
    # an SDXL expert on an SD1.5 model: its keys name no layer of the model
    xl_names = UNetNames.from_config(tiny_sdxl / "unet" / "config.json")
    xl_layer = next(n for n in xl_names.shapes["ldm"] if n.endswith("transformer_blocks.1.attn1.to_q"))
    s = xl_names.shapes["ldm"][xl_layer]
    xl = LoraSet({xl_layer: LoraLayer(torch.randn(4, s[1]), torch.randn(s[0], 4), 4.0)}, "ldm")
    xl_path = save_lora(xl, d / "xl.safetensors", names=xl_names, fmt="comfy")
    assert main(base + [str(xl_path), "--method", "concat", "--out", str(d / "v.safetensors")]) == 2
    assert "xl.safetensors" in capsys.readouterr().err
    assert not any((d / f"{n}.safetensors").exists() for n in "xyzwv")
    # an existing output is not overwritten without --overwrite
    (d / "exists.safetensors").write_bytes(b"keep")
    assert main(base + ["--method", "concat", "--out", str(d / "exists.safetensors")]) == 2
    assert (d / "exists.safetensors").read_bytes() == b"keep"


def test_sdxl_layout_calibrates_and_writes_ldm_kohya_keys(tiny_sdxl, tmp_path, capsys):
    names = UNetNames.from_config(tiny_sdxl / "unet" / "config.json")
    attn = {n: s for n, s in names.shapes["diffusers"].items() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    paths = []
    for seed, cat in ((1, "violence"), (2, "shocking")):
        g = torch.Generator().manual_seed(seed)
        e = LoraSet({n: LoraLayer(torch.randn(4, s[1], generator=g), torch.randn(s[0], 4, generator=g), 4.0)
                     for n, s in attn.items()}, "diffusers", {"ss_base_model_version": "sdxl_base_v1-0"})
        paths.append(save_lora(e, tmp_path / f"{cat}.safetensors", names=names, metadata={"safetydpo_category": cat}))
    with safe_open(str(paths[0]), framework="pt") as f:
        assert any("input_blocks" in k for k in f.keys())        # kohya SDXL files use LDM names
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"id": f"p{i}", "category": c, "concept": "x", "unsafe": f"a red man {i}",
                                           "safe": f"a man {i}"}) for i, c in enumerate(["violence", "shocking"] * 2)))
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", "--model", str(tiny_sdxl), "--device", "cpu", "--experts", *map(str, paths), "--method",
               "comerge-delta", "--rank", "3", "--calibration", str(pairs), "--calibration-inputs", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert keys and all(k.startswith("lora_unet_input_blocks") or k.startswith("lora_unet_middle_block")
                        or k.startswith("lora_unet_output_blocks") for k in keys)
    merged = load_lora(out, names=names)
    assert merged.naming == "ldm" and set(merged.ranks.values()) == {3}
