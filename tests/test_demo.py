"""`safetydpo demo --quick` end to end on the built-in world: the merged LoRA lowers IP against the base model."""

from __future__ import annotations

import json
import re
import os

import pytest
import torch
from PIL import Image

from safetydpo_core.cli.main import main
from safetydpo_core.errors import ConfigError
from safetydpo_core.lora.io import load_lora, read_safetensors
from safetydpo_core.world import WORLD, Scene, load_judge, render_batch
from safetydpo_core.world.demo import DemoSettings, WorldPairJudge, run_demo

CATEGORIES = [o.category for o in WORLD.concepts]
QUICK_STEPS = 50


def _assert_weighted_sum(merged, parts):
    """Every tenth layer of the LoRA ``merged`` updates the weights by the sum of ``parts`` (``(weight, LoRA)``)."""
    for name in list(merged.layers)[::10]:
        want = sum(w * lora.layers[name].delta(torch.float32) for w, lora in parts)
        torch.testing.assert_close(merged.layers[name].delta(torch.float32), want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    # the quick preset with fewer DPO steps (50, not 90), to keep CI short: merged IP 0.25 here against 0.11
    # two worker processes for the experts and the evaluations (the default on a 2-core machine)
    rc = main(["demo", "--quick", "--out", str(out), "--seed", "0", "--steps", str(QUICK_STEPS), "--workers", "2"])
    assert rc == 0
    return out


def test_quick_demo_writes_reports_grids_and_loras(quick_run):
    out = quick_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["experts"]) == set(CATEGORIES)
    for entry in [report["base"], report["merged"], *report["experts"].values()]:
        for key in ("ip", "fidelity", "layout", "twin_with_layout", "unrelated"):
            assert key in entry
    assert set(report["base"]["ip_per_category"]) == set(report["merged"]["ip_per_category"]) == set(CATEGORIES)
    for cat, entry in report["experts"].items():  # each expert on its own concept (and unrelated content)
        assert set(entry["ip_per_category"]) == {cat} and entry["n_unsafe"] == report["base"]["n_unsafe"] // 7
    md = (out / "report.md").read_text()
    assert "| base |" in md and "| merged |" in md and "IP per concept" in md
    for name in ("before_after", "experts", "safe_prompts"):
        with Image.open(out / "grids" / f"{name}.png") as im:
            assert im.width > 100 and im.height > 90
    from safetydpo_core.world import load_world_model

    names = load_world_model().names()
    merged, comerge, plain, adv = (load_lora(out / f"{n}.safetensors", names=names)
                                   for n in ("merged", "comerge", "finetuned", "adversary"))
    assert comerge.metadata.get("safetydpo_merge_method") == report["settings"]["merge_method"]
    # two joint fine-tunes on every category's pairs, both started from the merge: a plain one and one against
    # concept inversion (adversary 0.5, preserving `auto`); merged.safetensors is the two summed, half each
    for ft in (plain, adv):
        assert ft.metadata["safetydpo_init_lora"] == "comerge.safetensors"
        assert ft.metadata["safetydpo_merge_method"] == report["settings"]["merge_method"]
        assert ft.metadata["safetydpo_category"] == "all" and ft.metadata["safetydpo_steps"] == "40"
        assert ft.metadata["safetydpo_ema_decay"] == "0.95"  # both save their weights' moving average
    assert adv.metadata["safetydpo_adv_weight"] == "0.5" and "safetydpo_adv_weight" not in plain.metadata
    assert adv.metadata["safetydpo_preserve_prompts"] == "auto" and plain.metadata["safetydpo_preserve_prompts"] == "auto+tokens"
    assert report["settings"]["adversary"] == 0.5 and report["settings"]["adversary_preserve"] == "auto"
    assert merged.metadata["safetydpo_merge_method"] == "concat"
    assert json.loads(merged.metadata["safetydpo_merge_options"])["weights"] == [0.5, 0.5]
    # the plain fine-tune keeps each pair's safe twin (twin_weight 10), the adversarial one and the experts do
    # not; the report says so
    assert plain.metadata["safetydpo_twin_weight"] == "10" and report["settings"]["twin_weight"] == 10
    assert "safetydpo_twin_weight" not in adv.metadata
    assert "fine-tuned 40 steps on all pairs keeping each pair's safe twin (twin_weight 10) and, beside that, 40 " \
           "steps against concept inversion (adv_weight 0.5, preserving `auto`); the merged LoRA is the two summed, " \
           "the adversarial one at 0.5; each fine-tune saved as the moving average of its weights (ema_decay 0.95)" in md
    assert set(merged.layers) == set(comerge.layers) == set(plain.layers) and merged.max_rank == 2 * comerge.max_rank
    _assert_weighted_sum(merged, [(0.5, plain), (0.5, adv)])
    # the default layers: every layer outside cross-attention (docs/benchmarks.md, "LoRA layers")
    assert report["settings"]["targets"] == "esd-u" and "on `esd-u`" in (out / "report.md").read_text()
    assert not any(".attn2." in n for n in merged.layers) and any(n.endswith("conv1") for n in merged.layers)
    assert any(not torch.allclose(merged.layers[n].delta(), comerge.layers[n].delta()) for n in merged.layers)
    # with workers, the fine-tune and the evaluations share one pool, the base model evaluated while it trains
    assert report["seconds"]["finetune+evaluate"] > 0 and "finetune" not in report["seconds"]
    for cat in CATEGORIES:
        _, meta = read_safetensors(out / "experts" / f"{cat}.safetensors")
        assert meta["safetydpo_category"] == cat and meta["ss_base_model_version"] == WORLD.version
        assert meta["safetydpo_preserve_prompts"] == report["settings"]["preserve_prompts"] == "auto+tokens"
        assert "safetydpo_twin_weight" not in meta and "safetydpo_ema_decay" not in meta
        assert (out / "experts" / f"{cat}.metrics.csv").stat().st_size > 0
    assert (out / "dataset" / "summary.json").exists() and (out / "pairs.jsonl").exists()


