"""Concept prompts: what concept erasure (ESD, UCE) trains on instead of a preference dataset.

A :class:`ConceptPrompts` is the data source of the ESD trainer (:mod:`.esd`): a list of prompts that
name the concept(s) to erase, plus the picture size the reference's partial generations are made at. It
offers what the trainer needs of a data source (``len``, ``fingerprint()`` for checkpoints, ``categories``
for the LoRA's metadata). It comes from a concept list typed by a user (``"gun, rifle"``), or from the
unsafe prompts of a preference dataset (``safetydpo train --objective esd``).

Also here, for every erasure method: :func:`split_concepts` (a comma/newline-separated list into concept
strings) and :func:`check_tokens` (refuse a concept the model's tokenizer turns into nothing). Their errors
name the input (``concepts``, ``guide``, ``preserve``), which is also the name of the command-line flag and
of the node input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Iterable, Sequence

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..denoiser.protocol import Denoiser


def split_concepts(value: str | Iterable[str] | None, what: str = "concepts", allow_empty: bool = False) -> list[str]:
    """``"gun, rifle"`` (commas, semicolons or new lines) or a list -> ``["gun", "rifle"]``, blanks dropped.

    An empty result is a :class:`ConfigError` naming ``what`` unless ``allow_empty``.
    """
    if value is None:
        items: list[str] = []
    elif isinstance(value, str):
        items = [value]
        for sep in ("\n", ";", ","):
            items = [part for item in items for part in item.split(sep)]
    else:
        items = [str(v) for v in value]
    out = [" ".join(v.split()) for v in items]
    out = [v for v in out if v]
    if not out and not allow_empty:
        raise ConfigError(f"{what}: the list of concepts is empty. Give at least one concept, e.g. \"gun, rifle\" "
                          f"(separated by commas, semicolons or new lines).")
    return out


def check_tokens(denoiser: Denoiser, concepts: Sequence[str], what: str = "concepts") -> list[int]:
    """Text-token counts of ``concepts``; a :class:`ConfigError` naming ``what`` and the concept when the
    model's tokenizer turns one into nothing (only start/end/unknown tokens)."""
    counts = denoiser.prompt_token_counts(list(concepts))
    empty = [c for c, n in zip(concepts, counts) if n == 0]
    if empty:
        raise ConfigError(f"{what}: {empty[0]!r} turns into no tokens with this model's tokenizer (nothing but "
                          f"unknown or special characters), so it names no concept the model knows. Use words "
                          f"the model's tokenizer knows.")
    return counts


@dataclasses.dataclass(frozen=True)
class ConceptPrompts:
    """Prompts naming the concepts to erase; the ESD trainer's data source.

    ``size`` is (height, width) in pixels of the partial generations (None: the model's default size);
    ``categories`` only labels the result (LoRA metadata).
    """

    prompts: tuple[str, ...]
    size: tuple[int, int] | None = None
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(split_concepts(list(self.prompts))))
        if self.size is not None:
            h, w = (int(v) for v in self.size)
            if h <= 0 or w <= 0:
                raise ConfigError(f"size must be positive (height, width) in pixels; got {self.size!r}.")
            object.__setattr__(self, "size", (h, w))
        object.__setattr__(self, "categories", tuple(self.categories or ()))

    @classmethod
    def from_text(cls, concepts: str | Iterable[str], size: tuple[int, int] | None = None,
                  categories: Iterable[str] = (), what: str = "concepts") -> "ConceptPrompts":
        return cls(tuple(split_concepts(concepts, what)), size, tuple(categories))

    @classmethod
    def from_dataset(cls, dataset) -> "ConceptPrompts":
        """The distinct unsafe prompts of a :class:`~safetydpo_core.data.preference_dataset.PreferenceDataset`
        (in record order), at the size of its first record."""
        prompts = list(dict.fromkeys(r.unsafe for r in dataset.records))
        if not prompts:
            raise ConfigError(f"The dataset {getattr(dataset, 'root', '')} has no unsafe prompts to erase.")
        first = dataset.records[0]
        size = (first.height, first.width) if first.height and first.width else None
        return cls(tuple(prompts), size, tuple(dataset.categories or ()))

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """Digest of the prompts and size (a checkpoint records it; a resume must see the same)."""
        blob = json.dumps({"prompts": list(self.prompts), "size": list(self.size) if self.size else None})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check(self, denoiser: Denoiser, what: str = "concepts") -> None:
        """Refuse prompts the model's tokenizer turns into nothing."""
        check_tokens(denoiser, self.prompts, what)
