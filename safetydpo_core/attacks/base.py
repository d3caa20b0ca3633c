"""What every attack shares: the prompts it attacks, its budget, the candidates it tries, the record of each
attempt and of each prompt, the context it runs in (model, success oracle, sampling, seeds, progress,
Cancel) and the attack success rate (ASR).

* :class:`AttackPrompt`: an unsafe prompt with its categories, concept, optional safe twin and seed; read
  from JSONL by :func:`read_attack_prompts` (the pack's prompt-pair format, or lines with ``prompt``
  instead of ``unsafe``/``safe``);
* :class:`Budget`: target-model queries per prompt (pictures made and judged) and optimisation steps;
* :class:`Sampling`: how a query's picture is made (steps, guidance, sampler, size, batch);
* :class:`Candidate`: one adversarial input: a text anyone can type, or a soft conditioning;
* :class:`PromptResult`: per prompt and result variant (Ring-A-Bell has a soft and a hard result), the
  adversarial prompt, success, queries, steps, time and every attempt;
* :class:`AttackContext`: what an attack module gets: the attacked denoiser, the oracle, the base
  model's target latents (white-box attacks), per-prompt seeds and random generators, :meth:`query`;
* :class:`Attack`: the interface of the attack modules; :func:`asr_summary`: ASR per category beside the
  un-attacked rate, mean queries and steps.

A query renders a candidate from the prompt's own seed (the same initial noise for every candidate and for
the un-attacked prompt) and asks the oracle whether the picture is unsafe; on the world the oracle also
requires the attacked category (:mod:`.oracles`). ASR = the share of attacked prompts whose adversarial
picture is judged unsafe within the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from ..categories import normalize_categories
from ..denoiser.protocol import Denoiser, RenderingDenoiser
from ..errors import ConfigError, DatasetError, Interrupted, SafetyDPOError
from ..utils.numbers import check_start_step

ProgressFn = Callable[[float], None]


# -- inputs -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttackPrompt:
    """One unsafe prompt to attack."""

    id: str
    prompt: str
    category: list[str]
    concept: str
    safe: str | None = None
    seed: int | None = None
    synonyms: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"prompt {self.id!r}"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"{where}: the prompt to attack is empty.")
        try:
            self.category = normalize_categories(self.category, allow_all=False)
        except SafetyDPOError as e:
            raise ConfigError(f"{where}: {e}") from e
        if not self.category:
            raise ConfigError(f"{where} has no category; give each prompt at least one of the seven categories "
                              f"(the ASR is reported per category).")
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ConfigError(f"{where} has no concept; give each prompt the unsafe concept it is about (the attacks "
                              f"substitute, amplify or invert it).")


_PROMPT_KEYS = ("id", "category", "concept", "unsafe", "safe", "prompt", "seed", "synonyms")


def attack_prompt_from_dict(d: dict, where: str) -> AttackPrompt:
    if not isinstance(d, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(d).__name__}.")
    text = d.get("unsafe", d.get("prompt"))
    if "id" not in d or text is None:
        raise DatasetError(f"{where}: each line needs id, category, concept and the prompt to attack (unsafe, as in a "
                           f"prompt-pair file, or prompt).")
    seed = d.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DatasetError(f"{where}: seed must be an integer; got {seed!r}.")
    syn = d.get("synonyms") or []
    if isinstance(syn, str):
        syn = [s.strip() for s in syn.split(",") if s.strip()]
    try:
        return AttackPrompt(id=str(d["id"]), prompt=str(text), category=d.get("category") or [],
                            concept=str(d.get("concept") or ""), safe=d.get("safe") or None, seed=seed,
                            synonyms=[str(s) for s in syn],
                            extra={k: v for k, v in d.items() if k not in _PROMPT_KEYS})
    except SafetyDPOError as e:
        raise DatasetError(f"{where}: {e}") from e


def read_attack_prompts(path: str | os.PathLike, *, categories=None, limit: int | None = None) -> list[AttackPrompt]:
    """Prompts to attack from a JSONL file: prompt pairs (``unsafe`` is attacked, ``safe`` is its twin) or lines
    with ``prompt``; ``seed`` (a pair's render seed, as world pairs have) is used when present. ``limit``: at
    most this many per (first) category."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"The prompt file {p} does not exist.")
    if p.suffix.lower() not in (".jsonl", ".json"):
        raise DatasetError(f"The prompt file {p} must be a .jsonl file (prompt pairs, or lines with id, category, "
                           f"concept and prompt).")
    out: list[AttackPrompt] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}, line {i}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg}).") from e
        ap = attack_prompt_from_dict(d, where)
        if ap.id in seen:
            raise DatasetError(f"{where}: id {ap.id!r} already used on line {seen[ap.id]}; ids must be unique.")
        seen[ap.id] = i
        out.append(ap)
    if not out:
        raise DatasetError(f"The prompt file {p} holds no prompts.")
    return select_prompts(out, categories=categories, limit=limit, source=str(p))


