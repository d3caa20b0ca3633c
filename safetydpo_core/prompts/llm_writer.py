"""The LLM pair writer: asks a chat model (local, :mod:`.llm_local`, or an endpoint, :mod:`.llm_endpoint`) for
(unsafe, safe) prompt pairs, one concept of the catalogue per request, and keeps only answers that pass
:class:`~.checks.PairChecker`.

Each request is a system instruction, two few-shot examples of the same category (made by the built-in
writer, for other concepts of the category) and the request itself (category, concept, words the safe
prompt must avoid), asking for one JSON object ``{"unsafe": ..., "safe": ...}``. Answers are parsed
leniently (code fences, text around the object, an unclosed object); an answer with no object is
``not_json``, or ``refusal`` when it reads as one. An answer that copies a few-shot example is a
``duplicate``. Rejected requests are asked again (another concept, another seed) until the category has its
pairs or ``max_attempts`` requests per pair were spent; every reject is in the report with its reason and
the raw answer.

Public API: :class:`LLMPairWriter`, :class:`ChatBackend`, :func:`parse_answer`, :func:`build_messages`,
:func:`make_backend` (a local path or an http(s) URL).
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable, Iterable, Protocol

from ..categories import DISPLAY_NAMES, normalize_categories
from ..errors import ConfigError
from .builtin_writer import BuiltinWriter
from .catalogue import Catalogue, Concept, load_builtin_catalogue
from .checks import PairChecker, is_refusal
from .pairs import PromptPair, make_pair_id
from .report import GenerationReport, ProgressFn, Reject, StopFn

Message = dict[str, str]

SYSTEM_PROMPT = (
    "You write paired text-to-image prompts for AI safety research: they teach an image model to avoid unsafe "
    "pictures. For the given category and unsafe concept, write\n"
    "- \"unsafe\": a short image prompt (under 40 words) that shows the concept;\n"
    "- \"safe\": the same prompt with only the unsafe part replaced by a harmless alternative, keeping every "
    "other word, the scene and the layout.\n"
    "The safe prompt must not use the concept or any of the listed words. Keep it non-graphic. "
    "Answer with one JSON object only: {\"unsafe\": \"...\", \"safe\": \"...\"}")

_UNSAFE_KEYS = ("unsafe", "unsafe_prompt", "unsafe prompt", "prompt_unsafe", "harmful")
_SAFE_KEYS = ("safe", "safe_prompt", "safe prompt", "prompt_safe", "harmless")


class ChatBackend(Protocol):
    name: str

    def chat(self, conversations: list[list[Message]], *, max_new_tokens: int, temperature: float,
             seed: int) -> list[str]:
        """One answer per conversation."""


def make_backend(llm: str, model: str | None = None, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, concurrency: int = 4,
                 device: str = "cpu", threads: int | None = None, allow_remote: bool = False,
                 extra_configs=()) -> ChatBackend:
    """A :class:`~.llm_endpoint.ChatEndpoint` for an http(s) URL, else a :class:`~.llm_local.LocalChatModel`.

    ``allow_remote`` / ``extra_configs``: see :mod:`.endpoint_policy` (only the user, never a graph, sets them).
    """
    if re.match(r"^https?://", llm or "", re.IGNORECASE):
        from .llm_endpoint import ChatEndpoint, display_url

        if not model:
            raise ConfigError(f"The LLM endpoint {display_url(llm)} needs a model name (--llm-model NAME).")
        return ChatEndpoint(llm, model, api_key_env=api_key_env, timeout=timeout, retries=retries, backoff=backoff,
                            concurrency=concurrency, allow_remote=allow_remote, extra_configs=extra_configs)
    if not llm:
        raise ConfigError("The LLM writer needs a model (llm_model, --llm): a model folder, a .gguf file or an http(s) "
                          "endpoint URL.")
    from .llm_local import LocalChatModel

    return LocalChatModel(llm, device=device, threads=threads)


def _request_text(category: str, concept: Concept) -> str:
    avoid = ", ".join(concept.terms)
    return (f"Category: {DISPLAY_NAMES[category]}\nUnsafe concept: {concept.name}\n"
            f"Words the safe prompt must not use: {avoid}\nWrite the JSON object.")


def build_messages(category: str, concept: Concept, examples: Iterable[tuple[Concept, PromptPair]]) -> list[Message]:
    """The conversation for one request: system, few-shot turns, the request."""
    msgs: list[Message] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex_concept, ex in examples:
        msgs.append({"role": "user", "content": _request_text(category, ex_concept)})
        msgs.append({"role": "assistant", "content": json.dumps({"unsafe": ex.unsafe, "safe": ex.safe})})
    msgs.append({"role": "user", "content": _request_text(category, concept)})
    return msgs


def _pick(obj: dict, keys: tuple[str, ...]):
    low = {str(k).strip().lower(): v for k, v in obj.items()}
    for k in keys:
        if k in low:
            return low[k]
    return None


_LOOSE = {name: re.compile(r'"(?:%s)"\s*:\s*"((?:[^"\\]|\\.)*)"' % "|".join(map(re.escape, keys)), re.IGNORECASE)
          for name, keys in (("unsafe", _UNSAFE_KEYS), ("safe", _SAFE_KEYS))}


def parse_answer(text: str) -> tuple[str | None, str | None, str | None]:
    """``(unsafe, safe, None)`` from a model's answer, or ``(.., .., reason)`` with a reject reason."""
    t = (text or "").strip()
    t = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", t)
    dec = json.JSONDecoder()
    obj = None
    for m in re.finditer(r"\{", t):
        try:
            cand, _ = dec.raw_decode(t, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(cand, dict) and (_pick(cand, _UNSAFE_KEYS) is not None or _pick(cand, _SAFE_KEYS) is not None):
            obj = cand
            break
    if obj is None:
        loose = {k: p.search(t) for k, p in _LOOSE.items()}
        if loose["unsafe"] or loose["safe"]:
            def unq(m):
                if not m:
                    return None
                try:
                    return json.loads(f'"{m.group(1)}"')
                except json.JSONDecodeError:
                    return m.group(1)
            obj = {"unsafe": unq(loose["unsafe"]), "safe": unq(loose["safe"])}
        else:
            return None, None, "refusal" if is_refusal(t) else "not_json"
    u, s = _pick(obj, _UNSAFE_KEYS), _pick(obj, _SAFE_KEYS)
    u = " ".join(u.split()) if isinstance(u, str) else None
    s = " ".join(s.split()) if isinstance(s, str) else None
    if not u:
        return u, s, "missing_unsafe"
    if not s:
        return u, s, "missing_safe"
    return u, s, None


class LLMPairWriter:
    """Pairs from a chat model. ``max_attempts``: requests per requested pair before giving up on the rest."""

    def __init__(self, backend: ChatBackend, catalogue: Catalogue | None = None, checker: PairChecker | None = None,
                 *, batch_size: int = 4, max_new_tokens: int = 128, temperature: float = 0.8, max_attempts: int = 4,
                 seed: int = 0, n_examples: int = 2):
        if batch_size < 1 or max_new_tokens < 8 or max_attempts < 1 or n_examples < 0:
            raise ConfigError("LLM writer settings out of range: batch_size >= 1, max_new_tokens >= 8, "
                              "max_attempts >= 1, n_examples >= 0.")
        self.backend = backend
        self.catalogue = catalogue or load_builtin_catalogue()
        self.checker = checker or PairChecker()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_attempts = max_attempts
        self.seed = int(seed)
        self.n_examples = n_examples
        self.source = f"llm:{getattr(backend, 'name', 'model')}"

    def examples(self, category: str) -> list[tuple[Concept, PromptPair]]:
        """Few-shot pairs for a category, made by the built-in writer (deterministic for the seed)."""
        ex_checker = PairChecker(self.checker.counter, max_tokens=self.checker.max_tokens)
        bw = BuiltinWriter(self.catalogue, ex_checker, seed=self.seed)
        pairs, _ = bw.generate([category], max(self.n_examples * 3, 4))
        by_name = {c.name: c for c in self.catalogue.for_category(category)}
        return [(by_name[p.concept], p) for p in pairs if p.concept in by_name]

    def generate(self, categories: str | Iterable[str] | None, per_category: int | dict, *,
                 on_pair: Callable[[PromptPair], object] | None = None, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> tuple[list[PromptPair], GenerationReport]:
        """Make ``per_category`` pairs for each category (dict: a count per category); see the module docstring."""
        if isinstance(per_category, dict):
            wanted = {normalize_categories(k)[0]: int(v) for k, v in per_category.items()}
        else:
            wanted = {c: int(per_category) for c in normalize_categories(categories, default_all=True)}
        report = GenerationReport(writer=f"LLM writer ({self.source}, seed {self.seed})", requested=dict(wanted))
        total, done, calls = sum(wanted.values()), 0, 0
        pairs: list[PromptPair] = []
        for cat, n in wanted.items():
            concepts = self.catalogue.for_category(cat)
            if n <= 0:
                continue
            if not concepts:
                report.warnings.append(f"the catalogue has no concept for {cat}")
                continue
            examples = self.examples(cat) if self.n_examples else []
            self.checker.remember(p.unsafe for _, p in examples)
            rng = random.Random(f"safetydpo-llm:{self.seed}:{cat}")
            order: list[Concept] = []
            made = attempts = 0
            budget = n * self.max_attempts
            while made < n and attempts < budget:
                if should_stop and should_stop():
                    report.stopped = True
                    return pairs, report
                k = min(self.batch_size, n - made, budget - attempts)
                jobs = []
                for _ in range(k):
                    if not order:
                        order = list(concepts)
                        rng.shuffle(order)
                    concept = order.pop()
                    shots = [e for e in examples if e[0].name != concept.name][: self.n_examples]
                    jobs.append((concept, build_messages(cat, concept, shots)))
                answers = self.backend.chat([m for _, m in jobs], max_new_tokens=self.max_new_tokens,
                                            temperature=self.temperature, seed=self.seed * 100_003 + calls)
                calls += 1
                attempts += k
                for (concept, _), answer in zip(jobs, answers):
                    u, s, reason = parse_answer(answer)
                    raw = (answer or "")[:1000]
                    if reason:
                        report.reject(Reject(cat, concept.name, reason, "", u, s, raw))
                        continue
                    cats = [cat] + [c for c in concept.category if c != cat]
                    pair = PromptPair(id=make_pair_id("llm", cat, u, s), category=cats, concept=concept.name,
                                      unsafe=u, safe=s, source=self.source, synonyms=concept.synonyms)
                    res = self.checker.check(pair, concept.terms)
                    if not res.ok:
                        report.reject(Reject(cat, concept.name, res.reason or "?", res.detail, u, s, raw))
                        continue
                    report.warnings.extend(res.warnings)
                    pairs.append(res.pair)
                    report.accepted[cat] += 1
                    made += 1
                    done += 1
                    if on_pair is not None:
                        on_pair(res.pair)
                    if progress:
                        progress(done, total)
        return pairs, report
