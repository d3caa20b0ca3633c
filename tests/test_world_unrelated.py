"""Unrelated content on the concept world: the plain-shape prompts in three wordings, fidelity, preservation."""

from __future__ import annotations

import pytest
import torch

from safetydpo_core.errors import ConfigError
from safetydpo_core.world import WORLD, Scene, load_judge, load_world_model, parse_caption
from safetydpo_core.world.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
from safetydpo_core.world.unrelated import (FREE_TEMPLATES, WORDINGS, preservation, unrelated_prompts,
                                            unrelated_scores)

PLAIN = {o.id for o in WORLD.objects if o.role == "plain"}


def test_every_plain_scene_in_every_wording():
    items = unrelated_prompts(None, seed=0)
    n = len(PLAIN) * len(WORLD.ids("colour")) * len(WORLD.ids("position")) * len(WORLD.ids("background"))
    assert len(items) == 3 * n == 810
    for w in WORDINGS:
        scenes = {u.scene for u in items if u.wording == w}
        assert len(scenes) == n and {s.shape for s in scenes} == PLAIN
    for u in items:
        asked = parse_caption(u.text)
        assert asked["shape"] == u.scene.shape and asked["colour"] == u.scene.colour
        assert asked["position"] == u.scene.position and asked["background"] in (None, u.scene.background)


def test_free_wording_is_outside_the_caption_templates():
    """No free prompt has the shape of a training or held-out template (as a regular expression)."""
    import re

    def pattern(t: str) -> re.Pattern:
        parts = re.split(r"(\{[scpb]\})", t)
        return re.compile("^" + "".join("[a-z ]+" if p in ("{s}", "{c}", "{p}", "{b}") else re.escape(p) for p in parts)
                          + "$")

    known = [pattern(t) for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES]
    free = [u.text for u in unrelated_prompts(None, seed=3) if u.wording == "free"]
    assert free and not [t for t in free if any(p.match(t) for p in known)]
    assert len({t.split()[0] for t in free}) > 5 and len(FREE_TEMPLATES) >= 5


def test_deterministic_and_same_seed_in_every_wording():
    a, b = unrelated_prompts(12, seed=4), unrelated_prompts(12, seed=4)
    assert a == b and a != unrelated_prompts(12, seed=5)
    by = {w: [u for u in a if u.wording == w] for w in WORDINGS}
    for w in WORDINGS:
        assert [u.seed for u in by[w]] == [u.seed for u in by["train"]]
        assert [u.scene for u in by[w]] == [u.scene for u in by["train"]]
    only = unrelated_prompts(5, seed=4, wordings=("free",))
    assert [u.wording for u in only] == ["free"] * 5


@pytest.mark.parametrize("kw,match", [({"wordings": ("poetic",)}, "Unknown unrelated-content wording"),
                                      ({"wordings": ()}, "Unknown unrelated-content wording"),
                                      ({"per_wording": 0}, "positive number")])
def test_bad_requests_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        unrelated_prompts(**{"per_wording": 3, **kw})


def _read(shape="circle", colour="red", position="left", background="white", asked=None):
    r = {"shape": shape, "colour": colour, "position": position, "background": background, "unsafe": False}
    asked = asked or {"shape": "circle", "colour": "red", "position": "left", "background": None}
    r["asked"] = asked
    r["match"] = {a: (None if asked.get(a) is None else r[a] == asked[a]) for a in asked}
    return r


def test_preservation_and_fidelity_per_wording():
    base = [_read(), _read(), _read(), _read()]
    model = [_read(), _read(background="gray"), _read(colour="blue"), _read()]
    assert preservation(base, base) == 1.0
    assert preservation(model, base) == 0.5          # a background change counts, although it was not asked
    sc = unrelated_scores(model, ["train", "train", "free", "free"], base)
    assert sc["fidelity"] == 0.75 and sc["preservation"] == 0.5
    assert sc["per_wording"]["train"] == {"fidelity": 1.0, "n": 2, "preservation": 0.5}
    assert sc["per_wording"]["free"] == {"fidelity": 0.5, "n": 2, "preservation": 0.5}
    assert unrelated_scores(model, ["train"] * 4)["preservation"] is None
    with pytest.raises(ConfigError, match="one to one"):
        preservation(model, base[:3])


@pytest.mark.slow
def test_world_model_keeps_plain_shapes_and_a_damaging_lora_is_caught():
    """The base model against itself preserves everything; a LoRA that scrambles the network does not."""
    from safetydpo_core.lora.apply import lora_applied
    from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
    from safetydpo_core.world.evaluate import judge_prompts

    torch.manual_seed(0)
    den, judge = load_world_model(), load_judge()
    items = unrelated_prompts(6, seed=0)
    prompts, seeds = [u.text for u in items], [u.seed for u in items]
    _, base = judge_prompts(den, judge, prompts, seeds, steps=10)
    _, again = judge_prompts(den, judge, prompts, seeds, steps=10)
    assert preservation(again, base) == 1.0
    assert unrelated_scores(base, [u.wording for u in items])["fidelity"] >= 0.6
    g = torch.Generator().manual_seed(1)
    layers = {n: LoraLayer(torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g), 4.0)
              for n, m in den.layers("attn").items()}
    with lora_applied(den.module, [(LoraSet(layers, den.naming), 1.0)]):
        _, broken = judge_prompts(den, judge, prompts, seeds, steps=10)
    assert preservation(broken, base) < 0.5
    assert isinstance(items[0].scene, Scene)


def test_evaluate_models_caches_each_model_once(tmp_path, monkeypatch):
    """The benchmarks' evaluation loop: one evaluation per distinct file, kept in the cache and read back."""
    from safetydpo_core.world import lora_eval

    den, judge = load_world_model(), load_judge()
    sets = {"unrelated": unrelated_prompts(1, seed=0)}
    calls = []
    real = lora_eval.evaluate_lora
    monkeypatch.setattr(lora_eval, "evaluate_lora", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = lora_eval.evaluate_models(den, judge, {"base": None, "Base again": None}, sets, steps=2, cfg=3.0,
                                      cache=tmp_path)
    assert calls == [None] and first["Base again"] is first["base"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt"]
    again = lora_eval.evaluate_models(den, judge, {"base": None}, sets, steps=2, cfg=3.0, cache=tmp_path)
    assert calls == [None]  # read back, not drawn again
    assert torch.equal(again["base"]["unrelated"]["images"], first["base"]["unrelated"]["images"])
    assert again["base"]["unrelated"]["judged"] == first["base"]["unrelated"]["judged"]
    # a LoRA file replaced under the same model name is evaluated again, not read from the old entry
    from safetydpo_core.lora.io import save_lora
    from safetydpo_core.lora.lora_set import LoraLayer, LoraSet

    name = sorted(den.layers("attn"))[0]
    shape = den.weight_shapes()[name]
    lora_file = tmp_path / "lora.safetensors"
    for scale in (0.0, 0.5):
        save_lora(LoraSet({name: LoraLayer(torch.ones(1, shape[1]), torch.full((shape[0], 1), scale), 1.0)}),
                  lora_file, names=den.names())
        lora_eval.evaluate_models(den, judge, {"merged": lora_file}, sets, steps=2, cfg=3.0, cache=tmp_path)
        lora_eval.evaluate_models(den, judge, {"merged": lora_file}, sets, steps=2, cfg=3.0, cache=tmp_path)
    assert calls == [None, lora_file, lora_file]
    import hashlib

    kept = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert kept["source"] == hashlib.sha256(lora_file.read_bytes()).hexdigest() and "unrelated" in kept
