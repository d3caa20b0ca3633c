"""What an aligned model does to unrelated content, on real checkpoints' images: the neutral prompt set,
preservation (PSNR, SSIM, MAD of same-seed pairs), the FID Inception-v3 (architecture, weights files, features)
and FID/KID, through the one evaluation entry point, the CLI and its reports, and the bad inputs.

The Inception weights here are random (same architecture, keys and shapes as pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``): the numbers mean nothing, the code paths are the real ones. Where
pytorch-fid / torch-fidelity / scipy are importable, the results are checked against them too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safetydpo_core.cli.main import main
from safetydpo_core.errors import ConfigError, DatasetError
from safetydpo_core.eval import (EvalSettings, Evaluator, ImageBatch, ImageRecord, RunError, evaluate, headline,
                                 read_run, result_json, write_manifest, write_report)
from safetydpo_core.eval.fid import fid, frechet_distance, gaussian_stats, kid, mmd2_unbiased
from safetydpo_core.eval.inception import (FIDInceptionV3, InceptionFeatures, check_weights, convert_to_safetensors,
                                           expected_shapes, image_tensor, read_weights)
from safetydpo_core.eval.similarity import compare_pair, mean_abs_diff, psnr, ssim
from safetydpo_core.eval.testing import write_random_inception
from safetydpo_core.eval.weights import MissingWeights


def rgb(arr) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(arr), 0, 255).astype(np.uint8), "RGB")


def noise_image(seed: int, size=(40, 48), lo=0, hi=200) -> Image.Image:
    return rgb(np.random.default_rng(seed).integers(lo, hi, (size[1], size[0], 3)))


# -- the neutral prompt set ------------------------------------------------------------------------------------
def test_neutral_prompt_set_is_shipped_and_loads_by_name():
    from safetydpo_core.eval.prompt_sets import PROMPT_SETS, prompt_set_path
    from safetydpo_core.prompts.catalogue import load_builtin_catalogue
    from safetydpo_core.prompts.checks import find_terms
    from safetydpo_core.prompts.tokens import CLIP_CONTENT_TOKENS, load_token_counter
    from safetydpo_core.sampling import load_prompts

    ps = load_prompts("neutral")
    assert len(ps) >= 300 and len({p.prompt for p in ps}) == len(ps) and len({p.id for p in ps}) == len(ps)
    topics = [p.extra["topic"] for p in ps]
    assert {t: topics.count(t) for t in set(topics)} == {t: 64 for t in ("people", "animals", "objects", "scenes", "art")}
    assert topics[:5] == ["people", "animals", "objects", "scenes", "art"]  # interleaved: --limit N covers all topics
    assert all(p.category == [] and p.seed is None for p in ps)
    terms = {t for c in load_builtin_catalogue().concepts for t in c.terms}
    assert [p.prompt for p in ps if find_terms(p.prompt, terms)] == []  # nothing any safety concept names
    counter = load_token_counter()
    assert max(counter.count(p.prompt) for p in ps) <= CLIP_CONTENT_TOKENS
    assert load_prompts(" Neutral ", limit=7) == ps[:7]  # no categories: the first 7
    # the file is package data (pyproject's "*" globs) and is named by path too
    assert prompt_set_path("neutral") == PROMPT_SETS["neutral"] and PROMPT_SETS["neutral"].suffix == ".csv"
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"*.csv"' in text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert load_prompts(PROMPT_SETS["neutral"]) == ps


def test_training_set_is_disjoint_from_the_evaluation_set():
    from safetydpo_core.eval.prompt_sets import load_prompt_set, prompt_set_names
    from safetydpo_core.prompts.catalogue import load_builtin_catalogue
    from safetydpo_core.prompts.checks import find_terms
    from safetydpo_core.sampling import load_prompts

    assert prompt_set_names() == ["neutral", "neutral-train"]
    train, test = load_prompt_set("neutral-train"), load_prompt_set("neutral")
    assert len(train) == 160 == len(set(train)) and len(test) == 320 and not set(train) & set(test)
    assert test == [p.prompt for p in load_prompts("neutral")]
    assert {p.extra["topic"] for p in load_prompts("neutral-train")} == {"people", "animals", "objects", "scenes", "art"}
    terms = {t for c in load_builtin_catalogue().concepts for t in c.terms}
    assert [p for p in train if find_terms(p, terms)] == []
    with pytest.raises(DatasetError, match="not a built-in prompt set"):
        load_prompt_set("coco")


def test_unknown_prompt_set_names_the_input(tmp_path):
    from safetydpo_core.sampling import load_prompts

    with pytest.raises(DatasetError,
                       match=r"'neutrall' is not a built-in prompt set \(built-in: neutral, neutral-train\)"):
        load_prompts("neutrall")
    with pytest.raises(DatasetError, match="is a folder"):
        load_prompts(tmp_path)


def test_sample_cli_takes_the_neutral_set_by_name(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "neutral"
    assert main(["sample", "--model", str(tiny_sd15), "--prompts", "neutral", "--limit", "3", "--out", str(out),
                 "--steps", "1", "--size", "32", "--device", "cpu"]) == 0
    run = read_run(out)
    assert [r.id for r in run.records] == ["people-01", "animals-01", "objects-01"]
    assert [r.extra["topic"] for r in run.records] == ["people", "animals", "objects"]
    assert json.loads((out / "config.json").read_text())["prompts"] == "neutral"
    assert main(["sample", "--model", str(tiny_sd15), "--prompts", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "not a built-in prompt set" in capsys.readouterr().err and not (tmp_path / "x").exists()


# -- PSNR, SSIM, MAD ----------------------------------------------------------------------------------------------
def test_identical_pictures():
    a = noise_image(0)
    sc = compare_pair(a, a.copy())
    assert sc.ssim == pytest.approx(1.0, abs=1e-12) and sc.psnr == math.inf and sc.mad == 0 and sc.identical
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == math.inf and mean_abs_diff(a, a) == 0


def test_hand_computable_values():
    # constant pictures 100 and 200: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = rgb(np.full((20, 24, 3), 100)), rgb(np.full((20, 24, 3), 200))
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 200 + c1) / (100 ** 2 + 200 ** 2 + c1), rel=1e-12)  # 0.80003
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 100), rel=1e-12)  # 8.13 dB
    assert mean_abs_diff(a, b) == 100
    # a difference of one level everywhere: MSE 1, PSNR 20 log10(255) = 48.13 dB
    x = np.random.default_rng(1).integers(0, 250, (16, 16, 3))
    assert psnr(rgb(x), rgb(x + 1)) == pytest.approx(48.1308036, abs=1e-6)
    assert mean_abs_diff(rgb(x), rgb(x + 1)) == 1
    # a brightness shift keeps structure: contrast-structure term 1, SSIM below 1 only through luminance
    assert 0.9 < ssim(rgb(x), rgb(x + 1)) < 1.0


def test_ssim_matches_an_independent_gaussian_filter_computation():
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is not installed")
    a = np.random.default_rng(2).integers(0, 256, (37, 53, 3)).astype(np.float64)
    b = np.clip(a + np.random.default_rng(3).normal(0, 25, a.shape), 0, 255).round()

    def reference(x, y):  # scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5), per channel
        c1, c2, vals = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
        for ch in range(3):
            f = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731 - 11-tap window
            X, Y = x[..., ch], y[..., ch]
            mx, my = f(X), f(Y)
            vx, vy, cxy = f(X * X) - mx * mx, f(Y * Y) - my * my, f(X * Y) - mx * my
            m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            vals.append(m[5:-5, 5:-5].mean())  # valid positions only
        return float(np.mean(vals))

    got = ssim(rgb(a), rgb(b))
    assert got == pytest.approx(reference(a, b), abs=1e-10) and 0.2 < got < 0.95
    assert ssim(rgb(b), rgb(a)) == pytest.approx(got, abs=1e-12)  # symmetric


def test_pairs_of_different_sizes_or_too_small_are_refused():
    with pytest.raises(DatasetError, match=r"aligned.png is 40x48 but base.png is 48x40 pixels.*pixel by pixel"):
        compare_pair(noise_image(0, (40, 48)), noise_image(0, (48, 40)), ("aligned.png", "base.png"))
    with pytest.raises(DatasetError, match="smaller than SSIM's 11x11 window"):
        ssim(noise_image(0, (8, 30)), noise_image(1, (8, 30)))


# -- FID and KID on features -------------------------------------------------------------------------------------
def _scipy_frechet(a, b):
    """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of the covariance product)."""
    linalg = pytest.importorskip("scipy.linalg", reason="scipy is not installed")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(400, 32), (40, 64)])  # more images than dimensions, and fewer (singular covariances)
def test_fid_matches_the_scipy_frechet_distance(n, d):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ (np.eye(d) + 0.1 * rng.normal(size=(d, d))) + 0.3
    ref = _scipy_frechet(a, b)
    assert fid(a, b) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(b)) == pytest.approx(ref, rel=1e-7)  # the d x d path


def test_fid_matches_pytorch_fid():
    pf = pytest.importorskip("pytorch_fid.fid_score", reason="pytorch-fid (and torchvision) are not installed")
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(100, 512)), rng.normal(size=(100, 512)) * 1.1 + 0.2  # singular covariances
    sa, sb = gaussian_stats(a), gaussian_stats(b)
    assert fid(a, b) == pytest.approx(pf.calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = np.random.default_rng(0).normal(size=(60, 2048))
    assert fid(a, a) == pytest.approx(0, abs=1e-8)
    values = [fid(a, a + s) for s in (0.0, 0.1, 0.2, 0.4)]
    assert values[0] == pytest.approx(0, abs=1e-8)
    assert all(x < y for x, y in zip(values, values[1:]))
    assert values[2] == pytest.approx(2048 * 0.2 ** 2, rel=1e-9)  # a pure shift adds |shift|^2 and nothing else
    with pytest.raises(ConfigError, match="at least 2 images"):
        fid(a[:1], a)


def _kid_reference(f1, f2, subsets, size, seed):
    """torch-fidelity's kid_features_to_metric written out: poly kernel (x.y/d + 1)^3, unbiased MMD^2."""
    rng = np.random.RandomState(seed)
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), size, replace=False)]
        y = f2[rng.choice(len(f2), size, replace=False)]
        k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        m = size
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_unbiased_and_as_torch_fidelity_defines_it():
    rng = np.random.default_rng(5)
    a, a2 = rng.normal(size=(200, 64)), rng.normal(size=(200, 64))
    same = kid(a, a2, subsets=50, subset_size=100)
    shifted = kid(a, a2 + 0.5, subsets=50, subset_size=100)
    assert abs(same.mean) < 3 * same.std / math.sqrt(50) + 1e-3 and shifted.mean > 20 * abs(same.mean)
    assert (same.subsets, same.subset_size) == (50, 100)
    ref = _kid_reference(a, a2 + 0.5, 50, 100, 2020)
    assert (shifted.mean, shifted.std) == pytest.approx(ref, rel=1e-12)
    assert kid(a[:30], a2, subset_size=1000).subset_size == 30  # smaller sets: smaller subsets (as clean-fid)
    assert mmd2_unbiased(a[:50], a[:50]) < 0 < mmd2_unbiased(a[:50], a[:50] + 1)  # unbiased: slightly < 0 for equal sets
    with pytest.raises(ConfigError, match="at least 2 images in each set"):
        kid(a[:1], a2)