def select_prompts(prompts: Sequence[AttackPrompt], *, categories=None, limit: int | None = None,
                   source: str = "the prompts") -> list[AttackPrompt]:
    out = list(prompts)
    if categories:
        wanted = set(normalize_categories(categories, allow_all=True))
        if wanted:
            out = [q for q in out if wanted & set(q.category)]
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be at least 1; got {limit}.")
        kept, seen = [], {}
        for q in out:
            k = q.category[0]
            if seen.get(k, 0) < limit:
                seen[k] = seen.get(k, 0) + 1
                kept.append(q)
        out = kept
    if not out:
        raise DatasetError(f"No prompts to attack in {source} after the category filter.")
    return out


@dataclasses.dataclass
class Budget:
    """Per prompt: target-model queries (pictures made and judged) and optimisation steps."""

    queries: int
    steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries <= 0:
            raise ConfigError(f"The attack budget (queries per prompt) must be a positive integer; got {self.queries!r}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"The attack's optimisation steps must be a positive integer; got {self.steps!r}.")


@dataclasses.dataclass
class Sampling:
    """How a query's picture is made."""

    steps: int = 20
    cfg: float = 7.5
    sampler: str = "ddim"
    scheduler: str = "normal"
    height: int | None = None   # default: the model's native size
    width: int | None = None
    negative: str = ""
    batch_size: int = 8
    lora_start: int = 0         # the attacked model's LoRAs only after this many steps (0: from the first)

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ConfigError(f"Sampling steps and batch size must be positive; got {self.steps} and {self.batch_size}.")
        if self.cfg < 0:
            raise ConfigError(f"The guidance scale must be >= 0; got {self.cfg}.")
        self.lora_start = check_start_step(self.lora_start, self.steps, "lora_start")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.lora_start:
            del d["lora_start"]  # what runs made before the setting recorded: they resume
        return d

    def size(self, den: Denoiser) -> tuple[int, int]:
        return (self.height or den.sample_size, self.width or den.sample_size)


# -- candidates and records ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Candidate:
    """One adversarial input: ``text`` (``kind="text"``, a prompt anyone can type) or a soft conditioning
    (``kind="soft"``: ``cond`` with batch 1; ``text`` then says what it was made from)."""

    text: str
    kind: str = "text"
    cond: Any = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Verdict:
    unsafe: bool | None
    score: float | None = None
    read: str | None = None


@dataclasses.dataclass
class PromptResult:
    """The outcome of one attack (one result variant) on one prompt."""

    id: str
    variant: str
    category: list[str]
    concept: str
    original: str
    seed: int
    adversarial: str = ""
    kind: str = "text"
    success: bool | None = None
    score: float | None = None
    queries: int = 0
    steps: int = 0
    seconds: float = 0.0
    original_unsafe: bool | None = None
    safe: str | None = None
    attempts: list[dict] = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    image: Any = dataclasses.field(default=None, repr=False, compare=False)  # uint8 [3,H,W], not serialised
    cond: Any = dataclasses.field(default=None, repr=False, compare=False)   # a soft result's Conditioning

    def record(self, cand: Candidate, verdict: Verdict, step: int, image: torch.Tensor | None = None) -> None:
        """Count a query of ``cand`` (made after ``step`` optimisation steps) and keep it as the adversarial
        result if it is the first success, or while there is none, the highest-scoring picture (without an
        oracle: the latest candidate)."""
        self.queries += 1
        self.attempts.append({"query": self.queries, "text": cand.text, "kind": cand.kind, "step": step,
                              "unsafe": verdict.unsafe, "score": verdict.score, "read": verdict.read,
                              **{k: v for k, v in cand.info.items() if _jsonable(v)}})
        if self.success:
            return
        self.steps = step
        keep = (verdict.unsafe or not self.adversarial or verdict.unsafe is None
                or (verdict.score is not None and (self.score is None or verdict.score > self.score)))
        if keep:
            self.adversarial, self.kind, self.score, self.success = cand.text, cand.kind, verdict.score, verdict.unsafe
            self.image = image
            self.cond = cand.cond if cand.kind != "text" else None

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "cond")}

    @classmethod
    def from_json(cls, d: dict) -> "PromptResult":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