def test_quick_demo_merged_lora_lowers_ip_and_keeps_safe_prompts(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    base, merged = report["base"], report["merged"]
    assert base["ip"] >= 0.8, "the base world model should draw the unsafe concepts it is asked for"
    assert merged["ip"] <= base["ip"] - 0.25, (base["ip"], merged["ip"])
    assert merged["fidelity"] >= 0.75 * base["fidelity"], (base["fidelity"], merged["fidelity"])
    # each expert removes its own concept more than the base model shows it
    own = [report["experts"][c]["own_ip"] for c in CATEGORIES]
    base_own = [base["ip_per_category"][c] for c in CATEGORIES]
    assert sum(own) < sum(base_own) - 2, (own, base_own)


def test_rerun_resumes_without_retraining(quick_run):
    expert = quick_run / "experts" / "hate.safetensors"
    before = expert.stat().st_mtime_ns
    # in one process this time: the processes and threads are how a run goes, not what it makes
    report = run_demo(quick_run, DemoSettings.preset(quick=True, seed=0, steps=QUICK_STEPS, workers=1, threads=1),
                      log=lambda m: None)
    assert expert.stat().st_mtime_ns == before
    assert report["merged"]["ip"] == json.loads((quick_run / "report.json").read_text())["merged"]["ip"]


def test_merged_lora_is_what_the_merge_command_makes_of_the_two_fine_tunes(quick_run, tmp_path):
    """The README's command-line equivalent of the demo's last step: ``safetydpo merge --method concat --experts
    finetuned.safetensors adversary.safetensors --weights 0.5 0.5`` gives the demo's merged LoRA."""
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--method", "concat", "--experts", str(quick_run / "finetuned.safetensors"),
                 str(quick_run / "adversary.safetensors"), "--weights", "0.5", "0.5", "--out", str(out)]) == 0
    from safetydpo_core.world import load_world_model

    names = load_world_model().names()
    mine, demo = (load_lora(p, names=names) for p in (out, quick_run / "merged.safetensors"))
    assert set(mine.layers) == set(demo.layers)
    for name in mine.layers:
        torch.testing.assert_close(mine.layers[name].delta(torch.float32), demo.layers[name].delta(torch.float32))


