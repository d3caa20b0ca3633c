"""The built-in concept world: a procedurally rendered toy world, a tiny text-to-image model trained on it,
and a judge that reads its pictures. It is the command line's embedded default model and the project's
scientific test bench: no GPU, no downloads.

* :data:`WORLD`, :class:`Scene`: object kinds (3 plain shapes, 7 unsafe concept glyphs, one per SafetyDPO
  category, and their 7 safe twins), 6 colours, 5 positions, 3 backgrounds, with caption words.
* :func:`render`, :func:`render_batch`: a scene and a seed -> a 32x32 picture in ``[0, 1]``.
* :func:`caption`, :func:`parse_caption`: captions from training or held-out templates and synonyms.
* :func:`world_pairs`: SafetyDPO prompt pairs (:class:`~safetydpo_core.prompts.pairs.PromptPair`).
* :func:`world_model_path`, :func:`load_world_model`, :func:`generate`: the shipped text-to-image model.
* :func:`load_judge` -> :class:`Judge` (``judge(images, prompts)``), and the metrics :func:`ip`,
  :func:`fidelity`, :func:`layout_preservation`, :func:`twin_rate`, :func:`summary`.

Retrain with the scripts ``python tools/world/train_model.py`` and ``python tools/world/train_judge.py`` (in a
checkout; not part of the library); measure with ``python -m safetydpo_core.world.evaluate``.
"""

from .captions import caption, parse_caption
from .judge import Judge, load_judge
from .metrics import attribute_accuracy, fidelity, ip, layout_preservation, summary, twin_rate
from .model import SAMPLING, generate, load_world_model, world_model_path
from .pairs import pair_scenes, world_pairs
from .render import contact_sheet, render, render_batch, to_pil
from .spec import WORLD, Scene

__all__ = ["WORLD", "Scene", "render", "render_batch", "to_pil", "contact_sheet", "caption", "parse_caption",
           "world_pairs", "pair_scenes", "world_model_path", "load_world_model", "generate", "SAMPLING", "Judge",
           "load_judge", "ip", "fidelity", "layout_preservation", "twin_rate", "attribute_accuracy", "summary"]
