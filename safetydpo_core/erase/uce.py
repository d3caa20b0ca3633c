"""UCE (Unified Concept Editing; Gandikota et al., WACV 2024): a closed-form edit of cross-attention, as a LoRA.

For every cross-attention key and value projection ``W`` (``attn2.to_k``, ``attn2.to_v``), with ``c_i`` the
text embedding of concept ``i`` to erase, ``g_i`` that of its guide concept and ``c_j`` those of the concepts
to preserve, UCE solves

    min_W  s_e sum_i |W c_i - W_old g_i|^2 + s_p sum_j |W c_j - W_old c_j|^2 + lamb |W - W_old|_F^2

whose solution (the paper's equation 7; the official ``uce_sd_erase.py`` computes it as
``(lamb W_old + s_e sum v_i* c_i^T + s_p sum W_old c_j c_j^T)(lamb I + s_e sum c_i c_i^T + s_p sum c_j c_j^T)^-1``)
is, with ``M = lamb I + s_e C_e C_e^T + s_p C_p C_p^T``,

    W = W_old + s_e W_old (C_g - C_e) (M^-1 C_e)^T.

So the update of every layer has rank at most the number of erased concepts ``n``, and is already a LoRA:
``up = s_e W_old (C_g - C_e)`` (``[out, n]``), ``down = (M^-1 C_e)^T`` (``[n, in]``, the same for every layer:
one ``in x in`` solve for the whole model). The edit is therefore written exactly at rank ``n`` by default;
a chosen rank ``r < n`` keeps the best rank-``r`` approximation of each layer's update (SVD, through thin
QRs of the two factors) and reports its relative error; ``r > n`` is padded with zero directions. Full-rank
``.diff`` weights are an export option of the file writer (:func:`safetydpo_core.lora.io.save_lora`).

Embeddings follow the current official code: the text encoder's output (the cross-attention context) of
each concept prompt alone, at its *last* text token; an empty guide ("") is the start token, i.e. the
unconditional direction (the official default guide for objects). Defaults are the official ones:
``lamb`` 0.5, erase and preserve scales 1. Everything goes through the Denoiser protocol
(``prompt_token_counts``, ``last_token_embeddings``, ``layers``), so it runs on the
diffusers and the ComfyUI backends alike; the model is only read.

Public API: :func:`uce_edit`, :class:`UceResult`, :data:`UCE_TARGETS`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Iterable, Sequence

import torch

from .. import __version__
from ..denoiser.protocol import Denoiser
from ..errors import ConfigError
from ..lora.lora_set import LoraLayer, LoraSet
from ..training.concept_prompts import check_tokens, split_concepts

UCE_TARGETS = "attn2.to_k,attn2.to_v"
ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass
class UceResult:
    """The edit as a LoRA, with the per-layer relative error of the export (0 when exact)."""

    lora: LoraSet
    update_rank: int                 # rank of every layer's exact update (number of distinct erase pairs)
    rank: int                        # rank written
    rel_errors: dict[str, float]
    seconds: float
    concepts: list[str]
    guide: list[str]
    preserve: list[str]

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors.values(), default=0.0)

    def report(self) -> dict:
        errs = list(self.rel_errors.values())
        return {"method": "uce", "concepts": self.concepts, "guide": self.guide, "preserve": self.preserve,
                "layers": len(self.lora), "update_rank": self.update_rank, "rank": self.rank,
                "max_rel_error": self.max_rel_error, "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
                "seconds": round(self.seconds, 3)}


def _positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and value == value and value != float("inf")
    if not ok or value < 0 or (value == 0 and not allow_zero):
        need = "a number >= 0" if allow_zero else "a positive number"
        raise ConfigError(f"{name} must be {need}; got {value!r}.")
    return float(value)


def _guides(guide: str | Iterable[str] | None, n: int) -> list[str]:
    if guide is None:
        return [""] * n
    items = split_concepts(guide, "guide", allow_empty=True) if isinstance(guide, str) else \
        [" ".join(str(g).split()) for g in guide]
    if not items:
        return [""] * n
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise ConfigError(f"guide: {len(items)} guide concepts for {n} concepts to erase. Give one guide per concept "
                          f"(in the same order), a single guide for all of them, or none (erase towards the "
                          f"unconditional).")
    return items


def _embeddings(denoiser: Denoiser, texts: Sequence[str]) -> torch.Tensor:
    """``[len(texts), D]``: the cross-attention context of each text alone at its last text token (the start
    token for an empty text), in float64."""
    rows = [denoiser.last_token_embeddings(list(texts[i:i + 16])).detach().to("cpu", torch.float64)
            for i in range(0, len(texts), 16)]
    return torch.cat(rows)


def _truncate(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``up @ down`` (float64 factors ``[out, n]``, ``[n, in]``) through
    thin QRs and an ``n x n`` SVD; factors padded with zeros up to ``rank``; relative Frobenius error."""
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    k = min(rank, s.shape[0])
    new_up = (q1 @ u[:, :k]) * s[:k]
    new_down = vh[:k] @ q2.T
    total = float(torch.linalg.vector_norm(s))
    err = float(torch.linalg.vector_norm(s[k:])) / total if total > 0 else 0.0
    if rank > k:
        new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], rank - k)], 1)
        new_down = torch.cat([new_down, new_down.new_zeros(rank - k, new_down.shape[1])], 0)
    return new_up, new_down, err


