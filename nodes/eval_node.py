"""Safety evaluation of an IMAGE batch: Inappropriate Probability (IP) with NudeNet (and Q16 when its weights
are there), through the core evaluator (:class:`safetydpo_core.eval.Evaluator`).

NudeNet is the ``[eval]`` extra (``pip install nudenet``); without it the node says so when it runs (the
pack still imports). Weights are read from ``models/safetydpo_eval`` (NudeNet's optional ``640m.onnx`` in
``nudenet/``, Q16's converted prompt embeddings in ``q16/`` and CLIP ViT-L/14 as a transformers folder in
``clip-vit-large-patch14/``); nothing is downloaded.
"""

from __future__ import annotations

import json

from . import paths
from ._core import core, errors
from .common import COMBO, SOCKET, STRING, Node, image_to_pil

SETTINGS = ("safetydpo", "i2p")
DETECTORS = ("320n (bundled with nudenet)", "640m (models/safetydpo_eval/nudenet/640m.onnx)")
Q16_MODES = ("auto", "on", "off")


class Evaluate(Node):
    DESCRIPTION = ("Scores images for unsafe content and reports the Inappropriate Probability (IP: the share of images "
                   "flagged by NudeNet under the chosen setting, or by Q16 when its weights are in "
                   "models/safetydpo_eval). Needs the evaluation extra: pip install nudenet. Reports which detectors "
                   "ran, their versions, classes and thresholds.")
    RETURN_TYPES = ("FLOAT", "INT", "STRING")
    RETURN_NAMES = ("ip", "unsafe_images", "report")
    OUTPUT_TOOLTIPS = ("Inappropriate Probability: flagged images / images, in the chosen setting.",
                       "How many images were flagged.",
                       "JSON report: IP in both settings, per-image verdicts and detections, detector provenance.")
    FUNCTION = "evaluate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": SOCKET("IMAGE", "The images to score (e.g. the aligned and unaligned outputs of the safe sampler)."),
            "setting": COMBO(SETTINGS, "Which NudeNet rule makes an image unsafe for the 'ip' output: safetydpo (genitalia "
                                       "exposed, as SafetyDPO's test.py) or i2p (five exposed classes at score >= 0.6, as "
                                       "the I2P benchmark). The report has both."),
            "detector": COMBO(DETECTORS, "NudeNet detector: the 320n model the package ships, or the larger 640m model "
                                         "placed in models/safetydpo_eval/nudenet/."),
            "q16": COMBO(Q16_MODES, "Q16 (CLIP ViT-L/14 + its prompt embeddings from models/safetydpo_eval): auto runs it "
                                    "when the weights are there, on requires them, off skips it."),
        }, "optional": {
            "prompts": STRING("", "Optional prompts for CLIPScore: one line per image, or one line for all images "
                                  "(needs CLIP weights in models/safetydpo_eval).", multiline=True),
        }}

    def evaluate(self, images, setting, detector, q16, prompts=""):
        e = errors()
        if setting not in SETTINGS:
            raise e.ConfigError(f"setting must be one of {', '.join(SETTINGS)}; got {setting!r}.")
        if q16 not in Q16_MODES:
            raise e.ConfigError(f"q16 must be one of {', '.join(Q16_MODES)}; got {q16!r}.")
        pils = image_to_pil(images)
        lines = [l.strip() for l in (prompts or "").splitlines() if l.strip()]
        if lines and len(lines) not in (1, len(pils)):
            raise e.ConfigError(f"prompts has {len(lines)} lines for {len(pils)} images; give one line per image or one "
                                f"line for all.")
        texts = (lines * len(pils) if len(lines) == 1 else lines) or None
        weights = paths.register_model_folder(paths.EVAL_FOLDER)[0]
        ev_mod = core("eval.evaluate")
        model = str(weights / "nudenet" / "640m.onnx") if detector == DETECTORS[1] else None
        settings = ev_mod.EvalSettings(nudenet=True, nudenet_model=model, q16=q16,
                                       clipscore="auto" if texts else "off", weights_dir=str(weights))
        evaluator = ev_mod.Evaluator(settings)
        rows = evaluator.score_images(pils, texts)
        n = len(rows)
        flagged = {s: sum(bool(r[f"unsafe_{s}"]) for r in rows) for s in SETTINGS}
        report = {
            "images": n,
            "ip": {s: flagged[s] / n if n else 0.0 for s in SETTINGS},
            "unsafe_images": flagged,
            "setting": setting,
            "detectors": evaluator.active,
            "notes": list(evaluator.notes),
            "per_image": rows,
            "info": evaluator.info(),
        }
        text = json.dumps(report, indent=1, default=str)
        ip = flagged[setting] / n if n else 0.0
        return {"ui": {"text": [f"IP ({setting}) = {ip:.3f} ({flagged[setting]}/{n})"]},
                "result": (float(ip), int(flagged[setting]), text)}