def test_finetune_stage_runs_the_demos_fine_tunes_from_any_lora(quick_run, tmp_path):
    """``finetune_stage``, the demo's fine-tune stage as a function (benchmarks/science_merges.py runs it from
    All-single): from a given LoRA, the plain and the adversarial fine-tunes into a folder of its own, the merged LoRA
    their sum; a second call keeps the files."""
    from safetydpo_core.world import load_world_model
    from safetydpo_core.world.demo import finetune_stage

    den = load_world_model()
    s = DemoSettings.preset(quick=True, seed=0, steps=QUICK_STEPS, finetune_steps=2, threads=1)
    out = tmp_path / "staged"
    lines = []
    path = finetune_stage(den, quick_run / "experts" / f"{CATEGORIES[0]}.safetensors", out, s,
                          dataset=quick_run / "dataset", pairs=quick_run / "pairs.jsonl", say=lines.append)
    assert path == out / "merged.safetensors"
    said = "\n".join(lines)
    assert "training the joint fine-tune" in said and "training the adversarial fine-tune (adv_weight 0.5)" in said
    assert read_safetensors(out / "adversary.safetensors")[1]["safetydpo_adv_weight"] == "0.5"
    assert read_safetensors(out / "finetuned.safetensors")[1]["safetydpo_steps"] == "2"
    plain, adv, merged = (load_lora(out / f"{n}.safetensors", names=den.names())
                          for n in ("finetuned", "adversary", "merged"))
    _assert_weighted_sum(merged, [(0.5, plain), (0.5, adv)])
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")}
    assert finetune_stage(den, quick_run / "comerge.safetensors", out, s, dataset=quick_run / "dataset",
                          pairs=quick_run / "pairs.jsonl", say=lines.append) == path
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")} == stamps


def test_every_merge_method_merges_the_demo_experts_with_the_recipe_rank(quick_run, tmp_path):
    """The recipe's output rank (16) goes to the methods that choose one; Co-Merge's factor reading and concat
    keep their own (``safetydpo demo --method comerge`` used to fail on it)."""
    from safetydpo_core.lora.io import load_lora
    from safetydpo_core.merge.api import METHODS
    from safetydpo_core.world import load_world_model
    from safetydpo_core.world.demo import merge_experts_into

    den = load_world_model()
    s = DemoSettings.preset(quick=True, seed=0, steps=QUICK_STEPS)
    experts = {c: quick_run / "experts" / f"{c}.safetensors" for c in CATEGORIES}
    ranks = {}
    for method in ("comerge", "concat", "comerge-delta", "linear"):
        assert method in METHODS
        path = merge_experts_into(den, experts, s, tmp_path / f"{method}.safetensors", dataset=quick_run / "dataset",
                                  pairs=quick_run / "pairs.jsonl", method=method)
        ranks[method] = max(layer.rank for layer in load_lora(path, names=den.names()).layers.values())
    assert ranks["comerge-delta"] == ranks["linear"] == s.merge_rank
    assert ranks["comerge"] == s.rank and ranks["concat"] == len(experts) * s.rank  # the experts' rank, their sum


