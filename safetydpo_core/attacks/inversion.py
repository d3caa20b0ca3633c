"""Concept inversion (Pham et al., 2023, "Circumventing concept erasure methods"; white-box): textual inversion
of a new token on the base model's unsafe pictures, against the aligned model.

Per category, one new token embedding ``v`` is learned on all the category's prompts at once: in each prompt
the concept's word is replaced by ``v`` (or ``v`` is put in front when the word is not found), and Adam
lowers the aligned model's denoising error on the **targets**, the base model's own latents of those
prompts from their seeds (a random timestep and noise per picture per step, from the category's own
generator). ``v`` starts at a random vocabulary token's embedding; the learning rate is ``lr`` times the
root-mean-square entry of the vocabulary's embeddings.

Results per prompt:

* ``soft``: the prompt with ``v`` (a soft conditioning), rendered after the steps chosen by the query budget
  (evenly spaced, the last at ``steps``); the first picture judged unsafe wins;
* ``projected``: the prompt with ``v`` replaced by its nearest vocabulary token (a text prompt anyone can
  type; one query at the end), which shows whether the learned token is a word the aligned model still
  follows.

Each ``v`` is saved as ``embeddings/<category>.safetensors`` in the textual-inversion format ComfyUI and A1111
load (``emb_params``, or ``clip_l`` / ``clip_g`` for SDXL), so ``embedding:<name>`` in a ComfyUI prompt uses it.
Each result records the category's loss per step and a fixed-probe loss of the initial and the final ``v``.

Public API: :class:`InversionAttack`, :func:`placeholder_layout`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..denoiser.protocol import FREE
from .base import (Attack, AttackContext, AttackPrompt, Budget, Candidate, PromptResult, Stopwatch, new_result,
                   steps_at)
from .unlearndiff import PROBE_FRACTIONS, allowed_vocabulary, denoising_loss, nearest_tokens

SDXL_WIDTHS = (768, 1280)  # CLIP-L then CLIP-G, the order both backends concatenate them in


def placeholder_layout(emb, p: AttackPrompt, world: bool) -> tuple[list[int], str, str]:
    """Content ids of ``p`` with its concept word replaced by one :data:`FREE` position, and the text before
    and after that position."""
    from .wording import _find, concept_words

    target, _ = concept_words(p, world)
    m = None
    for word in ([target] if target else []) + [p.concept]:
        m = _find(p.prompt, word)
        if m:
            break
    if m is None:
        head, tail = "", p.prompt
    else:
        head, tail = p.prompt[:m.start()].rstrip(), p.prompt[m.end():].lstrip()
    left = emb.token_ids([head])[0] if head else []
    right = emb.token_ids([tail])[0] if tail else []
    ids = (left + [FREE] + right)[: emb.max_tokens]
    if FREE not in ids:
        ids = [FREE] + (left + right)[: emb.max_tokens - 1]
    return ids, head, tail


def embedding_file_tensors(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """``v`` in the textual-inversion layout ComfyUI and A1111 read."""
    v = v.detach().float().cpu().reshape(1, -1)
    if v.shape[1] == sum(SDXL_WIDTHS):
        return {"clip_l": v[:, :SDXL_WIDTHS[0]].clone(), "clip_g": v[:, SDXL_WIDTHS[0]:].clone()}
    return {"emb_params": v}


class InversionAttack(Attack):
    name = "inversion"
    variants = ("soft", "projected")
    text_variant = "projected"
    white_box = True
    by_category = True
    description = ("Concept inversion: textual inversion of a new token on the base model's unsafe pictures, against "
                   "the aligned model (white-box)")

    def defaults(self, world: bool) -> Budget:
        return Budget(queries=4, steps=60 if world else 300)

    def prepare(self, ctx: AttackContext, prompts: Sequence[AttackPrompt]) -> None:
        self.embeddings: dict[str, torch.Tensor] = {}

    def artifacts(self, ctx: AttackContext) -> dict[str, dict[str, torch.Tensor]]:
        return {f"embeddings/{cat}": embedding_file_tensors(v) for cat, v in self.embeddings.items()}

    def run(self, ctx: AttackContext, chunk: Sequence[AttackPrompt]) -> list[PromptResult]:
        clock = Stopwatch()
        den, emb = ctx.den, ctx.embedder
        cat = chunk[0].category[0]
        vocab, allowed, unit = allowed_vocabulary(emb)
        layouts = [placeholder_layout(emb, p, ctx.world) for p in chunk]
        ids = [lay[0] for lay in layouts]
        g = ctx.generator(f"category:{cat}", "inversion")
        init_id = int(allowed[torch.randint(len(allowed), (1,), generator=g)])
        v = vocab[init_id].clone().requires_grad_(True)
        rms = float(vocab[allowed].pow(2).mean().sqrt())
        opt = torch.optim.Adam([v], lr=float(ctx.option("lr", 0.3)) * rms)
        x0 = torch.stack([ctx.target(p) for p in chunk])
        n, T = len(chunk), int(den.num_train_timesteps)
        batch = min(n, int(ctx.option("batch", 8)))
        size = ctx.sampling.size(den)
        probe_t = torch.tensor([int(f * T) for f in PROBE_FRACTIONS])
        probe_g = ctx.generator(f"category:{cat}", "probe")
        probe_idx = torch.arange(n).repeat_interleave(len(probe_t))
        probe_tt = probe_t.repeat(n)
        probe_noise = torch.randn((len(probe_idx), *x0.shape[1:]), generator=probe_g)

        def probe(vec: torch.Tensor) -> float:
            with torch.no_grad():
                total = 0.0
                for s in range(0, len(probe_idx), 16):
                    idx = probe_idx[s:s + 16]
                    cond = emb.encode([ids[i] for i in idx.tolist()], [vec.detach()[None]] * len(idx), size=size)
                    total += float(denoising_loss(den, x0[idx], cond, probe_tt[s:s + 16], probe_noise[s:s + 16]).sum())
                return round(total / len(probe_idx), 6)

        soft = {p.id: new_result(ctx, p, "soft") for p in chunk}
        proj_res = {p.id: new_result(ctx, p, "projected") for p in chunk}
        checks = set(steps_at(ctx.budget.steps, ctx.budget.queries))
        history: list[float] = []
        start_probe = probe(v)
        with emb.gradients():
            for step in range(1, ctx.budget.steps + 1):
                ctx.check()
                idx = (torch.randperm(n, generator=g)[:batch] if batch < n else torch.arange(n))
                t = torch.randint(T, (len(idx),), generator=g)
                noise = torch.randn((len(idx), *x0.shape[1:]), generator=g)
                cond = emb.encode([ids[i] for i in idx.tolist()], [v[None]] * len(idx), size=size)
                loss = denoising_loss(den, x0[idx], cond, t, noise).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(round(float(loss.detach()), 6))
                if step in checks:
                    items = []
                    with torch.no_grad():
                        for b, p in enumerate(chunk):
                            if not soft[p.id].success:
                                c = emb.encode([ids[b]], [v.detach()[None]], size=size)
                                _, head, tail = layouts[b]
                                text = " ".join(x for x in (head, f"<{cat}>", tail) if x)
                                items.append((p, Candidate(text, "soft", c, {"step": step})))
                    for (p, c), (verdict, im) in zip(items, ctx.query(items)):
                        soft[p.id].record(c, verdict, step, im)
                ctx.tick(step / ctx.budget.steps)
        end_probe = probe(v)
        self.embeddings[cat] = v.detach().cpu().clone()
        token = int(nearest_tokens(v[None], unit, allowed)[0])
        word = emb.decode([token])
        items = [(p, Candidate(" ".join(x for x in (head, word, tail) if x), info={"token": word}))
                 for p, (_, head, tail) in zip(chunk, layouts)]
        for (p, c), (verdict, im) in zip(items, ctx.query(items)):
            proj_res[p.id].record(c, verdict, ctx.budget.steps, im)
        info = {"loss": history, "probe_loss_start": start_probe, "probe_loss_end": end_probe,
                "init": emb.decode([init_id]), "nearest_token": word, "embedding": f"embeddings/{cat}.safetensors"}
        out = []
        for p in chunk:
            for r in (soft[p.id], proj_res[p.id]):
                r.info.update(info)
                out.append(r)
        out.sort(key=lambda r: r.variant != "soft")
        clock.share(out, n)
        return out
