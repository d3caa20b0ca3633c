"""Running an attack on a model: the one orchestration the command line, the ComfyUI node and the benchmark use.

:func:`run_attack` takes the attacked denoiser (through ``attacked()``, a context that yields it with its
LoRAs on) and, for the white-box attacks, the base model (``base()``) whose pictures of the prompts are the
targets; then, prompt chunk by prompt chunk (a category's prompts, in pieces of ``chunk_size``; a whole
category for concept inversion):

1. the un-attacked prompt is rendered from its seed and judged (the "no attack" rate beside the ASR; not
   counted in the budget);
2. the attack module runs on the chunk within its budget;
3. the chunk's results are written to ``records.jsonl`` and its pictures to ``images/`` before the next
   chunk starts.

With an output folder the run resumes: the same call again (same settings, prompts, model, LoRAs and
oracle, recorded in ``attack.json``) skips finished chunks, and every random draw is keyed on the prompt
(or category) and the seed, so an interrupted and resumed run gives exactly the results of an
uninterrupted one. A folder holding another run is refused unless ``overwrite``.

Under ``accelerate launch`` (``split``, a :class:`~safetydpo_core.scaleout.Split`) each process attacks its share
of the chunks (dealt by the id of each chunk's first prompt) into its part, ``OUT/.parts/p<rank>/run/`` (an attack
folder of its own); the white-box targets are drawn in the batches one process would use, shared out the same
way; the main process then joins the parts into exactly the files one process writes (records in chunk order,
pictures, tensors, report). A killed process loses only its unfinished chunk; the next launch, of any size,
finishes the run.

Output folder: ``attack.json`` (settings, budget, oracle, per-variant ASR summaries, timing),
``records.jsonl`` (one :class:`~.base.PromptResult` per line, with every attempt), ``adversarial.jsonl``
(the adversarial text prompts as prompt pairs: ``unsafe`` is the adversarial prompt, ``safe`` the safe
twin when the input had one, else the original prompt; ``safetydpo sample --prompts`` reads it),
``images/original/<id>.png`` and ``images/<variant>/<id>.png``, ``report.md``, ``targets.safetensors``
(white-box), ``soft_conditioning.safetensors`` (the conditioning of soft results, ``<id>/<variant>/<key>``)
and the attack's artifacts (``embeddings/<category>.safetensors``, ``concept_vectors.safetensors``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..denoiser.protocol import RenderingDenoiser
from ..errors import ConfigError
from ..utils.atomic import atomic_path, atomic_write_text
from .base import (Attack, AttackContext, AttackPrompt, Budget, Candidate, Oracle, PromptResult, Sampling, asr_summary,
                   prompt_seed)

ATTACK_NAMES = ("wording", "ring-a-bell", "unlearndiff", "inversion")
RUN_VERSION = 1
SOFT_FILE = "soft_conditioning"  # soft results' conditioning: "<id>/<variant>/<key>" -> tensor
ProgressFn = Callable[[float, int, dict], None]


def get_attack(name: str) -> Attack:
    """The attack module's object for ``name`` (see :data:`ATTACK_NAMES`)."""
    if name == "wording":
        from .wording import WordingAttack

        return WordingAttack()
    if name == "ring-a-bell":
        from .ring_a_bell import RingABellAttack

        return RingABellAttack()
    if name == "unlearndiff":
        from .unlearndiff import UnlearnDiffAttack

        return UnlearnDiffAttack()
    if name == "inversion":
        from .inversion import InversionAttack

        return InversionAttack()
    raise ConfigError(f"Unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}.")


