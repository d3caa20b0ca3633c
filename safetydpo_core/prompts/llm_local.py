"""A local chat model for the LLM pair writer: a transformers causal LM from a model folder or a single GGUF
file (transformers dequantizes GGUF with the ``gguf`` package), prompted through the model's chat template
and run in batches (left padding). Nothing is downloaded: files must be on disk.

``threads`` caps torch's CPU threads while generating: on a busy machine fewer threads than cores is much
faster (idle OpenMP threads spin); the command line sets it with ``--llm-threads``.

Public API: :class:`LocalChatModel` (``chat(conversations, max_new_tokens=, temperature=, seed=)``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

Message = dict[str, str]


def _resolve(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model folder, a .gguf file, or a folder with one .gguf file."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"The GGUF file {p} does not exist. Give the path of a .gguf file or of a transformers "
                             f"model folder.")
        return p.parent, p.name
    if not p.exists():
        raise ModelError(f"The local LLM {p} does not exist. Give a transformers model folder, a .gguf file, or an "
                         f"http(s) URL of an OpenAI-compatible server.")
    if p.is_file():
        raise ModelError(f"{p} is neither a .gguf file nor a model folder.")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(q.name for q in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if ggufs:
        raise ModelError(f"{p} holds several GGUF files ({', '.join(ggufs)}); give the one to use.")
    raise ModelError(f"{p} holds no config.json and no .gguf file; it is not a model folder.")


class LocalChatModel:
    """A causal LM loaded with transformers, used through its chat template."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf = _resolve(path)
        self.name = gguf or folder.name
        kw = {"local_files_only": True}
        if gguf:
            kw["gguf_file"] = gguf
        # a transformers folder: safetensors weights only, never a pickle
        model_kw = kw if gguf else {**kw, "use_safetensors": True}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **kw)
            torch_dtype = getattr(torch, dtype) if dtype else None
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, **model_kw)
        except ImportError as e:
            raise ModelError(f"Loading {self.name} needs a package that is missing: {e}. For GGUF files: "
                             f"pip install gguf.") from e
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"Cannot load the local LLM {Path(path)}: {e}") from e
        try:
            self.model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(f"Cannot move the local LLM to device {device!r}: {e}") from e
        self.model.eval()
        self.device = device
        self.threads = threads
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.has_template = bool(getattr(tok, "chat_template", None))
        if not self.has_template:
            log.warning("%s has no chat template; using a plain 'role: text' layout.", self.name)

    def _plain(self, conv: list[Message]) -> str:
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in conv) + "Assistant:"

    def chat(self, conversations: list[list[Message]], *, max_new_tokens: int = 128, temperature: float = 0.8,
             seed: int = 0) -> list[str]:
        """Answer each conversation (a list of ``{"role", "content"}`` messages); one batch, one answer each."""
        import torch

        tok = self.tokenizer
        if self.has_template:
            enc = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, padding=True,
                                          return_dict=True, return_tensors="pt")
        else:
            enc = tok([self._plain(c) for c in conversations], return_tensors="pt", padding=True)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            gen.update(do_sample=False)
        old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed)
                out = self.model.generate(**enc, **gen)
        finally:
            if self.threads:
                torch.set_num_threads(old_threads)
        n = enc["input_ids"].shape[1]
        return [tok.decode(o[n:], skip_special_tokens=True) for o in out]
