"""Merge core: Co-Merge readings, the standard merges, SVD helpers and reports, on synthetic experts."""

from __future__ import annotations

import json

import pytest
import torch

from safetydpo_core.errors import ConfigError, LoraError
from safetydpo_core.lora.lora_set import LoraLayer, LoraSet
from safetydpo_core.merge import METHODS, CalibrationStats, LayerStats, MergeOptions, merge_experts
from safetydpo_core.merge.baselines import kth_largest, pruned_layer, trim
from safetydpo_core.merge.experts import expert_fingerprint
from safetydpo_core.merge.comerge import comerge_delta_layer, comerge_factor_layer, pick, selected_delta
from safetydpo_core.merge.lowrank import factored_svd, truncated_svd

SHAPES = {"blk.attn1.to_q": (12, 10), "blk.attn1.to_k": (12, 10), "blk.attn2.to_k": (12, 6), "blk.conv": (8, 4, 3, 3)}
N_INPUTS = 5


def make_expert(seed: int, rank: int = 4, alpha: float | None = None, shapes=SHAPES, category: str | None = None,
                scale: float = 0.3) -> LoraSet:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g) / rank ** 0.5
            up = torch.randn(shape[0], rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, shape[1], generator=g) / rank ** 0.5
            up = torch.randn(shape[0], rank, generator=g) * scale
        layers[name] = LoraLayer(down, up, float(alpha if alpha is not None else rank))
    meta = {"safetydpo_category": category} if category else {}
    return LoraSet(layers, "diffusers", meta)