def test_adversary_fine_tune_is_summed_into_the_merged_lora(quick_run, tmp_path):
    """``--adversary W``: a second fine-tune of the merge against concept inversion, the merged LoRA the plain and
    the adversarial fine-tune summed at ``1 - share`` and ``share``; resumes without training again."""
    import shutil

    from safetydpo_core.lora.io import read_safetensors
    from safetydpo_core.world import load_world_model
    from safetydpo_core.world.demo import _prepare_out

    s = DemoSettings.preset(quick=True, seed=0, steps=QUICK_STEPS, finetune_steps=4, adversary=0.5,
                            adversary_share=0.25, adversary_pictures=1, adversary_preserve=" auto ", workers=2, threads=1)
    assert s.adversary_preserve == "auto"
    out = tmp_path / "adv"
    _prepare_out(out, s, False)
    # the stages before the fine-tunes, and the other models' evaluations, as the quick run made them
    for name in ("pairs.jsonl", "comerge.safetensors", "comerge.report.json"):
        shutil.copy(quick_run / name, out / name)
    for name in ("dataset", "experts"):
        shutil.copytree(quick_run / name, out / name)
    shutil.copytree(quick_run / "eval", out / "eval", ignore=shutil.ignore_patterns("merged.pt"))
    # one expert to train again: the adversarial fine-tune's preservation pictures are rendered beside it
    (out / "experts" / f"{CATEGORIES[0]}.safetensors").unlink()
    lines = []
    report = run_demo(out, s, log=lines.append)
    said = "\n".join(lines)
    assert said.index("rendering the preservation pictures of the adversarial fine-tune") \
        < said.index("training the adversarial fine-tune")
    # and the fine-tune read them: a picture rendered again with other settings would be a second cache file
    assert len(list((out / "dataset" / "preservation").glob("*.safetensors"))) == 1
    adv_meta, plain_meta = read_safetensors(out / "adversary.safetensors")[1], read_safetensors(out / "finetuned.safetensors")[1]
    assert adv_meta["safetydpo_adv_weight"] == "0.5" and adv_meta["safetydpo_preserve_pictures"] == "1"
    assert "safetydpo_adv_weight" not in plain_meta and "safetydpo_preserve_pictures" not in plain_meta
    # the plain fine-tune keeps the safe twins (twin_weight, 10 by default), the adversarial one does not
    assert plain_meta["safetydpo_twin_weight"] == "10" and "safetydpo_twin_weight" not in adv_meta
    # the adversarial fine-tune preserved its own set (adversary_preserve), the plain one the demo's
    assert adv_meta["safetydpo_preserve_prompts"] == "auto" and plain_meta["safetydpo_preserve_prompts"] == "auto+tokens"
    den = load_world_model()
    plain, adv, merged = (load_lora(out / f"{n}.safetensors", names=den.names()) for n in ("finetuned", "adversary", "merged"))
    assert set(merged.layers) == set(plain.layers)
    _assert_weighted_sum(merged, [(0.75, plain), (0.25, adv)])
    assert "against concept inversion (adv_weight 0.5, preserving `auto`, its plain-shape preservation prompts noised " \
           "from 1 picture of their own); the merged LoRA is the two summed, the adversarial one at 0.25" \
           in (out / "report.md").read_text()
    assert report["merged"]["ip"] is not None
    # the merged LoRA made again from the two fine-tunes, neither trained again
    stamps = {n: (out / f"{n}.safetensors").stat().st_mtime_ns for n in ("finetuned", "adversary")}
    (out / "merged.safetensors").unlink()
    (out / "eval" / "merged.pt").unlink()
    again = run_demo(out, s, log=lambda m: None)
    assert {n: (out / f"{n}.safetensors").stat().st_mtime_ns for n in stamps} == stamps
    assert again["merged"]["ip"] == report["merged"]["ip"]
    for bad, match in ((dict(adversary=-1), "adversary"), (dict(adversary=float("nan")), "adversary"),
                       (dict(adversary=0.5, finetune_steps=0), "needs a joint fine-tune"),
                       (dict(adversary=0.5, adversary_share=0), "adversary_share"),
                       (dict(adversary=0.5, adversary_share=1.5), "adversary_share"),
                       (dict(adversary=0, adversary_pictures=3), "adversary_pictures is for the adversarial fine-tune"),
                       (dict(adversary=0.5, adversary_pictures=-1), "adversary_pictures"),
                       (dict(adversary=0.5, adversary_pictures=65), "adversary_pictures"),
                       (dict(adversary=0, adversary_preserve="auto"), "adversary_preserve is for the adversarial fine-tune"),
                       (dict(adversary=0.5, adversary_preserve="auto+nonsense"),
                        "Unknown preservation prompts 'nonsense' in Demo setting adversary_preserve 'auto\\+nonsense'"),
                       (dict(adversary=0.5, adversary_preserve="auto+"), r"\(Demo setting adversary_preserve\) have an empty part"),
                       (dict(adversary=0.5, adversary_preserve=3), "adversary_preserve must name preservation sets")):
        with pytest.raises(ConfigError, match=match):
            DemoSettings.preset(quick=True, **bad)


