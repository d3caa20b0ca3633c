"""The merge entry points: :func:`merge_experts` (LoraSets in, LoraSet + report out) and :func:`merge_files`
(files in, file + report out, as ``safetydpo merge`` runs it).

The ComfyUI nodes call :func:`calibrate` (with their own Denoiser) and :func:`merge_experts`; nothing here
touches a backend beyond the Denoiser protocol. Work is streamed one layer at a time: only one layer's
full updates (``N x out x in``) exist at once, so memory stays low on SDXL-sized experts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..denoiser.protocol import Denoiser
from ..errors import ConfigError, Interrupted
from ..lora.io import save_lora
from ..lora.lora_set import LoraLayer, LoraSet
from ..lora.unet_names import UNetNames
from .baselines import MAJORITY_SIGN, concat_layer, layer_seed, linear_layer, pruned_layer
from .calibration import CalibrationOptions, CalibrationStats, calibrate, calibration_prompts, dataset_inputs, read_pairs_jsonl
from .comerge import AGGREGATES, FACTOR_BALANCES, NORMALIZATIONS, comerge_delta_layer, comerge_factor_layer
from .experts import align_experts, expert_categories, expert_label, layer_group, layer_union, load_experts, unique_labels
from .lowrank import SVD_MODES, cpu_threads
from .report import LayerReport, MergeReport, factor_metrics

log = logging.getLogger(__name__)

AUTO_RANK = "auto"
AUTO_RANK_CAP = 64
METHODS = ("comerge", "comerge-delta", "concat", "linear", "ties", "dare", "dare-ties", "magnitude")
CALIBRATED = ("comerge", "comerge-delta")
OWN_RANK = ("comerge", "concat")  # their output rank follows from the experts' (theirs, and their sum)
DESCRIPTIONS = {
    "comerge": "Co-Merge, factor reading: each down/up element from the expert with the highest |w| x activation; rank r",
    "comerge-delta": "Co-Merge, delta reading: each element of the full update from the most active expert, then SVD",
    "concat": "exact: the experts' factors side by side; rank = sum of ranks",
    "linear": "task arithmetic: weighted sum of the updates, exact SVD to the rank",
    "ties": "TIES: trim to density, elect signs, disjoint mean; then SVD",
    "dare": "DARE-linear: random drop with rescale, weighted sum; then SVD",
    "dare-ties": "DARE-TIES: random drop with rescale, sign election, disjoint mean; then SVD",
    "magnitude": "magnitude pruning to density, weighted sum; then SVD",
}

ProgressFn = Callable[[int, int, dict | None], None]
StopFn = Callable[[], bool]


def needs_calibration(method: str) -> bool:
    """True for the Co-Merge methods, which score weights by calibration activations."""
    return method in CALIBRATED


@dataclasses.dataclass
class MergeOptions:
    """Options of every merge method (each method reads the ones that apply to it).

    ``rank``: output rank of the SVD methods: ``"auto"`` (the default: the sum of the experts' ranks, at most
    :data:`AUTO_RANK_CAP`: room for every expert's update; the best rank on the world, docs/benchmarks.md), a
    number, or ``None`` (the experts' largest rank); a number
    is refused for ``concat`` (rank = sum) and ``comerge`` (rank = the experts' rank), which fix their rank
    themselves and take ``"auto"`` as that. ``weights``: one per expert (default 1).
    ``aggregate``/``normalize``/``factor_balance``: Co-Merge (see :mod:`.comerge`). ``density`` and
    ``majority_sign``: TIES, DARE, magnitude. ``svd``: ``auto``, ``exact`` or ``randomized``. ``threads``:
    torch CPU threads while merging (default 1, see :func:`~.lowrank.cpu_threads`; ``None``: unchanged).
    """

    rank: int | str | None = AUTO_RANK
    weights: Sequence[float] | None = None
    aggregate: str = "mean"
    normalize: str = "none"
    factor_balance: str = "sqrt"
    density: float = 0.5
    majority_sign: str = "total"
    svd: str = "auto"
    seed: int = 0
    threads: int | None = 1

    def validate(self, method: str, n_experts: int) -> None:
        if method not in METHODS:
            raise ConfigError(f"Unknown merge method {method!r}; choose one of {', '.join(METHODS)}.")
        from ..utils.numbers import check_number

        if self.rank is not None and self.rank != AUTO_RANK:
            self.rank = check_number(self.rank, f"The output rank (a positive integer or {AUTO_RANK!r})", 1,
                                     integer=True)
            if method == "concat":
                raise ConfigError("concat is exact and its rank is the sum of the experts' ranks; leave the rank unset "
                                  "(or use linear for a chosen rank).")
            if method == "comerge":
                raise ConfigError("comerge (factor reading) keeps the experts' rank; leave the rank unset, or use "
                                  "comerge-delta to choose the output rank.")
        if self.weights is not None:
            if len(self.weights) != n_experts:
                raise ConfigError(f"{len(self.weights)} expert weights were given for {n_experts} experts; give one per expert.")
            for w in self.weights:
                if not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
                    raise ConfigError(f"Expert weight {w!r} is not a finite number.")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"Unknown aggregation {self.aggregate!r}; choose one of {', '.join(AGGREGATES)}.")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"Unknown score normalisation {self.normalize!r}; choose one of {', '.join(NORMALIZATIONS)}.")
        if self.factor_balance not in FACTOR_BALANCES:
            raise ConfigError(f"Unknown factor balance {self.factor_balance!r}; choose one of {', '.join(FACTOR_BALANCES)}.")
        if not 0.0 < float(self.density) <= 1.0:  # (a NaN fails this test too)
            raise ConfigError(f"The density (share of each update kept) must be in (0, 1]; got {self.density}.")
        if self.majority_sign not in MAJORITY_SIGN:
            raise ConfigError(f"Unknown majority-sign method {self.majority_sign!r}; choose one of {', '.join(MAJORITY_SIGN)}.")
        if self.threads is not None:
            self.threads = check_number(self.threads, "The number of CPU threads (0 = torch's default)", 0, integer=True)
        if self.threads is not None and int(self.threads) < 0:
            raise ConfigError(f"The number of CPU threads must be positive (or 0 for torch's default); got {self.threads}.")
        if self.svd not in SVD_MODES:
            raise ConfigError(f"Unknown SVD mode {self.svd!r}; choose one of {', '.join(SVD_MODES)}.")

    def used_by(self, method: str) -> dict[str, Any]:
        """The options that ``method`` reads (for metadata and reports)."""
        d: dict[str, Any] = {"weights": list(self.weights) if self.weights is not None else None}
        if method not in ("concat", "comerge"):
            d["rank"] = self.rank
        if method in CALIBRATED:
            d.update(aggregate=self.aggregate, normalize=self.normalize)
        if method == "comerge":
            d["factor_balance"] = self.factor_balance
        if method in ("ties", "dare", "dare-ties", "magnitude"):
            d["density"] = self.density
        if method in ("ties", "dare-ties"):
            d["majority_sign"] = self.majority_sign
        if method not in ("concat", "comerge", "linear"):
            d["svd"] = self.svd
        if method in ("dare", "dare-ties") or (method not in ("concat", "comerge", "linear") and self.svd != "exact"):
            d["seed"] = self.seed
        return d


@dataclasses.dataclass
class MergeResult:
    lora: LoraSet
    report: MergeReport


def _expert_info(lora: LoraSet, label: str) -> dict[str, Any]:
    ranks = sorted(set(lora.ranks.values()))
    alphas = sorted(lora.alphas)
    src = lora.metadata.get("safetydpo_source")
    return {"label": label, "file": Path(src).name if src else None, "categories": expert_categories(lora),
            "rank": ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
            "alpha": alphas[0] if len(alphas) == 1 else f"{alphas[0]:g}-{alphas[-1]:g}", "layers": len(lora)}


def merge_experts(experts: Sequence[LoraSet], method: str = "comerge", stats: CalibrationStats | None = None,
                  options: MergeOptions | None = None, labels: Sequence[str] | None = None,
                  progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> MergeResult:
    """Merge ``experts`` into one LoRA with ``method``; returns the LoRA and its :class:`MergeReport`.

    The experts must share one naming (see :func:`~.experts.align_experts`); Co-Merge needs ``stats`` from
    :func:`~.calibration.calibrate` in that naming. The output has alpha = rank (scale 1) on every layer,
    the union of the experts' layers, and metadata naming the method, experts and options.
    ``progress(done, total, info)`` is called per layer; ``should_stop()`` returning true raises
    :class:`~safetydpo_core.errors.Interrupted`.
    """
    opts = options or MergeOptions()
    opts.validate(method, len(experts))
    if len(experts) == 0:
        raise ConfigError("No experts to merge.")
    experts = [e if all(l.down.device.type == "cpu" for l in e.layers.values()) else e.to(device="cpu")
               for e in align_experts(experts)]
    naming = experts[0].naming
    if needs_calibration(method):
        if stats is None:
            raise ConfigError(f"{method} scores weights by their activations and needs calibration statistics; run "
                              f"calibrate() first (or give calibration prompts on the command line).")
        if stats.naming != naming:
            raise ConfigError(f"The calibration statistics use {stats.naming} layer names, the experts {naming}; align "
                              f"the experts to the model's naming before calibrating and merging.")
        if method == "comerge":
            stats.check_experts(experts)
    labels = unique_labels(list(labels) if labels else [expert_label(e, i) for i, e in enumerate(experts)])
    if len(labels) != len(experts):
        raise ConfigError(f"{len(labels)} labels for {len(experts)} experts.")
    weights = [float(w) for w in (opts.weights if opts.weights is not None else [1.0] * len(experts))]
    rank = output_rank(opts.rank, experts)
    names = layer_union(experts)
    report = MergeReport(method=method, labels=labels, experts=[_expert_info(e, l) for e, l in zip(experts, labels)],
                         options=opts.used_by(method), calibration=dict(stats.info) if (stats and needs_calibration(method)) else None)
    out: dict[str, LoraLayer] = {}
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        if should_stop is not None and should_stop():
            raise Interrupted(f"Merge stopped at layer {i + 1} of {len(names)}; nothing was written.")
        group = layer_group(experts, name)
        seed = layer_seed(opts.seed, name)
        with torch.no_grad(), cpu_threads(opts.threads):
            merged, info = _merge_layer(method, name, group, weights, stats, opts, rank, seed)
        lr = LayerReport(name=name, rank=merged.rank, svd_rel_error=info.get("svd_rel_error"),
                         selected_norm=info.get("selected_norm"), notes=list(info.get("notes", [])))
        sels = info.get("selections")
        if sels:
            lr.counts = {p: s.counts(len(experts)) for p, s in sels.items()}
            lr.elements = {p: s.elements for p, s in sels.items()}
        with cpu_threads(opts.threads):
            lr.metrics = factor_metrics(merged, group, weights)
        report.layers.append(lr)
        out[name] = merged
        if progress is not None:
            progress(i + 1, len(names), {"layer": name})
    report.seconds = time.perf_counter() - t0
    lora = LoraSet(out, naming, _output_metadata(method, experts, report))
    return MergeResult(lora, report)


def parse_rank(text: str) -> int | str:
    """A rank option from text: a positive integer or ``auto`` (for ``--rank``)."""
    value = str(text).strip().lower()
    if value == AUTO_RANK:
        return AUTO_RANK
    try:
        rank = int(value)
    except ValueError:
        rank = 0
    if rank <= 0:
        raise ConfigError(f"The output rank must be a positive integer or {AUTO_RANK!r}; got {text!r}.")
    return rank


def output_rank(rank: int | str | None, experts: Sequence[LoraSet]) -> int:
    """The SVD methods' output rank for a ``rank`` option (see :class:`MergeOptions`)."""
    if rank == AUTO_RANK:
        return min(sum(e.max_rank for e in experts), AUTO_RANK_CAP)
    return int(rank) if rank is not None else max(e.max_rank for e in experts)


def _merge_layer(method: str, name: str, group: list[LoraLayer | None], weights: list[float],
                 stats: CalibrationStats | None, opts: MergeOptions, rank: int, seed: int) -> tuple[LoraLayer, dict]:
    if method == "comerge":
        return comerge_factor_layer(name, group, weights, stats.get(name) if stats else None, opts.aggregate,
                                    opts.normalize, opts.factor_balance)
    if method == "comerge-delta":
        return comerge_delta_layer(name, group, weights, stats.get(name) if stats else None, rank, opts.aggregate,
                                   opts.normalize, opts.svd, seed)
    if method == "concat":
        return concat_layer(group, weights)
    if method == "linear":
        return linear_layer(group, weights, rank)
    return pruned_layer(method, name, group, weights, rank, opts.density, opts.majority_sign, opts.svd, opts.seed)


def _output_metadata(method: str, experts: Sequence[LoraSet], report: MergeReport) -> dict[str, str]:
    cats = list(dict.fromkeys(c for e in experts for c in expert_categories(e)))
    meta: dict[str, str] = {
        "safetydpo_merge_method": method,
        "safetydpo_merge_experts": json.dumps(report.experts),
        "safetydpo_merge_options": json.dumps(report.options),
    }
    if cats:
        meta["safetydpo_category"] = ",".join(cats)
    ov = report.overall()
    summary = {k: ov[k] for k in ("shares", "svd_rel_error", "sum_deviation", "retention") if k in ov}
    meta["safetydpo_merge_summary"] = json.dumps(summary, default=str)
    for key in ("ss_base_model_version", "safetydpo_model_fingerprint"):
        vals = {e.metadata.get(key) for e in experts} - {None, ""}
        if len(vals) == 1:
            meta[key] = vals.pop()
    return meta


# ------------------------------------------------------------------------------------------------------
# Files in, file out


@dataclasses.dataclass
class MergeFilesResult:
    result: MergeResult
    output: Path
    report_json: Path
    report_text: Path
    stats: CalibrationStats | None


def _model_names(model: str | os.PathLike) -> tuple[UNetNames, dict, str] | None:
    """Layer names, shapes and base-model version from a diffusers folder's UNet (or SD3 / Flux transformer)
    config (no weights loaded)."""
    from ..denoiser.diffusers_backend import base_model_version_of

    p = Path(model).expanduser()
    info = {}
    if p.is_dir() and (p / "safetydpo.json").exists():
        info = json.loads((p / "safetydpo.json").read_text(encoding="utf-8"))
    tcfg = p / "transformer" / "config.json"
    if p.is_dir() and tcfg.exists():
        from ..lora.transformer_names import TransformerNames

        tnames = TransformerNames.from_config(tcfg)
        return tnames, tnames.shapes["diffusers"], str(info.get("base_model_version") or tnames.base_model_version)  # type: ignore[return-value]
    cfg = p / "unet" / "config.json"
    if not (p.is_dir() and cfg.exists()):
        return None
    config = json.loads(cfg.read_text(encoding="utf-8"))
    names = UNetNames.from_config(config)
    return names, names.shapes["diffusers"], base_model_version_of(config, info)


def merge_files(model: str | os.PathLike | None, expert_paths: Sequence[str | os.PathLike], method: str,
                out: str | os.PathLike, *, options: MergeOptions | None = None,
                calibration: str | os.PathLike | None = None, dataset: str | os.PathLike | None = None,
                calib_options: CalibrationOptions | None = None, prompt_field: str = "unsafe",
                stats_path: str | os.PathLike | None = None, denoiser: Denoiser | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, fmt: str | None = None,
                progress_factory: Callable[[str, int], Any] | None = None,
                should_stop: StopFn | None = None, guidance: float | None = None) -> MergeFilesResult:
    """Load the experts, calibrate if the method needs it, merge, and write the LoRA and its reports.

    ``model`` (or an already loaded ``denoiser``) gives layer names and shapes; it is loaded fully only
    when calibrating. ``calibration`` is a prompt-pairs JSONL file, ``dataset`` a preference dataset folder
    (real latents); ``stats_path`` caches the calibration statistics (read if present, written otherwise).
    ``progress_factory(desc, total)`` returns a ``progress(done, total, info)`` callable with ``close()``.
    ``guidance``: the distilled guidance the model calibrates with (guidance-distilled models only).
    """
    opts = options or MergeOptions()
    opts.validate(method, len(expert_paths))
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"The merged LoRA {out} must end in .safetensors.")
    if len(expert_paths) < 2:
        log.warning("merging %d expert(s): the result is that expert re-expressed", len(expert_paths))
    calibrated = needs_calibration(method)
    stats: CalibrationStats | None = None
    if stats_path is not None and Path(stats_path).exists() and calibrated:
        stats = CalibrationStats.load(stats_path)
    if denoiser is None and model is None:
        raise ConfigError("Give the base model (model, --model): it names the experts' layers and checks that they fit.")
    static = None if (denoiser is not None or (calibrated and stats is None)) else _model_names(model)  # type: ignore[arg-type]
    if static is None and denoiser is None:
        from ..denoiser.diffusers_backend import DiffusersDenoiser

        denoiser = DiffusersDenoiser.from_pretrained(model, device=device, dtype=dtype,  # type: ignore[arg-type]
                                                     guidance=guidance)
    if denoiser is not None:
        names = denoiser.names()
        shapes, naming, bmv = denoiser.weight_shapes(), denoiser.naming, denoiser.base_model_version
    else:
        names, shapes, bmv = static  # type: ignore[misc]
        naming = "diffusers"
    experts = load_experts(expert_paths, names)
    experts = align_experts(experts, naming, names, shapes)
    notes = []
    if denoiser is not None:
        fp = None
        try:
            fp = denoiser.fingerprint()
        except Exception:  # noqa: BLE001 - informational
            pass
        for i, e in enumerate(experts):
            efp = e.metadata.get("safetydpo_model_fingerprint")
            if fp and efp and efp != fp:
                notes.append(f"expert {i + 1} ({Path(e.metadata.get('safetydpo_source', '?')).name}) was trained on a model "
                             f"with another fingerprint ({efp} vs {fp}); its shapes fit")
                log.warning(notes[-1])
    if calibrated and stats is None:
        copts = calib_options or CalibrationOptions()
        if method == "comerge-delta" and copts.rank_stats == "experts":
            copts = dataclasses.replace(copts, rank_stats="none")  # reading D needs input statistics only
        cats = list(dict.fromkeys(c for e in experts for c in expert_categories(e)))
        inputs = None
        prompts = None
        if dataset is not None:
            inputs = dataset_inputs(dataset, cats, copts.num_inputs, copts.seed)
        elif calibration is not None:
            pairs = read_pairs_jsonl(calibration)
            prompts = calibration_prompts(pairs, cats, copts.num_inputs, copts.seed, prompt_field, source=str(calibration))
        else:
            raise ConfigError(f"{method} needs calibration prompts: give the experts' prompt pairs (--calibration "
                              f"PAIRS.jsonl) or a preference dataset (dataset, --calibration-dataset DATASET), or saved "
                              f"statistics (--stats).")
        bar = progress_factory("calibration", copts.num_inputs) if progress_factory else None
        try:
            stats = calibrate(denoiser, prompts, experts=experts, options=copts, inputs=inputs, progress=bar,
                              should_stop=should_stop)
        finally:
            if bar is not None:
                bar.close()
        stats.info["categories"] = cats
        if stats_path is not None:
            stats.save(stats_path)
    bar = progress_factory("merge", len(layer_union(experts))) if progress_factory else None
    try:
        result = merge_experts(experts, method, stats, opts, progress=bar, should_stop=should_stop)
    finally:
        if bar is not None:
            bar.close()
    result.report.notes.extend(notes)
    result.lora.metadata["ss_base_model_version"] = bmv
    save_lora(result.lora, out, names=names, fmt=fmt)
    j, t = result.report.write(out)
    return MergeFilesResult(result, out, j, t, stats)
