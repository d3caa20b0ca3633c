"""Calibration: hook statistics against a hand computation on a toy denoiser, prompts, datasets, caching,
and calibration + merge on a tiny diffusers SD1.5 model with experts in either naming."""

from __future__ import annotations

import json

import pytest
import torch

from safetydpo_core.denoiser.protocol import Conditioning, uniform_timesteps
from safetydpo_core.errors import ConfigError, DatasetError, Interrupted, LoraError
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.lora.peft_adapter import PeftLoraAdapter
from safetydpo_core.lora.targets import select_layers
from safetydpo_core.lora.unet_names import weight_modules
from safetydpo_core.merge import (CalibrationOptions, CalibrationStats, MergeOptions, align_experts, calibrate,
                                  calibration_prompts, dataset_inputs, merge_experts, read_pairs_jsonl)

TOKENS = {"a": torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]]),
          "b": torch.tensor([[-2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])}
IMAGES = {p: torch.arange(18, dtype=torch.float32).reshape(2, 3, 3) * (1.0 if p == "a" else -0.5) for p in TOKENS}


class ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)


class ToyDenoiser:
    """The Denoiser protocol (every member) around a linear and a conv layer fed from the conditioning: an
    epsilon model on the discrete schedule whose prediction is its input."""

    naming = "diffusers"
    prediction_type = "epsilon"
    schedule = "discrete"
    num_train_timesteps = 1000
    base_model_version = "custom"
    device = torch.device("cpu")
    dtype = torch.float32
    guidance_input = False
    guidance = None
    latent_channels = 2
    vae_scale_factor = 1
    sample_size = 8
    default_size = (8, 8)

    def __init__(self):
        torch.manual_seed(0)
        self.net = ToyNet()
        self.seen_t: list[int] = []

    @property
    def module(self):
        return self.net

    def names(self):
        raise LoraError("The toy network has only diffusers names; it has no LDM naming to convert to.")

    def layers(self, targets=None):
        return select_layers(dict(self.net.named_modules()), targets)

    def weight_shapes(self):
        return weight_modules(self.net)

    def fingerprint(self):
        return "toy"

    def attach_lora(self, rank, alpha=None, targets=None):
        return PeftLoraAdapter(self.net, list(self.layers(targets)), rank=rank, alpha=alpha)

    def set_gradient_checkpointing(self, enabled):
        pass  # two layers: nothing worth recomputing

    def latent_shape(self, height, width):
        return (2, 2, 2)

    def encode_prompts(self, prompts, size=None):
        return Conditioning({"tok": torch.stack([TOKENS[p] for p in prompts]),
                             "img": torch.stack([IMAGES[p] for p in prompts])})

    def prompt_token_counts(self, prompts):
        return [len(TOKENS[p]) for p in prompts]

    def last_token_embeddings(self, prompts):
        return torch.stack([TOKENS[p][-1] for p in prompts])

    def prompt_embedder(self):
        raise ConfigError("The toy denoiser has no tokenizer: it cannot be attacked token by token.")

    def sample_timesteps(self, n, generator, latent_shape=None, t_range=None):
        return uniform_timesteps(self.num_train_timesteps, n, generator, t_range)

    def add_noise(self, x0, noise, t):
        return x0 + noise

    def target(self, x0, noise, t):
        return noise

    def unit_marginal(self, noise, t):
        return noise

    def predict(self, x_t, t, cond):
        self.seen_t.extend(int(v) for v in t)
        self.net.proj(cond.tensors["tok"])
        self.net.conv(cond.tensors["img"])
        return x_t

    def eps_from_prediction(self, pred, x_t, t):
        return pred


def toy_experts():
    g = torch.Generator().manual_seed(1)
    e1 = LoraSet({"proj": LoraLayer(torch.randn(2, 3, generator=g), torch.randn(2, 2, generator=g), 2.0),
                  "conv": LoraLayer(torch.randn(1, 2, 3, 3, generator=g), torch.randn(3, 1, 1, 1, generator=g), 1.0)},
                 "diffusers")
    e2 = LoraSet({"proj": LoraLayer(torch.randn(3, 3, generator=g), torch.randn(2, 3, generator=g), 3.0)}, "diffusers")
    return [e1, e2]


