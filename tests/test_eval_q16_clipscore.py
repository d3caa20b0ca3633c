"""Q16 and CLIPScore through the real loading and scoring code, on random-weight tiny CLIP folders.

The CLIP models here are built from a tiny config with random weights (``safetydpo_core.eval.testing``): the
pipeline (folder checks, preprocessing, projected embeddings, Q16's softmax(100 cos) rule, CLIPScore's
definitions) is real, the numbers are not meaningful. Known answers come from constructing the Q16 prompt
embeddings from an image's own embedding, and from recomputing the scores by hand with transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from safetydpo_core.errors import ConfigError
from safetydpo_core.eval import EvalSettings, Evaluator
from safetydpo_core.eval.clip import ClipEmbedder
from safetydpo_core.eval.clipscore import ClipScorer
from safetydpo_core.eval.q16 import Q16Classifier, load_q16_embeddings
from safetydpo_core.eval.testing import build_tiny_clip, write_q16_embeddings
from safetydpo_core.eval.weights import MissingWeights


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14", seed=0)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipEmbedder(clip_dir)


def _images():
    rng = np.random.default_rng(1)
    return [Image.new("RGB", (64, 48), (220, 30, 30)), Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
            Image.new("L", (50, 50), 200)]


def _by_hand_image_features(clip_dir, images):
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pix = CLIPImageProcessor.from_pretrained(str(clip_dir))(images=[im.convert("RGB") for im in images],
                                                            return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pix)
    f = (out if torch.is_tensor(out) else out.pooler_output).float()
    return model, f / f.norm(dim=-1, keepdim=True)


def test_image_embeddings_match_transformers(clip_dir, clip):
    images = _images()
    _, want = _by_hand_image_features(clip_dir, images)
    got = clip.images(images)
    assert got.shape == (3, 16) and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_q16_rule_softmax_100cos_argmax(clip):
    images = _images()
    f = clip.images(images)
    # prompts built from image 0's own embedding: [non-inappropriate = -f0, inappropriate = f0]
    q = Q16Classifier(clip, torch.stack([-f[0], f[0]]))
    p = q.probabilities(images)
    want = torch.softmax(100 * f @ torch.stack([-f[0], f[0]]).T, dim=-1).numpy()
    assert np.allclose(p, want, atol=1e-5)
    assert p[0, 1] > 0.999 and q.flags(p)[0] is True
    swapped = Q16Classifier(clip, torch.stack([f[0], -f[0]]))
    assert swapped.flags(swapped.probabilities(images[:1])) == [False]
    with pytest.raises(ConfigError, match="dimension 8.*embeds in 16"):
        Q16Classifier(clip, torch.randn(2, 8))


def test_q16_embeddings_files(tmp_path):
    e = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    for name in ("p.npy", "p.safetensors"):
        assert torch.allclose(load_q16_embeddings(write_q16_embeddings(tmp_path / name, e)), torch.from_numpy(e))
    from safetensors.torch import save_file

    save_file({"whatever": torch.from_numpy(e)}, str(tmp_path / "one.safetensors"))
    assert load_q16_embeddings(tmp_path / "one.safetensors").shape == (2, 16)
    save_file({"a": torch.zeros(2, 16), "b": torch.zeros(2, 16)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match="hold 2 tensors"):
        load_q16_embeddings(tmp_path / "two.safetensors")
    (tmp_path / "prompts.p").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ConfigError, match=r"pickled format.*numpy.save\('prompts.npy'"):
        load_q16_embeddings(tmp_path / "prompts.p")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="hold Python objects"):
        load_q16_embeddings(tmp_path / "obj.npy")
    np.save(tmp_path / "three.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(ConfigError, match=r"shape \(3, 16\); expected \[2, D\]"):
        load_q16_embeddings(tmp_path / "three.npy")
    with pytest.raises(MissingWeights, match="does not exist"):
        load_q16_embeddings(tmp_path / "absent.npy")


def test_clipscore_definitions(clip_dir, clip):
    from transformers import AutoTokenizer

    images = _images()
    prompts = ["a red cat", "a photo of a dog at night", "blue house"]
    cos = ClipScorer(clip).cosines(images, prompts)
    model, fi = _by_hand_image_features(clip_dir, images)
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**enc)
    ft = (out if torch.is_tensor(out) else out.pooler_output).float()
    ft = ft / ft.norm(dim=-1, keepdim=True)
    assert np.allclose(cos, (fi * ft).sum(-1).numpy(), atol=1e-5)
    # the report's two numbers: SafetyDPO's mean 100*cos (no clamp) and Hessel's 2.5*max(cos, 0)
    from safetydpo_core.eval.report import summarize

    rows = [{"group": "g", "categories": [], "id": str(i), "seed": 0, "unsafe_safetydpo": False, "unsafe_i2p": False,
             "nudenet_safetydpo": None, "nudenet_i2p": None, "q16": None, "clip_cos": c}
            for i, c in enumerate([0.3, -0.2, 0.1])]
    [s] = summarize(rows, ["g"])
    assert s.clipscore == pytest.approx(100 * 0.2 / 3) and s.clip_s == pytest.approx(2.5 * 0.4 / 3)


def test_clip_folder_errors(tmp_path, clip_dir):
    with pytest.raises(MissingWeights, match="does not exist.*openai/clip-vit-large-patch14"):
        ClipEmbedder(tmp_path / "nope", help_text="Q16 needs openai/clip-vit-large-patch14")
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(MissingWeights, match="'siglip' model, not a CLIP model"):
        ClipEmbedder(tmp_path / "notclip")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((clip_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MissingWeights, match="pytorch_model.bin: pickled weights are refused"):
        ClipEmbedder(pickled)


def test_evaluator_finds_weights_in_the_weights_dir(tmp_path, clip_dir):
    import shutil

    w = tmp_path / "weights"
    shutil.copytree(clip_dir, w / "clip-vit-large-patch14")
    # CLIP alone is not Q16: without the embeddings Q16 does not run, and without NudeNet there is no IP
    with pytest.raises(ConfigError, match="Neither NudeNet nor Q16 runs"):
        Evaluator(EvalSettings(nudenet=False, weights_dir=str(w), q16="auto"))
    with pytest.raises(MissingWeights, match=r"data/ViT-L-14/prompts.p.*" + str(w / "q16" / "prompts.npy")):
        Evaluator(EvalSettings(nudenet=False, weights_dir=str(w), q16="on"))
    write_q16_embeddings(w / "q16" / "prompts.npy", np.random.default_rng(0).normal(size=(2, 16)))
    ev = Evaluator(EvalSettings(nudenet=False, weights_dir=str(w)))
    assert ev.active == ["q16", "clipscore"] and ev.q16.clip is ev.clipscore.clip  # one CLIP loaded for both
    rows = ev.score_images(_images(), ["a cat", "a dog", "a house"])
    for r in rows:
        assert r["nudenet"] is None and isinstance(r["q16"], bool) and 0 <= r["q16_p"] <= 1
        assert r["unsafe_safetydpo"] == r["q16"] == r["unsafe_i2p"] and -1 <= r["clip_cos"] <= 1
    info = ev.info()
    assert len(info["q16"]["embeddings_sha256"]) == 64 and info["clipscore"]["clip"]["embed_dim"] == 16


def test_evaluator_without_weights_notes_or_refuses(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(ConfigError, match="Neither NudeNet nor Q16 runs"):
        Evaluator(EvalSettings(nudenet=False, weights_dir=str(empty)))
    with pytest.raises(MissingWeights, match=r"CLIPScore needs CLIP weights.*" + str(empty / "clipscore")):
        Evaluator(EvalSettings(nudenet=False, weights_dir=str(empty), q16="off", clipscore="on"))
    with pytest.raises(MissingWeights, match="openai/clip-vit-large-patch14"):
        Evaluator(EvalSettings(nudenet=False, q16_clip=str(tmp_path / "missing"), q16_embeddings=str(tmp_path / "e.npy")))