# -- the oracle ---------------------------------------------------------------------------------------------
class Oracle(Protocol):
    """Decides whether a query's picture shows the attacked unsafe content."""

    name: str

    def verdicts(self, images: torch.Tensor, prompts: Sequence[AttackPrompt]) -> list[Verdict]: ...


# -- the context --------------------------------------------------------------------------------------------
def prompt_seed(base_seed: int, p: AttackPrompt) -> int:
    """The prompt's own seed when it has one (world pairs carry their render seed), else one derived from the
    base seed and the prompt id (as ``safetydpo sample`` derives it)."""
    from ..data.render import pair_seed

    return int(p.seed) if p.seed is not None else pair_seed(base_seed, p.id)


def stable_seed(*parts) -> int:
    return int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:15], 16)


@dataclasses.dataclass
class AttackContext:
    """What an attack module works with (built by :mod:`.runner`)."""

    den: RenderingDenoiser
    oracle: Oracle | None
    sampling: Sampling
    budget: Budget
    seed: int
    options: dict
    world: bool = False
    targets: dict[str, torch.Tensor] | None = None
    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None
    lora_switch: Callable[[], Any] | None = None  # a context yielding the sampler's step callback (lora_start)
    _embedder: Any = None

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = self.den.prompt_embedder()
        return self._embedder

    def seed_of(self, p: AttackPrompt) -> int:
        return prompt_seed(self.seed, p)

    def generator(self, p: AttackPrompt | str, purpose: str) -> torch.Generator:
        """A CPU generator for one prompt (or a category key) and purpose, independent of batching and order."""
        key = p.id if isinstance(p, AttackPrompt) else str(p)
        return torch.Generator().manual_seed(stable_seed(self.seed, key, purpose))

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("The attack was cancelled; finished prompts are kept, run it again to resume.")

    def tick(self, fraction: float) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, float(fraction))))

    def option(self, name: str, default):
        v = self.options.get(name)
        return default if v is None else v

    def target(self, p: AttackPrompt) -> torch.Tensor:
        if self.targets is None or p.id not in self.targets:
            raise ConfigError("This attack needs the base model's picture of each prompt (white-box attacks); none "
                              "was given.")
        return self.targets[p.id]

    # -- queries --------------------------------------------------------------------------------------------
    def encode_candidates(self, cands: Sequence[Candidate], size: tuple[int, int]):
        from ..denoiser.protocol import Conditioning

        parts: list = [None] * len(cands)
        texts = [i for i, c in enumerate(cands) if c.kind == "text"]
        if texts:
            enc = self.den.encode_prompts([cands[i].text for i in texts], size=size)
            for j, i in enumerate(texts):
                parts[i] = enc.index(slice(j, j + 1))
        for i, c in enumerate(cands):
            if c.kind != "text":
                if c.cond is None:
                    raise ConfigError("A soft candidate needs its conditioning.")
                parts[i] = c.cond
        dev = self.den.device
        return Conditioning.cat([Conditioning({k: v.detach().to(dev) for k, v in p.tensors.items()}) for p in parts])

    @torch.no_grad()
    def render(self, items: Sequence[tuple[AttackPrompt, Candidate]]) -> torch.Tensor:
        """Pictures ``[B,3,H,W]`` in ``[0,1]`` (CPU) of each candidate from its prompt's seed."""
        from ..data.render import initial_noise

        s = self.sampling
        h, w = s.size(self.den)
        shape = self.den.latent_shape(h, w)
        out = []
        for start in range(0, len(items), s.batch_size):
            self.check()
            batch = items[start:start + s.batch_size]
            cond = self.encode_candidates([c for _, c in batch], (h, w))
            uncond = self.den.encode_prompts([s.negative] * len(batch), size=(h, w)) if s.cfg != 1.0 else None
            noise = torch.stack([initial_noise(self.seed_of(p), shape) for p, _ in batch])
            with (self.lora_switch() if self.lora_switch is not None else contextlib.nullcontext()) as switch:
                lat = self.den.sample(cond, uncond, noise, steps=s.steps, cfg=s.cfg, sampler=s.sampler,
                                      scheduler=s.scheduler, callback=switch)
            out.append(self.den.decode_latents(lat).float().cpu())
        return torch.cat(out)

    def query(self, items: Sequence[tuple[AttackPrompt, Candidate]]) -> list[tuple[Verdict, torch.Tensor]]:
        """Render and judge each (prompt, candidate): its verdict and its picture (uint8 ``[3,H,W]``)."""
        if not items:
            return []
        images = self.render(items)
        if self.oracle is None:
            verdicts = [Verdict(None) for _ in items]
        else:
            verdicts = self.oracle.verdicts(images, [p for p, _ in items])
        return [(v, (im * 255).round().to(torch.uint8)) for v, im in zip(verdicts, images)]


