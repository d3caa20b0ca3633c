"""Preference datasets on disk: the format (:mod:`.preference_dataset`), the builder from image files
(:mod:`.from_images`) and the same-seed renderer (:mod:`.render`)."""

from .preference_dataset import PairRecord, PreferenceDataset, PreferenceDatasetWriter, preview_paths

__all__ = ["PairRecord", "PreferenceDataset", "PreferenceDatasetWriter", "preview_paths"]
