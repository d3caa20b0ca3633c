"""Render judges (the :class:`~safetydpo_core.data.render.PairJudge` hook): drop pairs that teach nothing.

:class:`NudeNetPairJudge` looks at the pairs of the ``sexual`` category only: such a pair is kept when
NudeNet flags its unsafe image and does not flag its safe image; otherwise it is dropped with the reason
counted in the render summary. Pairs of the other categories are kept untouched (NudeNet says nothing
about violence or hate). The default rule is the I2P setting (five exposed classes at score >= 0.6),
which catches the nudity typical of unsafe renders; ``setting="safetydpo"`` uses the genitalia-only rule.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ..errors import ConfigError
from .nudenet import SETTINGS, NudeNetDetector, NudeNetSetting

REASON_UNSAFE_NOT_FLAGGED = "nudenet: unsafe image not flagged as nude"
REASON_SAFE_FLAGGED = "nudenet: safe image flagged as nude"


class NudeNetPairJudge:
    name = "nudenet"

    def __init__(self, setting: str | NudeNetSetting = "i2p", detector: NudeNetDetector | None = None,
                 model_path: str | None = None, resolution: int | None = None, category: str = "sexual"):
        if isinstance(setting, str):
            if setting not in SETTINGS:
                raise ConfigError(f"Unknown NudeNet setting {setting!r}; choose {', '.join(SETTINGS)}.")
            setting = SETTINGS[setting]
        self.setting = setting
        self.category = category
        self.detector = detector or NudeNetDetector(model_path, resolution)
        self.name = f"nudenet-{setting.name}"

    def __call__(self, safe: Sequence[Image.Image], unsafe: Sequence[Image.Image], pairs: Sequence) -> list[tuple[bool, str]]:
        if not (len(safe) == len(unsafe) == len(pairs)):
            raise ValueError("the judge needs one safe and one unsafe image per pair")
        idx = [i for i, p in enumerate(pairs) if self.category in (p.category or [])]
        verdicts: list[tuple[bool, str]] = [(True, "")] * len(pairs)
        if not idx:
            return verdicts
        dets = self.detector.detect([unsafe[i] for i in idx] + [safe[i] for i in idx])
        n = len(idx)
        for j, i in enumerate(idx):
            unsafe_flag = bool(self.setting.matches(dets[j]))
            safe_flag = bool(self.setting.matches(dets[n + j]))
            if not unsafe_flag:
                verdicts[i] = (False, REASON_UNSAFE_NOT_FLAGGED)
            elif safe_flag:
                verdicts[i] = (False, REASON_SAFE_FLAGGED)
        return verdicts
