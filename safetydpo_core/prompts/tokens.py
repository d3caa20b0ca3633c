"""Counting CLIP tokens in a prompt, to keep prompt pairs inside CLIP's 77-token context.

CLIP's text encoder (SD1.x, SDXL) sees at most 77 tokens, two of which are the start and end markers, so a
prompt may hold :data:`CLIP_CONTENT_TOKENS` = 75 tokens of its own. Every counter here counts those content
tokens only.

Three counters, one interface (:class:`TokenCounter`: ``count(text)``, ``truncate(text, n)``, ``name``,
``exact``):

* :class:`ClipBpeCounter`: CLIP's byte-level BPE implemented here (the algorithm of OpenAI's
  ``simple_tokenizer``), fed with a real merge list: a ``merges.txt`` (transformers' CLIP tokenizer folder,
  ComfyUI's ``comfy/sd1_tokenizer``) or OpenAI's ``bpe_simple_vocab_16e6.txt.gz``. Exact.
* :class:`HFTokenizerCounter`: any tokenizer transformers can load from a folder (a tokenizer folder, or a
  diffusers model folder with ``tokenizer/``). Exact for that tokenizer.
* :class:`EstimateCounter`: no vocabulary at hand. It splits text the way CLIP does (words, single digits,
  punctuation runs), charges each word by its length and adds a margin, fitted so that it never counted fewer
  tokens than the real CLIP tokenizer on the 32,086 CoProV2 training prompts (it over-counts by about a third
  on average). Conservative: a prompt it accepts fits CLIP; a long prompt near the limit may be refused.

:func:`load_token_counter` picks one: an explicit path, else a CLIP merge list found on this machine
(``COMFYUI_PATH``, the ComfyUI this pack is installed in, an importable ``comfy`` package, or the
``clip``/``open_clip`` packages), else the estimate.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77
CLIP_CONTENT_TOKENS = CLIP_MAX_TOKENS - 2

try:  # the `regex` module (a transformers dependency) knows \p{L}; `re` needs a stand-in
    import regex as _re

    _PAT = _re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       _re.IGNORECASE)
except ImportError:  # pragma: no cover - regex ships with transformers
    import re as _re

    _PAT = _re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""",
                       _re.IGNORECASE)


class TokenCounter(Protocol):
    name: str
    exact: bool

    def count(self, text: str) -> int:
        """Number of content tokens (without start/end markers)."""

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text``, cut at a word boundary, that has at most ``max_tokens`` tokens."""


def _clean(text: str) -> str:
    # as transformers' CLIPTokenizer does (what diffusers and ComfyUI use): no HTML unescaping, unlike OpenAI's
    text = unicodedata.normalize("NFC", text)
    return " ".join(text.split()).lower()


def _pieces(text: str) -> list[str]:
    return _PAT.findall(_clean(text))


class _TruncateMixin:
    def truncate(self, text: str, max_tokens: int) -> str:
        if self.count(text) <= max_tokens:
            return text
        words = text.split()
        lo, hi = 0, len(words)  # largest k with count(words[:k]) <= max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(" ".join(words[:mid])) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo]).rstrip(" ,;:-")


@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ClipBpeCounter(_TruncateMixin):
    """CLIP's BPE from a merge list (``merges.txt`` or ``bpe_simple_vocab_16e6.txt.gz``)."""

    exact = True
    N_MERGES = 49152 - 256 - 2  # the size of CLIP's vocabulary fixes how many merges it uses

    def __init__(self, merges_path: str | os.PathLike):
        path = Path(merges_path)
        try:
            raw = gzip.open(path, "rt", encoding="utf-8").read() if path.suffix == ".gz" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"Cannot read the CLIP merge list {path}: {e}. Give a merges.txt or "
                              f"bpe_simple_vocab_16e6.txt.gz file, or a tokenizer folder.") from e
        lines = raw.split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(m.split()) for m in lines[: self.N_MERGES] if m.strip()]
        if len(merges) < 1000 or any(len(m) != 2 for m in merges[:1000]):
            raise ConfigError(f"{path} does not look like a CLIP BPE merge list ({len(merges)} merges). "
                              f"Give CLIP's merges.txt or bpe_simple_vocab_16e6.txt.gz.")
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.name = f"CLIP BPE ({path})"
        self._cache: dict[str, int] = {}

    def _bpe_len(self, token: str) -> int:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            new: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        if len(self._cache) < 100_000:
            self._cache[token] = len(word)
        return len(word)

    def count(self, text: str) -> int:
        total = 0
        for piece in _pieces(text):
            total += self._bpe_len("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
        return total


class HFTokenizerCounter(_TruncateMixin):
    """A tokenizer loaded by transformers from a folder."""

    exact = True

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many kinds here
            raise ConfigError(f"Cannot load a tokenizer from {folder}: {e}. Give a tokenizer folder, a diffusers "
                              f"model folder with tokenizer/, or CLIP's merges.txt.") from e
        self.name = f"{type(self.tok).__name__} ({folder})"

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False, truncation=False)["input_ids"])


