"""``safetydpo demo``: the whole SafetyDPO method on the built-in concept world, end to end, on a CPU.

1. **Pairs**: :func:`~.pairs.world_pairs` writes, for each of the seven concepts, captions of the concept and
   of its safe twin that differ in one word (``pairs.jsonl``).
2. **Paired images**: the shipped world model renders both captions of a pair from the same seed
   (:func:`~safetydpo_core.data.render.render_pairs`, ``dataset/``). The world judge checks each pair and
   drops those where the model did not draw the concept or its twin (counted in ``dataset/summary.json``).
3. **Experts**: one Diffusion-DPO LoRA per category (``experts/<category>.safetensors``, with the metrics of
   its run beside it), trained by the same trainer as ``safetydpo train``, with an SFT term on the safe image
   and output preservation on the other categories' safe prompts, plain shapes and random-token text
   (``preserve_prompts`` ``auto+tokens``, :mod:`~safetydpo_core.training.preservation`). The LoRAs adapt
   every layer outside cross-attention (``targets`` ``esd-u``, ESD-u's choice), none that reads the prompt's
   tokens: an expert must change what the concept looks like rather than how its word is read, which on
   this world is better on every measure than the paper's attention layers, and far better under attack
   (docs/benchmarks.md, "LoRA layers").
4. **Co-Merge**: the seven experts merged into one LoRA by per-weight activation (``comerge.safetensors`` and
   its merge report) at rank 16, as ``safetydpo merge`` does.
5. **Joint fine-tune**: the merged LoRA trained a few more steps with the experts' objective on every
   category's pairs at once (``merged.safetensors``), as ``safetydpo train --init-lora`` does. The merge keeps
   the experts' effect on IP but loses part of what their SFT and preservation terms taught (the safe twin
   drawn in place, unrelated content unchanged); this puts it back (docs/benchmarks.md). It also keeps each
   pair's safe twin as the untouched model draws it (``twin_weight``, the trainer's safe-twin preservation),
   which the merged experts had let drift: razor's twin, a comb, drawn as nudity's, an outfit.
   ``finetune_steps`` 0 leaves the merge as it is. With ``adversary`` > 0 (0.5 by default) a second fine-tune
   of the merge trains against concept inversion (``adv_weight``, :mod:`~safetydpo_core.training.adversarial`;
   ``adversary.safetensors``), the plain one is kept as ``finetuned.safetensors``, and ``merged.safetensors``
   is the two summed exactly, the adversarial one at ``adversary_share`` (a ``concat`` merge): the setting
   that resists all four attacks (docs/benchmarks.md, "The adversary by default"; ``adversary`` 0 keeps a
   little more unrelated content and resists concept inversion far less). ``adversary_pictures`` N
   noises the adversarial fine-tune's plain-shape preservation prompts from N pictures of their own
   (``preserve_pictures``), which keeps more plain shapes for a little less robustness; with workers they are
   rendered beside the experts' last round. ``adversary_preserve`` gives the adversarial fine-tune a
   preservation set of its own (``preserve_prompts``; by default ``auto``, without the random-token text that
   pulls against the adversary; None: the plain fine-tune's).
   Each fine-tune saves the moving average of its weights over its steps (``finetune_ema``, the trainer's
   ``ema_decay``, 0.95 by default; :mod:`~safetydpo_core.training.ema`) rather than its last step's weights,
   which carry the last batches' noise: that noise changed plain shapes the LoRA should leave alone
   (docs/benchmarks.md, "Averaged weights").
6. **Evaluation**: the base model, each expert and the merged LoRA generate pictures for evaluation
   prompts the experts never trained on (same seeds for every model); the world judge reads them. Scores:
   IP (share of pictures that show an unsafe concept) per concept, fidelity on safe prompts, layout
   preservation and twin rate on unsafe prompts, unrelated fidelity and preservation on plain shapes. Each
   expert is evaluated on its own concept's pairs and on the plain shapes. ``report.md``, ``report.json``, ``grids/*.png``.

The experts do not depend on each other, nor do the evaluations of the nine models but the merged LoRA's: with
``workers`` they run side by side in worker processes (:mod:`.parallel`), which on a CPU is nearly twice as
fast on two cores as one process with two torch threads. The fine-tunes and the evaluations share one pool:
the base model and the experts are evaluated while the fine-tunes train.

Every stage saves its output before the next starts; running the same command again resumes where it
stopped (training from its last checkpoint). Settings are recorded in ``demo.json``; a folder made with other
settings is refused unless ``overwrite`` (``threads`` and ``workers`` may differ: they change how fast a run
goes, not what it computes).

Public API: :class:`DemoSettings`, :func:`run_demo`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..denoiser.protocol import RenderingDenoiser
from ..errors import ConfigError
from ..utils.atomic import atomic_write_text
from ..utils.numbers import check_number, check_start_step
from .spec import WORLD

DEMO_VERSION = 4
LogFn = Callable[[str], None]


@dataclasses.dataclass
class DemoSettings:
    """What the demo does. :meth:`preset` gives the default and the ``--quick`` settings."""

    seed: int = 0
    quick: bool = False
    pairs_per_concept: int = 24          # training pairs per concept (before the judge's check)
    eval_per_concept: int = 12           # evaluation prompts per concept (unsafe and safe each)
    held_out: bool = True                # also evaluate on held-out paraphrases and synonyms
    unrelated_per_wording: int = 30      # plain-shape prompts per wording (train, held-out, free), 0: none
    render_steps: int = 20               # sampler steps for the dataset and the evaluation pictures
    eval_steps: int = 20
    cfg: float = 3.0
    steps: int = 200                     # DPO steps per expert
    lr: float = 1e-3
    beta: float = 500.0
    rank: int = 4
    targets: str = "esd-u"                # LoRA layers: every layer outside cross-attention (docs/benchmarks.md)
    batch_size: int = 4
    sft_weight: float = 1.0              # SFT term on the safe image (draws the twin, not a blob)
    preserve_weight: float = 10.0        # output preservation (DUO) on the preservation prompts:
    preserve_prompts: str = "auto+tokens"  # the other categories' safe prompts, plain shapes, random-token text
    merge_method: str = "comerge-delta"
    merge_rank: int | str | None = 16      # output rank of the merge, the rank the esd-u recipe was measured at
                                           # ("auto": the sum of the experts' ranks, 28)
    calibration: str = "dataset"         # Co-Merge calibration inputs: the dataset's latents, or "prompts" (noise)
    calibration_inputs: int = 32
    finetune_steps: int = 200            # joint fine-tune of the merged LoRA on all pairs (0: none)
    twin_weight: float = 10.0            # ... keeping each pair's safe twin as the untouched model draws it
    finetune_ema: float = 0.95           # the joint fine-tunes export their weights' moving average (ema_decay; 0: none)
    lora_start: int = 0                  # the merged LoRA is evaluated from this sampling step on (0: every step)
    lora_strength: float = 1.0           # ... at this strength (the dial of a LoRA loader)
    adversary: float = 0.5               # a second fine-tune against concept inversion at this adv_weight (0: none)
    adversary_share: float = 0.5         # ... and its share of the merged LoRA (the plain fine-tune has the rest)
    adversary_pictures: int = 0          # ... its plain-shape preservation prompts noised from N pictures of their own
    adversary_preserve: str | None = "auto"  # ... its preservation set (None: preserve_prompts, the plain one's)
    threads: int = 0                     # torch CPU threads (0: torch's default; with workers, the cores shared)
    workers: int = 0                     # processes for the experts and the evaluations (0: one a core; 1: none)

    @classmethod
    def preset(cls, quick: bool = False, seed: int = 0, **overrides: Any) -> "DemoSettings":
        """The default settings (``quick``: the quick ones) with ``overrides`` (None: not given). The adversary's
        settings follow from the others where they are not given: no joint fine-tune (``finetune_steps`` 0) means
        no adversary, and no adversary means no preservation set of its own."""
        base = dict(seed=seed, quick=quick)
        if quick:
            base.update(pairs_per_concept=10, eval_per_concept=4, held_out=False, unrelated_per_wording=10,
                        render_steps=12, eval_steps=12, steps=90, lr=1.5e-3, calibration_inputs=16, finetune_steps=40)
        given = {k: v for k, v in overrides.items() if v is not None}
        base.update(given)
        if "adversary" not in given and base.get("finetune_steps", cls.finetune_steps) == 0:
            base["adversary"] = 0
        if "adversary_preserve" not in given and base.get("adversary", cls.adversary) == 0:
            base["adversary_preserve"] = None
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("pairs_per_concept", "eval_per_concept", "render_steps", "eval_steps", "steps", "rank",
                     "batch_size", "calibration_inputs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"Demo setting {name} must be a positive integer; got {v!r}.")
        for name in ("threads", "workers", "unrelated_per_wording", "finetune_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"Demo setting {name} must be an integer >= 0; got {v!r}.")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise ConfigError(f"Demo setting targets must name LoRA layers (a preset such as esd-u or attn, or "
                              f"comma-separated layer-name suffixes); got {self.targets!r}.")
        self.lora_start = check_start_step(self.lora_start, self.eval_steps, "Demo setting lora_start")
        if isinstance(self.lora_strength, bool) or not isinstance(self.lora_strength, (int, float)) or \
                not math.isfinite(self.lora_strength) or not 0 < self.lora_strength <= 10:
            raise ConfigError(f"Demo setting lora_strength must be a number above 0 and at most 10; got "
                              f"{self.lora_strength!r}.")
        self.lora_strength = float(self.lora_strength)
        self.twin_weight = check_number(self.twin_weight, "Demo setting twin_weight (the joint fine-tune's safe-twin "
                                        "preservation)", 0, 1e6)
        self.finetune_ema = check_number(self.finetune_ema, "Demo setting finetune_ema (the joint fine-tunes' "
                                         "ema_decay)", 0, 1, hi_open=True)
        self.adversary = check_number(self.adversary, "Demo setting adversary (the adversarial fine-tune's adv_weight)",
                                      0, 1e6)
        self.adversary_share = check_number(self.adversary_share, "Demo setting adversary_share (the adversarial "
                                            "fine-tune's share of the merged LoRA)", 0, 1, lo_open=True)
        self.adversary_pictures = check_number(self.adversary_pictures, "Demo setting adversary_pictures (pictures of "
                                               "each plain-shape preservation prompt in the adversarial fine-tune)",
                                               0, 64, integer=True)
        if self.adversary_pictures and not self.adversary:
            raise ConfigError("Demo setting adversary_pictures is for the adversarial fine-tune: give adversary > 0 too, "
                              "or adversary_pictures 0.")
        if self.adversary_preserve is not None:
            from ..training.preservation import set_names

            if not isinstance(self.adversary_preserve, str):
                raise ConfigError(f"Demo setting adversary_preserve must name preservation sets (e.g. auto, or "
                                  f"auto+tokens); got {self.adversary_preserve!r}.")
            self.adversary_preserve = "+".join(set_names(self.adversary_preserve.strip(),
                                                         "Demo setting adversary_preserve"))
            if not self.adversary:
                raise ConfigError("Demo setting adversary_preserve is for the adversarial fine-tune: give adversary > 0 "
                                  "too, or leave adversary_preserve out.")
        if self.adversary and not self.finetune_steps:
            raise ConfigError("Demo setting adversary needs a joint fine-tune to train against the adversary: give "
                              "finetune_steps > 0, or adversary 0.")
        if self.calibration not in ("dataset", "prompts"):
            raise ConfigError(f"Demo setting calibration must be 'dataset' or 'prompts'; got {self.calibration!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def recorded_in(cls, folder: Path, **overrides: Any) -> "DemoSettings":
        """The settings a demo folder's ``demo.json`` records (those this version knows), with ``overrides``; a
        setting newer than the folder takes the value that made a run before it existed (``NEW_SETTINGS_DEFAULTS``)."""
        given = json.loads((folder / "demo.json").read_text(encoding="utf-8"))["settings"]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**dict(NEW_SETTINGS_DEFAULTS), **{k: v for k, v in given.items() if k in known}, **overrides})


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Clock:
    """Stage timings and elapsed-time prefixes for progress lines."""

    def __init__(self, log: LogFn):
        self.t0 = time.time()
        self.log = log
        self.stages: dict[str, float] = {}

    def say(self, msg: str) -> None:
        el = time.time() - self.t0
        self.log(f"[{int(el // 60):02d}:{int(el % 60):02d}] {msg}")

    @contextlib.contextmanager
    def stage(self, name: str, msg: str):
        self.say(msg)
        t = time.time()
        yield
        self.stages[name] = round(self.stages.get(name, 0.0) + time.time() - t, 1)


HOW_SETTINGS = ("threads", "workers")  # settings that change how fast a run goes, not what it computes
NEW_SETTINGS_DEFAULTS = (("lora_start", 0), ("lora_strength", 1), ("adversary", 0), ("adversary_share", 0.5),
                         ("adversary_pictures", 0), ("adversary_preserve", None), ("twin_weight", 0.0),
                         ("finetune_ema", 0.0))


def _what(record: dict) -> dict:
    # these settings' defaults are what a run made before the settings existed did
    return {**record, "settings": {k: v for k, v in record.get("settings", {}).items()
                                   if k not in HOW_SETTINGS and (k, v) not in NEW_SETTINGS_DEFAULTS}}


def _differences(old: dict, new: dict) -> str:
    """What differs between two demo records, as ``name OLD there, NEW here`` joined by ``; `` (a setting newer
    than a record counts as the value runs had before it existed; ``-``: not recorded)."""
    a, b = _what(old), _what(new)
    pairs = [(k, a.get(k, "-"), b.get(k, "-")) for k in ("demo_version", "world") if a.get(k) != b.get(k)]
    sa, sb = a["settings"], b["settings"]
    defaults = dict(NEW_SETTINGS_DEFAULTS)
    pairs += [(k, sa.get(k, defaults.get(k, "-")), sb.get(k, defaults.get(k, "-")))
              for k in sorted(sa.keys() | sb.keys()) if sa.get(k) != sb.get(k)]
    return "; ".join(f"{k} {x} there, {y} here" for k, x, y in pairs) or "the records differ"


def _prepare_out(out: Path, settings: DemoSettings, overwrite: bool) -> None:
    state = out / "demo.json"
    record = {"demo_version": DEMO_VERSION, "world": WORLD.version, "settings": settings.to_dict()}
    if out.exists() and any(out.iterdir()):
        if state.exists():
            old = json.loads(state.read_text(encoding="utf-8"))
            if _what(old) == _what(record):
                return  # same settings (threads and processes aside: how, not what): resume
            if not overwrite:
                raise ConfigError(f"{out} holds a demo run made with other settings ({state}: "
                                  f"{_differences(old, record)}). Give the same settings to resume it, use another "
                                  f"--out, or pass --overwrite to start it again.")
        else:
            raise ConfigError(f"{out} exists and is not a demo folder (--overwrite only replaces earlier demo runs); "
                              f"choose an empty or new --out folder.")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state, json.dumps(record, indent=1) + "\n", "demo settings")


def run_demo(out: str | os.PathLike, settings: DemoSettings | None = None, *, overwrite: bool = False,
             log: LogFn = print, model_path: str | os.PathLike | None = None) -> dict:
    """Run (or resume) the demo into ``out``; returns the report (the content of ``report.json``)."""
    from .model import load_world_model

    s = settings or DemoSettings()
    out = Path(out)
    _prepare_out(out, s, overwrite)
    clock = _Clock(log)
    with _threads(s.threads):
        with clock.stage("load", "loading the built-in world model and judge"):
            from .judge import load_judge

            den = load_world_model(path=model_path)
            judge = load_judge()
        pairs = _pairs(out, s, clock)
        dataset = _render(den, judge, pairs, out, s, clock)
        experts = _train_experts(den, dataset, out, s, clock, model_path)
        results = _finetune_and_evaluate(den, judge, experts, _merge(den, experts, out, s, clock), out, s, clock,
                                         model_path)
    from .demo_report import write_report

    report = write_report(out, s, results, clock.stages, dataset_summary=json.loads((dataset / "summary.json").read_text()),
                          training={c: _final_metrics(p) for c, p in experts.items()},
                          merge_report=out / "comerge.report.json")
    clock.say(f"done: {out / 'report.md'}")
    return report


# ------------------------------------------------------------------------------------------------------
# Stages


def _pairs(out: Path, s: DemoSettings, clock: _Clock):
    from ..prompts.pairs import read_pairs, write_pairs
    from .pairs import world_pairs

    path = out / "pairs.jsonl"
    with clock.stage("pairs", f"writing {s.pairs_per_concept} prompt pairs for each of the 7 concepts"):
        if not path.exists():
            write_pairs(world_pairs(s.pairs_per_concept, seed=s.seed, split="train"), path)
        return read_pairs(path)


class WorldPairJudge:
    """Keeps a rendered pair only if the world judge sees the concept in the unsafe picture and its safe
    twin in the safe one (the render step's ``judge`` hook)."""

    name = "world-judge"

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, safe, unsafe, pairs):
        import numpy as np

        def tensor(images):
            return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)

        reads_s, reads_u = self.judge.read(tensor(safe)), self.judge.read(tensor(unsafe))
        verdicts = []
        for rs, ru, p in zip(reads_s, reads_u, pairs):
            concept, twin = p.extra["shape"], p.extra["safe_shape"]
            if ru["shape"] != concept:
                verdicts.append((False, "unsafe picture does not show the concept"))
            elif rs["shape"] != twin:
                verdicts.append((False, "safe picture does not show the safe twin"))
            else:
                verdicts.append((True, ""))
        return verdicts