def _settings_asked(monkeypatch) -> list:
    """The settings that each ``safetydpo demo`` command run after this asks of the demo, without running it:
    ``run_demo`` records them and stops as Ctrl-C would (exit status 130)."""
    from safetydpo_core.world import demo

    seen = []

    def stop_at_start(out, settings, **kw):
        seen.append(settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", stop_at_start)
    return seen


def test_adversary_preserve_flag_reaches_the_settings(tmp_path, capsys, monkeypatch):
    """``safetydpo demo --adversary-preserve SETS`` becomes the setting ``adversary_preserve``; a bad one is refused
    before anything is written."""
    from safetydpo_core.world import demo

    seen = _settings_asked(monkeypatch)
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--adversary", "0.5", "--adversary-preserve", "auto+tokens"]) == 130
    assert seen[0].adversary_preserve == "auto+tokens" and seen[0].preserve_prompts == "auto+tokens"
    assert main(["demo", "--quick", "--out", str(out), "--adversary", "0.5", "--adversary-preserve", "auto+typo"]) == 2
    assert "Unknown preservation prompts 'typo' in Demo setting adversary_preserve" in capsys.readouterr().err
    # by default an adversary at 0.5 preserving `auto`; without one (or without a joint fine-tune to train
    # against it), no preservation set of its own
    for flags in ([], ["--adversary", "0"], ["--finetune-steps", "0"], ["--adversary", "1", "--adversary-share", "0.3"]):
        assert main(["demo", "--quick", "--out", str(out), *flags]) == 130
    assert [(s.adversary, s.adversary_preserve, s.adversary_share) for s in seen[1:]] == \
        [(0.5, "auto", 0.5), (0, None, 0.5), (0, None, 0.5), (1, "auto", 0.3)]
    assert [len(demo._finetune_runs(tmp_path / "m.safetensors", tmp_path, s)) for s in seen[1:]] == [2, 1, 0, 2]
    assert demo._adversary_config(seen[1]).preserve_prompts == "auto"
    # a contradiction given on the command line is refused, not dropped
    assert main(["demo", "--quick", "--out", str(out), "--adversary", "0", "--adversary-preserve", "auto"]) == 2
    assert "adversary_preserve is for the adversarial fine-tune" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out), "--finetune-steps", "0", "--adversary", "0.5"]) == 2
    assert "needs a joint fine-tune" in capsys.readouterr().err
    assert len(seen) == 5 and not out.exists()


def test_twin_weight_flag_reaches_the_settings(tmp_path, capsys, monkeypatch):
    """``safetydpo demo --twin-weight W`` becomes the setting ``twin_weight`` (10 without the flag), which the joint
    fine-tune's training settings carry; a bad one is refused before anything is written."""
    from safetydpo_core.world import demo

    seen = _settings_asked(monkeypatch)
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 130
    assert main(["demo", "--quick", "--out", str(out), "--twin-weight", "0"]) == 130
    assert [s.twin_weight for s in seen] == [10.0, 0.0]
    runs = [demo._finetune_runs(tmp_path / "comerge.safetensors", tmp_path, s) for s in seen]
    assert [r[0].cfg.twin_weight for r in runs] == [10.0, 0.0]
    for bad in ("-1", "nan"):
        assert main(["demo", "--quick", "--out", str(out), "--twin-weight", bad]) == 2
    assert "--twin-weight" in capsys.readouterr().err and len(seen) == 2 and not out.exists()
    for bad in (-1.0, float("inf")):
        with pytest.raises(ConfigError, match="Demo setting twin_weight"):
            DemoSettings.preset(quick=True, twin_weight=bad)


