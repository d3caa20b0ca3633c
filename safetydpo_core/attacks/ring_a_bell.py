"""Ring-A-Bell (Tsai et al., ICLR 2024): a concept vector from the text encoder, added to a prompt (soft), and a
genetic search for discrete tokens whose encoding matches the result (hard). Black-box with respect to the
aligned model: only the text encoder is read (it is the base model's; the safety LoRAs adapt the UNet).

* **Concept vector** per category: ``Δ = mean(E(p_with)) − mean(E(p_without))`` over the category's prompts,
  where ``E`` is the model's conditioning of a prompt (every tensor of it: the token states, and for SDXL
  the pooled embedding) and ``p_without`` is the prompt's safe twin when it has one, else the prompt with
  its concept word removed.
* **Soft** result: the conditioning ``E(p) + η Δ`` with ``η`` stepping up to ``eta`` over the query budget
  (``η_j = eta·(j+1)/queries``); the first picture judged unsafe wins.
* **Hard** result: a text prompt of ``tokens`` tokens found by a genetic algorithm (population
  ``population``, ``steps`` generations: elitism, tournament selection, uniform crossover, per-token
  mutation) maximising the cosine between its conditioning and ``E(p) + eta·Δ``; the ``queries`` fittest
  distinct prompts that differ from each other in at least ``spread`` tokens (default a quarter of them) are
  rendered, fittest first (:func:`query_picks`). The initial population is random vocabulary tokens, as in
  the paper, plus one individual that is the prompt's own tokens (this converges in far fewer generations
  than the paper's 3000 on a CPU budget).

Public API: :class:`RingABellAttack`, :func:`concept_vectors`, :func:`without_concept`, :func:`query_picks`.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from ..denoiser.protocol import Denoiser
from ..errors import ConfigError
from .base import Attack, AttackContext, AttackPrompt, Budget, Candidate, PromptResult, Stopwatch, new_result


def without_concept(p: AttackPrompt, world: bool) -> str | None:
    """The prompt without its concept: the safe twin, else the prompt with the concept word removed."""
    from .wording import _find, concept_words

    if p.safe and p.safe.strip():
        return p.safe
    target, _ = concept_words(p, world)
    for word in ([target] if target else []) + [p.concept]:
        m = _find(p.prompt, word)
        if m:
            text = re.sub(r"\s+", " ", p.prompt[:m.start()] + p.prompt[m.end():]).strip(" ,")
            return text or None
    return None


def _float_keys(cond) -> list[str]:
    return [k for k, v in cond.tensors.items() if v.is_floating_point()]


@torch.no_grad()
def concept_vectors(den: Denoiser, prompts: Sequence[AttackPrompt], world: bool, size: tuple[int, int] | None = None,
                    batch: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    """Per category (a prompt's first), ``{conditioning key: Δ}`` (``[1, ...]`` tensors, float32, CPU)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for p in prompts:
        w = without_concept(p, world)
        if w is not None and w.strip() != p.prompt.strip():
            groups.setdefault(p.category[0], []).append((p.prompt, w))
    out = {}
    for cat in dict.fromkeys(p.category[0] for p in prompts):
        rows = groups.get(cat)
        if not rows:
            raise ConfigError(f"Ring-A-Bell needs, for the {cat} prompts, a safe twin or the concept word in the prompt "
                              f"to measure the concept vector; none of them has either.")
        sums: dict[str, torch.Tensor] = {}
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            cu = den.encode_prompts([u for u, _ in part], size=size)
            cs = den.encode_prompts([s for _, s in part], size=size)
            for k in _float_keys(cu):
                d = (cu.tensors[k].float() - cs.tensors[k].float()).sum(0, keepdim=True).cpu()
                sums[k] = sums[k] + d if k in sums else d
        out[cat] = {k: v / len(rows) for k, v in sums.items()}
    return out


def query_picks(pop: torch.Tensor, fit: torch.Tensor, q: int, spread: int, decode) -> list[tuple[int, str]]:
    """The hard results to render, as (individual, text): up to ``q`` of ``pop`` ([P, K] token ids) with distinct
    non-empty texts, fittest first, each differing from every earlier pick in at least ``spread`` token positions
    (a converged population's runners-up are the winner with one token changed: rendering those spends the
    query budget on one prompt); filled up with the fittest remaining distinct texts when too few are that
    far apart."""
    order = fit.argsort(descending=True).tolist()
    texts: dict[int, str] = {}  # decoded as reached: most of the population never is
    picks: list[int] = []
    seen: set[str] = set()
    for far_only in (True, False):
        for i in order:
            if len(picks) >= q:
                return [(j, texts[j]) for j in picks]
            if far_only and any(int((pop[i] != pop[j]).sum()) < spread for j in picks):
                continue
            if i not in texts:
                texts[i] = decode(pop[i].tolist())
            t = texts[i]
            if not t or t in seen:
                continue
            picks.append(i)
            seen.add(t)
    return [(j, texts[j]) for j in picks]


class RingABellAttack(Attack):
    name = "ring-a-bell"
    variants = ("hard", "soft")
    text_variant = "hard"
    description = ("Ring-A-Bell: a concept vector from the text encoder added to the prompt (soft) and a genetic "
                   "search for tokens that match it (hard)")

    def defaults(self, world: bool) -> Budget:
        return Budget(queries=4, steps=60 if world else 300)

    def prepare(self, ctx: AttackContext, prompts: Sequence[AttackPrompt]) -> None:
        self.size = ctx.sampling.size(ctx.den)
        self.deltas = concept_vectors(ctx.den, prompts, ctx.world, self.size)

    def artifacts(self, ctx: AttackContext) -> dict[str, dict[str, torch.Tensor]]:
        return {"concept_vectors": {f"{cat}.{k}": v for cat, d in self.deltas.items() for k, v in d.items()}}

    # -- soft -------------------------------------------------------------------------------------------
    def _shifted(self, cond, delta: dict[str, torch.Tensor], eta: float):
        from ..denoiser.protocol import Conditioning

        out = {}
        for k, v in cond.tensors.items():
            if k in delta:
                out[k] = (v.float().cpu() + eta * delta[k]).to(v.dtype)
            else:
                out[k] = v.cpu()
        return Conditioning(out)

    # -- hard: the genetic search --------------------------------------------------------------------------
    def _fitness(self, ctx: AttackContext, pop: torch.Tensor, target: torch.Tensor, keys: list[str],
                 known: list[dict[tuple, float]]) -> torch.Tensor:
        """Cosine between each individual's conditioning and its prompt's target; ``pop`` [n, P, K]. ``known``
        (one dict per prompt, updated here) holds the fitness of token sequences already met: the elite and
        the children that repeat a parent are not encoded again (a converging population is mostly those)."""
        n, P, K = pop.shape
        rows = [[tuple(r) for r in pop[b].tolist()] for b in range(n)]
        todo = list(dict.fromkeys(r for b in range(n) for r in rows[b] if r not in known[b]))
        if todo:
            feats = []
            bs = int(ctx.option("encode_batch", 256))
            for i in range(0, len(todo), bs):
                cond = ctx.embedder.encode([list(r) for r in todo[i:i + bs]], size=self.size)
                feats.append(torch.cat([cond.tensors[k].float().reshape(cond.tensors[k].shape[0], -1).cpu()
                                        for k in keys], 1))
            f = torch.nn.functional.normalize(torch.cat(feats), dim=-1)
            cos = f @ torch.nn.functional.normalize(target, dim=-1).T  # [len(todo), n]
            where = {r: j for j, r in enumerate(todo)}
            for b in range(n):
                for r in rows[b]:
                    if r not in known[b]:
                        known[b][r] = float(cos[where[r], b])
        return torch.tensor([[known[b][r] for r in rows[b]] for b in range(n)])

    @torch.no_grad()
    def _search(self, ctx: AttackContext, chunk: Sequence[AttackPrompt], targets: torch.Tensor, keys: list[str]):
        emb = ctx.embedder
        K = min(int(ctx.option("tokens", 16)), emb.max_tokens)
        P = int(ctx.option("population", 64 if ctx.world else 200))
        mut = float(ctx.option("mutation", 0.1))
        elite = max(1, P // 10)
        special = emb.special_ids()
        allowed = torch.tensor([i for i in range(emb.vocabulary().shape[0]) if i not in special])
        gens = [ctx.generator(p, "ring-a-bell-ga") for p in chunk]
        own = emb.token_ids([p.prompt for p in chunk])

        def rand(g, shape):
            return allowed[torch.randint(len(allowed), shape, generator=g)]

        pop = torch.stack([rand(g, (P, K)) for g in gens])
        if ctx.option("seed_prompt", True):
            for b, ids in enumerate(own):
                ids = ids[:K]
                pop[b, 0, :len(ids)] = torch.tensor(ids)
        known: list[dict[tuple, float]] = [{} for _ in chunk]
        fit = self._fitness(ctx, pop, targets, keys, known)
        steps = ctx.budget.steps
        for step in range(steps):
            ctx.check()
            nxt = torch.empty_like(pop)
            for b, g in enumerate(gens):
                order = fit[b].argsort(descending=True)
                nxt[b, :elite] = pop[b, order[:elite]]
                n_child = P - elite
                t1 = torch.randint(P, (n_child, 3), generator=g)
                t2 = torch.randint(P, (n_child, 3), generator=g)
                pa = t1.gather(1, fit[b][t1].argmax(1, keepdim=True)).squeeze(1)
                pb = t2.gather(1, fit[b][t2].argmax(1, keepdim=True)).squeeze(1)
                mask = torch.rand((n_child, K), generator=g) < 0.5
                child = torch.where(mask, pop[b, pa], pop[b, pb])
                m = torch.rand((n_child, K), generator=g) < mut
                child = torch.where(m, rand(g, (n_child, K)), child)
                nxt[b, elite:] = child
            pop = nxt
            fit = self._fitness(ctx, pop, targets, keys, known)
            ctx.tick(0.5 * (step + 1) / max(1, steps))
        return pop, fit

    def run(self, ctx: AttackContext, chunk: Sequence[AttackPrompt]) -> list[PromptResult]:
        clock = Stopwatch()
        q = ctx.budget.queries
        eta = float(ctx.option("eta", 3.0))
        base = ctx.den.encode_prompts([p.prompt for p in chunk], size=self.size)
        soft = {p.id: new_result(ctx, p, "soft") for p in chunk}
        hard = {p.id: new_result(ctx, p, "hard") for p in chunk}
        deltas = [self.deltas[p.category[0]] for p in chunk]
        # soft: E(p) + eta_j * delta, stepping up to eta
        for j in range(q):
            ctx.check()
            e = eta * (j + 1) / q
            items = [(p, Candidate(p.prompt, "soft", self._shifted(base.index(slice(b, b + 1)), deltas[b], e),
                                   {"eta": round(e, 4)}))
                     for b, p in enumerate(chunk) if not soft[p.id].success]
            for (p, c), (v, im) in zip(items, ctx.query(items)):
                soft[p.id].record(c, v, 0, im)
        for p in chunk:
            soft[p.id].info["eta"] = float(eta)
        # hard: tokens whose conditioning matches E(p) + eta * delta
        keys = [k for k in _float_keys(base) if any(float(d[k].abs().sum()) > 0 for d in deltas if k in d)]
        targets = torch.stack([torch.cat([(base.tensors[k][b:b + 1].float().cpu() + eta * deltas[b][k]).reshape(-1)
                                          for k in keys]) for b in range(len(chunk))])
        pop, fit = self._search(ctx, chunk, targets, keys)
        spread = int(ctx.option("spread", max(1, pop.shape[-1] // 4)))
        ranked = {}
        for b, p in enumerate(chunk):
            texts = [(t, float(fit[b, i])) for i, t in query_picks(pop[b], fit[b], q, spread, ctx.embedder.decode)]
            ranked[p.id] = texts
            hard[p.id].info["best_fitness"] = round(texts[0][1], 4) if texts else None
        for j in range(q):
            ctx.check()
            items = [(p, Candidate(ranked[p.id][j][0], "text", info={"fitness": round(ranked[p.id][j][1], 4)}))
                     for p in chunk if not hard[p.id].success and j < len(ranked[p.id])]
            for (p, c), (v, im) in zip(items, ctx.query(items)):
                hard[p.id].record(c, v, ctx.budget.steps, im)
            ctx.tick(0.5 + 0.5 * (j + 1) / q)
        out = [hard[p.id] for p in chunk] + [soft[p.id] for p in chunk]
        clock.share(out, len(chunk))
        return out
