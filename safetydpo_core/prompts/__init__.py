"""Prompt pairs: the JSONL pair format (:mod:`.pairs`), the built-in writer (:mod:`.builtin_writer`, with the
concept catalogue in :mod:`.catalogue`), the LLM writers (:mod:`.llm_writer` over :mod:`.llm_local` or
:mod:`.llm_endpoint`), the checks every generated pair passes (:mod:`.checks`, CLIP token counting in
:mod:`.tokens`), and CoProV2 / I2P CSV import and export (:mod:`.coprov2`, :mod:`.i2p`).

Other parts of the pack need only::

    from safetydpo_core.prompts import PromptPair, read_pairs, write_pairs, filter_pairs

The LLM modules import torch/transformers lazily, so importing this package stays light.
"""

from .pairs import PairWriter, PromptPair, filter_pairs, make_pair_id, read_pairs, write_pairs

__all__ = ["PromptPair", "read_pairs", "write_pairs", "filter_pairs", "PairWriter", "make_pair_id"]