def make_stats(experts=None, shapes=SHAPES, seed: int = 99, with_rank: bool = True) -> CalibrationStats:
    """Random positive input statistics; rank statistics measured from synthetic token matrices."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        d = shape[1]
        kernel = shape[2] * shape[3] if len(shape) == 4 else 1
        xs = [torch.randn(7, d, generator=g) * torch.rand(d, generator=g) * 3 for _ in range(N_INPUTS)]
        sq = torch.stack([(x ** 2).sum(0) for x in xs])
        tokens = torch.full((N_INPUTS,), 7.0, dtype=torch.float64)
        st = LayerStats(sq=sq, tokens=tokens, kernel=kernel)
        if with_rank and experts and kernel == 1:
            index, cols, start = {}, [], 0
            for e, ex in enumerate(experts):
                layer = ex.layers.get(name)
                if layer is None:
                    continue
                a = layer.down.reshape(layer.rank, -1)
                cols.append(torch.stack([((x @ a.T) ** 2).sum(0) for x in xs]))
                index[e] = (start, layer.rank)
                start += layer.rank
            st.rank_sq = torch.cat(cols, 1)
            st.rank_tokens = tokens.clone()
            st.rank_index = index
        out[name] = st
    info = {"expert_fingerprints": [expert_fingerprint(e) for e in experts]} if (with_rank and experts) else {}
    return CalibrationStats(out, "diffusers", info)


def expert_sum(experts, weights=None) -> dict[str, torch.Tensor]:
    weights = weights or [1.0] * len(experts)
    out = {}
    for e, w in zip(experts, weights):
        for n, l in e.items():
            out[n] = out.get(n, 0) + w * l.delta()
    return out


# ------------------------------------------------------------------------------------------------------
# Identity, zero experts, exactness


@pytest.mark.parametrize("method,kwargs,weights", [
    ("comerge", {}, None),
    ("comerge", {"aggregate": "vote", "normalize": "mean"}, None),
    ("comerge-delta", {}, None),
    ("comerge-delta", {"aggregate": "vote", "normalize": "rms"}, None),
    ("concat", {}, "mean"),
    ("linear", {}, "mean"),
    ("ties", {"density": 1.0}, None),
    ("magnitude", {"density": 1.0}, "mean"),
    ("dare", {"density": 1.0}, "mean"),
    ("dare-ties", {"density": 1.0}, None),
])
def test_identical_experts_merge_to_that_expert(method, kwargs, weights):
    base = make_expert(1, rank=4, alpha=2.0)
    experts = [LoraSet(dict(base.layers), "diffusers", {}) for _ in range(3)]
    w = [1 / 3] * 3 if weights == "mean" else None
    stats = make_stats(experts)
    res = merge_experts(experts, method, stats, MergeOptions(weights=w, **kwargs))
    for name, layer in base.items():
        got = res.lora[name].delta()
        assert torch.allclose(got, layer.delta(), atol=1e-5, rtol=1e-4), (method, name)


@pytest.mark.parametrize("method", ["comerge", "comerge-delta"])
@pytest.mark.parametrize("aggregate,normalize", [("mean", "none"), ("vote", "none"), ("vote", "mean"), ("mean", "rms")])
def test_zero_expert_never_wins(method, aggregate, normalize):
    a, b = make_expert(1), make_expert(2)
    zero = LoraSet({n: LoraLayer(torch.zeros_like(l.down), torch.zeros_like(l.up), l.alpha) for n, l in a.items()},
                   "diffusers", {})
    experts = [zero, a, b]
    res = merge_experts(experts, method, make_stats(experts), MergeOptions(aggregate=aggregate, normalize=normalize))
    for lr in res.report.layers:
        for part, counts in lr.counts.items():
            assert counts[0] == 0, (lr.name, part)
    assert res.report.overall()["shares"][res.report.labels[0]] == 0.0


def test_zero_activation_channel_goes_to_largest_weight_and_all_zero_is_undecided():
    values = torch.tensor([[[0.0, 2.0, 0.0]], [[1.0, -3.0, 0.0]]])      # 2 experts, 1 x 3
    scores = values.abs() * torch.tensor([1.0, 0.0, 1.0])             # channel 1 never active
    sel = pick(values, scores)
    assert sel.winner.tolist() == [[1, 1, -1]]
    assert sel.merged.tolist() == [[1.0, -3.0, 0.0]]


def test_concat_is_exact_with_mixed_ranks_alphas_and_layers():
    e1 = make_expert(1, rank=4, alpha=1.0)
    e2 = make_expert(2, rank=8, alpha=16.0)
    partial = {k: v for k, v in SHAPES.items() if k != "blk.attn2.to_k"}
    e3 = make_expert(3, rank=2, alpha=2.0, shapes=partial)
    experts = [e1, e2, e3]
    weights = [1.0, 0.5, -2.0]
    res = merge_experts(experts, "concat", None, MergeOptions(weights=weights))
    want = expert_sum(experts, weights)
    assert set(res.lora.layers) == set(SHAPES)
    for n, d in want.items():
        assert torch.allclose(res.lora[n].delta(), d, atol=1e-5)
        assert res.lora[n].rank == sum(e.layers[n].rank for e in experts if n in e.layers)
    assert res.report.overall()["sum_deviation"] < 1e-5


def test_missing_layer_is_a_zero_update_for_every_method():
    e1 = make_expert(1)
    e2 = make_expert(2, shapes={"blk.attn1.to_q": SHAPES["blk.attn1.to_q"]})
    experts = [e1, e2]
    stats = make_stats(experts)
    for method in METHODS:
        res = merge_experts(experts, method, stats, MergeOptions(rank=4) if method not in ("concat", "comerge") else None)
        assert set(res.lora.layers) == set(SHAPES), method
    # where only e1 adapts a layer, selection merges must give e1's update (rank 4, exact) and e2 wins nothing
    res = merge_experts(experts, "comerge-delta", stats)
    n = "blk.attn1.to_k"
    assert torch.allclose(res.lora[n].delta(), e1[n].delta(), atol=1e-5)
    lr = next(l for l in res.report.layers if l.name == n)
    assert lr.counts["delta"][1] == 0


def test_alpha_is_folded_once():
    e = make_expert(5, rank=4, alpha=1.0)   # scale 1/4
    for method in ("comerge", "comerge-delta", "concat", "linear"):
        res = merge_experts([e], method, make_stats([e]))
        for n, l in e.items():
            assert torch.allclose(res.lora[n].delta(), l.delta(), atol=1e-5), method
            assert res.lora[n].alpha == res.lora[n].rank


# ------------------------------------------------------------------------------------------------------
# Shares, rank bounds, determinism, full-rank exactness


@pytest.mark.parametrize("method,kw", [("comerge", {}), ("comerge", {"aggregate": "vote"}),
                                       ("comerge-delta", {"normalize": "mean", "aggregate": "vote"})])
def test_winner_shares_sum_to_one_per_layer(method, kw):
    experts = [make_expert(s, category=c) for s, c in ((1, "violence"), (2, "sexual"), (3, "hate"))]
    res = merge_experts(experts, method, make_stats(experts), MergeOptions(**kw))
    labels = res.report.labels
    assert labels == ["violence", "sexual", "hate"]
    for lr in res.report.layers:
        shares = lr.shares(labels)
        assert abs(sum(shares.values()) - 1.0) < 1e-9
        if len(lr.counts) > 1:
            for part in lr.counts:
                assert abs(sum(lr.shares(labels, part).values()) - 1.0) < 1e-9
    assert abs(sum(res.report.overall()["shares"].values()) - 1.0) < 1e-9
    d = json.loads(res.report.to_json())
    assert d["layers"][0]["shares"] and "retention" in d["overall"]


@pytest.mark.parametrize("method", ["comerge-delta", "linear", "ties", "dare", "dare-ties", "magnitude"])
@pytest.mark.parametrize("rank", [1, 3, 50])
def test_svd_output_rank_bound(method, rank):
    experts = [make_expert(s) for s in range(4)]
    res = merge_experts(experts, method, make_stats(experts), MergeOptions(rank=rank))
    for n, layer in res.lora.items():
        shape = SHAPES[n]
        bound = min(rank, shape[0], int(torch.tensor(shape[1:]).prod()))
        assert layer.rank <= bound
        assert layer.alpha == layer.rank
        assert torch.linalg.matrix_rank(layer.delta()) <= bound
        assert tuple(layer.weight_shape()) == shape


@pytest.mark.parametrize("method", METHODS)
def test_merges_are_deterministic(method):
    experts = [make_expert(s) for s in range(3)]
    stats = make_stats(experts)
    a = merge_experts(experts, method, stats, MergeOptions(seed=7))
    b = merge_experts(experts, method, stats, MergeOptions(seed=7))
    for n in a.lora.layers:
        assert torch.equal(a.lora[n].down, b.lora[n].down) and torch.equal(a.lora[n].up, b.lora[n].up), (method, n)


def test_dare_depends_on_seed_and_not_on_layer_order():
    experts = [make_expert(s) for s in range(3)]
    a = merge_experts(experts, "dare", None, MergeOptions(seed=1, density=0.5))
    b = merge_experts(experts, "dare", None, MergeOptions(seed=2, density=0.5))
    assert not torch.allclose(a.lora["blk.attn1.to_q"].delta(), b.lora["blk.attn1.to_q"].delta())
    rev = [LoraSet(dict(reversed(list(e.layers.items()))), "diffusers", {}) for e in experts]
    c = merge_experts(rev, "dare", None, MergeOptions(seed=1, density=0.5))
    for n in a.lora.layers:
        assert torch.equal(a.lora[n].delta(), c.lora[n].delta())


@pytest.mark.parametrize("aggregate,normalize", [("mean", "none"), ("vote", "mean")])
def test_delta_reading_at_full_rank_reproduces_the_selection(aggregate, normalize):
    experts = [make_expert(s) for s in range(4)]
    stats = make_stats(experts)
    res = merge_experts(experts, "comerge-delta", stats, MergeOptions(rank=64, aggregate=aggregate, normalize=normalize))
    for n in SHAPES:
        group = [e.layers.get(n) for e in experts]
        sel = selected_delta(group, [1.0] * 4, stats.get(n), aggregate, normalize)
        assert torch.allclose(res.lora[n].delta(), sel.merged, atol=1e-5)
        lr = next(l for l in res.report.layers if l.name == n)
        assert lr.svd_rel_error < 1e-5
        # every element of the selection is one expert's element
        vals = torch.stack([g.delta() for g in group])
        hit = (vals == sel.merged.unsqueeze(0)).any(0)
        assert bool(hit.all())


# ------------------------------------------------------------------------------------------------------
# Co-Merge scoring by hand


def test_factor_reading_by_hand():
    # two experts, one linear layer 2x3, rank 1, alpha = rank (scale 1)
    a1, b1 = torch.tensor([[1.0, -4.0, 0.5]]), torch.tensor([[2.0], [0.1]])
    a2, b2 = torch.tensor([[2.0, 1.0, -0.2]]), torch.tensor([[1.0], [3.0]])
    layers = [LoraLayer(a1, b1, 1.0), LoraLayer(a2, b2, 1.0)]
    sq = torch.tensor([[1.0, 0.01, 4.0]])                  # one input, one token: x = (1, 0.1, 2) up to sign
    x = torch.tensor([1.0, 0.1, 2.0])
    h1, h2 = float((a1 @ x).abs()), float((a2 @ x).abs())  # |A_e x| = 1 - 0.4 + 1 = 1.6 ; 2 + 0.1 - 0.4 = 1.7
    st = LayerStats(sq=sq, tokens=torch.ones(1, dtype=torch.float64), rank_sq=torch.tensor([[h1 ** 2, h2 ** 2]]),
                    rank_tokens=torch.ones(1, dtype=torch.float64), rank_index={0: (0, 1), 1: (1, 1)})
    merged, info = comerge_factor_layer("l", layers, [1.0, 1.0], st)
    # down scores: |a| * (1, 0.1, 2): e1 (1, 0.4, 1.0) vs e2 (2, 0.1, 0.4) -> (e2, e1, e1)
    assert merged.down.tolist() == [[2.0, -4.0, 0.5]]
    # up scores: |b| * h: e1 (3.2, 0.16) vs e2 (1.7, 5.1) -> (e1, e2)
    assert merged.up.tolist() == [[2.0], [3.0]]
    assert info["selections"]["down"].winner.tolist() == [[1, 0, 0]]
    assert info["selections"]["up"].winner.tolist() == [[0], [1]]


def test_vote_differs_from_mean_where_it_should():
    # up scores depend on each expert's own rank activation, which varies per input
    layers = [LoraLayer(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]]), 1.0),
              LoraLayer(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0]]), 1.0)]
    # three inputs: channel 0 active in two weak inputs, channel 1 in one strong input
    sq = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 100.0]])
    st = LayerStats(sq=sq, tokens=torch.ones(3, dtype=torch.float64), rank_sq=sq.clone(),
                    rank_tokens=torch.ones(3, dtype=torch.float64), rank_index={0: (0, 1), 1: (1, 1)})
    mean, _ = comerge_factor_layer("l", layers, [1.0, 1.0], st, aggregate="mean")
    vote, info = comerge_factor_layer("l", layers, [1.0, 1.0], st, aggregate="vote")
    # mean RMS: expert 2's rank activation is larger -> it wins `up`; by vote expert 1 wins 2 of 3 inputs
    assert mean.up.item() == 1.0 and vote.up.item() == 1.0
    m_w = comerge_factor_layer("l", layers, [1.0, 1.0], st)[1]["selections"]["up"].winner.item()
    v_w = info["selections"]["up"].winner.item()
    assert (m_w, v_w) == (1, 0)


def test_delta_vote_without_normalisation_equals_mean():
    experts = [make_expert(s) for s in range(3)]
    stats = make_stats(experts)
    a = merge_experts(experts, "comerge-delta", stats, MergeOptions(aggregate="mean"))
    b = merge_experts(experts, "comerge-delta", stats, MergeOptions(aggregate="vote"))
    for n in a.lora.layers:
        assert torch.equal(a.lora[n].delta(), b.lora[n].delta())


def test_expert_weight_shifts_wins():
    experts = [make_expert(1), make_expert(2)]
    stats = make_stats(experts)
    even = merge_experts(experts, "comerge-delta", stats).report.overall()["shares"]
    tilted = merge_experts(experts, "comerge-delta", stats, MergeOptions(weights=[3.0, 1.0])).report.overall()["shares"]
    assert tilted["expert0"] > even["expert0"] + 0.2


def test_normalisation_balances_a_loud_expert():
    quiet, loud = make_expert(1, scale=0.1), make_expert(2, scale=10.0)
    stats = make_stats([quiet, loud])
    raw = merge_experts([quiet, loud], "comerge-delta", stats).report.overall()["shares"]
    norm = merge_experts([quiet, loud], "comerge-delta", stats, MergeOptions(normalize="mean")).report.overall()["shares"]
    assert raw["expert0"] < 0.05
    assert 0.3 < norm["expert0"] < 0.7


# ------------------------------------------------------------------------------------------------------
# Baselines against peft and the SVD helpers


def test_ties_and_magnitude_match_peft():
    from peft.utils import merge_utils as mu

    experts = [make_expert(s) for s in range(3)]
    w = [1.0, 0.5, 2.0]
    name = "blk.attn1.to_q"
    group = [e.layers[name] for e in experts]
    deltas = [g.delta() for g in group]
    for method, ref in (("ties", mu.ties(deltas, torch.tensor(w), 0.4, "total")),
                        ("magnitude", mu.magnitude_prune(deltas, torch.tensor(w), 0.4))):
        layer, info = pruned_layer(method, name, group, w, rank=64, density=0.4)
        assert torch.allclose(layer.delta(), ref, atol=1e-5), method


def test_linear_matches_task_arithmetic_and_truncation_is_optimal():
    experts = [make_expert(s) for s in range(3)]
    res = merge_experts(experts, "linear", None, MergeOptions(rank=3))
    for n, full in expert_sum(experts).items():
        m = full.reshape(full.shape[0], -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(res.lora[n].delta(), best, atol=1e-4)


def test_trim_and_kth_largest():
    x = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    s = torch.sort(x, descending=True).values
    for k in (1, 17, 200_000, 399_999, 400_000):
        assert kth_largest(x, k) == s[k - 1]
    t = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    kept = trim(t, 0.25)
    assert int((kept != 0).sum()) == 500
    assert float(kept.abs()[kept != 0].min()) >= float(t.abs().reshape(-1).sort(descending=True).values[499])


def test_truncated_svd_modes_agree_and_factored_svd_is_exact():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(300, 200, generator=g) @ torch.diag(torch.logspace(0, -2, 200)) @ torch.randn(200, 200, generator=g)
    ue, de, ee = truncated_svd(m, 10, mode="exact")
    ur, dr, er = truncated_svd(m, 10, mode="randomized", seed=0)
    assert abs(ee - er) < 1e-3 * max(ee, 1e-6) + 1e-6
    assert abs(float(torch.linalg.matrix_norm(m - ur @ dr)) / float(torch.linalg.matrix_norm(m)) - er) < 1e-5
    # with a spectral gap the randomized factors give the same rank-10 matrix
    gap = torch.randn(300, 10, generator=g) @ torch.randn(10, 200, generator=g) + 1e-3 * torch.randn(300, 200, generator=g)
    ue, de, _ = truncated_svd(gap, 10, mode="exact")
    ur, dr, _ = truncated_svd(gap, 10, mode="randomized", seed=0)
    assert torch.allclose(ur @ dr, ue @ de, atol=1e-3)
    up, down = torch.randn(300, 12, generator=g), torch.randn(12, 200, generator=g)
    fu, fd, fe = factored_svd(up, down, 12)
    assert fe < 1e-6 and torch.allclose(fu @ fd, up @ down, atol=1e-3)
    fu, fd, fe = factored_svd(up, down, 5)
    eu, ed, ee = truncated_svd(up @ down, 5, mode="exact")
    assert abs(fe - ee) < 1e-5 and torch.allclose(fu @ fd, eu @ ed, atol=1e-3)
    zu, zd, ze = truncated_svd(torch.zeros(20, 30), 4)
    assert ze == 0.0 and zu.shape == (20, 4)


# ------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_with_names():
    a = make_expert(1)
    other = make_expert(2, shapes={"blk.attn1.to_q": (12, 11)})
    with pytest.raises(LoraError, match=r"blk\.attn1\.to_q.*\(12, 11\).*\(12, 10\)|blk\.attn1\.to_q.*\(12, 10\).*\(12, 11\)"):
        merge_experts([a, other], "concat")
    with pytest.raises(ConfigError, match="concat is exact"):
        merge_experts([a, a], "concat", None, MergeOptions(rank=4))
    with pytest.raises(ConfigError, match="comerge-delta"):
        merge_experts([a, a], "comerge", make_stats([a, a]), MergeOptions(rank=4))
    with pytest.raises(ConfigError, match="calibration"):
        merge_experts([a, a], "comerge")
    with pytest.raises(ConfigError, match="one per expert"):
        merge_experts([a, a], "linear", None, MergeOptions(weights=[1.0]))
    with pytest.raises(ConfigError, match="Unknown merge method"):
        merge_experts([a, a], "slerp")
    with pytest.raises(ConfigError, match="density"):
        merge_experts([a, a], "ties", None, MergeOptions(density=0.0))
    with pytest.raises(ConfigError, match="other experts"):
        b = make_expert(3)
        merge_experts([a, b], "comerge", make_stats([b, a]))
    bad_stats = make_stats([a], shapes={**SHAPES, "blk.attn1.to_q": (12, 9)}, with_rank=False)
    with pytest.raises(ConfigError, match="another model"):
        merge_experts([a, a], "comerge-delta", bad_stats)


def test_report_summary_and_metadata():
    experts = [make_expert(s, category=c) for s, c in ((1, "violence"), (2, "sexual"))]
    res = merge_experts(experts, "comerge", make_stats(experts))
    text = res.report.summary()
    assert "violence" in text and "sexual" in text and "blk.attn1.to_q" in text
    meta = res.lora.metadata
    assert meta["safetydpo_merge_method"] == "comerge"
    assert [e["label"] for e in json.loads(meta["safetydpo_merge_experts"])] == ["violence", "sexual"]
    assert json.loads(meta["safetydpo_merge_options"])["aggregate"] == "mean"
    assert meta["safetydpo_category"] == "violence,sexual"
    ret = res.report.overall()["retention"]
    assert set(ret) == {"violence", "sexual"}
    single = merge_experts([experts[0]], "concat").report.overall()
    assert abs(single["retention"]["violence"] - 1.0) < 1e-9


def test_delta_layer_conv_shapes():
    experts = [make_expert(s) for s in range(2)]
    stats = make_stats(experts)
    group = [e.layers["blk.conv"] for e in experts]
    layer, info = comerge_delta_layer("blk.conv", group, [1, 1], stats.get("blk.conv"), rank=3)
    assert layer.down.shape == (3, 4, 3, 3) and layer.up.shape == (8, 3, 1, 1)
    layer, info = comerge_factor_layer("blk.conv", group, [1, 1], stats.get("blk.conv"))
    assert layer.down.shape == (4, 4, 3, 3) and layer.up.shape == (8, 4, 1, 1)
    assert any("approximated" in n for n in info["notes"])


def test_merge_reports_progress_and_can_be_interrupted():
    from safetydpo_core.errors import Interrupted

    experts = [make_expert(s) for s in range(2)]
    seen = []
    merge_experts(experts, "linear", None, progress=lambda d, t, i: seen.append((d, t, i["layer"])))
    assert [s[0] for s in seen] == [1, 2, 3, 4] and all(s[1] == 4 for s in seen)
    with pytest.raises(Interrupted, match="layer 3 of 4"):
        calls = []
        merge_experts(experts, "linear", None, progress=lambda d, t, i: calls.append(d), should_stop=lambda: len(calls) >= 2)