@dataclasses.dataclass
class AttackSettings:
    """What to run: the attack, its budget (``queries``: the ``--budget``; ``steps``: optimisation steps; None
    takes the attack's default for the model, see each module's ``defaults``), the seed, how queries are
    rendered, attack options (e.g. ``eta``, ``tokens``, ``lr``) and the chunk size."""

    attack: str
    queries: int | None = None
    steps: int | None = None
    seed: int = 0
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    options: dict = dataclasses.field(default_factory=dict)
    chunk_size: int = 8

    def __post_init__(self) -> None:
        get_attack(self.attack)
        if self.queries is not None and (isinstance(self.queries, bool) or not isinstance(self.queries, int)
                                         or self.queries <= 0):
            raise ConfigError(f"The attack budget must be a positive number of queries per prompt; got {self.queries!r}.")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0):
            raise ConfigError(f"The attack's optimisation steps must be a positive integer; got {self.steps!r}.")
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive; got {self.chunk_size}.")

    def budget(self, attack: Attack, world: bool) -> Budget:
        d = attack.defaults(world)
        return Budget(queries=self.queries or d.queries, steps=d.steps if not d.steps else (self.steps or d.steps))

    def to_json(self) -> dict:
        return {"attack": self.attack, "queries": self.queries, "steps": self.steps, "seed": self.seed,
                "sampling": self.sampling.to_json(), "options": dict(self.options),
                "chunk_size": self.chunk_size}


@dataclasses.dataclass
class AttackRun:
    """The results of a run (complete or, after an interruption, what is done)."""

    attack: str
    results: list[PromptResult]
    summary: dict
    budget: Budget
    oracle: str | None
    out: Path | None
    complete: bool
    artifacts: dict

    def text_results(self) -> list[PromptResult]:
        v = get_attack(self.attack).text_variant
        return [r for r in self.results if r.variant == v]

    def image_of(self, result: PromptResult) -> torch.Tensor | None:
        """The adversarial picture (uint8 ``[3,H,W]``), from memory or from the output folder."""
        if result.image is not None or self.out is None:
            return result.image
        from ..sampling import _file_id

        path = self.out / "images" / result.variant / f"{_file_id(result.id)}.png"
        if not path.exists():
            return None
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)

    def soft_conditioning(self, result: PromptResult):
        """The conditioning of a soft result (kept in memory, else read back from the output folder)."""
        from ..denoiser.protocol import Conditioning

        if result.cond is not None or result.kind == "text":
            return result.cond
        tensors = _Folder(self.out).load_tensors(SOFT_FILE)
        prefix = f"{result.id}/{result.variant}/"
        found = {k[len(prefix):]: v[None] for k, v in tensors.items() if k.startswith(prefix)}
        return Conditioning(found) if found else None


# -- chunks ------------------------------------------------------------------------------------------------
def make_chunks(prompts: Sequence[AttackPrompt], by_category: bool, size: int) -> list[list[AttackPrompt]]:
    groups: dict[str, list[AttackPrompt]] = {}
    for p in prompts:
        groups.setdefault(p.category[0], []).append(p)
    chunks = []
    for g in groups.values():
        if by_category:
            chunks.append(g)
        else:
            chunks.extend(g[i:i + size] for i in range(0, len(g), size))
    return chunks


def check_prompts(prompts: Sequence[AttackPrompt]) -> None:
    if not prompts:
        raise ConfigError("No prompts to attack; give at least one prompt with its category and concept.")
    seen = set()
    for p in prompts:
        if not isinstance(p, AttackPrompt):
            raise ConfigError(f"Expected AttackPrompt objects; got {type(p).__name__}.")
        if p.id in seen:
            raise ConfigError(f"The prompt id {p.id!r} occurs twice; ids must be unique.")
        seen.add(p.id)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- base-model targets ------------------------------------------------------------------------------------