def test_calibration_matches_a_hand_computation():
    den = ToyDenoiser()
    experts = toy_experts()
    stats = calibrate(den, ["a", "b"], experts=experts, options=CalibrationOptions(num_inputs=3, batch_size=2))
    order = ["a", "b", "a"]
    proj = stats.get("proj")
    want_sq = torch.stack([(TOKENS[p] ** 2).sum(0) for p in order])
    assert torch.allclose(proj.sq, want_sq)
    assert proj.tokens.tolist() == [2, 2, 2]
    # rank-space activations: expert 1 then expert 2, concatenated
    a1, a2 = experts[0]["proj"].down, experts[1]["proj"].down
    want_rank = torch.stack([torch.cat([((TOKENS[p] @ a1.T) ** 2).sum(0), ((TOKENS[p] @ a2.T) ** 2).sum(0)]) for p in order])
    assert torch.allclose(proj.rank_sq, want_rank, atol=1e-5)
    assert proj.rank_index == {0: (0, 2), 1: (2, 3)}
    # RMS over all tokens = sqrt(sum x^2 / tokens)
    all_tok = torch.cat([TOKENS[p] for p in order])
    assert torch.allclose(proj.channel_rms(), all_tok.pow(2).mean(0).sqrt())
    rms, src = proj.rank_rms(1, a2)
    assert src == "experts" and torch.allclose(rms, (all_tok @ a2.T).pow(2).mean(0).sqrt(), atol=1e-5)
    # conv layer: per-channel sums over positions; each delta column (c, kh, kw) gets channel c's RMS
    conv = stats.get("conv")
    assert conv.kernel == 9
    assert torch.allclose(conv.sq[1], (IMAGES["b"] ** 2).sum((1, 2)))
    assert conv.channel_rms().shape == (18,)
    h = torch.nn.functional.conv2d(IMAGES["a"][None], experts[0]["conv"].down, padding=1)
    assert torch.allclose(conv.rank_sq[0], h.pow(2).sum((0, 2, 3)), atol=1e-4)
    # noise mode: timesteps in the top 30 % of the schedule
    assert len(den.seen_t) == 3 and all(700 <= t < 1000 for t in den.seen_t)
    assert stats.info["x0"] == "noise" and stats.info["prompts"] == 2


def test_gram_statistics_give_the_same_rank_activations():
    den = ToyDenoiser()
    experts = toy_experts()
    by_hooks = calibrate(den, ["a", "b"], experts=experts, options=CalibrationOptions(num_inputs=4))
    by_gram = calibrate(den, ["a", "b"], experts=experts, options=CalibrationOptions(num_inputs=4, rank_stats="gram"))
    g = by_gram.get("proj")
    assert g.rank_sq is None and g.gram is not None
    all_tok = torch.cat([TOKENS[p] for p in "abab"])
    assert torch.allclose(g.gram.float(), all_tok.T @ all_tok, atol=1e-5)
    for e, ex in enumerate(experts):
        want, _ = by_hooks.get("proj").rank_rms(e, ex["proj"].down)
        got, src = g.rank_rms(e, ex["proj"].down)
        assert src == "gram" and torch.allclose(got, want, atol=1e-5)
    # the merge is the same whichever way the rank activations were obtained
    a = merge_experts(experts, "comerge", by_hooks)
    b = merge_experts(experts, "comerge", by_gram)
    assert a.lora.allclose(b.lora)
    # with no rank statistics, the diagonal approximation is used and said so
    none = calibrate(den, ["a"], experts=experts, options=CalibrationOptions(num_inputs=2, rank_stats="none"))
    res = merge_experts(experts, "comerge", none)
    assert any("approximated" in n for n in res.report.overall().get("notes", []))