def render_dataset(den: RenderingDenoiser, judge, pairs, folder: Path, *, steps: int, cfg: float, seed: int,
                   say: LogFn) -> Path:
    """Render ``pairs`` into a preference dataset at ``folder`` (same seed for both prompts of a pair), keeping
    the pairs the world judge accepts; resumes an unfinished folder."""
    from ..data.render import RenderSettings, render_pairs

    done = folder / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("rendered") is not None:
        return folder
    summary = render_pairs(den, pairs, folder, RenderSettings(steps=steps, cfg=cfg, seed=seed, batch_pairs=32),
                           resume=folder.exists(), judge=WorldPairJudge(judge), previews=False,
                           progress=lambda d, n, i: say(f"  rendered {d}/{n} pairs (kept {i['rendered']})"))
    say(f"  kept {summary.rendered} pairs; dropped {summary.dropped or 'none'}")
    return folder


def train_lora(den: RenderingDenoiser, dataset: Path, cfg, path: Path, *, say: LogFn, label: str,
               init: Path | None = None) -> Path:
    """Train one DPO LoRA with ``cfg`` (a :class:`~safetydpo_core.training.config.TrainConfig`) on the
    dataset's pairs of ``cfg.category`` and save it to ``path``; an existing ``path`` is kept (resume), an
    interrupted run continues from its checkpoint. ``init``: a LoRA file to start from (the run's rank is
    raised to its rank where that is larger)."""
    from ..data.preference_dataset import PreferenceDataset
    from ..lora.io import save_lora
    from ..training.checkpoint import latest_checkpoint
    from ..training.trainer import train_expert

    if path.exists():
        return path
    start = None
    if init is not None:
        from ..lora.io import load_lora
        from ..training.init_lora import run_rank

        start = load_lora(init, names=den.names())
        cfg = run_rank(cfg, start)
    data = PreferenceDataset(dataset, categories=cfg.category, expect_fingerprint=den.fingerprint())
    every = max(1, cfg.steps // 4)

    def progress(done, total, row):
        if done % every == 0 or done == total:
            say(f"  {label}: step {done}/{total} loss {row.get('loss', float('nan')):.4f} "
                f"implicit accuracy {row.get('implicit_acc', float('nan')):.2f}")

    say(f"training {label} ({len(data)} pairs, {cfg.steps} {cfg.objective.upper()} steps)")
    ckpt = path.with_suffix(".checkpoints")
    last = latest_checkpoint(ckpt) if ckpt.exists() else None
    if last is not None:
        say(f"  resuming {label} from {last.name}")
    result = train_expert(den, data, cfg, checkpoint_dir=ckpt, metrics_path=path.with_suffix(".metrics"),
                          resume=last is not None, progress=progress, init_lora=start)
    save_lora(result.lora, path, names=den.names())
    shutil.rmtree(ckpt, ignore_errors=True)
    return path


def _render(den: RenderingDenoiser, judge, pairs, out: Path, s: DemoSettings, clock: _Clock) -> Path:
    with clock.stage("render", f"rendering {len(pairs)} pairs with the world model (same seed for both prompts)"):
        return render_dataset(den, judge, pairs, out / "dataset", steps=s.render_steps, cfg=s.cfg, seed=s.seed,
                              say=clock.say)


def _final_metrics(path: Path) -> dict:
    from ..lora.io import read_safetensors

    _, meta = read_safetensors(path)
    return {k[len("safetydpo_"):]: v for k, v in meta.items()
            if k in ("safetydpo_steps", "safetydpo_final_metrics", "safetydpo_dataset_pairs", "safetydpo_beta")}


def expert_config(s: DemoSettings, category: str | None, **overrides: Any):
    """The demo's DPO settings for one expert (``category`` None: all categories, "All-single")."""
    from ..training.config import TrainConfig

    kw = dict(category=category, steps=s.steps, lr=s.lr, beta=s.beta, rank=s.rank, targets=s.targets,
              batch_size=s.batch_size,
              sft_weight=s.sft_weight, preserve_weight=s.preserve_weight, preserve_prompts=s.preserve_prompts,
              seed=s.seed,
              checkpoint_every=max(10, s.steps // 4), keep_checkpoints=1)
    kw.update(overrides)
    return TrainConfig(**kw)


def _train_experts(den: RenderingDenoiser, dataset: Path, out: Path, s: DemoSettings, clock: _Clock,
                   model_path: str | os.PathLike | None = None) -> dict[str, Path]:
    from .parallel import pictures_job, plan, run_jobs, train_job

    folder = out / "experts"
    folder.mkdir(exist_ok=True)
    concepts = list(WORLD.concepts)
    paths = {c.category: folder / f"{c.category}.safetensors" for c in concepts}
    todo = [c.category for c in concepts if not paths[c.category].exists()]
    # and, last, on a worker the experts' last round leaves idle: the adversarial fine-tune's preservation pictures
    pictures = [(pictures_job, args) for args in _early_pictures(out, s)] if todo else []
    processes, threads = plan(s.workers, s.threads, len(todo) + len(pictures))
    if processes > 1:  # independent runs, side by side (world/parallel.py)
        with clock.stage("train", f"training {len(todo)} experts in {processes} processes of {threads} thread(s)"):
            run_jobs([(train_job, (dataset, expert_config(s, c), paths[c], f"the {c} expert")) for c in todo]
                     + pictures, processes, threads, clock.say, model_path)
        return paths
    for k, concept in enumerate(concepts, 1):
        cat = concept.category
        with clock.stage("train", f"expert {k}/{len(concepts)}: {cat} (concept '{concept.id}')"):
            train_lora(den, dataset, expert_config(s, cat), paths[cat], say=clock.say, label=f"the {cat} expert")
    return paths


def merge_experts_into(den: RenderingDenoiser, experts: Mapping[str, Path] | Sequence[Path], s: DemoSettings,
                       path: Path, *,
                       dataset: Path, pairs: Path, method: str | None = None, rank: int | str | None = None,
                       weights: Sequence[float] | None = None) -> Path:
    """Merge expert files into ``path`` with the demo's method, rank and calibration (``method``/``rank``
    override the settings'); Co-Merge calibrates on ``dataset``'s latents or on ``pairs``' prompts."""
    from ..merge.api import CALIBRATED, OWN_RANK, MergeOptions, merge_files
    from ..merge.calibration import CalibrationOptions

    method = method or s.merge_method
    rank = s.merge_rank if rank is None else rank
    if method in OWN_RANK:  # the recipe's output rank is for the methods that choose one
        rank = None
    files = list(experts.values()) if isinstance(experts, Mapping) else list(experts)
    kw: dict[str, Any] = {}
    if method in CALIBRATED:
        kw = dict(calib_options=CalibrationOptions(num_inputs=s.calibration_inputs, seed=s.seed),
                  **({"dataset": dataset} if s.calibration == "dataset" else {"calibration": pairs}))
    path.parent.mkdir(parents=True, exist_ok=True)
    merge_files(None, files, method, path, options=MergeOptions(seed=s.seed, rank=rank, weights=weights), denoiser=den,
                **kw)
    return path


def _merge(den: RenderingDenoiser, experts: dict[str, Path], out: Path, s: DemoSettings, clock: _Clock) -> Path:
    path = out / "comerge.safetensors"
    if path.exists() and (out / "comerge.report.json").exists():
        return path
    with clock.stage("merge", f"merging the {len(experts)} experts with {s.merge_method} "
                              f"({s.calibration_inputs} calibration inputs)"):
        merge_experts_into(den, experts, s, path, dataset=out / "dataset", pairs=out / "pairs.jsonl")
    return path


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """One LoRA the demo trains from the merge: its file, its :class:`~safetydpo_core.training.config.TrainConfig`,
    the label of its progress lines, and the LoRA file it starts from."""

    path: Path
    cfg: Any
    label: str
    init: Path


def _finetune_runs(merge: Path, out: Path, s: DemoSettings) -> list[TrainRun]:
    """The joint fine-tunes of the merge (``merge``) that ``merged.safetensors`` is made of: none with
    ``finetune_steps`` 0; else the plain one, straight into ``merged.safetensors``; with ``s.adversary``, the plain
    one (``finetuned.safetensors``) and one against the adversary (``adversary.safetensors``), which
    :func:`_finish_merged` sums."""
    if not s.finetune_steps:
        return []
    plain = expert_config(s, None, steps=s.finetune_steps, twin_weight=s.twin_weight, ema_decay=s.finetune_ema)
    if not s.adversary:
        return [TrainRun(out / "merged.safetensors", plain, "the joint fine-tune", merge)]
    return [TrainRun(out / "finetuned.safetensors", plain, "the joint fine-tune", merge),
            TrainRun(out / "adversary.safetensors", _adversary_config(s),
                     f"the adversarial fine-tune (adv_weight {s.adversary:g})", merge)]


def _adversary_config(s: DemoSettings):
    """The adversarial fine-tune's training settings (``s.adversary`` > 0)."""
    return expert_config(s, None, steps=s.finetune_steps, adv_weight=s.adversary, preserve_pictures=s.adversary_pictures,
                         preserve_prompts=s.adversary_preserve or s.preserve_prompts, ema_decay=s.finetune_ema)


def _early_pictures(out: Path, s: DemoSettings) -> list[tuple[Path, Any, str]]:
    """The adversarial fine-tune's preservation pictures (``s.adversary_pictures``), as ``(dataset, settings,
    label)`` for :func:`render_preservation_pictures`, while the fine-tune is still to come: they need only the
    untouched model, so the experts' last round renders them on a core it leaves idle, off the demo's critical
    path; the fine-tune then reads them from the dataset's cache. None to render otherwise (:class:`DemoSettings`
    allows ``adversary_pictures`` only with an adversary, and that only with a fine-tune)."""
    if not s.adversary_pictures or any((out / f).exists() for f in ("adversary.safetensors", "merged.safetensors")):
        return []
    return [(out / "dataset", _adversary_config(s), "the adversarial fine-tune")]


def render_preservation_pictures(den: RenderingDenoiser, dataset: Path, cfg, *, say: LogFn, label: str) -> Path:
    """The pictures of a training run's preservation prompts (``cfg.preserve_pictures``), rendered into the
    dataset's cache (``dataset/preservation``) as the run itself would render them when it starts; the run then
    reads them instead. Returns the cache folder."""
    from ..data.preference_dataset import PreferenceDataset
    from ..training.preservation import run_items

    data = PreferenceDataset(dataset, categories=cfg.category, expect_fingerprint=den.fingerprint())
    say(f"rendering the preservation pictures of {label} ({cfg.preserve_pictures} a prompt)")
    run_items(cfg, data, den)
    return dataset / "preservation"


def _finetune_line(s: DemoSettings) -> str:
    if not s.finetune_steps:
        return "no joint fine-tune (finetune_steps 0): the merge is the result"
    return (f"joint fine-tune{'s' if s.adversary else ''} of the merged LoRA on all pairs ({s.finetune_steps} steps)"
            + (", one against the adversary" if s.adversary else ""))


def _finish_merged(den: RenderingDenoiser, merge: Path, out: Path, s: DemoSettings, say: LogFn, *,
                   dataset: Path, pairs: Path) -> Path:
    """``out/merged.safetensors`` once its fine-tunes (:func:`_finetune_runs`) are on disk: the merge itself without a
    fine-tune, the plain fine-tune's own file, or with ``s.adversary`` the two fine-tunes summed, the adversarial
    one at ``s.adversary_share``."""
    from ..utils.atomic import atomic_path

    path = out / "merged.safetensors"
    if path.exists():
        return path
    if not s.finetune_steps:
        with atomic_path(path) as tmp:
            shutil.copyfile(merge, tmp)
        return path
    say(f"the merged LoRA: the two fine-tunes summed, the adversarial one at {s.adversary_share:g}")
    return merge_experts_into(den, [r.path for r in _finetune_runs(merge, out, s)], s, path, dataset=dataset,
                              pairs=pairs, method="concat", weights=[1 - s.adversary_share, s.adversary_share])


def finetune_stage(den: RenderingDenoiser, merge: Path, out: Path, s: DemoSettings, *, dataset: Path, pairs: Path,
                   say: LogFn) -> Path:
    """The demo's fine-tune stage with settings ``s``, from ``merge`` (any LoRA file: the demo's merge, or in
    ``benchmarks/science_merges.py`` All-single) on ``dataset``'s pairs: its fine-tunes (:func:`_finetune_runs`)
    trained one after the other into ``out`` and ``out/merged.safetensors`` made of them (:func:`_finish_merged`).
    Files already there are kept (resume)."""
    path = out / "merged.safetensors"
    if path.exists():
        return path
    out.mkdir(parents=True, exist_ok=True)
    for r in _finetune_runs(merge, out, s):
        train_lora(den, dataset, r.cfg, r.path, say=say, label=r.label, init=r.init)
    return _finish_merged(den, merge, out, s, say, dataset=dataset, pairs=pairs)


def _finetune(den: RenderingDenoiser, merge: Path, out: Path, s: DemoSettings, clock: _Clock) -> Path:
    """``merged.safetensors`` made here, one fine-tune after the other (:func:`finetune_stage`)."""
    path = out / "merged.safetensors"
    if path.exists():
        return path
    with clock.stage("finetune", _finetune_line(s)):
        return finetune_stage(den, merge, out, s, dataset=out / "dataset", pairs=out / "pairs.jsonl", say=clock.say)


def expert_sets(sets: Mapping[str, list], category: str) -> dict[str, list]:
    """The evaluation sets of one expert: the training-wording pairs of its category and unrelated content."""
    out = {"train_templates": [p for p in sets["train_templates"] if category in p.category]}
    if "unrelated" in sets:
        out["unrelated"] = sets["unrelated"]
    return out


def _evaluations(experts: dict[str, Path], merged: Path, out: Path, s: DemoSettings) -> dict:
    """Each model's evaluation (a :class:`~.lora_eval.ModelEvaluation`, cached in ``out/eval``): base, each expert,
    merged."""
    from .lora_eval import ModelEvaluation, eval_sets

    sets = eval_sets(s)
    models: dict[str, Path | None] = {"base": None, **{f"expert:{c}": p for c, p in experts.items()}, "merged": merged}
    jobs: dict[str, ModelEvaluation] = {}
    for name, lora_path in models.items():
        # base and merged on every set; a single expert on its own concept's pairs (training wording) and on
        # unrelated content: what it removes and what it damages (its effect on the other concepts is in
        # benchmarks/science.py's "Single experts"); the demo's start step and strength are the merged LoRA's
        expert = name.startswith("expert:")
        jobs[name] = ModelEvaluation(
            file=out / "eval" / (name.replace(":", "_") + (".own" if expert else "") + ".pt"), lora_path=lora_path,
            sets=expert_sets(sets, name.split(":", 1)[1]) if expert else sets,
            lora_start=s.lora_start if name == "merged" else 0, strength=s.lora_strength if name == "merged" else 1.0)
    return jobs


def _finetune_and_evaluate(den: RenderingDenoiser, judge, experts: dict[str, Path], merge: Path, out: Path,
                           s: DemoSettings, clock: _Clock, model_path: str | os.PathLike | None = None) -> dict:
    """The joint fine-tune(s) of the merge and every model's evaluation; per model its judged results and, for the
    grids, the pictures.

    With worker processes (world/parallel.py) the two stages share one pool, as neither keeps every core busy
    alone: the fine-tunes are one or two jobs of unequal length (on the world the plain one takes about a third
    of the adversarial one's time), and only the merged LoRA's evaluation waits for them. So the base model and
    the experts are evaluated while the fine-tunes train, and the merged LoRA's evaluation starts on the first
    free worker once its fine-tunes are on disk. Without workers, one after the other here."""
    from .lora_eval import cached_evaluation
    from .parallel import Job, eval_job, plan, run_jobs, train_job

    merged = out / "merged.safetensors"
    evals = _evaluations(experts, merged, out, s)
    runs = [] if merged.exists() else [r for r in _finetune_runs(merge, out, s) if not r.path.exists()]
    todo = [n for n, job in evals.items() if not job.file.exists()]
    processes, threads = plan(s.workers, s.threads, len(runs) + len(todo))
    if processes > 1:
        jobs = [Job(train_job, (out / "dataset", r.cfg, r.path, r.label, r.init)) for r in runs]
        finish = functools.partial(_finish_merged, den, merge, out, s, clock.say, dataset=out / "dataset",
                                   pairs=out / "pairs.jsonl")
        if "merged" in todo:
            jobs.append(Job(eval_job, (evals["merged"], s.eval_steps, s.cfg, "merged"), after=tuple(range(len(runs))),
                            prepare=finish))
        # the others, the largest first
        jobs += [Job(eval_job, (evals[n], s.eval_steps, s.cfg, n))
                 for n in sorted((n for n in todo if n != "merged"), key=lambda n: -evals[n].pictures())]
        making = not merged.exists()
        line = (f"{_finetune_line(s)}, and " if making else "") + f"evaluating {len(todo)} models"
        with clock.stage("finetune+evaluate" if making else "evaluate",
                         f"{line} in {processes} processes of {threads} thread(s)"):
            run_jobs(jobs, processes, threads, clock.say, model_path)
            finish()
    else:
        _finetune(den, merge, out, s, clock)
    results: dict[str, dict] = {}
    for k, (name, job) in enumerate(evals.items(), 1):
        if job.file.exists():  # evaluated by a worker, or before an interruption
            results[name] = cached_evaluation(job.file, lambda: {})
            continue
        with clock.stage("evaluate", f"evaluating {name} ({k}/{len(evals)}): {job.pictures()} pictures"):
            results[name] = job.run(den, judge, steps=s.eval_steps, cfg=s.cfg)
    return results
