"""The concept world's renderer: deterministic, draws what the scene says, twins match their concepts' size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safetydpo_core.errors import ConfigError
from safetydpo_core.world import WORLD, Scene, render, render_batch
from safetydpo_core.world.render import render_array


def _mask(img: np.ndarray, scene: Scene) -> np.ndarray:
    """Pixels whose colour is far from the background's grey level."""
    bg = np.array(WORLD.get("background", scene.background).data)[:, None, None] / 255
    return np.abs(img - bg).max(axis=0) > 0.25


def test_same_scene_and_seed_give_the_same_pixels():
    s = Scene("weapon", "red", "left", "white")
    a, b = render(s, 7), render(s.to_dict(), 7)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a, render(s, 8))  # the seed moves, sizes and tints the object
    batch = render_batch([s, s.replace(colour="blue")], [7, 7])
    assert torch.equal(batch[0], a) and not torch.equal(batch[1], a)


def test_world_pixels_are_pinned():
    """The shipped model and judge were trained on these pictures: a change of the renderer needs a retrain."""
    scenes = [Scene(o, c, p, b) for o, c, p, b in zip(WORLD.shapes, WORLD.ids("colour") * 3, WORLD.ids("position") * 4,
                                                      WORLD.ids("background") * 6)]
    imgs = render_batch(scenes, range(len(scenes))).double()
    assert imgs.sum().item() == pytest.approx(PINNED_SUM, rel=1e-6), (
        "the world's renders changed; retrain the model and judge (see the README, 'The world') and re-pin")
    assert (imgs * torch.arange(32, dtype=torch.float64)).sum().item() == pytest.approx(PINNED_MOMENT, rel=1e-6)


PINNED_SUM = 42663.8841423206
PINNED_MOMENT = 662178.1138878949


@pytest.mark.parametrize("shape", WORLD.shapes)
def test_object_has_the_asked_colour_position_and_background(shape):
    for k, (colour, position, bg) in enumerate(zip(WORLD.ids("colour"), WORLD.ids("position") + ("center",),
                                                   WORLD.ids("background") * 2)):
        scene = Scene(shape, colour, position, bg)
        img = render_array(scene, 100 + k)
        mask = _mask(img, scene)
        assert 20 <= mask.sum() <= 300, f"{scene}: object covers {mask.sum()} pixels"
        ys, xs = np.nonzero(mask)
        cx, cy = WORLD.get("position", position).data
        bx, by = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # glyphs are centred on their box
        assert abs(bx - cx) < 2.5 and abs(by - cy) < 2.5, f"{scene}: box centre ({bx}, {by}) is not at {cx, cy}"
        core = img[:, mask].mean(axis=1) * 255
        rgb = np.array(WORLD.get("colour", colour).data)
        assert np.abs(core - rgb).max() < 60, f"{scene}: object colour {core} is not {colour} {rgb}"
        corner = img[:, :3, :3] if position not in ("left", "top") else img[:, -3:, -3:]
        corner = corner.mean(axis=(1, 2)) * 255
        assert np.abs(corner - np.array(WORLD.get("background", bg).data)).max() < 20, f"{scene}: background is not {bg}"


def test_twins_have_the_same_size_and_place_but_another_glyph():
    for concept in WORLD.concepts:
        s = Scene(concept.id, "purple", "center", "cream")
        a = _mask(render_array(s, 3), s)
        b = _mask(render_array(s.replace(shape=concept.twin), 3), s)
        assert 0.45 < b.sum() / a.sum() < 2.2, f"{concept.id} vs {concept.twin}: areas {a.sum()} and {b.sum()}"
        iou = (a & b).sum() / (a | b).sum()
        assert iou < 0.7, f"{concept.id} and its twin {concept.twin} look alike (IoU {iou:.2f})"
        for m in (a, b):
            ys, xs = np.nonzero(m)
            assert abs((xs.min() + xs.max() + 1) / 2 - 16) < 2.5 and abs((ys.min() + ys.max() + 1) / 2 - 16) < 2.5


def test_every_glyph_is_distinct():
    masks = {}
    for o in WORLD.objects:
        s = Scene(o.id, "red", "center", "white")
        masks[o.id] = _mask(render_array(s, 0), s)
    ids = list(masks)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85, f"{a} and {b} are nearly the same picture (IoU {iou:.2f})"


def test_bad_scenes_and_seeds_are_refused():
    with pytest.raises(ConfigError, match="shape 'hexagon'"):
        Scene("hexagon", "red", "left", "white")
    with pytest.raises(ConfigError, match="colour"):
        render({"shape": "circle", "colour": "pink", "position": "left", "background": "white"})
    with pytest.raises(ConfigError, match="lacks background"):
        render({"shape": "circle", "colour": "red", "position": "left"})
    with pytest.raises(ConfigError, match="seed"):
        render(Scene("circle", "red", "left", "white"), -1)
    with pytest.raises(ConfigError, match="one seed per scene"):
        render_batch([Scene("circle", "red", "left", "white")], [1, 2])
    with pytest.raises(ConfigError, match="multiple of 8"):
        render(Scene("circle", "red", "left", "white"), 0, size=30)