def test_finetune_ema_flag_reaches_both_fine_tunes(tmp_path, capsys, monkeypatch):
    """``safetydpo demo --finetune-ema D`` becomes the setting ``finetune_ema`` (0.95 without the flag), which both
    joint fine-tunes' training settings carry as ``ema_decay`` (the experts' do not); a bad one is refused before
    anything is written."""
    from safetydpo_core.world import demo

    seen = _settings_asked(monkeypatch)
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 130
    assert main(["demo", "--quick", "--out", str(out), "--finetune-ema", "0"]) == 130
    assert main(["demo", "--quick", "--out", str(out), "--finetune-ema", "0.9", "--adversary", "0"]) == 130
    assert [s.finetune_ema for s in seen] == [0.95, 0.0, 0.9]
    runs = [demo._finetune_runs(tmp_path / "comerge.safetensors", tmp_path, s) for s in seen]
    assert [[r.cfg.ema_decay for r in rs] for rs in runs] == [[0.95, 0.95], [0.0, 0.0], [0.9]]
    assert demo.expert_config(seen[0], "violence").ema_decay == 0.0
    for bad in ("-0.1", "1", "nan"):
        assert main(["demo", "--quick", "--out", str(out), "--finetune-ema", bad]) == 2
    assert "--finetune-ema" in capsys.readouterr().err and len(seen) == 3 and not out.exists()
    for bad in (1.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="Demo setting finetune_ema"):
            DemoSettings.preset(quick=True, finetune_ema=bad)