def test_calibration_on_dataset_latents_uses_the_whole_schedule(tmp_path):
    from safetydpo_core.data import PreferenceDatasetWriter

    with PreferenceDatasetWriter(tmp_path / "ds", model_fingerprint="toy", shard_size=2, previews=False) as wr:
        for i, cat in enumerate(["violence", "sexual", "violence", "hate"]):
            wr.add(id=f"p{i}", category=[cat], concept="c", unsafe="a", safe="b",
                   safe_latent=torch.full((2, 2, 2), float(i)), unsafe_latent=torch.full((2, 2, 2), -float(i)),
                   seed=i, height=8, width=8)
    inputs = dataset_inputs(tmp_path / "ds", ["violence", "sexual"], count=5)
    assert len(inputs) == 5
    assert all(p == "a" for p, _ in inputs)
    assert {float(x.flatten()[0]) for _, x in inputs} <= {0.0, 1.0, 2.0, -1.0, -2.0}
    den = ToyDenoiser()
    stats = calibrate(den, None, inputs=inputs, experts=toy_experts(), options=CalibrationOptions(num_inputs=40, batch_size=8))
    assert stats.info["x0"] == "latents"
    assert min(den.seen_t) < 700 and max(den.seen_t) < 1000


def test_calibration_can_be_interrupted_and_reports_progress():
    den = ToyDenoiser()
    seen = []
    with pytest.raises(Interrupted):
        calibrate(den, ["a"], experts=toy_experts(), options=CalibrationOptions(num_inputs=8, batch_size=2),
                  progress=lambda d, t, i: seen.append((d, t)), should_stop=lambda: len(seen) >= 2)
    assert seen == [(2, 8), (4, 8)]
    # the hooks are gone afterwards
    assert not den.net.proj._forward_hooks and not den.net.conv._forward_hooks


def test_calibration_refuses_bad_input():
    den = ToyDenoiser()
    experts = toy_experts()
    with pytest.raises(ConfigError, match="prompts"):
        calibrate(den, [], experts=experts)
    with pytest.raises(ConfigError, match="rank_stats"):
        calibrate(den, ["a"], layer_names=["proj"])
    ldm = LoraSet(dict(experts[0].layers), "ldm")
    with pytest.raises(LoraError, match="align_experts"):
        calibrate(den, ["a"], experts=[ldm])
    ghost = LoraSet({"nope": experts[0]["proj"]}, "diffusers")
    with pytest.raises(LoraError, match="nope"):
        calibrate(den, ["a"], experts=[ghost])
    with pytest.raises(ConfigError, match="timesteps"):
        calibrate(den, ["a"], experts=experts, options=CalibrationOptions(timesteps=(0.9, 0.5)))


def test_stats_cache_round_trip_and_stale_experts(tmp_path):
    den = ToyDenoiser()
    experts = toy_experts()
    stats = calibrate(den, ["a", "b"], experts=experts, options=CalibrationOptions(num_inputs=3))
    path = stats.save(tmp_path / "stats.safetensors")
    back = CalibrationStats.load(path)
    assert back.info == json.loads(json.dumps(stats.info))
    for n, s in stats.layers.items():
        b = back.layers[n]
        assert torch.equal(s.sq, b.sq) and torch.equal(s.rank_sq, b.rank_sq) and s.rank_index == b.rank_index
        assert s.kernel == b.kernel
    assert merge_experts(experts, "comerge", back).lora.allclose(merge_experts(experts, "comerge", stats).lora)
    with pytest.raises(ConfigError, match="other experts"):
        merge_experts(list(reversed(experts)), "comerge", back)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="cannot be read"):
        CalibrationStats.load(tmp_path / "junk.safetensors")