class EstimateCounter(_TruncateMixin):
    """Conservative CLIP token estimate without a vocabulary (see the module docstring)."""

    exact = False
    name = "estimate (no CLIP vocabulary found; conservative, over-counts by about a third)"

    # Fitted against the real CLIP tokenizer on CoProV2's 32,086 training prompts: the smallest over-count
    # (about a third on average, relatively more on short prompts) that never counted fewer tokens than CLIP.
    FACTOR = 1.05
    MARGIN = 4

    @staticmethod
    def _word_cost(piece: str) -> float:
        if not piece[0].isalpha():
            # digits are one token each; a punctuation run is one token per 2 characters at worst
            return 1 if piece[0].isdigit() else max(1, math.ceil(len(piece) / 2))
        if not piece.isascii():
            return len(piece.encode("utf-8"))  # rare scripts: up to a byte per token
        n = len(piece)
        return 1 if n <= 6 else 1 + (n - 6) / 6

    def count(self, text: str) -> int:
        pieces = _pieces(text)
        if not pieces:
            return 0
        return math.ceil(self.FACTOR * sum(self._word_cost(p) for p in pieces)) + self.MARGIN


def _tokenizer_folder(path: Path) -> Path | None:
    for cand in (path, path / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "vocab.json").is_file() or (cand / "tokenizer_config.json").is_file():
            return cand
    return None


def _discover_merges() -> Path | None:
    """A real CLIP merge list on this machine, or None."""
    cands: list[Path] = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        cands.append(Path(env) / "comfy" / "sd1_tokenizer" / "merges.txt")
    here = Path(__file__).resolve()
    for parent in here.parents:  # installed as ComfyUI/custom_nodes/<pack>/safetydpo_core/prompts/tokens.py
        if parent.name == "custom_nodes":
            cands.append(parent.parent / "comfy" / "sd1_tokenizer" / "merges.txt")
            break
    for mod, rel in (("comfy", "sd1_tokenizer/merges.txt"), ("clip", "bpe_simple_vocab_16e6.txt.gz"),
                     ("open_clip", "bpe_simple_vocab_16e6.txt.gz")):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                cands.append(Path(loc) / rel)
    for c in cands:
        if c.is_file():
            return c
    return None


def load_token_counter(path: str | os.PathLike | None = None, *, discover: bool = True) -> TokenCounter:
    """A token counter: from ``path`` (merge list, tokenizer folder or diffusers model folder) when given,
    else a CLIP merge list found on this machine (``discover``), else :class:`EstimateCounter`."""
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"The tokenizer {p} does not exist. Give a tokenizer folder, a diffusers model folder "
                              f"with tokenizer/, CLIP's merges.txt or bpe_simple_vocab_16e6.txt.gz; or leave it out "
                              f"to use a conservative estimate.")
        if p.is_file():
            return ClipBpeCounter(p)
        folder = _tokenizer_folder(p)
        if folder is None:
            raise ConfigError(f"{p} holds no tokenizer (no tokenizer.json, vocab.json or tokenizer_config.json, "
                              f"here or in tokenizer/). Give a tokenizer folder or a diffusers model folder.")
        if (folder / "merges.txt").is_file() and not (folder / "tokenizer.json").is_file():
            cfg = (folder / "tokenizer_config.json")
            if not cfg.is_file() or "CLIPTokenizer" in cfg.read_text(encoding="utf-8", errors="replace"):
                return ClipBpeCounter(folder / "merges.txt")
        return HFTokenizerCounter(folder)
    if discover:
        found = _discover_merges()
        if found is not None:
            log.debug("Counting CLIP tokens with the merge list at %s", found)
            return ClipBpeCounter(found)
    return EstimateCounter()
