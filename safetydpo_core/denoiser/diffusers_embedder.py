"""The :class:`~.protocol.PromptEmbedder` of the diffusers backend: token-level access to its CLIP text encoders.

Conditioning from token ids with some positions given as input embeddings is computed by the ordinary
text-encoder forward on the ids, with a forward hook on each encoder's token-embedding layer that puts the
given rows in place of the looked-up ones (so attention masks, the position of the end token and the
pooled output work exactly as for a typed prompt). The result is assembled as
:meth:`~.diffusers_backend.DiffusersDenoiser.encode_prompts` assembles it: the last hidden states (SD1.x/2.x)
or the penultimate hidden states of both encoders concatenated, the pooled CLIP-G embedding and the size
``time_ids`` (SDXL). With several encoders an input embedding is the concatenation of the encoders'
token embeddings, in the order of the encoders.

The encoders' weights are frozen when they are loaded, so gradients reach the given rows without further
preparation: :meth:`DiffusersPromptEmbedder.gradients` does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ..errors import ConfigError, ModelError
from .protocol import FREE, Conditioning


class DiffusersPromptEmbedder:
    """Token-level access to a :class:`~.diffusers_backend.DiffusersDenoiser`'s text encoder(s)."""

    def __init__(self, denoiser):
        self.den = denoiser
        self.tokenizers = list(denoiser.parts.tokenizers)
        self.encoders = list(denoiser.parts.text_encoders)
        if not self.tokenizers or len(self.tokenizers) != len(self.encoders):
            raise ModelError("This model has no text encoder to attack through.")
        first = self.tokenizers[0].get_vocab()
        for tok in self.tokenizers[1:]:
            if tok.get_vocab() != first:
                raise ModelError("This model's tokenizers have different vocabularies; token-level attacks need "
                                 "one shared vocabulary (as SD1.x, SD2.x and SDXL have).")
        self.widths = [int(enc.get_input_embeddings().embedding_dim) for enc in self.encoders]
        self.dim = sum(self.widths)
        self.lengths = [int(tok.model_max_length) for tok in self.tokenizers]
        self.max_tokens = min(self.lengths) - 2
        self.vocab_size = len(first)

    # -- vocabulary and text ------------------------------------------------------------------------
    @torch.no_grad()
    def vocabulary(self) -> torch.Tensor:
        rows = [enc.get_input_embeddings().weight.detach().float().cpu() for enc in self.encoders]
        n = min(r.shape[0] for r in rows)
        return torch.cat([r[:n] for r in rows], dim=-1)

    def special_ids(self) -> set[int]:
        out: set[int] = set()
        for tok in self.tokenizers:
            out.update(int(i) for i in tok.all_special_ids)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
                v = getattr(tok, name, None)
                if v is not None:
                    out.add(int(v))
        return out

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizers[0]
        ids = tok(list(prompts), add_special_tokens=False, truncation=False).input_ids
        return [list(map(int, row))[: self.max_tokens] for row in ids]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizers[0].decode([int(i) for i in ids], skip_special_tokens=True)
        return " ".join(text.split())

    # -- conditioning -------------------------------------------------------------------------------
    def _layout(self, ids: Sequence[Sequence[int]], index: int) -> torch.Tensor:
        tok, length = self.tokenizers[index], self.lengths[index]
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        placeholder = 0 if eos != 0 else 1  # any id but the end token (the pooled output looks for it)
        rows = []
        for seq in ids:
            content = [placeholder if int(i) == FREE else int(i) for i in seq]
            rows.append([bos] + content + [eos] + [pad] * (length - len(content) - 2))
        return torch.tensor(rows, dtype=torch.long, device=self.den.device)

    def encode(self, ids: Sequence[Sequence[int]], free: Sequence[torch.Tensor | None] | None = None,
               size: tuple[int, int] | None = None) -> Conditioning:
        ids = [list(map(int, s)) for s in ids]
        if not ids:
            raise ConfigError("No token sequences to encode.")
        for s in ids:
            if len(s) > self.max_tokens:
                raise ConfigError(f"A token sequence has {len(s)} tokens; this model's text encoder takes at most "
                                  f"{self.max_tokens} (besides its start and end tokens).")
        free = list(free) if free is not None else [None] * len(ids)
        if len(free) != len(ids):
            raise ConfigError(f"{len(ids)} token sequences but {len(free)} free-embedding tensors.")
        mask = torch.zeros(len(ids), max(self.lengths), dtype=torch.bool)
        given = []
        for b, (s, f) in enumerate(zip(ids, free)):
            pos = [j + 1 for j, i in enumerate(s) if i == FREE]
            n = 0 if f is None else int(f.shape[0])
            if len(pos) != n or (f is not None and (f.dim() != 2 or f.shape[1] != self.dim)):
                raise ConfigError(f"Sequence {b} has {len(pos)} free positions but the free embeddings have shape "
                                  f"{None if f is None else tuple(f.shape)}; give [{len(pos)}, {self.dim}].")
            mask[b, pos] = True
            if n:
                given.append(f)
        rows = torch.cat(given, 0) if given else None
        hidden, pooled, offset = [], None, 0
        for i, enc in enumerate(self.encoders):
            layout = self._layout(ids, i)
            width = self.widths[i]
            part = None if rows is None else rows[:, offset:offset + width]
            offset += width
            hook = None
            if part is not None:
                m = mask[:, : layout.shape[1]].to(layout.device)

                def put(_module, _inputs, output, m=m, part=part):
                    out = output.clone()
                    out[m] = part.to(out.device, out.dtype)
                    return out

                hook = enc.get_input_embeddings().register_forward_hook(put)
            try:
                if self.den.is_sdxl:
                    out = enc(layout, output_hidden_states=True)
                    hidden.append(out.hidden_states[-2])
                    if i == len(self.encoders) - 1:
                        pooled = out[0]
                else:
                    hidden.append(enc(layout)[0])
            finally:
                if hook is not None:
                    hook.remove()
        dtype = self.den.dtype
        tensors = {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(dtype)}
        if self.den.is_sdxl:
            h, w = size or (self.den.sample_size, self.den.sample_size)
            tensors["text_embeds"] = pooled.to(dtype)
            tensors["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=self.den.device).repeat(len(ids), 1)
        return Conditioning(tensors)

    @contextlib.contextmanager
    def gradients(self) -> Iterator[None]:
        with torch.enable_grad():
            yield