@torch.no_grad()
def make_targets(den: RenderingDenoiser, prompts: Sequence[AttackPrompt], sampling: Sampling, seed: int,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """The base model's latents of each prompt from its seed (what the white-box attacks aim at)."""
    from ..data.render import render_latents
    from ..errors import Interrupted

    h, w = sampling.size(den)
    out = {}
    for start in range(0, len(prompts), sampling.batch_size):
        if should_stop is not None and should_stop():
            raise Interrupted("The attack was cancelled while the base model drew its target pictures.")
        batch = prompts[start:start + sampling.batch_size]
        lat = render_latents(den, [p.prompt for p in batch], [prompt_seed(seed, p) for p in batch], size=(h, w),
                             steps=sampling.steps, cfg=sampling.cfg, sampler=sampling.sampler,
                             scheduler=sampling.scheduler, negative=sampling.negative)
        for p, x in zip(batch, lat):
            out[p.id] = x.detach().float().cpu().clone()
    return out


# -- the run -----------------------------------------------------------------------------------------------
class _Folder:
    """The output folder: state, records, images, artifacts (all written atomically)."""

    def __init__(self, out: Path | None):
        self.out = out

    def state(self) -> dict | None:
        if self.out is None or not (self.out / "attack.json").exists():
            return None
        try:
            return json.loads((self.out / "attack.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{self.out / 'attack.json'} is not valid JSON ({e}); remove the folder or pass "
                              f"overwrite.") from e

    def check(self, state: dict, overwrite: bool) -> bool:
        """Whether the folder already holds this run (read-only); a folder holding something else is refused
        unless ``overwrite``."""
        from ..scaleout import PARTS

        out, old = self.out, self.state()
        if out is None or not out.exists() or not any(c.name != PARTS for c in out.iterdir()):
            return False
        if old is None:
            raise ConfigError(f"{out} exists and holds no attack run (no attack.json); choose an empty or new "
                              f"output folder.")
        if old.get("state") == state["state"]:
            return True
        if not overwrite:
            changed = sorted(k for k in state["state"] if old.get("state", {}).get(k) != state["state"][k])
            raise ConfigError(f"{out} holds an attack run made with other settings ({', '.join(changed)}). Use "
                              f"another output folder, or overwrite to start it again.")
        return False

    def prepare(self, state: dict, overwrite: bool) -> list[PromptResult]:
        """The finished results of this run in the folder, after :meth:`check`; a folder holding another run is
        emptied (``overwrite``) and this run's state written."""
        from ..scaleout import PARTS

        if self.out is None:
            return []
        if self.check(state, overwrite):
            return self.records()
        out = self.out
        if out.exists():
            for child in out.iterdir():
                if child.name != PARTS:  # the split (scaleout.Split.open) owns the parts
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "attack.json", json.dumps(state, indent=1) + "\n", "attack state")
        return []

    def records(self) -> list[PromptResult]:
        path = self.out / "records.jsonl" if self.out else None
        if path is None or not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(PromptResult.from_json(json.loads(line)))
        return out

    def save_chunk(self, results: list[PromptResult], originals: dict[str, torch.Tensor]) -> None:
        if self.out is None:
            return
        from ..sampling import _file_id

        for r in results:
            if r.image is not None:
                self._png(self.out / "images" / r.variant / f"{_file_id(r.id)}.png", r.image)
        for pid, im in originals.items():
            self._png(self.out / "images" / "original" / f"{_file_id(pid)}.png", im)
        path = self.out / "records.jsonl"
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        atomic_write_text(path, old + "".join(json.dumps(r.to_json()) + "\n" for r in results), "attack records")

    @staticmethod
    def _png(path: Path, image: torch.Tensor) -> None:
        from PIL import Image

        arr = image.permute(1, 2, 0).numpy()
        with atomic_path(path, "image") as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")

    def save_tensors(self, stem: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        if self.out is None or not tensors:
            return
        from safetensors.torch import save_file

        path = self.out / f"{stem}.safetensors"
        with atomic_path(path, "attack tensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={k: str(v) for k, v in (metadata or {}).items()})

    def load_tensors(self, stem: str) -> dict[str, torch.Tensor]:
        if self.out is None or not (self.out / f"{stem}.safetensors").exists():
            return {}
        from safetensors.torch import load_file

        return load_file(str(self.out / f"{stem}.safetensors"))


def run_attack(den: RenderingDenoiser, prompts: Sequence[AttackPrompt], settings: AttackSettings, *,
               oracle: Oracle | None, out: str | os.PathLike | None = None,
               attacked: Callable[[], ContextManager[Any]] | None = None,
               base: Callable[[], ContextManager[Any]] | None = None,
               lora_switch: Callable[[], ContextManager[Any]] | None = None,
               overwrite: bool = False, model: dict | None = None, world: bool | None = None,
               log: Callable[[str], None] | None = None, progress: ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None, split=None) -> AttackRun | None:
    """Run (or resume) ``settings.attack`` on ``prompts`` against ``den``; see the module docstring.

    ``attacked()`` / ``base()``: contexts in which ``den`` is (or that yield) the attacked model and the base
    model (default: ``den`` as it is, for both; e.g. ``lambda: lora_applied(den.module, loras)``).
    ``lora_switch()``: with ``settings.sampling.lora_start`` > 0, a context (entered inside ``attacked()``) that
    yields the sampler's step callback which keeps the attacked model's LoRAs out of the first steps of each
    picture (``lambda: lora_withheld_until(den.module, loras, start)``); the attack itself optimises against the
    LoRAs at every step. ``model``: what identifies the attacked model in the run's state (model path,
    LoRA files and their fingerprints); ``den.fingerprint()`` is added (taken outside ``attacked()``).
    ``split``: this process's :class:`~safetydpo_core.scaleout.Split` under ``accelerate launch``; the main
    process returns the joined run, the others None.
    """
    from .oracles import is_world

    check_prompts(prompts)
    if settings.sampling.lora_start and lora_switch is None:
        raise ConfigError(f"lora_start={settings.sampling.lora_start} switches the attacked model's LoRA on after the "
                          f"first steps, but no LoRA was given to switch; attack a model with a LoRA, or leave it 0.")
    attack = get_attack(settings.attack)
    world = is_world(den) if world is None else world
    budget = settings.budget(attack, world)
    if attack.token_level:
        den.prompt_embedder()  # a model without token-level access (SD3, Flux) is refused before anything is written
    say = log or (lambda m: None)
    model_state = {"fingerprint": den.fingerprint(), **(model or {})}
    prompt_state = [[p.id, p.prompt, p.category, p.concept, p.safe, p.seed] for p in prompts]
    state = {"state": {"version": RUN_VERSION, "attack": attack.name, "budget": dataclasses.asdict(budget),
                       "settings": settings.to_json(), "model": model_state, "prompts": _digest(prompt_state),
                       "oracle": getattr(oracle, "name", None), "world": world},
             "attack": attack.name, "description": attack.description, "prompts": len(prompts),
             "complete": False}
    folder = _Folder(Path(out) if out is not None else None)
    chunks = make_chunks(prompts, attack.by_category, settings.chunk_size)
    if split is None:
        work = folder
        done = folder.prepare(state, overwrite)
        mine, in_parts = chunks, set()
    else:  # this process writes its share into its part; the main process joins the parts at the end
        if folder.out is None:
            raise ConfigError("A split attack (several processes) needs an output folder.")
        folder.check(state, overwrite)  # every process refuses a folder of another run before anything is written
        split.barrier()
        if split.is_main:
            folder.prepare(state, overwrite)
        split.barrier()  # the main process has emptied (overwrite) the output folder and written the run's state
        work = _Folder(split.part / "run")
        work.prepare(state, overwrite=False)
        done = folder.records()
        in_parts = split.gather(lambda part: _part_keys(part, state))
        mine = split.owned(chunks, key=lambda c: c[0].id)
    attacked = attacked or (lambda: contextlib.nullcontext(den))
    base = base or (lambda: contextlib.nullcontext(den))
    done_keys = {(r.id, r.variant) for r in done} | in_parts

    def finished(c):
        return all((p.id, v) in done_keys for p in c for v in attack.variants)

    todo = [c for c in mine if not finished(c)]
    n_total = len(prompts)
    n_done = n_total - sum(len(c) for c in chunks if not finished(c))
    if progress is not None:
        progress(float(n_done), n_total, {"attack": attack.name})
    if n_done:
        say(f"resuming: {n_done} of {n_total} prompts already attacked")
    targets = None
    if attack.white_box:
        # every process sees every unfinished chunk's prompts: the targets are drawn in one process's batches
        need = [p for c in chunks if not finished(c) for p in c]
        targets = _targets(den, need, settings, folder, work, split, base, should_stop, say)
        targets = {p.id: targets[p.id] for c in todo for p in c}
    results = [r for r in done if any(r.id == p.id for p in prompts)]
    artifacts: dict = {}
    with attacked() as aden:
        aden = aden if aden is not None else den
        ctx = AttackContext(aden, oracle, settings.sampling, budget, settings.seed, dict(settings.options), world,
                            targets, should_stop=should_stop, lora_switch=lora_switch)
        if todo:
            attack.prepare(ctx, prompts)
        for k, chunk in enumerate(todo):
            ctx.check()
            base_units = n_done

            def tick(frac, base_units=base_units, n=len(chunk)):
                if progress is not None:
                    progress(base_units + frac * n, n_total, {"attack": attack.name})

            ctx.progress = tick
            t0, c0 = time.perf_counter(), time.process_time()
            originals = ctx.query([(p, Candidate(p.prompt)) for p in chunk])
            t1, c1 = time.perf_counter(), time.process_time()
            chunk_results = attack.run(ctx, chunk)
            cpu = (time.process_time() - c1) / len(chunk)
            for r in chunk_results:
                verdict = originals[[p.id for p in chunk].index(r.id)][0]
                r.original_unsafe = verdict.unsafe
                r.info["cpu_seconds"] = round(cpu, 3)
                r.info["no_attack_seconds"] = round((t1 - t0) / len(chunk), 3)
                r.info["no_attack_cpu_seconds"] = round((c1 - c0) / len(chunk), 3)
            work.save_chunk(chunk_results, {p.id: im for p, (_, im) in zip(chunk, originals)})
            soft = {f"{r.id}/{r.variant}/{k}": v[0] for r in chunk_results if r.cond is not None
                    for k, v in r.cond.tensors.items()}
            if soft:
                work.save_tensors(SOFT_FILE, {**work.load_tensors(SOFT_FILE), **soft})
            for stem, tensors in attack.artifacts(ctx).items():
                artifacts[stem] = tensors
                work.save_tensors(stem, tensors, {"attack": attack.name})
            results.extend(chunk_results)
            n_done += len(chunk)
            if progress is not None:
                progress(float(n_done), n_total, {"attack": attack.name})
            say(f"chunk {k + 1}/{len(todo)} ({chunk[0].category[0]}, {len(chunk)} prompts): " +
                ", ".join(f"{v} {sum(bool(r.success) for r in chunk_results if r.variant == v)}/{len(chunk)}"
                          for v in attack.variants))
    if split is not None:
        joined = split.finish(lambda parts: _join_parts(parts, folder, state, chunks))
        if joined is None:
            return None
        results, artifacts = joined
    return _complete(folder, state, attack, results, prompts, budget, oracle, artifacts)


def _complete(folder: _Folder, state: dict, attack: Attack, results: list[PromptResult],
              prompts: Sequence[AttackPrompt], budget: Budget, oracle: Oracle | None, artifacts: dict) -> AttackRun:
    """The run's results in prompt order, its summary, and (with a folder) ``attack.json``, the adversarial
    prompts and the report."""
    order = {p.id: i for i, p in enumerate(prompts)}
    vorder = {v: i for i, v in enumerate(attack.variants)}
    results.sort(key=lambda r: (vorder.get(r.variant, 99), order.get(r.id, 1 << 30)))
    summary = {v: asr_summary(results, v) for v in attack.variants}
    run = AttackRun(attack.name, results, summary, budget, getattr(oracle, "name", None),
                    folder.out, True, artifacts)
    if folder.out is not None:
        state["complete"] = True
        state["summary"] = summary
        state["oracle_notes"] = list(getattr(oracle, "notes", []) or [])
        atomic_write_text(folder.out / "attack.json", json.dumps(state, indent=1) + "\n", "attack state")
        write_adversarial(folder.out / "adversarial.jsonl", run, prompts)
        from .report import write_report

        write_report(folder.out / "report.md", run, state)
    return run


def _targets(den: RenderingDenoiser, need: list[AttackPrompt], settings: AttackSettings, folder: _Folder,
             work: _Folder, split, base, should_stop, say) -> dict[str, torch.Tensor]:
    """The base model's target latents of ``need`` (the prompts of every unfinished chunk): read where stored,
    the missing ones drawn in batches of ``settings.sampling.batch_size`` in prompt order (a split run deals
    those batches out, and every process then reads every part's targets)."""
    if not need:  # the same for every process of a split
        return {}

    def stored() -> dict[str, torch.Tensor]:
        found = dict(folder.load_tensors("targets"))
        for run in _part_runs(split.parts() if split is not None else []):
            found.update(run.load_tensors("targets"))
        return found

    cached = stored()
    missing = [p for p in need if p.id not in cached]
    if split is not None:
        split.barrier()  # every process has read the stored targets before any writes more
    if missing:
        bs = settings.sampling.batch_size
        batches = [missing[i:i + bs] for i in range(0, len(missing), bs)]
        if split is not None:
            batches = split.owned(batches, key=lambda b: b[0].id)
        mine = [p for b in batches for p in b]
        if mine:
            say(f"the base model draws {len(mine)} target pictures")
            with base() as bden:
                drawn: dict[str, torch.Tensor] = {}
                for b in batches:  # one call per batch: the batches of one process, whatever the split
                    drawn.update(make_targets(bden if bden is not None else den, b, settings.sampling, settings.seed,
                                              should_stop))
            work.save_tensors("targets", {**work.load_tensors("targets"), **drawn})
            cached.update(drawn)
        if split is not None:
            split.barrier()  # every part's targets are on disk
            cached = stored()
    return cached


def _part_runs(parts: Sequence[Path], state: dict | None = None) -> list[_Folder]:
    """The attack folders of a split's ``parts``; with ``state``, those of another run are left out."""
    runs = [_Folder(part / "run") for part in parts]
    return [r for r in runs if state is None or (r.state() or {}).get("state") == state["state"]]


def _part_keys(part: Path, state: dict) -> set[tuple[str, str]]:
    """(prompt id, variant) of the finished results in a part of this run (a part of another run holds none)."""
    return {(r.id, r.variant) for run in _part_runs([part], state) for r in run.records()}


def _join_parts(parts: list[Path], folder: _Folder, state: dict, chunks: list[list[AttackPrompt]]):
    """(Main process) the parts' results, pictures and tensors added to ``folder`` as one process writes them:
    records after those already there, chunk by chunk in chunk order. Returns (all results, artifacts)."""
    from safetensors import safe_open

    from ..scaleout_commands import _move

    out = folder.out
    have = folder.records()
    keys = {(r.id, r.variant) for r in have}
    chunk_of = {p.id: i for i, c in enumerate(chunks) for p in c}
    new: list[PromptResult] = []
    tensors: dict[str, tuple[dict, dict]] = {}
    for run in _part_runs(parts, state):
        for r in run.records():
            if (r.id, r.variant) not in keys:
                keys.add((r.id, r.variant))
                new.append(r)
        for img in sorted((run.out / "images").rglob("*.png")):
            _move(img, out / img.relative_to(run.out))
        for f in sorted(run.out.rglob("*.safetensors")):
            stem = f.relative_to(run.out).as_posix()[:-len(".safetensors")]
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
                got = {k: h.get_tensor(k) for k in h.keys()}
            tensors.setdefault(stem, ({}, meta))[0].update(got)
    new.sort(key=lambda r: chunk_of.get(r.id, 1 << 30))  # stable: a chunk's records keep their order
    if new:
        atomic_write_text(out / "records.jsonl", "".join(json.dumps(r.to_json()) + "\n" for r in have + new),
                          "attack records")
    artifacts = {}
    for stem, (got, meta) in tensors.items():
        folder.save_tensors(stem, {**folder.load_tensors(stem), **got}, meta)
        if stem not in ("targets", SOFT_FILE):
            artifacts[stem] = got
    return have + new, artifacts


def write_adversarial(path: Path, run: AttackRun, prompts: Sequence[AttackPrompt]) -> None:
    """The text variant's adversarial prompts as a prompt-pair JSONL (``safetydpo sample`` reads it)."""
    from ..prompts.pairs import PromptPair, write_pairs

    by_id = {p.id: p for p in prompts}
    pairs = []
    for r in run.text_results():
        p = by_id[r.id]
        text = r.adversarial or p.prompt
        safe = p.safe if p.safe and p.safe.strip() != text.strip() else p.prompt
        if safe.strip() == text.strip():
            safe = f"{p.prompt} (original)"
        pairs.append(PromptPair(id=r.id, category=list(p.category), concept=p.concept, unsafe=text, safe=safe,
                                source=f"attack:{run.attack}",
                                extra={"attack": run.attack, "variant": r.variant, "original": p.prompt,
                                       "success": r.success, "queries": r.queries, "steps": r.steps, "seed": r.seed,
                                       "safe_is_original": not (p.safe and safe == p.safe)}))
    write_pairs(pairs, path, overwrite=True)
