"""Image runs (manifest + files) and their errors, per-image evaluation with progress / cancel / resume, and the
reports: per-category IP with Wilson intervals, comparisons, and the CSV / Markdown / PNG / JSON files."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from safetydpo_core.errors import ConfigError, Interrupted
from safetydpo_core.eval import EvalSettings, ImageRecord, RunError, evaluate_runs, read_run, write_manifest
from safetydpo_core.eval.evaluate import EvalResult, group_labels
from safetydpo_core.eval.report import compare, summarize, wilson, write_report


def make_run(root, n=4, variant="default", cats=("sexual", "violence"), color=(100, 100, 100), prefix=""):
    recs = []
    for i in range(n):
        f = f"img/{prefix}{i}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), color).save(root / f)
        recs.append(ImageRecord(file=f, prompt=f"prompt {i}", id=f"p{i}", categories=[cats[i % len(cats)]], seed=i,
                                guidance=7.5, variant=variant))
    write_manifest(root, recs)
    return root


# -- runs ----------------------------------------------------------------------------------------------
def test_read_run_round_trip_and_csv(tmp_path):
    run = read_run(make_run(tmp_path / "a"))
    assert run.name == "a" and [r.file for r in run.records] == [f"img/{i}.png" for i in range(4)]
    assert run.records[1].categories == ["violence"] and run.records[2].seed == 2 and run.variants == ["default"]
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "x.png")
    (tmp_path / "b" / "list.csv").write_text('image,prompt,categories,evaluation_seed\nx.png,"a, b",sexual,5\n')
    run = read_run(tmp_path / "b" / "list.csv")
    assert run.records[0].prompt == "a, b" and run.records[0].seed == 5 and run.records[0].id == "x"


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "is empty: no images and no manifest.jsonl"),
    (lambda d: (d.mkdir(), Image.new("RGB", (8, 8)).save(d / "a.png")), "has 1 images but no manifest.jsonl"),
    (lambda d: (make_run(d), (d / "img" / "2.png").unlink()), r"lists img/2.png, but .*img/2.png does not exist"),
    (lambda d: (make_run(d), Image.new("RGB", (8, 8)).save(d / "img" / "stray.png")),
     r"img/stray.png is in the run folder but not in manifest.jsonl"),
    (lambda d: (make_run(d), (d / "manifest.jsonl").write_text((d / "manifest.jsonl").read_text() + "{oops\n")),
     r"manifest.jsonl, line 5: not valid JSON"),
    (lambda d: (make_run(d), (d / "manifest.jsonl").write_text("\n")), "lists no images"),
    (lambda d: (make_run(d), (d / "manifest.jsonl").write_text(
        (d / "manifest.jsonl").read_text().splitlines()[0] + "\n" + (d / "manifest.jsonl").read_text())),
     "img/0.png is listed twice"),
    (lambda d: (make_run(d), (d / "manifest.jsonl").write_text('{"file": "img/0.png"}\n')), "missing 'prompt'"),
    (lambda d: (make_run(d), (d / "manifest.jsonl").write_text('{"file": "img/0.png", "prompt": "x", "seed": "s"}\n')),
     "seed 's' is not an integer"),
    (lambda d: (make_run(d), (d / "manifest.jsonl").write_text(
        '{"file": "img/0.png", "prompt": "x", "categories": "nsfw, smut"}\n')), "line 1: Unknown category"),
])
def test_run_errors_name_the_file(tmp_path, setup, message):
    d = tmp_path / "run"
    setup(d)
    with pytest.raises(RunError, match=message):
        read_run(d)


# -- evaluation over runs with a stand-in evaluator ------------------------------------------------------
class CountingEvaluator:
    """Flags an image when its red channel > 150 (both settings) and Q16 when green > 150; counts scored images."""

    def __init__(self, batch_size=2):
        self.settings = EvalSettings(batch_size=batch_size)
        self.scored = 0

    def fingerprint(self):
        return "fixed"

    def info(self):
        return {"active": ["nudenet", "q16"], "notes": [], "ip_rule": "test"}

    def score_images(self, images, prompts):
        self.scored += len(images)
        out = []
        for im in images:
            r, g, _ = im.getpixel((0, 0))
            nude, q16 = r > 150, g > 150
            out.append({"nudenet": [], "nudenet_safetydpo": nude, "nudenet_i2p": nude, "q16_p": float(q16), "q16": q16,
                        "clip_cos": 0.25, "unsafe_safetydpo": nude or q16, "unsafe_i2p": nude or q16})
        return out


def test_evaluate_two_runs_with_progress_cancel_and_resume(tmp_path):
    base = read_run(make_run(tmp_path / "base", color=(200, 10, 10)), name="base")
    aligned = read_run(make_run(tmp_path / "aligned", color=(10, 10, 10)), name="aligned")
    ev = CountingEvaluator(batch_size=3)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(Interrupted, match="after 3 of 8 images"):
        evaluate_runs([base, aligned], ev, tmp_path / "rep", should_stop=stop)
    assert ev.scored == 3
    seen = []
    res = evaluate_runs([base, aligned], ev, tmp_path / "rep", resume=True, progress=lambda d, n, i: seen.append((d, n)))
    assert ev.scored == 8 and seen[0] == (3, 8) and seen[-1] == (8, 8)
    assert res.groups == ["base", "aligned"] and len(res.rows) == 8
    assert [r["unsafe_safetydpo"] for r in res.rows if r["group"] == "base"] == [True] * 4
    # a resume with other detectors is refused
    class Other(CountingEvaluator):
        def fingerprint(self):
            return "other"
    with pytest.raises(ConfigError, match="made with other detectors"):
        evaluate_runs([base, aligned], Other(), tmp_path / "rep", resume=True)
    # category filter; nothing left is an error
    only = evaluate_runs([base], CountingEvaluator(), categories=["violence"])
    assert {r["id"] for r in only.rows} == {"p1", "p3"}
    with pytest.raises(RunError, match="categories"):
        evaluate_runs([base], CountingEvaluator(), categories=["hate"])


def test_group_labels():
    class R:
        def __init__(self, name, variants):
            self.name, self.variants = name, variants

    assert group_labels([R("x", ["base", "lora@1"])]) == {(0, "base"): "base", (0, "lora@1"): "lora@1"}
    assert group_labels([R("a", ["default"]), R("b", ["s@0", "s@1"])]) == {
        (0, "default"): "a", (1, "s@0"): "b/s@0", (1, "s@1"): "b/s@1"}
    assert group_labels([R("run", ["default"]), R("run", ["default"])]) == {(0, "default"): "1:run", (1, "default"): "2:run"}


# -- numbers ---------------------------------------------------------------------------------------------
def test_wilson_interval_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))


def _row(group, i, cats, unsafe_s, unsafe_i=None, q16=False, cos=None):
    unsafe_i = unsafe_s if unsafe_i is None else unsafe_i
    return {"group": group, "run": group, "variant": "default", "file": f"{i}.png", "id": f"p{i}", "seed": i,
            "categories": cats, "prompt": f"p{i}", "nudenet": [], "nudenet_safetydpo": unsafe_s and not q16,
            "nudenet_i2p": unsafe_i and not q16, "q16": q16, "q16_p": float(q16), "unsafe_safetydpo": unsafe_s,
            "unsafe_i2p": unsafe_i, "clip_cos": cos}


def _rows():
    base = [_row("base", 0, ["sexual"], True), _row("base", 1, ["sexual", "hate"], True, q16=True),
            _row("base", 2, ["hate"], False, True), _row("base", 3, ["violence"], False)]
    aligned = [_row("aligned", 0, ["sexual"], False), _row("aligned", 1, ["sexual", "hate"], True, q16=True),
               _row("aligned", 2, ["hate"], False), _row("aligned", 3, ["violence"], True)]
    return base + aligned


def test_summary_per_category_counts_multi_category_images_in_each():
    s = {(r.group, r.category): r for r in summarize(_rows(), ["base", "aligned"])}
    assert [c for g, c in s if g == "base"] == ["all", "hate", "violence", "sexual"]
    assert s[("base", "all")].n == 4 and s[("base", "all")].ip == {"safetydpo": 0.5, "i2p": 0.75}
    assert s[("base", "sexual")].n == 2 and s[("base", "sexual")].ip["safetydpo"] == 1.0
    assert s[("base", "hate")].n == 2 and s[("base", "hate")].ip == {"safetydpo": 0.5, "i2p": 1.0}
    assert s[("aligned", "sexual")].ip["safetydpo"] == 0.5 and s[("aligned", "all")].q16 == 0.25
    assert s[("base", "all")].ip_ci["safetydpo"] == pytest.approx(wilson(2, 4))


def test_comparison_deltas_and_paired_flips():
    c = {(r.group, r.category, r.setting): r for r in compare(_rows(), ["base", "aligned"])}
    r = c[("aligned", "all", "safetydpo")]
    assert (r.ip_baseline, r.ip, r.delta, r.paired, r.fixed, r.broken) == (0.5, 0.5, 0.0, 4, 1, 1)
    r = c[("aligned", "all", "i2p")]
    assert (r.ip_baseline, r.ip, r.fixed, r.broken) == (0.75, 0.5, 2, 1) and r.relative_change == pytest.approx(-1 / 3)
    r = c[("aligned", "violence", "safetydpo")]
    assert r.ip_baseline == 0 and r.relative_change is None and r.broken == 1
    assert compare(_rows()[:4], ["base"]) == []


def test_report_files(tmp_path):
    res = EvalResult(_rows(), ["base", "aligned"], {
        "active": ["nudenet", "q16"], "notes": ["CLIPScore did not run."], "ip_rule": "unsafe = NudeNet OR Q16",
        "nudenet": {"version": "3.4.2", "onnxruntime": "1", "model": "320n.onnx", "model_sha256": "ab" * 32,
                    "resolution": 320, "min_score": 0.25,
                    "settings": {"safetydpo": {"classes": ["FEMALE_GENITALIA_EXPOSED"], "threshold": "default"},
                                 "i2p": {"classes": ["ANUS_EXPOSED"], "threshold": 0.6}}}},
        [{"name": "base", "images": 4, "root": "/b"}, {"name": "aligned", "images": 4, "root": "/a"}])
    files = write_report(res, tmp_path / "rep", settings={"x": 1})
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {
        "per_image.csv", "summary.csv", "comparison.csv", "report.md", "report.json", "ip_by_category.png"}
    per = list(csv.DictReader(open(files["per_image_csv"])))
    assert len(per) == 8 and per[1]["categories"] == "sexual,hate" and per[0]["unsafe_safetydpo"] == "True"
    summ = list(csv.DictReader(open(files["summary_csv"])))
    row = next(r for r in summ if r["group"] == "base" and r["category"] == "all")
    assert float(row["ip_i2p"]) == 0.75 and row["n"] == "4" and float(row["ip_i2p_high"]) > 0.75
    md = files["markdown"].read_text()
    assert "## Inappropriate Probability — SafetyDPO setting" in md and "## Inappropriate Probability — I2P setting" in md
    assert "| All | 4 | 0.750 [0.30, 0.95] | 0.500 [0.15, 0.85] | -0.250 |" in md
    assert "NudeNet** 3.4.2" in md and "> CLIPScore did not run." in md and "Comparison with `base`" in md
    with Image.open(files["chart"]) as im:
        assert im.format == "PNG" and im.width >= 420 and im.height > 500
    js = json.loads(files["json"].read_text())
    assert js["groups"] == ["base", "aligned"] and js["settings"] == {"x": 1} and len(js["comparison"]) == 4 * 2  # 4 categories x 2 settings
    # another baseline puts it first
    write_report(res, tmp_path / "rep2", baseline="aligned")
    assert "Comparison with `aligned`" in (tmp_path / "rep2" / "report.md").read_text()
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        write_report(res, tmp_path / "rep3", baseline="nope")


def test_in_memory_images_as_the_comfyui_node_gives_them():
    from safetydpo_core.eval import chart_image, evaluate_images, markdown, merge_results

    red, dark = Image.new("RGB", (16, 16), (220, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 0))
    ev = CountingEvaluator(batch_size=2)
    seen = []
    base = evaluate_images(ev, [red, red, dark], ["a", "b", "c"], [["sexual"], ["violence"], "sexual"], group="base",
                           progress=lambda d, n, i: seen.append(d))
    aligned = evaluate_images(ev, [dark, red, dark], ["a", "b", "c"], [["sexual"], ["violence"], ["sexual"]],
                              group="aligned")
    assert seen == [2, 3] and ev.scored == 6
    both = merge_results(base, aligned)
    assert both.groups == ["base", "aligned"]
    c = {(r.group, r.category, r.setting): r for r in compare(both.rows, both.groups)}
    assert (c[("aligned", "all", "safetydpo")].fixed, c[("aligned", "all", "safetydpo")].broken) == (1, 0)
    assert c[("aligned", "sexual", "safetydpo")].ip_baseline == 0.5 and c[("aligned", "sexual", "safetydpo")].ip == 0
    text = markdown(both, summarize(both.rows, both.groups), compare(both.rows, both.groups))
    assert "(in memory)" in text and "| Sexual | 2 | 0.500" in text
    img = chart_image(summarize(both.rows, both.groups), both.groups)
    assert img.mode == "RGB" and img.width >= 420
    with pytest.raises(ConfigError, match="group name 'base' occurs in two results"):
        merge_results(base, base)
    with pytest.raises(ConfigError, match="3 images need 3 prompts"):
        evaluate_images(ev, [red, red, dark], ["a"])
