"""The :class:`~safetydpo_core.denoiser.protocol.PromptEmbedder` of the ComfyUI backend: token-level access to
the graph's ``CLIP`` (CLIP-L for SD1.x, CLIP-H for SD2.x, CLIP-L + CLIP-G for SDXL, CLIP-G for the refiner).

It goes through ComfyUI's own text encoders (each ``SDClipModel`` of the ``CLIP``, with the clip options,
loading and execution device that ``CLIP.encode_from_tokens`` sets), whose token lists may hold embedding
tensors in place of ids (that is how ComfyUI applies textual-inversion embeddings): a position whose input
embedding is given becomes such a tensor, every other position keeps its id, so the attention mask, the end
token's position and the pooled output are computed exactly as for a typed prompt. Many sequences go
through one forward as a batch (which ``encode_from_tokens`` cannot do: it joins sections into one prompt). For SDXL
an input embedding is the concatenation of the CLIP-L and CLIP-G token embeddings (the two tokenizers
share one vocabulary), CLIP-L first as in the diffusers backend; the conditioning is assembled as
:meth:`.comfy_denoiser.ComfyDenoiser.encode_prompts` assembles it.

Gradients: ComfyUI builds a graph's models inside ``torch.inference_mode()``, and autograd cannot save
inference tensors for backward; its CLIP layers also add to their input in place, so the CLIP runs with
autograd saving copies of what it keeps for backward. Inside :meth:`ComfyPromptEmbedder.gradients` every weight of the CLIP gets a
parameter-free identity weight function (ComfyUI's ops then work on a normal copy of each weight, as its
own trainer arranges for the diffusion model), the denoiser's working clone of the ``MODEL`` gets identity
weight wrappers (:class:`.comfy_lora_adapter.ComfyLoraAdapter` with no trained layer) and its ``predict``
keeps the caller's grad mode; on the way out everything is taken off again and the graph's models are as
they were.

ComfyUI is imported inside functions only (it is not needed here at all: the objects are given).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ._core import from_core
from .comfy_lora_adapter import ComfyLoraAdapter, IdentityWrapper

if TYPE_CHECKING:
    from .comfy_denoiser import ComfyDenoiser

# the core, whichever way the pack was imported (nodes/_core.py)
FREE, Conditioning = from_core("denoiser.protocol", "FREE", "Conditioning")
ConfigError, ModelError = from_core("errors", "ConfigError", "ModelError")

_SDXL_SIZE_KEYS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
BATCH = 64  # sequences per text-encoder forward


@dataclasses.dataclass
class _Encoder:
    key: str            # the tokenizer/encoder key ("l", "g", "h")
    tokenizer: object   # ComfyUI's SDTokenizer (its .tokenizer is the transformers CLIPTokenizer)
    module: object      # ComfyUI's SDClipModel
    start: int
    end: int
    pad: int
    length: int
    width: int
    offset: int


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class ComfyPromptEmbedder:
    """Token-level access to a :class:`~.comfy_denoiser.ComfyDenoiser`'s ``CLIP``."""

    def __init__(self, denoiser: ComfyDenoiser):
        clip = denoiser.clip
        if clip is None:
            raise ConfigError("This model has no CLIP attached; connect the CLIP of the checkpoint for the attack.")
        self.den = denoiser
        self.clip = clip
        try:
            keys = sorted(clip.tokenize("").keys(), key=lambda k: {"l": 0, "h": 1, "g": 2}.get(k, 3))
        except Exception as e:  # noqa: BLE001 - any CLIP we cannot read token by token
            raise ModelError(f"This CLIP ({type(clip.cond_stage_model).__name__}) cannot be read token by token: {e}") from e
        self.encoders: list[_Encoder] = []
        offset = 0
        csm = clip.cond_stage_model
        for k in keys:
            tk = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", f"clip_{k}"), None)
            mod = getattr(csm, getattr(csm, "clip", f"clip_{k}"), None)
            emb = getattr(getattr(mod, "transformer", None), "get_input_embeddings", None)
            if tk is None or mod is None or emb is None or getattr(tk, "start_token", None) is None \
                    or getattr(tk, "end_token", None) is None:
                raise ModelError(f"Token-level attacks support the CLIP text encoders of SD1.x, SD2.x and SDXL; this "
                                 f"CLIP ({type(csm).__name__}, key {k!r}) is not one of them.")
            width = int(emb().weight.shape[-1])
            self.encoders.append(_Encoder(k, tk, mod, int(tk.start_token), int(tk.end_token), int(tk.pad_token),
                                          int(tk.max_length), width, offset))
            offset += width
        first = self.encoders[0].tokenizer.tokenizer.get_vocab()
        for e in self.encoders[1:]:
            if e.tokenizer.tokenizer.get_vocab() != first:
                raise ModelError("This CLIP's tokenizers have different vocabularies; token-level attacks need one.")
        self.dim = offset
        self.max_tokens = min(e.length for e in self.encoders) - 2
        self.vocab_size = len(first)
        self._grad = False
        self._identity = IdentityWrapper()
        self._wrapped: list = []

    # -- vocabulary and text ------------------------------------------------------------------------
    @torch.no_grad()
    def vocabulary(self) -> torch.Tensor:
        with torch.inference_mode(False):
            self.clip.load_model()
            rows = [e.module.transformer.get_input_embeddings().weight.detach().float().cpu().clone()
                    for e in self.encoders]
        n = min(r.shape[0] for r in rows)
        return torch.cat([r[:n] for r in rows], dim=-1)

    def special_ids(self) -> set[int]:
        out: set[int] = set()
        for e in self.encoders:
            out.update({e.start, e.end, e.pad})
            out.update(int(i) for i in e.tokenizer.tokenizer.all_special_ids)
        return out

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        hf = self.encoders[0].tokenizer.tokenizer
        return [list(map(int, hf(str(p), add_special_tokens=False)["input_ids"]))[: self.max_tokens] for p in prompts]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.encoders[0].tokenizer.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return " ".join(text.split())

    # -- conditioning -------------------------------------------------------------------------------
    def _sections(self, seqs: list[list[int]], rows: list[torch.Tensor | None]) -> dict:
        """Per encoder key, one token list per sequence (ids, and the given rows in the FREE positions), in
        the form ComfyUI's ``SDClipModel`` takes (its callers strip the weights off first)."""
        tokens = {}
        for e in self.encoders:
            sections = []
            for seq, f in zip(seqs, rows):
                lst, r = [e.start], 0
                for i in seq:
                    if i == FREE:
                        lst.append(f[r, e.offset:e.offset + e.width])
                        r += 1
                    else:
                        lst.append(int(i))
                lst.append(e.end)
                lst += [e.pad] * (e.length - len(lst))
                sections.append(lst)
            tokens[e.key] = sections
        return tokens

    def _forward(self, seqs: list[list[int]], rows: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cond [n, L, D], pooled [n, P] or None)`` for a batch of sequences: what ``CLIP.encode_from_tokens``
        computes for each (its clip options, loading and execution device; each encoder's forward; the
        encoders' states joined as ComfyUI joins them: CLIP-L then CLIP-G, pooled from the last), but with the
        sequences as one batch (``encode_from_tokens`` would join them into one long prompt)."""
        import comfy.model_management as mm

        clip, csm = self.clip, self.clip.cond_stage_model
        csm.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            csm.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()
        if self._grad:
            self._wrap_clip()
        csm.set_clip_options({"execution_device": clip.patcher.load_device})
        sections = self._sections(seqs, rows)
        outs = [e.module(sections[e.key]) for e in self.encoders]
        zs = [o[0] for o in outs]
        cut = min(z.shape[1] for z in zs)
        cond = torch.cat([z[:, :cut] for z in zs], dim=-1)
        pooled = outs[-1][1] if len(outs[-1]) > 1 else None
        dev = mm.intermediate_device()
        return cond.to(dev), (pooled.to(dev) if pooled is not None else None)

    def encode(self, ids: Sequence[Sequence[int]], free: Sequence[torch.Tensor | None] | None = None,
               size: tuple[int, int] | None = None) -> Conditioning:
        import comfy.conds

        ids = [list(map(int, s)) for s in ids]
        if not ids:
            raise ConfigError("No token sequences to encode.")
        free = list(free) if free is not None else [None] * len(ids)
        if len(free) != len(ids):
            raise ConfigError(f"{len(ids)} token sequences but {len(free)} free-embedding tensors.")
        for b, (s, f) in enumerate(zip(ids, free)):
            if len(s) > self.max_tokens:
                raise ConfigError(f"A token sequence has {len(s)} tokens; this CLIP takes at most {self.max_tokens}.")
            n = sum(1 for i in s if i == FREE)
            if n != (0 if f is None else int(f.shape[0])) or (f is not None and (f.dim() != 2 or f.shape[1] != self.dim)):
                raise ConfigError(f"Sequence {b} has {n} free positions but the free embeddings have shape "
                                  f"{None if f is None else tuple(f.shape)}; give [{n}, {self.dim}].")
        with torch.inference_mode(False), torch.set_grad_enabled(self._grad and torch.is_grad_enabled()):
            conds, pooled = [], []
            # ComfyUI's CLIP layers add to their input in place (x += attention(norm(x))), which autograd
            # refuses when it saved that input; saving copies makes the forward differentiable as it is.
            saving = (torch.autograd.graph.saved_tensors_hooks(torch.clone, _same) if torch.is_grad_enabled()
                      else contextlib.nullcontext())
            with saving:
                for i in range(0, len(ids), BATCH):
                    cond, pool = self._forward(ids[i:i + BATCH], free[i:i + BATCH])
                    conds.extend(cond.float().split(1))
                    pooled.extend([None] * cond.shape[0] if pool is None else pool.float().split(1))
            first = comfy.conds.CONDCrossAttn(conds[0])
            cross = first.concat([comfy.conds.CONDCrossAttn(c) for c in conds[1:]]) if len(conds) > 1 else conds[0]
            tensors = {"c_crossattn": cross.float().cpu()}
            if self.den.is_sdxl:
                if any(p is None for p in pooled):
                    raise ModelError("This CLIP gives no pooled output, which SDXL needs; use the checkpoint's CLIP.")
                h, w = size or self.den.default_size
                pooled_b = torch.cat(pooled, 0).float()
                sizes = {"height": h, "width": w, "crop_h": 0, "crop_w": 0, "target_height": h, "target_width": w}
                y = self.den.patcher.model.encode_adm(pooled_output=pooled_b, device=pooled_b.device,
                                                      prompt_type="positive", **sizes)
                tensors["y"] = y.float().cpu()
                tensors["pooled_output"] = pooled_b.cpu()
                tensors["size"] = torch.tensor([[sizes[k] for k in _SDXL_SIZE_KEYS]] * len(ids), dtype=torch.float32)
        return Conditioning(tensors)

    # -- gradients ----------------------------------------------------------------------------------
    def _wrap_clip(self) -> None:
        """An identity weight function on every weight of the CLIP (again after ComfyUI reloaded it)."""
        for m in self.clip.cond_stage_model.modules():
            for attr, param in (("weight_function", "weight"), ("bias_function", "bias")):
                if not hasattr(m, attr) or getattr(m, param, None) is None:
                    continue
                fns = m.__dict__.get(attr, getattr(m, attr))
                if not any(f is self._identity for f in fns):
                    m.__dict__[attr] = list(fns) + [self._identity]
                    self._wrapped.append((m, attr))

    def _unwrap_clip(self) -> None:
        for m, attr in self._wrapped:
            fns = m.__dict__.get(attr)
            if fns:
                m.__dict__[attr] = [f for f in fns if f is not self._identity]
        self._wrapped = []

    @contextlib.contextmanager
    def gradients(self) -> Iterator[None]:
        den = self.den
        adapter = None
        with torch.inference_mode(False):
            if den.adapter is None:  # identity wrappers on the working clone, so backward works through it
                adapter = ComfyLoraAdapter(den._working(), [], rank=1, device=den.device)
            prev = den._input_grads
            den._input_grads, self._grad = True, True
            try:
                with torch.enable_grad():
                    yield
            finally:
                self._grad = False
                den._input_grads = prev
                self._unwrap_clip()
                if adapter is not None:
                    adapter.remove()