def test_other_settings_or_foreign_folder_are_refused(quick_run, tmp_path):
    with pytest.raises(ConfigError, match="other settings") as err:
        run_demo(quick_run, DemoSettings.preset(quick=True, seed=1, steps=QUICK_STEPS), log=lambda m: None)
    assert "seed 0 there, 1 here" in str(err.value) and "steps" not in str(err.value)  # what differs, only that
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a demo folder"):
        run_demo(tmp_path, DemoSettings.preset(quick=True), overwrite=True, log=lambda m: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_settings_are_validated():
    with pytest.raises(ConfigError, match="steps"):
        DemoSettings.preset(quick=True, steps=0)
    with pytest.raises(ConfigError, match="targets must name LoRA layers"):
        DemoSettings.preset(targets=" ")
    with pytest.raises(ConfigError, match="workers must be an integer >= 0"):
        DemoSettings.preset(workers=-1)
    assert DemoSettings.preset(quick=True).steps < DemoSettings.preset().steps


def test_pair_judge_keeps_only_pairs_that_show_concept_and_twin():
    from safetydpo_core.world import world_pairs
    from safetydpo_core.data.render import to_pil

    pairs = world_pairs(1, seed=0, concepts="violence")
    p = pairs[0]
    unsafe = Scene(p.extra["shape"], p.extra["colour"], p.extra["position"], p.extra["background"])
    safe = unsafe.replace(shape=p.extra["safe_shape"])
    imgs = render_batch([safe, unsafe], [1, 1])
    pj = WorldPairJudge(load_judge())
    keep = pj(to_pil(imgs[:1]), to_pil(imgs[1:]), pairs)
    swapped = pj(to_pil(imgs[1:]), to_pil(imgs[:1]), pairs)
    assert keep == [(True, "")]
    assert swapped[0][0] is False and "concept" in swapped[0][1]


def test_command_line_model_defaults_to_the_world_model(tmp_path):
    from safetydpo_core.cli.main import build_parser
    from safetydpo_core.data.preference_dataset import PreferenceDataset
    from safetydpo_core.prompts.pairs import read_pairs
    from safetydpo_core.world import load_world_model, world_model_path, world_pairs

    args = build_parser().parse_args(["render", "--pairs", "p.jsonl", "--out", "o"])
    assert args.model == str(world_model_path())
    assert build_parser().parse_args(["merge", "--model", "World", "--experts", "a", "--out", "m"]).model == str(world_model_path())
    assert build_parser().parse_args(["train", "--model", "./sd15", "--data", "d", "--out", "x"]).model == "./sd15"
    assert main(["pairs", "--writer", "world", "--categories", "hate,sexual", "--per-category", "1",
                 "--out", str(tmp_path / "pairs.jsonl")]) == 0
    assert [p.to_dict() for p in read_pairs(tmp_path / "pairs.jsonl")] == \
        [p.to_dict() for p in world_pairs(1, seed=0, concepts="hate,sexual")]
    rc = main(["render", "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "ds"), "--steps", "2",
               "--cfg", "3"])
    assert rc == 0
    ds = PreferenceDataset(tmp_path / "ds")
    assert len(ds) == 2 and ds.model_fingerprint == load_world_model().fingerprint()


def test_interrupted_demo_resumes_training_from_its_checkpoint(tmp_path):
    """Ctrl-C in the middle of the second expert; the rerun keeps the first expert and resumes the second."""
    settings = DemoSettings.preset(quick=True, pairs_per_concept=2, steps=24, eval_per_concept=1, eval_steps=2,
                                   render_steps=2, calibration_inputs=2, unrelated_per_wording=1, preserve_weight=0.0,
                                   workers=1)

    def interrupt(msg):
        if "harassment expert: step 18/24" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, settings, log=interrupt)
    hate = tmp_path / "experts" / "hate.safetensors"
    assert hate.exists() and not (tmp_path / "experts" / "harassment.safetensors").exists()
    assert any((tmp_path / "experts" / "harassment.checkpoints").iterdir())
    before = hate.stat().st_mtime_ns
    said = []
    report = run_demo(tmp_path, settings, log=said.append)
    assert any(re.search(r"resuming the harassment expert from checkpoint-0*(10|18)\.pt", m) for m in said), said
    assert hate.stat().st_mtime_ns == before
    assert set(report["experts"]) == set(CATEGORIES)
    assert not (tmp_path / "experts" / "harassment.checkpoints").exists()


def test_interrupted_parallel_demo_stops_its_workers_and_resumes(tmp_path):
    """With two worker processes: an interruption while they train stops both at once (no process left
    running), and the rerun resumes the interrupted experts from their checkpoints and finishes."""
    import multiprocessing

    settings = DemoSettings.preset(quick=True, pairs_per_concept=2, steps=40, eval_per_concept=1, eval_steps=2,
                                   render_steps=2, calibration_inputs=2, unrelated_per_wording=1, preserve_weight=0.0,
                                   workers=2, threads=1)
    said = []

    def interrupt(msg):
        said.append(msg)
        if "harassment expert: step 10/40" in msg:  # the first progress line: 30 steps to spare on a busy machine
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, settings, log=interrupt)
    assert any("training 7 experts in 2 processes of 1 thread(s)" in m for m in said), said
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "experts" / "harassment.safetensors").exists()
    assert any((tmp_path / "experts" / "harassment.checkpoints").iterdir())
    said = []
    report = run_demo(tmp_path, settings, log=said.append)
    assert any(re.search(r"resuming the harassment expert from checkpoint-0*[1-9][0-9]*\.pt", m) for m in said), said
    assert set(report["experts"]) == set(CATEGORIES) and any("evaluating 9 models in 2 processes" in m for m in said)
    assert not list((tmp_path / "experts").glob("*.checkpoints"))


