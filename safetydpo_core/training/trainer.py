"""The safety-expert training loop: Diffusion-DPO (or MaPO) on a LoRA over any Denoiser.

Read top to bottom, one optimiser step is:

1. draw ``batch_size`` pairs (a deterministic order derived from the seed);
2. pick the conditioning prompt of each pair (``condition``: the unsafe prompt, the safe one, or either)
   and drop it to "" with probability ``prompt_dropout``;
3. draw one noise and one timestep per pair, shared by its safe and unsafe latents (the timesteps come
   from the denoiser: uniform for discrete schedules, the family's shifted logit-normal for flow matching,
   and the target it predicts is its own: epsilon, v or the flow velocity);
4. reference prediction with the adapters switched off (no copy of the network), then the policy
   prediction with them on;
5. the objective on ``[safe..., unsafe...]`` (safe preferred), plus the terms that are switched on: output
   preservation on the preservation prompts (``preserve_weight``, :mod:`.preservation`), safe-twin
   preservation (``twin_weight``: each pair's safe prompt on its own noised safe latent, the same squared
   distance to the adapters-off prediction) and the adversary's (``adv_weight``, :mod:`.adversarial`);
   backward, clip, optimiser step; with ``ema_decay`` the LoRA's weight average (:mod:`.ema`) moves towards the
   new weights, and the run exports that average instead of the last step's weights.

Every random draw of step ``s`` comes from a generator seeded by ``(seed, s, micro-step)``, so a run that
is interrupted and resumed from a checkpoint produces the same LoRA as an uninterrupted one. A non-finite
loss or gradient stops training with the last good state saved; a cancel (``should_stop`` returning
True, an exception from a callback, or Ctrl-C) saves a checkpoint before leaving.

Data-parallel runs (several processes, see :mod:`.distributed`): one optimiser step has
``G = grad_accum * world_size`` micro-steps, and process ``rank`` runs the global micro-steps
``local * world_size + rank``; the micro-step index above is that global index, so the draws do not
depend on how the micro-steps are spread over processes. Each process divides its losses by ``G``, the
LoRA gradients (and the logged statistics) are summed across processes before clipping, and every process
takes the same optimiser step from the same starting weights (broadcast from process 0). Only process 0
writes metrics, checkpoints and reports progress. A resume needs the same ``G``, not the same number of
processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..data.preference_dataset import PreferenceDataset
from ..denoiser.protocol import Conditioning, Denoiser
from ..errors import ConfigError, DatasetError, Interrupted, LoraError, TrainingDiverged
from ..lora.lora_set import LoraLayer, LoraSet
from ..lora.targets import check_rank_useful, layer_rank
from . import objectives
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RESUME_KEYS, TrainConfig
from .distributed import ProcessGroup, SingleProcess
from .ema import WeightEMA
from .init_lora import fit_init_lora
from .metrics import MetricsLog

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]
StopFn = Callable[[], bool]

COND_CACHE = 512  # prompt embeddings the trainer keeps (least recently used dropped first)

# settings that must not change between an interrupted run and its resume (declared in config.SETTINGS); the
# ESD ones are checked by training/esd.py, and grad_accum below, as micro-steps per optimiser step (x processes)
_RESUME_KEYS = tuple(k for k in RESUME_KEYS if not k.startswith("esd_") and k != "grad_accum")


@dataclasses.dataclass
class TrainResult:
    lora: LoraSet
    history: list[dict]
    steps: int
    checkpoint: Path | None


def step_generator(seed: int, step: int, micro: int, domain: int = 0) -> torch.Generator:
    """The CPU generator for one micro-step, a pure function of ``(seed, step, micro)``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, domain, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _family(base_model_version: str) -> str | None:
    """The latent space a kohya ``ss_base_model_version`` implies (SD1/SD2 share one), None when unknown."""
    for prefix, fam in (("sdxl", "sdxl"), ("sd_v", "sd"), ("sd3", "sd3"), ("flux", "flux")):
        if base_model_version.startswith(prefix):
            return fam
    return None