def _write_pairs(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_calibration_prompts_round_robin_over_categories(tmp_path):
    rows = [{"id": f"v{i}", "category": ["violence"], "concept": "x", "unsafe": f"violent {i}", "safe": f"calm {i}"}
            for i in range(10)]
    rows += [{"id": "s0", "category": "Sexual", "concept": "y", "unsafe": "nude 0", "safe": "dressed 0"},
             {"id": "h0", "category": ["hate", "violence"], "concept": "z", "unsafe": "hateful 0", "safe": "kind 0"}]
    pairs = read_pairs_jsonl(_write_pairs(tmp_path / "pairs.jsonl", rows))
    assert pairs[10]["category"] == ["sexual"]
    got = calibration_prompts(pairs, ["violence", "sexual"], count=4, seed=0)
    assert len(got) == 4 and "nude 0" in got[:2]
    assert sum(p.startswith(("violent", "hateful")) for p in got) == 3
    both = calibration_prompts(pairs, ["sexual"], count=10, field="both")
    assert both == ["nude 0", "dressed 0"]
    assert calibration_prompts(pairs, ["sexual"], count=10, seed=1) == ["nude 0"]
    assert calibration_prompts(pairs, [], 100, seed=3) == calibration_prompts(pairs, None, 100, seed=3)
    with pytest.raises(DatasetError, match="self_harm"):
        calibration_prompts(pairs, ["self_harm"], count=4)
    with pytest.raises(DatasetError):
        read_pairs_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------------
# The diffusers backend


def _attn_experts(den, n=3, rank=4):
    shapes = {k: v for k, v in den.weight_shapes().items() if k in den.layers("attn")}
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(s)
        out.append(LoraSet({k: LoraLayer(torch.randn(rank, v[1], generator=g) / 2, torch.randn(v[0], rank, generator=g) * 0.1,
                                         float(rank)) for k, v in shapes.items()}, "diffusers",
                           {"safetydpo_category": ["violence", "sexual", "hate"][s % 3]}))
    return out


def test_tiny_sd15_calibrate_and_merge_with_experts_in_either_naming(tiny_sd15):
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser

    den = DiffusersDenoiser.from_pretrained(tiny_sd15)
    experts = _attn_experts(den)
    names = den.names()
    experts[1] = experts[1].renamed(names.mapping("diffusers", "ldm"), "ldm")   # a ComfyUI-named expert
    aligned = align_experts(experts, naming=den.naming, names=names, weight_shapes=den.weight_shapes())
    assert all(e.naming == "diffusers" for e in aligned)
    stats = calibrate(den, ["a photo of a cat", "a dog at night"], experts=aligned,
                      options=CalibrationOptions(num_inputs=4, batch_size=2))
    assert set(stats.layers) == set(aligned[0].layers)
    for n, s in stats.layers.items():
        assert s.sq.shape == (4, den.weight_shapes()[n][1])
        assert bool((s.sq > 0).all()) and s.rank_sq.shape == (4, 12)
    # attn2 k/v see the text conditioning: 77 tokens per input; attn1 sees the latent positions
    k = next(s for n, s in stats.layers.items() if n.endswith("attn2.to_k"))
    assert k.tokens.tolist() == [77.0] * 4
    for method in ("comerge", "comerge-delta"):
        res = merge_experts(aligned, method, stats, MergeOptions(aggregate="vote", normalize="mean"))
        assert set(res.lora.layers) == set(aligned[0].layers)
        res.lora.check_fits(den.weight_shapes())
        ov = res.report.overall()
        assert abs(sum(ov["shares"].values()) - 1) < 1e-9
        assert all(v > 0.1 for v in ov["shares"].values())


def test_tiny_sd15_experts_from_another_model_are_refused(tiny_sd15, tiny_sdxl):
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser

    den = DiffusersDenoiser.from_pretrained(tiny_sd15)
    xl = DiffusersDenoiser.from_pretrained(tiny_sdxl)
    good = _attn_experts(den, n=1)[0]
    # same layer names, other widths: an SDXL-like cross-attention dimension
    shapes = xl.weight_shapes()
    bad_name = next(n for n in good.layers if n.endswith("attn2.to_k"))
    layer = good[bad_name]
    wrong = LoraSet({**good.layers, bad_name: LoraLayer(torch.zeros(4, layer.in_features + 32), layer.up, 4.0)},
                    "diffusers")
    with pytest.raises(LoraError, match=rf"{bad_name}.*{layer.in_features + 32}.*{layer.in_features}"):
        align_experts([good, wrong], naming="diffusers", weight_shapes=den.weight_shapes())
    only_xl = [n for n in shapes if n not in den.weight_shapes() and n.endswith("attn1.to_q")][0]
    stray = LoraSet({only_xl: LoraLayer(torch.zeros(4, shapes[only_xl][1]), torch.zeros(shapes[only_xl][0], 4), 4.0)},
                    "diffusers")
    with pytest.raises(LoraError, match="another architecture"):
        align_experts([good, stray], naming="diffusers", weight_shapes=den.weight_shapes())