# -- attacks ------------------------------------------------------------------------------------------------
class Attack:
    """An attack module's interface. ``variants``: the results it gives per prompt (the first is written as the
    adversarial text prompts); ``white_box``: needs gradients and the base model's pictures; ``token_level``:
    needs the denoiser's ``prompt_embedder()`` (checked before anything is written); ``by_category``:
    works on all prompts of a category at once (a chunk is a whole category)."""

    name = ""
    variants: tuple[str, ...] = ("text",)
    text_variant = "text"
    white_box = False
    token_level = True  # reaches the text encoder through the Denoiser's prompt_embedder()
    by_category = False
    description = ""

    def defaults(self, world: bool) -> Budget:
        raise NotImplementedError

    def prepare(self, ctx: AttackContext, prompts: Sequence[AttackPrompt]) -> None:
        """Work on the whole prompt set before the chunks (must be deterministic: it is redone on resume)."""

    def run(self, ctx: AttackContext, chunk: Sequence[AttackPrompt]) -> list[PromptResult]:
        raise NotImplementedError

    def artifacts(self, ctx: AttackContext) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors to save beside the results (file stem -> tensors), e.g. learned embeddings."""
        return {}


def new_result(ctx: AttackContext, p: AttackPrompt, variant: str) -> PromptResult:
    return PromptResult(id=p.id, variant=variant, category=list(p.category), concept=p.concept, original=p.prompt,
                        seed=ctx.seed_of(p), safe=p.safe)


class Stopwatch:
    """Wall time of a chunk, shared out equally over its prompts (each result variant of a prompt gets the
    prompt's share: the variants are made together)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def share(self, results: Sequence[PromptResult], n_prompts: int) -> None:
        per = (time.perf_counter() - self.t0) / max(1, n_prompts)
        for r in results:
            r.seconds = round(per, 3)


# -- ASR -----------------------------------------------------------------------------------------------------
def _rate(flags: list) -> float | None:
    vals = [bool(f) for f in flags if f is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def asr_summary(results: Sequence[PromptResult], variant: str | None = None) -> dict:
    """ASR over ``results`` (one variant), per category, beside the un-attacked rate, mean queries and steps."""
    rs = [r for r in results if variant is None or r.variant == variant]
    cats: dict[str, list[PromptResult]] = {}
    for r in rs:
        for c in r.category:
            cats.setdefault(c, []).append(r)
    return {
        "n": len(rs),
        "asr": _rate([r.success for r in rs]),
        "no_attack": _rate([r.original_unsafe for r in rs]),
        "queries": round(sum(r.queries for r in rs) / len(rs), 2) if rs else 0,
        "steps": round(sum(r.steps for r in rs) / len(rs), 2) if rs else 0,
        "seconds": round(sum(r.seconds for r in rs), 1),
        "per_category": {c: {"n": len(v), "asr": _rate([r.success for r in v]),
                             "no_attack": _rate([r.original_unsafe for r in v])} for c, v in cats.items()},
    }


def steps_at(total_steps: int, queries: int) -> list[int]:
    """The optimisation steps (1-based) after which a white-box attack queries the model: ``queries`` evenly
    spaced checks, the last one at ``total_steps``."""
    q = max(1, min(queries, total_steps))
    return sorted({max(1, math.ceil(total_steps * (i + 1) / q)) for i in range(q)})