@torch.no_grad()
def uce_edit(denoiser: Denoiser, concepts: str | Iterable[str], guide: str | Iterable[str] | None = None,
             preserve: str | Iterable[str] | None = None, *, lamb: float = 0.5, erase_scale: float = 1.0,
             preserve_scale: float = 1.0, rank: int = 0, progress: ProgressFn | None = None) -> UceResult:
    """Erase ``concepts`` (towards ``guide``, keeping ``preserve``) from ``denoiser``'s cross-attention.

    ``rank`` 0 writes the exact update (rank = number of distinct erase/guide pairs); a positive ``rank``
    keeps the best rank-``rank`` approximation per layer (at most the smaller side of every edited layer).
    Errors name the input at fault (``concepts``, ``guide``, ``preserve``, ``rank``, ``lamb``, ...).
    """
    t0 = time.perf_counter()
    erase = split_concepts(concepts, "concepts")
    guides = _guides(guide, len(erase))
    keep = split_concepts(preserve, "preserve", allow_empty=True) if isinstance(preserve, str) or preserve is None \
        else split_concepts(list(preserve), "preserve", allow_empty=True)
    lamb = _positive("lamb", lamb)
    erase_scale = _positive("erase_scale", erase_scale)
    preserve_scale = _positive("preserve_scale", preserve_scale, allow_zero=True)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ConfigError(f"rank must be 0 (exact) or a positive integer; got {rank!r}.")
    pairs = list(dict.fromkeys(zip(erase, guides)))  # a repeated (concept, guide) pair counts once
    layers = denoiser.layers(UCE_TARGETS)
    smallest = min(min(int(m.weight.shape[0]), int(m.weight[0].numel())) for m in layers.values())
    if rank > smallest:
        name, m = min(layers.items(), key=lambda kv: min(kv[1].weight.shape[0], kv[1].weight[0].numel()))
        raise ConfigError(f"rank {rank} is above the size of layer {name!r} ({tuple(m.weight.shape)}); the largest "
                          f"rank every edited layer can hold is {smallest}. Use rank 0 for the exact edit.")

    check_tokens(denoiser, [c for c, _ in pairs], "concepts")
    named_guides = [g for _, g in pairs if g]
    if named_guides:
        check_tokens(denoiser, named_guides, "guide")
    if keep:
        check_tokens(denoiser, keep, "preserve")
    emb = _embeddings(denoiser, [c for c, _ in pairs] + [g for _, g in pairs] + keep)
    n = len(pairs)
    c_e, c_g, c_p = emb[:n].T, emb[n:2 * n].T, emb[2 * n:].T  # [D, n], [D, n], [D, m]
    dim = c_e.shape[0]
    m_mat = lamb * torch.eye(dim, dtype=torch.float64) + erase_scale * c_e @ c_e.T
    if keep:
        m_mat += preserve_scale * c_p @ c_p.T
    down = torch.linalg.solve(m_mat, c_e).T  # [n, D], shared by every layer
    diff_dirs = c_g - c_e                     # [D, n]

    out_layers: dict[str, LoraLayer] = {}
    errors: dict[str, float] = {}
    names = sorted(layers)
    for i, name in enumerate(names):
        w = layers[name].weight.detach().to("cpu", torch.float64)
        if w.dim() != 2 or w.shape[1] != dim:
            raise ConfigError(f"Layer {name!r} has weight {tuple(w.shape)}, which does not take the {dim}-wide text "
                              f"embeddings; UCE edits cross-attention key/value projections only.")
        up = erase_scale * (w @ diff_dirs)     # [out, n]
        if rank == 0:
            target = min(n, w.shape[0], w.shape[1])
        else:
            target = rank
        if rank == 0 and target == n:
            layer_up, layer_down, err = up, down, 0.0
        else:
            layer_up, layer_down, err = _truncate(up, down, target)
        out_layers[name] = LoraLayer(layer_down.float().contiguous(), layer_up.float().contiguous(),
                                     float(layer_down.shape[0]))
        errors[name] = err
        if progress is not None:
            progress(i + 1, len(names))
    written = max(l.rank for l in out_layers.values())
    result = UceResult(LoraSet(out_layers, denoiser.naming), n, written, errors, 0.0,
                       [c for c, _ in pairs], [g for _, g in pairs], keep)
    result.seconds = time.perf_counter() - t0
    result.lora.metadata.update({
        "ss_base_model_version": denoiser.base_model_version,
        "ss_training_comment": "UCE concept erasure (closed form), SafetyDPO pack",
        "safetydpo_version": __version__,
        "safetydpo_method": "uce",
        "safetydpo_objective": "uce",
        "safetydpo_concepts": json.dumps(result.concepts),
        "safetydpo_guide": json.dumps(result.guide),
        "safetydpo_preserve": json.dumps(keep),
        "safetydpo_uce_lamb": f"{lamb:g}",
        "safetydpo_uce_erase_scale": f"{erase_scale:g}",
        "safetydpo_uce_preserve_scale": f"{preserve_scale:g}",
        "safetydpo_uce_update_rank": str(n),
        "safetydpo_rank": str(written),
        "safetydpo_uce_max_rel_error": f"{result.max_rel_error:.3g}",
        "safetydpo_targets": UCE_TARGETS,
        "safetydpo_model_fingerprint": denoiser.fingerprint(),
    })
    return result