class PairOrder:
    """Sample ``k`` overall is position ``k mod n`` of epoch ``k // n``'s seeded permutation."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=step_generator(self.seed, epoch, 0, domain=1)))
        return int(self._perm[1][pos])


class ExpertTrainer:
    """Trains one LoRA expert; see the module docstring for the step."""

    def __init__(self, denoiser: Denoiser, dataset: PreferenceDataset, config: TrainConfig,
                 checkpoint_dir: str | os.PathLike | None = None, metrics_path: str | os.PathLike | None = None,
                 progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 init_lora: LoraSet | None = None, group: ProcessGroup | None = None):
        self.group = group if group is not None else SingleProcess()
        self.denoiser = denoiser
        self.dataset = dataset
        self.cfg = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.metrics_path = metrics_path
        self.progress = progress
        self.should_stop = should_stop
        self.init_lora = init_lora
        self._cond_cache: OrderedDict[tuple[str, tuple[int, int]], Conditioning] = OrderedDict()
        self._preserve_items = None
        self.adversary = None
        self._adversary_before = None  # the adversary's state at the start of a step still running
        self.ema: WeightEMA | None = None  # the weight average (ema_decay), made by run()
        self._check_dataset()

    # -- checks -------------------------------------------------------------------------------------
    def _check_dataset(self) -> None:
        if len(self.dataset) == 0:
            raise DatasetError("The dataset has no pairs to train on.")
        dropped = self.dataset.drop_identical()  # also refuses NaN/inf latents, naming the shard and key
        if dropped:
            log.warning("Leaving out %d pairs whose safe and unsafe latents are identical (they teach nothing): %s%s",
                        len(dropped), ", ".join(dropped[:5]), ", ..." if len(dropped) > 5 else "")
        want = self.denoiser.latent_channels
        # From the dataset's index when it has one: a 100,000-pair dataset is not parsed record by record.
        shapes = (self.dataset.latent_shapes() if hasattr(self.dataset, "latent_shapes")
                  else {tuple(r.latent_shape) for r in self.dataset.records})
        if any(s[0] != want for s in shapes):
            bad = [r for r in self.dataset.records if r.latent_shape[0] != want]
            if bad:
                raise DatasetError(f"Pair {bad[0].id!r} has latents of shape {bad[0].latent_shape}, but the model "
                                   f"expects {want} latent channels; the dataset was made for another model family.")
        made_for = str(getattr(self.dataset, "header", {}).get("settings", {}).get("model_base") or "")
        mine = str(self.denoiser.base_model_version or "")
        if made_for and mine and _family(made_for) and _family(mine) and _family(made_for) != _family(mine):
            raise DatasetError(f"The dataset {getattr(self.dataset, 'root', '')} was rendered with a {made_for} model, but "
                               f"this model is {mine}: latents of another architecture cannot train it (not even with "
                               f"a model mismatch allowed). Render the pairs with this model.")
        if len(shapes) > 1 and self.cfg.batch_size > 1:
            raise ConfigError(f"The dataset mixes latent sizes {sorted(shapes)[:3]}; use batch_size 1 for mixed sizes.")

    # -- pieces of a step ---------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        # One prompt per text-encoder call: a batch's padding and size change the kernels' reduction order, so
        # a prompt's embedding would depend on which prompts were cached before it (the process's history),
        # and data-parallel or resumed runs would drift from one uninterrupted process.
        # The batch's own prompts go to the cache's recent end before anything is evicted, so a full cache never
        # drops a prompt of the batch that is being encoded.
        mine = {}
        for p in dict.fromkeys(prompts):
            c = self._cond_cache.pop((p, size), None)
            mine[p] = c if c is not None else self.denoiser.encode_prompts([p], size=size)
            self._cond_cache[(p, size)] = mine[p]
        while len(self._cond_cache) > COND_CACHE:
            self._cond_cache.popitem(last=False)
        parts = [mine[p] for p in prompts]
        if len({c.sample_shapes() for c in parts}) > 1:
            # Prompts of different token lengths (a long prompt spans more CLIP windows or T5 tokens) do not
            # stack; the denoiser pads them to one length its own way. Still a function of the batch alone.
            return self.denoiser.encode_prompts(list(prompts), size=size)
        return Conditioning.cat(parts)

    @property
    def micro_steps(self) -> int:
        """Micro-steps per optimiser step over all processes (``G`` in the module docstring)."""
        return self.cfg.grad_accum * self.group.world_size

    def _batch(self, order: PairOrder, step: int, micro: int):
        """The data and draws of global micro-step ``micro`` of ``step``."""
        cfg, ds = self.cfg, self.dataset
        g = step_generator(cfg.seed, step, micro)
        first = (step * self.micro_steps + micro) * cfg.batch_size
        idx = [order[first + b] for b in range(cfg.batch_size)]
        safes, unsafes, prompts = [], [], []
        for i in idx:
            s, u = ds.load_pair(i)
            safes.append(s)
            unsafes.append(u)
            r = ds.records[i]
            use_safe = cfg.condition == "safe" or (cfg.condition == "both" and bool(torch.rand(1, generator=g) < 0.5))
            prompt = r.safe if use_safe else r.unsafe
            if cfg.prompt_dropout and float(torch.rand(1, generator=g)) < cfg.prompt_dropout:
                prompt = ""
            prompts.append(prompt)
        w, l = torch.stack(safes), torch.stack(unsafes)
        noise = torch.randn(w.shape, generator=g)
        t = self.denoiser.sample_timesteps(len(idx), g, latent_shape=tuple(w.shape[1:]), t_range=cfg.timestep_range)
        rec = ds.records[idx[0]]
        size = (rec.height or w.shape[-2] * self.denoiser.vae_scale_factor,
                rec.width or w.shape[-1] * self.denoiser.vae_scale_factor)
        return w, l, noise, t, prompts, size, [ds.records[i] for i in idx]

    def _autocast(self):
        mp = self.cfg.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        dev = torch.device(self.denoiser.device).type
        return torch.autocast(dev, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def _predictions(self, adapter, inputs: Sequence[tuple[torch.Tensor, torch.Tensor, Conditioning]],
                     reference: Sequence[bool]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The adapted prediction for each ``(x_t, t, cond)`` of ``inputs``, and the adapter-off (reference)
        prediction for those marked in ``reference``: one forward for all policy inputs and one for all
        reference inputs when their conditioning tensors stack (the DPO pair and the preservation prompts of a
        step), since a tiny model's step is mostly per-call overhead and a GPU's is kernel launches."""
        d = self.denoiser
        stackable = len({c.sample_shapes() for _, _, c in inputs}) == 1

        def run(chosen: list[tuple[torch.Tensor, torch.Tensor, Conditioning]]) -> list[torch.Tensor]:
            if not chosen:
                return []
            if not stackable or len(chosen) == 1:
                return [d.predict(x, t, c) for x, t, c in chosen]
            out = d.predict(torch.cat([x for x, _, _ in chosen]), torch.cat([t for _, t, _ in chosen]),
                            Conditioning.cat([c for _, _, c in chosen]))
            return list(out.split([len(x) for x, _, _ in chosen]))

        want = [inp for inp, r in zip(inputs, reference) if r]
        with torch.no_grad(), adapter.disabled(), self._autocast():
            refs = iter(run(want))
        with self._autocast():
            preds = run(list(inputs))
        return preds, [next(refs) if r else None for r in reference]

    def _dpo_input(self, w, l, noise, t, cond):
        """Noised safe and unsafe latents (one noise, one timestep per pair), their target, the conditioning."""
        d = self.denoiser
        dev = torch.device(d.device)
        x0 = torch.cat([w, l]).to(dev)
        n2 = torch.cat([noise, noise]).to(dev)
        t2 = torch.cat([t, t]).to(dev)
        return (d.add_noise(x0, n2, t2), t2, cond.repeat(2)), d.target(x0, n2, t2)

    def _objective(self, pred: torch.Tensor, ref: torch.Tensor | None, target: torch.Tensor) -> objectives.ObjectiveOutput:
        cfg = self.cfg
        if cfg.objective == "dpo":
            return objectives.diffusion_dpo(pred, ref, target, cfg.beta, cfg.sft_weight)
        return objectives.mapo(pred, target, cfg.mapo_beta, cfg.mapo_snr, self.denoiser.num_train_timesteps,
                               cfg.sft_weight)

    def _preserve_input(self, w: torch.Tensor, step: int, micro: int, size: tuple[int, int]):
        """Output preservation's input (:mod:`.preservation`): ``len(w)`` preservation prompts, on inputs noised
        with their own noise and timestep from their own latents (or, for prompts without one, from the batch's
        safe latents ``w``). Its loss is the mean squared distance between the adapted and the adapter-off
        prediction there."""
        d, cfg = self.denoiser, self.cfg
        items = self._preserve_items  # built by run() before the adapters go in
        g = step_generator(cfg.seed, step, micro, domain=3)
        pick = torch.randint(len(items), (w.shape[0],), generator=g).tolist()
        x0 = []
        for b, k in enumerate(pick):
            it = items[k]
            lat = it.picture if it.picture is not None else (
                self.dataset.load_latent(*it.latent) if it.latent is not None else None)
            x0.append(lat if lat is not None and lat.shape == w[b].shape else w[b])
        x0 = torch.stack(x0)
        noise = torch.randn(x0.shape, generator=g)
        t = d.sample_timesteps(x0.shape[0], g, latent_shape=tuple(x0.shape[1:]), t_range=cfg.timestep_range)
        dev = torch.device(d.device)
        x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
        return d.add_noise(x0, noise, t), t, self._encode([items[k].prompt for k in pick], size)

    def _preservation_items(self):
        """The preservation set (:mod:`.preservation`), with pictures of its everyday prompts rendered by the model
        as it is now when ``preserve_pictures`` is set: :meth:`run` calls this before the adapters go in."""
        from .preservation import run_items

        return run_items(self.cfg, self.dataset, self.denoiser, should_stop=self.should_stop)

    def _micro_loss(self, adapter, order: PairOrder, step: int, micro: int, batch=None) -> objectives.ObjectiveOutput:
        """The objective of global micro-step ``micro`` of ``step`` (``batch``: its :meth:`_batch`, when already
        loaded), with the output-preservation term when ``preserve_weight`` is set (ESD replaces this: :mod:`.esd`)."""
        cfg = self.cfg
        w, l, noise, t, prompts, size, records = batch or self._batch(order, step, micro)
        pair, target = self._dpo_input(w, l, noise, t, self._encode(prompts, size))
        inputs, reference = [pair], [cfg.objective == "dpo"]
        if cfg.adv_weight:  # the same noised pair once more, under the adversary's prompts (.adversarial)
            inputs.append((pair[0], pair[1], self.adversary.conditioning(records, size).repeat(2)))
            reference.append(cfg.objective == "dpo" and cfg.adv_objective == "dpo")
        if cfg.twin_weight:  # each pair's safe prompt on its own noised safe latent (the first half of the pair)
            n, twin_at = w.shape[0], len(inputs)
            inputs.append((pair[0][:n], pair[1][:n], self._encode([r.safe for r in records], size)))
            reference.append(True)
        if cfg.preserve_weight:
            inputs.append(self._preserve_input(w, step, micro, size))
            reference.append(True)
        preds, refs = self._predictions(adapter, inputs, reference)
        out = self._objective(preds[0], refs[0], target)
        if cfg.adv_weight:
            if cfg.adv_objective == "dpo":
                adv = self._objective(preds[1], refs[1], target).loss
            else:  # "anchor": the untouched model's prediction for the pairs' safe prompts, on the same inputs
                with torch.no_grad(), adapter.disabled(), self._autocast():
                    anchor = self.denoiser.predict(pair[0], pair[1], self._encode([r.safe for r in records], size).repeat(2))
                adv = objectives.per_sample_mse(preds[1], anchor).mean()
            out.loss = out.loss + cfg.adv_weight * adv
            out.stats["adv"] = float(adv.detach())
        if cfg.twin_weight:
            twin = objectives.per_sample_mse(preds[twin_at], refs[twin_at]).mean()
            out.loss = out.loss + cfg.twin_weight * twin
            out.stats["twin"] = float(twin.detach())
        if cfg.preserve_weight:
            kept = objectives.per_sample_mse(preds[-1], refs[-1]).mean()
            out.loss = out.loss + cfg.preserve_weight * kept
            out.stats["preserve"] = float(kept.detach())
        return out

    def _adversary_step(self, order: PairOrder, step: int) -> tuple[float, tuple]:
        """The adversary's turn before optimiser step ``step`` (:mod:`.adversarial`): its tokens restart when due,
        then take ``adv_steps`` steps against the current LoRA on the pairs of the step's first micro-step, the
        same on every process (so they need no synchronising); returns its last denoising error and that
        micro-step's batch (for the process that trains on it, so it is not loaded twice)."""
        cfg, d = self.cfg, self.denoiser
        self._adversary_before = self.adversary.state_dict()  # what a checkpoint of an unfinished step holds
        self.adversary.begin(step)
        batch = self._batch(order, step, 0)
        w, l, noise, t, prompts, size, records = batch
        with self._autocast():
            error = self.adversary.attack(d, records, l.to(torch.device(d.device)), size, cfg.adv_steps,
                                          step_generator(cfg.seed, step, 0, domain=6), t_range=cfg.timestep_range)
        return error, batch

    def _initial_lora(self, adapter) -> LoraSet:
        """Seeded initialisation (down ~ N(0, 1/r), up = 0, as the official code): the update starts at zero,
        so the policy equals the reference at step 0, and the run does not depend on global RNG state."""
        g = step_generator(self.cfg.seed, 0, 0, domain=2)
        current = adapter.export()
        layers = {}
        for name in sorted(current.layers):
            l = current.layers[name]
            layers[name] = LoraLayer(torch.randn(l.down.shape, generator=g) / l.rank, torch.zeros_like(l.up), l.alpha)
        return LoraSet(layers, current.naming)

    def _start_lora(self, adapter, init: LoraSet | None) -> LoraSet:
        """The seeded initialisation, or ``init`` (the init LoRA fitted to the model and the run's rank; layers
        it lacks start from the seeded initialisation)."""
        fresh = self._initial_lora(adapter)
        if init is None:
            return fresh
        extra = sorted(set(init.layers) - set(fresh.layers))
        if extra:
            raise LoraError(f"The init LoRA adapts layer {extra[0]!r}, which this run (targets {self.cfg.targets!r}) does "
                            f"not train; train with the targets the LoRA was made with.")
        return LoraSet({**fresh.layers, **init.layers}, fresh.naming)

    def _optimizer(self, params):
        cfg = self.cfg
        if cfg.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            opt = Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                            clip_threshold=1.0, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)

        def factor(s: int) -> float:
            warm = min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            if cfg.lr_schedule == "cosine":
                span = max(1, cfg.steps - cfg.warmup_steps)
                progress = min(1.0, max(0, s - cfg.warmup_steps) / span)
                return warm * 0.5 * (1 + math.cos(math.pi * progress))
            return warm

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def _state(self, adapter, opt, sched, metrics: MetricsLog) -> dict:
        lora = adapter.export()
        return {"lora_down": {n: l.down for n, l in lora.items()}, "lora_up": {n: l.up for n, l in lora.items()},
                "lora_alpha": {n: l.alpha for n, l in lora.items()}, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "history": metrics.history, "config": self.cfg.to_dict(),
                "naming": lora.naming, "model_fingerprint": self.denoiser.fingerprint(),
                "dataset_fingerprint": self.dataset.fingerprint(), "micro_steps": self.micro_steps,
                "world_size": self.group.world_size,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **({"adversary": self._adversary_before if self._adversary_before is not None
                    else self.adversary.state_dict()} if self.adversary is not None else {})}

    def _restore(self, path: Path, adapter, opt, sched) -> tuple[int, list[dict]]:
        state = load_checkpoint(path)
        old = state.get("config", {})
        new = self.cfg.to_dict()
        defaults = TrainConfig().to_dict()
        for k in _RESUME_KEYS:
            a, b = old.get(k, defaults[k]), new.get(k)  # a setting newer than the checkpoint had its default
            if isinstance(a, list) or isinstance(b, tuple):
                a, b = list(a) if a is not None else None, list(b) if b is not None else None
            if a != b:
                raise ConfigError(f"Cannot resume from {path}: it was trained with {k}={a!r}, this run asks for {k}={b!r}. "
                                  f"Use the same settings, or a new checkpoint folder to start over.")
        old_g = int(state.get("micro_steps", old.get("grad_accum", 1)))
        if old_g != self.micro_steps:
            raise ConfigError(f"Cannot resume from {path}: it was trained with {old_g} micro-steps per optimiser step "
                              f"(grad_accum x processes), this run has {self.cfg.grad_accum} x {self.group.world_size} = "
                              f"{self.micro_steps}. Choose grad_accum so that the product is {old_g}.")
        if state.get("dataset_fingerprint") != self.dataset.fingerprint():
            raise ConfigError(f"Cannot resume from {path}: it was trained on a different dataset (or category selection).")
        lora = LoraSet({n: LoraLayer(state["lora_down"][n], state["lora_up"][n], state["lora_alpha"][n])
                        for n in state["lora_down"]}, state.get("naming", adapter.naming))
        adapter.load(lora)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if self.adversary is not None:
            self.adversary.load_state_dict(state.get("adversary", {}))
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), where=f"The checkpoint {path}")
        return int(state["step"]), list(state.get("history", []))

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        cfg, d = self.cfg, self.denoiser
        if cfg.gradient_checkpointing:
            d.set_gradient_checkpointing(True)
        layers = d.layers(cfg.targets)
        check_rank_useful(layers, cfg.rank)
        capped = {n: r for n, m in layers.items() if (r := layer_rank(m, cfg.rank)) < cfg.rank}
        if capped:
            log.info("rank %d is above what %d layer(s) can use; they train at their own largest rank (%s)",
                     cfg.rank, len(capped), ", ".join(f"{n}: {r}" for n, r in sorted(capped.items())[:3])
                     + (", ..." if len(capped) > 3 else ""))
        # fitted before the adapters go in (they change the model's weight names)
        init = None if self.init_lora is None else fit_init_lora(self.init_lora, d, cfg.rank, seed=cfg.seed)
        if cfg.adv_weight:
            from .adversarial import Adversary

            self.adversary = Adversary(d, self.dataset.records, lr=cfg.adv_lr, reset=cfg.adv_reset, init=cfg.adv_init,
                                       seed=cfg.seed)
        if cfg.preserve_weight and self._preserve_items is None:  # its pictures are the untouched model's
            self._preserve_items = self._preservation_items()
        adapter = d.attach_lora(cfg.rank, cfg.alpha, cfg.targets)
        try:
            adapter.load(self._start_lora(adapter, init))
            params = adapter.parameters()
            opt, sched = self._optimizer(params)
            self.ema = WeightEMA(params, cfg.ema_decay) if cfg.ema_decay else None
            scaler = torch.amp.GradScaler(torch.device(d.device).type) if cfg.mixed_precision == "fp16" else None
            start, history = 0, []
            ckpt = latest_checkpoint(self.checkpoint_dir) if (resume and self.checkpoint_dir) else None
            if resume and ckpt is None:
                log.warning("No checkpoint to resume from in %s; starting from step 0.", self.checkpoint_dir)
            if ckpt is not None:
                start, history = self._restore(ckpt, adapter, opt, sched)
                if start > cfg.steps:
                    raise ConfigError(f"The checkpoint {ckpt} is already at step {start}, past the {cfg.steps} steps "
                                      f"asked for. Ask for at least {start} steps, or start over without resume.")
                log.info("Resuming from %s (step %d of %d).", ckpt, start, cfg.steps)
            self._broadcast(params)
            metrics = MetricsLog(self.metrics_path if self.group.is_main else None, history)
            last_ckpt = self._loop(adapter, params, opt, sched, scaler, metrics, start) or ckpt
            with self.ema.applied(params) if self.ema is not None else contextlib.nullcontext():
                lora = adapter.export()
        finally:
            adapter.remove()
            if cfg.gradient_checkpointing:
                d.set_gradient_checkpointing(False)
        lora.metadata.update(self.metadata(metrics.history))
        return TrainResult(lora, metrics.history, cfg.steps, last_ckpt)

    def _broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Start every process from process 0's LoRA weights (a no-op in a single process)."""
        if self.group.world_size == 1:
            return
        with torch.no_grad():
            for p in params:
                self.group.broadcast_(p.data, src=0)

    def _sync_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the LoRA gradients over processes, one flat reduction per dtype."""
        if self.group.world_size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            self.group.all_reduce_sum_(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def _stop_requested(self) -> bool:
        stop = self.should_stop is not None and bool(self.should_stop())
        if self.group.world_size > 1:  # every process leaves at the same step
            flag = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64)
            stop = float(self.group.all_reduce_sum_(flag)[0]) > 0
        return stop

    def _loop(self, adapter, params, opt, sched, scaler, metrics: MetricsLog, start: int) -> Path | None:
        cfg, group = self.cfg, self.group
        order = PairOrder(len(self.dataset), cfg.seed)
        done, saved, last = start, start, None
        n_micro = self.micro_steps

        def save(step: int) -> Path | None:
            if self.checkpoint_dir is None:
                return None
            if not group.is_main:
                return checkpoint_path(self.checkpoint_dir, step)
            return save_checkpoint(self.checkpoint_dir, step, self._state(adapter, opt, sched, metrics), cfg.keep_checkpoints)

        try:
            for step in range(start, cfg.steps):
                if self._stop_requested():
                    raise Interrupted(f"Training was cancelled after {done} of {cfg.steps} steps.")
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                first = None  # micro-step 0's batch, when the adversary's turn loaded it
                if self.adversary is not None:
                    stats_adv, first = self._adversary_step(order, step)
                total, stats, bad_loss = 0.0, {}, None
                for local in range(cfg.grad_accum):
                    micro = local * group.world_size + group.rank
                    out = self._micro_loss(adapter, order, step, micro, batch=first if micro == 0 else None)
                    if not torch.isfinite(out.loss):
                        bad_loss = float(out.loss.detach())
                        for k in out.stats:
                            stats.setdefault(k, 0.0)
                        break
                    loss = out.loss / n_micro
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += float(loss.detach())
                    for k, v in out.stats.items():
                        stats[k] = stats.get(k, 0.0) + v / n_micro
                if group.world_size > 1:
                    keys = sorted(stats)
                    packed = torch.tensor([total, *(stats[k] for k in keys), 0.0 if bad_loss is None else 1.0],
                                          dtype=torch.float64)
                    group.all_reduce_sum_(packed)
                    total, stats = float(packed[0]), {k: float(v) for k, v in zip(keys, packed[1:-1])}
                    if packed[-1] > 0 and bad_loss is None:
                        bad_loss = float("nan")
                if bad_loss is not None:
                    last = save(done)
                    raise TrainingDiverged(
                        f"The loss became {bad_loss} at step {step + 1}; training stopped. "
                        f"{'The last good state is in ' + str(last) + '. ' if last else ''}"
                        f"Lower the learning rate or beta, or train in fp32.")
                self._sync_grads(params)
                if scaler:
                    scaler.unscale_(opt)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not math.isfinite(grad_norm) and scaler is None:
                    last = save(done)
                    raise TrainingDiverged(
                        f"The gradient norm became {grad_norm} at step {step + 1}; training stopped. "
                        f"{'The last good state is in ' + str(last) + '. ' if last else ''}"
                        f"Lower the learning rate or beta, or train in fp32.")
                lr = float(sched.get_last_lr()[0])
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                if self.ema is not None:
                    self.ema.update(params)
                self._adversary_before = None
                done = step + 1
                if self.adversary is not None:
                    stats["adv_attack"] = stats_adv
                row = {"step": done, "loss": total, **stats, "lr": lr, "grad_norm": grad_norm,
                       "seconds": round(time.perf_counter() - t0, 4)}
                metrics.append(row)
                if self.progress is not None and group.is_main:
                    self.progress(done, cfg.steps, row)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    last, saved = save(done), done
        except TrainingDiverged:
            raise
        except BaseException:
            if done > saved:
                last = save(done)
                if last and group.is_main:
                    log.warning("Interrupted after step %d; state saved to %s (resume to continue).", done, last)
            raise
        if done > saved or last is None:
            last = save(done)
        return last

    def metadata(self, history: list[dict]) -> dict[str, str]:
        cfg, ds = self.cfg, self.dataset
        final = history[-1] if history else {}
        meta = {
            "ss_base_model_version": self.denoiser.base_model_version,
            "ss_training_comment": "SafetyDPO safety expert (Diffusion-DPO LoRA)",
            "safetydpo_version": __version__,
            "safetydpo_category": ",".join(cfg.category or ds.categories or []) or "all",
            "safetydpo_objective": cfg.objective,
            "safetydpo_beta": f"{cfg.beta:g}" if cfg.objective == "dpo" else f"{cfg.mapo_beta:g}",
            "safetydpo_condition": cfg.condition,
            "safetydpo_steps": str(len(history)),
            "safetydpo_seed": str(cfg.seed),
            "safetydpo_rank": str(cfg.rank),
            "safetydpo_lr": f"{cfg.lr:g}",
            "safetydpo_targets": cfg.targets,
            "safetydpo_dataset_fingerprint": ds.fingerprint(),
            "safetydpo_dataset_pairs": str(len(ds)),
            "safetydpo_model_fingerprint": self.denoiser.fingerprint(),
        }
        if cfg.preserve_weight:
            meta["safetydpo_preserve_weight"] = f"{cfg.preserve_weight:g}"
            meta["safetydpo_preserve_prompts"] = Path(cfg.preserve_prompts).name  # never a full path
            if cfg.preserve_pictures:
                meta["safetydpo_preserve_pictures"] = str(cfg.preserve_pictures)
        if cfg.twin_weight:
            meta["safetydpo_twin_weight"] = f"{cfg.twin_weight:g}"
        if cfg.adv_weight:
            meta["safetydpo_adv_weight"] = f"{cfg.adv_weight:g}"
            meta["safetydpo_adv_init"] = cfg.adv_init
        if cfg.ema_decay:  # the file holds the weight average, not the last step's weights
            meta["safetydpo_ema_decay"] = f"{cfg.ema_decay:g}"
        if self.init_lora is not None:  # where the run started: the file's name (never a full path), its merge
            start = self.init_lora.metadata
            meta["safetydpo_init_lora"] = Path(start.get("safetydpo_source", "")).name or "(a LoRA given in memory)"
            if "safetydpo_merge_method" in start:
                meta["safetydpo_merge_method"] = start["safetydpo_merge_method"]
        if self.group.world_size > 1:
            meta["safetydpo_processes"] = str(self.group.world_size)
        if self.denoiser.guidance is not None:
            meta["safetydpo_guidance"] = f"{self.denoiser.guidance:g}"
        if final:
            meta["safetydpo_final_metrics"] = ",".join(f"{k}={final[k]:.4g}" for k in ("loss", "implicit_acc", "margin")
                                                       if k in final)
        return meta


def train_expert(denoiser: Denoiser, dataset: PreferenceDataset | str | os.PathLike, config: TrainConfig, *,
                 checkpoint_dir: str | os.PathLike | None = None, metrics_path: str | os.PathLike | None = None,
                 resume: bool = False, progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 init_lora: LoraSet | None = None, allow_model_mismatch: bool = False,
                 group: ProcessGroup | None = None) -> TrainResult:
    """Train one safety expert on ``dataset`` (a folder or an open :class:`PreferenceDataset`).

    With ``config.objective == "esd"`` the dataset's unsafe prompts are the concepts that ESD erases.

    ``group``: the processes of a data-parallel run (:mod:`.distributed`); default one process.
    """
    if not isinstance(dataset, PreferenceDataset):
        dataset = PreferenceDataset(dataset, categories=config.category, expect_fingerprint=denoiser.fingerprint(),
                                    on_mismatch="warn" if allow_model_mismatch else "error")
    if config.objective == "esd":  # concept erasure: the dataset's unsafe prompts are the concepts (esd.py)
        from .esd import ConceptPrompts, train_esd

        return train_esd(denoiser, ConceptPrompts.from_dataset(dataset), config, checkpoint_dir=checkpoint_dir,
                         metrics_path=metrics_path, resume=resume, progress=progress, should_stop=should_stop,
                         init_lora=init_lora, group=group)
    trainer = ExpertTrainer(denoiser, dataset, config, checkpoint_dir=checkpoint_dir, metrics_path=metrics_path,
                            progress=progress, should_stop=should_stop, init_lora=init_lora, group=group)
    return trainer.run(resume=resume)