def test_kid_matches_torch_fidelity():
    tf = pytest.importorskip("torch_fidelity.metric_kid", reason="torch-fidelity is not installed")
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(150, 64)), rng.normal(size=(120, 64)) + 0.3
    ref = tf.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20, kid_subset_size=100,
                                    verbose=False, kid_kernel="poly", kid_kernel_poly_degree=3,
                                    kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020)
    ours = kid(a, b, subsets=20, subset_size=100)
    assert ours.mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert ours.std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)


# -- the FID Inception ---------------------------------------------------------------------------------------------
def _conv(out: dict, name: str, cin: int, cout: int, kh: int, kw: int | None = None) -> None:
    out[f"{name}.conv.weight"] = (cout, cin, kh, kw or kh)
    for t in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.bn.{t}"] = (cout,)


def pytorch_fid_keys() -> dict[str, tuple]:
    """The tensors of pt_inception-2015-12-05-6726825d.pth as pytorch-fid's fid_inception_v3() loads them: written
    down from torchvision's Inception3 (num_classes=1008, aux_logits=False) with pytorch-fid's FIDInceptionA/C/E
    blocks (src/pytorch_fid/inception.py), BasicConv2d = conv (no bias) + bn."""
    k: dict[str, tuple] = {}
    for name, cin, cout, ks in (("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3),
                                ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)):
        _conv(k, name, cin, cout, ks)
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        _conv(k, f"{name}.branch1x1", cin, 64, 1)
        _conv(k, f"{name}.branch5x5_1", cin, 48, 1)
        _conv(k, f"{name}.branch5x5_2", 48, 64, 5)
        _conv(k, f"{name}.branch3x3dbl_1", cin, 64, 1)
        _conv(k, f"{name}.branch3x3dbl_2", 64, 96, 3)
        _conv(k, f"{name}.branch3x3dbl_3", 96, 96, 3)
        _conv(k, f"{name}.branch_pool", cin, pool, 1)
    _conv(k, "Mixed_6a.branch3x3", 288, 384, 3)
    _conv(k, "Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    _conv(k, "Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    _conv(k, "Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        _conv(k, f"{name}.branch1x1", 768, 192, 1)
        _conv(k, f"{name}.branch7x7_1", 768, c7, 1)
        _conv(k, f"{name}.branch7x7_2", c7, c7, 1, 7)
        _conv(k, f"{name}.branch7x7_3", c7, 192, 7, 1)
        _conv(k, f"{name}.branch7x7dbl_1", 768, c7, 1)
        _conv(k, f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
        _conv(k, f"{name}.branch7x7dbl_3", c7, c7, 1, 7)
        _conv(k, f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
        _conv(k, f"{name}.branch7x7dbl_5", c7, 192, 1, 7)
        _conv(k, f"{name}.branch_pool", 768, 192, 1)
    _conv(k, "Mixed_7a.branch3x3_1", 768, 192, 1)
    _conv(k, "Mixed_7a.branch3x3_2", 192, 320, 3)
    _conv(k, "Mixed_7a.branch7x7x3_1", 768, 192, 1)
    _conv(k, "Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    _conv(k, "Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
    _conv(k, "Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        _conv(k, f"{name}.branch1x1", cin, 320, 1)
        _conv(k, f"{name}.branch3x3_1", cin, 384, 1)
        _conv(k, f"{name}.branch3x3_2a", 384, 384, 1, 3)
        _conv(k, f"{name}.branch3x3_2b", 384, 384, 3, 1)
        _conv(k, f"{name}.branch3x3dbl_1", cin, 448, 1)
        _conv(k, f"{name}.branch3x3dbl_2", 448, 384, 3)
        _conv(k, f"{name}.branch3x3dbl_3a", 384, 384, 1, 3)
        _conv(k, f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
        _conv(k, f"{name}.branch_pool", cin, 192, 1)
    k["fc.weight"], k["fc.bias"] = (1008, 2048), (1008,)
    return k


def test_architecture_has_pytorch_fids_keys_and_shapes():
    want = pytorch_fid_keys()
    assert len(want) == 94 * 5 + 2  # 94 convolutions with their batch norms, and the 1008-class classifier
    assert expected_shapes() == want
    with torch.device("meta"):
        model = FIDInceptionV3()
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with 1008 classes
    # (+16,392) that is 23,850,960
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception" /
                                  "pt_inception-2015-12-05-6726825d.pth", seed=0)


@pytest.fixture(scope="module")
def extractor(inception_pth):
    return InceptionFeatures(inception_pth)


def test_features_match_pytorch_fid(inception_pth, extractor):
    pfi = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid (and torchvision) are not installed")
    inc = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pfi.FIDInceptionE_1(1280)), ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
        setattr(inc, name, block)
    inc.load_state_dict(torch.load(inception_pth, weights_only=True), strict=True)
    saved = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: inc  # pytorch-fid's wrapper, without its download
    try:
        ref_model = pfi.InceptionV3([3]).eval()
    finally:
        pfi.fid_inception_v3 = saved
    im = noise_image(7, (53, 41))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # torchvision's ToTensor
    with torch.no_grad():
        ref = ref_model(x)[0].flatten(1).double().numpy()
    ours = extractor.features([im])
    assert ours.shape == (1, 2048)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_weights_files_pth_safetensors_and_conversion(inception_pth, extractor, tmp_path, capsys):
    from safetydpo_core.eval import inception as inc_mod

    assert extractor.info()["sha256"] and "bilinear to 299x299" in extractor.info()["resize"]
    tensors, meta = read_weights(inception_pth)
    assert meta == {} and len(tensors) == 94 * 6 + 2  # plus the batch norms' num_batches_tracked counters
    check_weights(tensors, inception_pth)
    assert inc_mod.main([str(inception_pth), str(tmp_path / "w.safetensors")], out=print) == 0
    assert "wrote" in capsys.readouterr().out
    st, meta = read_weights(tmp_path / "w.safetensors")
    assert meta["source_sha256"] == extractor.sha256 and len(st) == 94 * 5 + 2
    assert all(torch.equal(st[k], tensors[k]) for k in st)
    assert inc_mod.main([str(inception_pth), str(tmp_path / "w.safetensors")]) == 2  # no overwrite without asking
    assert "already exists" in capsys.readouterr().err
    im = noise_image(3, (30, 30))
    np.testing.assert_array_equal(InceptionFeatures(tmp_path / "w.safetensors").features([im]), extractor.features([im]))


def test_images_of_any_size_are_resized_bilinearly_to_299():
    im = noise_image(4, (64, 32))
    x = image_tensor(im)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(arr, size=(299, 299), mode="bilinear", align_corners=False)[0]
    assert x.shape == (3, 299, 299) and torch.equal(x, ref)
    same = noise_image(5, (299, 299))
    assert torch.allclose(image_tensor(same), torch.from_numpy(np.asarray(same, dtype=np.float32) / 255).permute(2, 0, 1))


_UNPICKLED = []


def _mark_unpickled():
    _UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_bad_weights_files_are_refused_with_where_to_put_them(inception_pth, tmp_path):
    weights = tmp_path / "weights"
    # missing: `auto` notes it, `on` (or an explicit path, or a reference folder) is an error naming the place
    ev = FakeEvaluator(EvalSettings(weights_dir=str(weights), fid="auto"))
    assert ev.inception_path is None and "did not run (no Inception weights found)" in ev.inception_note
    for kw in ({"fid": "on"}, {"inception": str(tmp_path / "x.pth")}, {"fid_reference": str(tmp_path)}):
        with pytest.raises(MissingWeights) as e:
            FakeEvaluator(EvalSettings(weights_dir=str(weights), **kw))
        msg = str(e.value)
        assert "pt_inception-2015-12-05-6726825d.pth" in msg and str(weights / "inception") in msg
        assert "github.com/mseitzer/pytorch-fid/releases" in msg and "--inception" in msg
    assert "x.pth does not exist" in str(pytest.raises(MissingWeights, FakeEvaluator, EvalSettings(
        weights_dir=str(weights), inception=str(tmp_path / "x.pth"))).value)
    # a pickle that needs more than plain tensors is refused and never unpickled
    bad = tmp_path / "pickled.pth"
    torch.save({"state_dict": torch.load(inception_pth, weights_only=True), "extra": _Payload()}, bad)
    with pytest.raises(MissingWeights, match="is a pickle that needs more than plain tensors"):
        InceptionFeatures(bad)
    assert _UNPICKLED == []
    ns = tmp_path / "namespace.pth"
    torch.save(argparse.Namespace(a=1), ns)
    with pytest.raises(MissingWeights, match="never unpickles"):
        read_weights(ns)
    # wrong shapes, missing and unexpected tensors: listed
    sd = torch.load(inception_pth, weights_only=True)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    sd["fc.bias"] = torch.zeros(1000)
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    torch.save(sd, tmp_path / "torchvision_like.pth")
    with pytest.raises(MissingWeights) as e:
        InceptionFeatures(tmp_path / "torchvision_like.pth")
    msg = str(e.value)
    assert "1 tensors missing: Mixed_7c.branch_pool.conv.weight" in msg and "unexpected tensors: AuxLogits.fc.weight" in msg
    assert "fc.weight is [1000, 2048], expected [1008, 2048]" in msg and "not the FID Inception-v3" in msg
    (tmp_path / "torn.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(MissingWeights, match="not a readable safetensors file"):
        read_weights(tmp_path / "torn.safetensors")
    with pytest.raises(MissingWeights, match="does not exist"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    with pytest.raises(ConfigError, match="fid_reference is given but fid is off"):
        EvalSettings(fid="off", fid_reference=str(tmp_path))


def test_converter_refuses_to_replace_its_source(inception_pth, tmp_path):
    from safetydpo_core.errors import SafetyDPOError

    src = tmp_path / "a.pth"
    shutil.copy(inception_pth, src)
    with pytest.raises(SafetyDPOError, match="replace its source"):
        convert_to_safetensors(src, src)
    assert convert_to_safetensors(src).name == "a.safetensors"


# -- the evaluation entry point, the CLI and the reports -------------------------------------------------------------
class FakeEvaluator(Evaluator):
    """The real Evaluator's FID/KID and preservation machinery, with a stand-in safety detector (red > 150 = unsafe)
    so the quality code runs without NudeNet."""

    def __init__(self, settings: EvalSettings):  # noqa: D401 - no detectors loaded
        from safetydpo_core.eval.weights import resolve_weights_dir

        self.settings = settings
        self.weights_dir = resolve_weights_dir(settings.weights_dir)
        self.notes = []
        self.nudenet = self.q16 = self.clipscore = None
        self.inception_path = None
        self.inception_note = None
        self._inception = None
        self._locate_inception()
        self.scored = 0

    def fingerprint(self):
        return "fake"

    def info(self):
        return {"active": ["fake"], "notes": [], "ip_rule": "red > 150"}

    def score_images(self, images, prompts=None):
        self.scored += len(images)
        out = []
        for im in images:
            red = float(np.asarray(im)[..., 0].mean())
            v = red > 150
            out.append({"nudenet": [], "nudenet_safetydpo": v, "nudenet_i2p": v, "q16": None, "q16_p": None,
                        "clip_cos": None, "unsafe_safetydpo": v, "unsafe_i2p": v})
        return out


def make_variant_run(root: Path, n=3, shift=30, size=(40, 48), sizes_aligned=None) -> Path:
    recs = []
    for variant, s in (("base", 0), ("merged@1", shift)):
        (root / "images" / variant).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sz = (sizes_aligned or size) if variant != "base" else size
            arr = np.random.default_rng(i).integers(0, 200, (sz[1], sz[0], 3)) + s
            rgb(arr).save(root / "images" / variant / f"p{i}.png")
            recs.append(ImageRecord(file=f"images/{variant}/p{i}.png", prompt=f"prompt {i}", id=f"p{i}", seed=100 + i,
                                    variant=variant, strength=0.0 if variant == "base" else 1.0))
    write_manifest(root, recs)
    return root


def test_preservation_without_weights_pairs_by_prompt_and_seed(tmp_path):
    run = read_run(make_variant_run(tmp_path / "run"))
    ev = FakeEvaluator(EvalSettings(weights_dir=str(tmp_path / "none"), fid="auto"))
    result = evaluate([run], evaluator=ev)
    assert result.groups == ["base", "merged@1"] and ev.scored == 6
    q = result.quality
    (row,) = q.preservation
    direct = [compare_pair(Image.open(tmp_path / "run" / "images" / "merged@1" / f"p{i}.png"),
                           Image.open(tmp_path / "run" / "images" / "base" / f"p{i}.png")) for i in range(3)]
    assert (row.group, row.baseline, row.pairs, row.identical, row.unpaired) == ("merged@1", "base", 3, 0, 0)
    assert row.ssim == pytest.approx(np.mean([d.ssim for d in direct])) and row.mad == pytest.approx(30.0, abs=0.5)
    assert row.psnr == pytest.approx(np.mean([d.psnr for d in direct]))
    assert [p["seed"] for p in q.pairs] == [100, 101, 102]
    assert q.distribution == [] and any("no Inception weights found" in n for n in q.notes)
    h = headline(result)
    assert h["group"] == "merged@1" and h["ssim"] == row.ssim and h["fid"] is None and h["ip"]["safetydpo"] == 0


@pytest.mark.slow
def test_fid_kid_through_the_cli_reports_resume_and_reference_folder(inception_pth, tmp_path, capsys, monkeypatch):
    from safetydpo_core.eval import pipeline

    weights = inception_pth.parent.parent
    monkeypatch.setattr(pipeline, "Evaluator", FakeEvaluator)
    monkeypatch.setattr("safetydpo_core.eval.Evaluator", FakeEvaluator)
    run = make_variant_run(tmp_path / "run", n=3, shift=40)
    out = tmp_path / "rep"
    args = ["eval", str(run), "--out", str(out), "--weights-dir", str(weights), "--fid", "on", "--kid-subsets", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## Preservation and FID/KID against `base`" in printed and "| merged@1 | 3 | 3 |" in printed
    assert "FID from 3 pictures (fewer than 2048" in printed
    report = json.loads((out / "report.json").read_text())
    (dist,) = report["quality"]["distribution"]
    assert dist["group"] == "merged@1" and dist["against"] == "base" and dist["fid"] > 0 and dist["kid_subset_size"] == 3
    assert report["quality"]["inception"]["sha256"] and report["settings"]["fid"] == "on"
    qrows = list(csv.DictReader(open(out / "quality.csv")))
    assert [r["group"] for r in qrows] == ["merged@1"] and float(qrows[0]["fid"]) == pytest.approx(dist["fid"])
    assert len(list(csv.DictReader(open(out / "preservation.csv")))) == 3
    # the cached features are the network's features, and FID/KID are those of the features
    from safetydpo_core.eval.pipeline import _items_of_runs
    from safetydpo_core.eval.quality import FeatureCache

    ex = InceptionFeatures(inception_pth)
    cache = FeatureCache(out, ex.sha256)
    _, items = _items_of_runs([read_run(run)], None)
    fb, fa = (np.stack([cache.get(it) for it in items[g]]).astype(np.float64) for g in ("base", "merged@1"))
    np.testing.assert_allclose(fa[0], ex.features([Image.open(run / "images" / "merged@1" / "p0.png")])[0], rtol=1e-5)
    assert dist["fid"] == pytest.approx(fid(fa, fb), rel=1e-6)
    assert dist["kid"] == pytest.approx(kid(fa, fb, subsets=5).mean, rel=1e-6, abs=1e-12)
    # resume: features come from the cache, nothing is computed again
    calls = []
    real = InceptionFeatures.features
    monkeypatch.setattr(InceptionFeatures, "features", lambda self, ims: calls.append(len(ims)) or real(self, ims))
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert calls == [] and json.loads((out / "report.json").read_text())["quality"]["distribution"][0]["fid"] == \
        pytest.approx(dist["fid"])
    # a reference folder of mixed sizes: every group (the baseline too) against it
    ref = tmp_path / "photos"
    (ref / "sub").mkdir(parents=True)
    noise_image(11, (30, 30)).save(ref / "a.png")
    noise_image(12, (64, 40)).save(ref / "sub" / "b.jpg")
    noise_image(13, (50, 50)).save(ref / "c.webp")
    (ref / "notes.txt").write_text("not an image")
    assert main(["eval", str(run), "--out", str(out), "--overwrite", "--weights-dir", str(weights),
                 "--fid-reference", str(ref), "--kid-subsets", "3", "--preservation", "off"]) == 0
    capsys.readouterr()
    q = json.loads((out / "report.json").read_text())["quality"]
    assert [d["group"] for d in q["distribution"]] == ["base", "merged@1"] and q["preservation"] == []
    assert q["reference"]["images"] == 3 and q["reference"]["sizes"] == ["30x30", "50x50", "64x40"]
    assert all(d["against"] == "reference" and d["n_against"] == 3 and d["fid"] > 0 for d in q["distribution"])
    assert any("3 sizes" in n for n in q["notes"])
    assert not (out / "preservation.csv").exists()  # the earlier evaluation's per-pair file does not linger
    assert calls == [3]  # only the reference pictures are new: the run's features are in the cache of this --out


@pytest.mark.parametrize("case,message", [
    ("empty_reference", r"The reference folder .*photos holds no images"),
    ("missing_reference", r"The reference folder .*nowhere does not exist"),
    ("file_reference", r"The reference .*a.png is a file"),
    ("not_an_image", r"cannot be read"),
    ("mixed_pair_sizes", r"p0.png \(merged@1\) is 48x40 but .*p0.png \(base\), the picture of the same prompt and seed, "
                         r"is 40x48 pixels"),
    ("missing_weights", r"FID and KID need the FID Inception-v3 weights.*pt_inception-2015-12-05-6726825d.pth"),
    ("bad_baseline", r"The baseline 'nope' is not one of the evaluated groups: base, merged@1"),
])
def test_bad_inputs_are_refused_before_anything_is_written(inception_pth, tmp_path, capsys, monkeypatch, case, message):
    from safetydpo_core.eval import pipeline

    monkeypatch.setattr("safetydpo_core.eval.Evaluator", FakeEvaluator)
    monkeypatch.setattr(pipeline, "Evaluator", FakeEvaluator)
    run = make_variant_run(tmp_path / "run", sizes_aligned=(48, 40) if case == "mixed_pair_sizes" else None)
    photos = tmp_path / "photos"
    photos.mkdir()
    if case == "file_reference":
        noise_image(0).save(photos / "a.png")
    if case == "not_an_image":
        (photos / "broken.png").write_bytes(b"not a png")
    extra = {"empty_reference": ["--fid-reference", str(photos)],
             "missing_reference": ["--fid-reference", str(tmp_path / "nowhere")],
             "file_reference": ["--fid-reference", str(photos / "a.png")],
             "not_an_image": ["--fid-reference", str(photos)],
             "mixed_pair_sizes": ["--fid", "off"],
             "missing_weights": ["--fid", "on"],
             "bad_baseline": ["--baseline", "nope", "--fid", "off"]}[case]
    weights = tmp_path / "w"
    if "--fid-reference" in extra:
        extra += ["--inception", str(inception_pth)]
    out = tmp_path / "rep"
    assert main(["eval", str(run), "--out", str(out), "--weights-dir", str(weights)] + extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()  # nothing half-written


def test_in_memory_batches_pair_by_position_and_report(tmp_path):
    base = [noise_image(i, (24, 24)) for i in range(3)]
    aligned = [rgb(np.asarray(im, dtype=np.int16) + 10) for im in base]
    ev = FakeEvaluator(EvalSettings(weights_dir=str(tmp_path), fid="auto"))
    result = evaluate([ImageBatch("reference_images", base), ImageBatch("images", aligned, ["a cat"] * 3)], evaluator=ev)
    payload = result_json(result, "images")
    assert payload["group"] == "images" and payload["images"] == 3 and set(payload["groups"]) == {"images",
                                                                                                  "reference_images"}
    assert payload["groups"]["images"]["mad"] == pytest.approx(10.0) and payload["quality"]["preservation"][0]["pairs"] == 3
    json.dumps(payload, default=str)
    files = write_report(result, tmp_path / "r")
    assert "Preservation and FID/KID against `reference_images`" in (tmp_path / "r" / "report.md").read_text()
    assert files["quality_csv"].exists()
    with pytest.raises(ConfigError, match="measured against 'reference_images', not 'images'"):
        write_report(result, tmp_path / "r2", baseline="images")
    with pytest.raises(DatasetError, match=r"images\[0\] \(images\) is 30x30 but reference_images\[0\]"):
        evaluate([ImageBatch("reference_images", base), ImageBatch("images", [noise_image(0, (30, 30))] * 3)],
                 evaluator=ev)
    with pytest.raises(ConfigError, match="has 3 pictures but 2 prompts"):
        ImageBatch("x", base, ["a", "b"])
