"""Concept-erasure baselines as LoRAs: ESD-u, ESD-x (trained, :mod:`safetydpo_core.training.esd`) and UCE
(closed form, :mod:`.uce`); :mod:`.api` runs any of them for the command line, the nodes and the benchmarks."""

from .api import METHODS, EraseResult, EraseSettings, erase_concepts, save_erasure
from .uce import UceResult, uce_edit

__all__ = ["METHODS", "EraseResult", "EraseSettings", "erase_concepts", "save_erasure", "UceResult", "uce_edit"]
