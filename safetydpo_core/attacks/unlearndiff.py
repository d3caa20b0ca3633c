"""UnlearnDiffAtk (Zhang et al., 2023; white-box): prepended tokens optimised so that the aligned model denoises
the base model's own unsafe picture of the prompt.

For each prompt, ``tokens`` (k) free token embeddings are put before the prompt's tokens. Each step draws a
timestep and noise (from the prompt's own generator), noises the **target** (the base model's latent of the
prompt from the prompt's seed) and takes an Adam step on the free embeddings to lower the aligned model's
denoising error ``||pred(x_t, c(adv + prompt), t) − target||²``. As in the paper (and PEZ), the forward pass
uses the embeddings **projected** to their nearest vocabulary tokens (cosine), and the gradient is applied
to the continuous embeddings (straight-through), so the result is always a real text prompt. After the
steps chosen by the query budget (evenly spaced, the last at ``steps``), the current projected prompt (the
decoded tokens, then the prompt) is rendered from the prompt's seed and judged; the first success stops
that prompt. Learning rate: ``lr`` times the root-mean-square entry of the vocabulary's embeddings.

Each result records the loss of every step and a fixed-probe loss (the same timesteps and noise) of the
initial and of the final projected tokens.

Public API: :class:`UnlearnDiffAttack`, :func:`nearest_tokens`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..denoiser.protocol import FREE, Denoiser
from .base import (Attack, AttackContext, AttackPrompt, Budget, Candidate, PromptResult, Stopwatch, new_result,
                   steps_at)

PROBE_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def nearest_tokens(e: torch.Tensor, vocab_unit: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Ids (from ``allowed``) of the vocabulary rows nearest in cosine to each row of ``e`` ``[..., D]``."""
    sims = torch.nn.functional.normalize(e.detach().float(), dim=-1) @ vocab_unit.T
    return allowed[sims.argmax(-1)]


def allowed_vocabulary(emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vocabulary [V, D], allowed ids (no special tokens), unit rows of the allowed vocabulary)."""
    vocab = emb.vocabulary()
    special = emb.special_ids()
    allowed = torch.tensor([i for i in range(vocab.shape[0]) if i not in special])
    return vocab, allowed, torch.nn.functional.normalize(vocab[allowed], dim=-1)


def denoising_loss(den: Denoiser, x0: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the denoiser's prediction at ``t`` for the noised ``x0``."""
    dev = den.device
    x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
    x_t = den.add_noise(x0, noise, t)
    pred = den.predict(x_t, t, cond).float()
    tgt = den.target(x0, noise, t).float()
    return ((pred - tgt) ** 2).mean(dim=tuple(range(1, pred.dim())))


class UnlearnDiffAttack(Attack):
    name = "unlearndiff"
    variants = ("text",)
    text_variant = "text"
    white_box = True
    description = ("UnlearnDiffAtk: prepended tokens, projected to the vocabulary, optimised so that the aligned model "
                   "denoises the base model's unsafe picture (white-box)")

    def defaults(self, world: bool) -> Budget:
        return Budget(queries=4, steps=40)

    def run(self, ctx: AttackContext, chunk: Sequence[AttackPrompt]) -> list[PromptResult]:
        clock = Stopwatch()
        den, emb = ctx.den, ctx.embedder
        vocab, allowed, unit = allowed_vocabulary(emb)
        k = max(1, min(int(ctx.option("tokens", 3 if ctx.world else 5)), emb.max_tokens - 1))
        own = [ids[: emb.max_tokens - k] for ids in emb.token_ids([p.prompt for p in chunk])]
        layout = [[FREE] * k + ids for ids in own]
        n = len(chunk)
        init = torch.stack([allowed[torch.randint(len(allowed), (k,), generator=ctx.generator(p, "unlearndiff-init"))]
                            for p in chunk])
        e = vocab[init].clone().requires_grad_(True)
        rms = float(vocab[allowed].pow(2).mean().sqrt())
        opt = torch.optim.Adam([e], lr=float(ctx.option("lr", 0.1)) * rms)
        x0 = torch.stack([ctx.target(p) for p in chunk])
        T = int(den.num_train_timesteps)
        gens = [ctx.generator(p, "unlearndiff-noise") for p in chunk]
        probe_t = torch.tensor([int(f * T) for f in PROBE_FRACTIONS])
        probe_noise = [torch.randn((len(probe_t), *x0.shape[1:]), generator=ctx.generator(p, "probe")) for p in chunk]
        results = {p.id: new_result(ctx, p, "text") for p in chunk}
        history: list[list[float]] = [[] for _ in chunk]
        size = ctx.sampling.size(den)
        checks = set(steps_at(ctx.budget.steps, ctx.budget.queries))

        def probe(tokens: torch.Tensor) -> list[float]:
            out = []
            with torch.no_grad():
                for b in range(n):
                    cond = emb.encode([layout[b]] * len(probe_t), [vocab[tokens[b]]] * len(probe_t), size=size)
                    loss = denoising_loss(den, x0[b:b + 1].expand(len(probe_t), *x0.shape[1:]), cond, probe_t,
                                          probe_noise[b])
                    out.append(round(float(loss.mean()), 6))
            return out

        start_probe = probe(init)
        with emb.gradients():
            for step in range(1, ctx.budget.steps + 1):
                ctx.check()
                proj = nearest_tokens(e, unit, allowed)
                e_st = e + (vocab[proj] - e).detach()
                t = torch.cat([torch.randint(T, (1,), generator=g) for g in gens])
                noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
                cond = emb.encode(layout, list(e_st), size=size)
                loss = denoising_loss(den, x0, cond, t, noise)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                for b, v in enumerate(loss.detach().cpu().tolist()):
                    history[b].append(round(v, 6))
                if step in checks:
                    proj = nearest_tokens(e, unit, allowed)
                    items = []
                    for b, p in enumerate(chunk):
                        if not results[p.id].success:
                            text = f"{emb.decode(proj[b].tolist())} {p.prompt}".strip()
                            items.append((p, Candidate(text, info={"tokens": emb.decode(proj[b].tolist())})))
                    for (p, c), (v, im) in zip(items, ctx.query(items)):
                        results[p.id].record(c, v, step, im)
                ctx.tick(step / ctx.budget.steps)
        end_probe = probe(nearest_tokens(e, unit, allowed))
        out = []
        for b, p in enumerate(chunk):
            r = results[p.id]
            r.info.update({"loss": history[b], "probe_loss_start": start_probe[b], "probe_loss_end": end_probe[b],
                           "tokens": k, "init": emb.decode(init[b].tolist())})
            out.append(r)
        clock.share(out, n)
        return out
