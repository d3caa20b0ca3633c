"""The Red-Team Attack node on real ComfyUI objects, in-process (COMFYUI_PATH): tiny SD1.5 and SDXL models built as
ComfyUI's executor builds them, the node called as the executor calls it (inside inference mode).

Checked: the outputs (adversarial pairs and lines, a CONDITIONING batch that ComfyUI's own sampler takes, the
pictures, the report) for a black-box and the white-box attacks on SD1.5 and SDXL; the white-box attacks
refuse to run without ``base_model``; Cancel through ComfyUI's progress hook stops the run and queueing again
finishes it with the results of an uninterrupted run; the graph's MODEL is left as it was.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_support import assert_same_state, diffusion_state, import_comfy, requires_comfyui, tiny_sd15, tiny_sdxl
from test_nodes_comfy import comfy_dirs, core_errors, run  # noqa: F401 - comfy_dirs is a fixture

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15(seed=21)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(seed=22)


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    import sys

    if "comfy.model_management" in sys.modules:
        sys.modules["comfy.model_management"].unload_all_models()


def _attack(triple, pairs, attack, **kw):
    mp, clip, vae = triple
    args = dict(model=mp, clip=clip, vae=vae, pairs=pairs, attack=attack, budget=2, steps=2, judge="none",
                nudenet_setting="i2p", seed=3, sample_steps=2, cfg=4.0, sampler_name="euler", scheduler="normal",
                width=64, height=64, prompts_per_category=2, conditioning="soft result", resume=True)
    args.update(kw)
    return run("SafetyDPO_RedTeamAttack", **args)


def _sample(mp, cond, n):
    """ComfyUI's own sampling with the node's CONDITIONING as the positive prompt."""
    comfy = import_comfy().comfy
    import comfy.sample  # noqa: F401

    latent = torch.zeros(n, 4, 8, 8)
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(mp, noise, 2, 4.0, "euler", "normal", cond, cond, latent, denoise=1.0,
                                   disable_pbar=True, seed=0)


def test_wording_and_unlearndiff_on_sd15(comfy_dirs, sd15):
    mp = sd15[0]
    before = diffusion_state(mp)
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="violence", pairs_per_category=2, seed=4)
    adv, lines, cond, images, report = _attack(sd15, pairs, "wording")
    assert len(adv) == 2 and [p.id for p in adv] == [p.id for p in pairs]
    assert lines.splitlines() == [p.unsafe for p in adv] and all(p.unsafe != q.unsafe for p, q in zip(adv, pairs))
    assert cond[0][0].shape == (2, 77, 32) and images.shape == (2, 64, 64, 3)
    assert "Red-team attack: wording" in report
    assert _sample(mp, cond, 2).shape == (2, 4, 8, 8)
    with pytest.raises(core_errors().ConfigError, match="connect base_model"):
        _attack(sd15, pairs, "unlearndiff")
    adv, lines, cond, images, report = _attack(sd15, pairs, "unlearndiff", base_model=mp)
    assert all(q.unsafe in p.unsafe and len(p.unsafe) > len(q.unsafe) for p, q in zip(adv, pairs))  # prepended tokens
    assert cond[0][0].shape == (2, 77, 32) and images.shape == (2, 64, 64, 3)
    assert_same_state(before, mp)


def test_inversion_and_ring_a_bell_on_sdxl_give_soft_conditioning(comfy_dirs, sdxl):
    mp = sdxl[0]
    before = diffusion_state(mp)
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="sexual", pairs_per_category=2, seed=6)
    adv, lines, cond, images, report = _attack(sdxl, pairs, "inversion", base_model=mp)
    c, extras = cond[0]
    assert c.shape == (2, 77, 48) and extras["pooled_output"].shape == (2, 32) and extras["width"] == 64
    text_cond = _attack(sdxl, pairs, "inversion", base_model=mp, conditioning="adversarial text")[2]
    assert not torch.allclose(text_cond[0][0], c)  # the soft token is not the projected word
    assert _sample(mp, cond, 2).shape == (2, 4, 8, 8)
    adv, lines, cond, images, report = _attack(sdxl, pairs, "ring-a-bell")
    assert cond[0][0].shape == (2, 77, 48) and len(lines.splitlines()) == 2
    assert "Result: hard" in report and "Result: soft" in report
    assert_same_state(before, mp)


def test_cancel_then_queue_again_finishes_with_the_same_results(comfy_dirs, sd15):
    comfy = import_comfy().comfy
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="hate, shocking", pairs_per_category=1, seed=8)
    calls = {"n": 0}

    def hook(value, total, preview, node_id=None):  # the server's hook raises on Cancel (main.py)
        calls["n"] += 1
        if value >= total // 2 and value > 0:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _attack(sd15, pairs, "wording", prompts_per_category=1, seed=9)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert calls["n"] > 0
    resumed = _attack(sd15, pairs, "wording", prompts_per_category=1, seed=9)
    straight = _attack(sd15, pairs, "wording", prompts_per_category=1, seed=9, resume=False)
    assert resumed[1] == straight[1]
    assert torch.equal(resumed[3], straight[3])