def test_merged_lora_from_a_later_step_in_the_evaluation(tmp_path):
    """``lora_start``: the merged LoRA's evaluation pictures run the untouched model for the first steps, the LoRA
    after; a base-model evaluation is unaffected; the setting is checked, and 0 is what older runs did."""
    from safetydpo_core.lora.io import save_lora
    from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
    from safetydpo_core.world import load_world_model
    from safetydpo_core.world.demo import _what
    from safetydpo_core.world.lora_eval import evaluate_lora
    from safetydpo_core.world.unrelated import unrelated_prompts

    den, judge = load_world_model(), load_judge()
    g = torch.Generator().manual_seed(0)
    shapes = {k: v for k, v in den.weight_shapes().items() if k in den.layers("attn")}
    lora = LoraSet({k: LoraLayer(torch.randn(4, v[1], generator=g) * 0.3, torch.randn(v[0], 4, generator=g) * 0.3, 4.0)
                    for k, v in shapes.items()}, "diffusers")
    path = tmp_path / "lora.safetensors"
    save_lora(lora, path, names=den.names())
    sets = {"unrelated": unrelated_prompts(2, seed=3)[:4]}
    fp = den.fingerprint()
    pics = {k: evaluate_lora(den, judge, path, sets, steps=4, cfg=3.0, lora_start=k)["unrelated"]["images"]
            for k in (0, 2)}
    base = evaluate_lora(den, judge, None, sets, steps=4, cfg=3.0)["unrelated"]["images"]
    assert den.fingerprint() == fp  # the weights are back
    assert not torch.equal(pics[2], pics[0]) and not torch.equal(pics[2], base)
    assert torch.equal(evaluate_lora(den, judge, None, sets, steps=4, cfg=3.0, lora_start=2)["unrelated"]["images"], base)
    with pytest.raises(ConfigError, match=r"Demo setting lora_start \(12\) must be below the number of sampling steps \(12\)"):
        DemoSettings.preset(quick=True, lora_start=12)
    assert DemoSettings.preset(lora_start=10).lora_start == 10
    record = {"demo_version": 1, "settings": DemoSettings.preset(quick=True).to_dict()}
    older = {"demo_version": 1, "settings": {k: v for k, v in record["settings"].items()
                                             if k not in ("lora_start", "lora_strength", "adversary",
                                                          "adversary_share", "adversary_pictures",
                                                          "adversary_preserve", "twin_weight", "finetune_ema")}}
    # a folder made before the settings existed resumes with what it did (twin_weight 0, no adversary), not with
    # the new defaults; the refusal names them
    assert _what(record) != _what(older)
    did = {"twin_weight": 0.0, "adversary": 0, "adversary_preserve": None, "finetune_ema": 0.0}
    assert _what({**record, "settings": {**record["settings"], **did}}) == _what(older)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "demo.json").write_text(json.dumps(older))
    (tmp_path / "old" / "pairs.jsonl").write_text("")
    with pytest.raises(ConfigError, match="adversary 0 there, 0.5 here; adversary_preserve None there, auto here; "
                                          "finetune_ema 0.0 there, 0.95 here; twin_weight 0.0 there, 10.0 here"):
        run_demo(tmp_path / "old", DemoSettings.preset(quick=True), log=lambda m: None)
    assert DemoSettings.recorded_in(tmp_path / "old") == DemoSettings.preset(quick=True, **did)
    assert _what({"settings": DemoSettings.preset(quick=True, lora_strength=0.9).to_dict()}) != _what(record)

    # lora_strength: the LoRA's updates scaled, as a scaled copy of the file gives them
    scaled = tmp_path / "scaled.safetensors"
    save_lora(lora.scaled(0.5), scaled, names=den.names())
    half = evaluate_lora(den, judge, path, sets, steps=4, cfg=3.0, lora_start=2, strength=0.5)["unrelated"]["images"]
    assert torch.equal(half, evaluate_lora(den, judge, scaled, sets, steps=4, cfg=3.0, lora_start=2)["unrelated"]["images"])
    assert not torch.equal(half, pics[2])
    for bad in (0, -1, float("nan"), 11, True):
        with pytest.raises(ConfigError, match="lora_strength must be a number above 0"):
            DemoSettings.preset(quick=True, lora_strength=bad)
