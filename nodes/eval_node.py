"""Evaluation of an IMAGE batch: Inappropriate Probability (IP) with NudeNet (and Q16 when its weights are
there), and, against an optional batch of reference images (e.g. the Safe Sampler's unaligned output, same
seeds), preservation (PSNR, SSIM, mean absolute difference of image i against reference image i) and FID/KID.
The node calls the core's one evaluation entry point (:func:`safetydpo_core.eval.evaluate`) and outputs
what it computed (:func:`~safetydpo_core.eval.headline`, :func:`~safetydpo_core.eval.result_json`).

NudeNet is the ``[eval]`` extra (``pip install nudenet``); without it the node says so when it runs (the
pack still imports). Weights are read from ``models/safetydpo_eval`` (NudeNet's optional ``640m.onnx`` in
``nudenet/``, Q16's converted prompt embeddings in ``q16/``, CLIP ViT-L/14 as a transformers folder in
``clip-vit-large-patch14/``, the FID Inception weights in ``inception/``); nothing is downloaded.
"""

from __future__ import annotations

import json

import math

from . import paths
from ._core import core, errors
from .common import COMBO, SOCKET, STRING, Node, comfy_progress, comfy_stop, image_to_pil

SETTINGS = ("safetydpo", "i2p")
DETECTORS = ("320n (bundled with nudenet)", "640m (models/safetydpo_eval/nudenet/640m.onnx)")
Q16_MODES = ("auto", "on", "off")


class Evaluate(Node):
    DESCRIPTION = ("Scores images for unsafe content and reports the Inappropriate Probability (IP: the share of images "
                   "flagged by NudeNet under the chosen setting, or by Q16 when its weights are in "
                   "models/safetydpo_eval). With reference_images connected (e.g. the Safe Sampler's unaligned images, "
                   "same seeds and order), also what the LoRA changed: PSNR, SSIM and mean absolute difference of each "
                   "image against its reference, and FID/KID of the two batches (with the FID Inception weights in "
                   "models/safetydpo_eval/inception). Needs the evaluation extra: pip install nudenet. Reports which "
                   "detectors ran, their versions, classes and thresholds.")
    RETURN_TYPES = ("FLOAT", "INT", "STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("ip", "unsafe_images", "report", "fid", "kid", "ssim", "psnr")
    OUTPUT_TOOLTIPS = ("Inappropriate Probability of images: flagged images / images, in the chosen setting.",
                       "How many images were flagged.",
                       "JSON report: IP in both settings for images (and reference_images), preservation and FID/KID, "
                       "per-image verdicts and detections, detector provenance.",
                       "FID of images against reference_images (Inception-v3 pool3; noisy on few images). NaN when "
                       "not measured (no reference_images, or no Inception weights).",
                       "KID (unbiased, polynomial kernel) of images against reference_images; NaN when not measured.",
                       "Mean SSIM of image i against reference image i (1 = unchanged); NaN without reference_images.",
                       "Mean PSNR in dB of image i against reference image i (higher = closer; identical pairs left "
                       "out, inf when all are identical); NaN without reference_images.")
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
            "reference_images": SOCKET("IMAGE", "Optional images to compare with, in the same order and from the same "
                                                "seeds as images (e.g. the Safe Sampler's unaligned output): PSNR, SSIM "
                                                "and mean absolute difference per pair (same sizes needed), FID and "
                                                "KID of the two batches."),
        }}

    def evaluate(self, images, setting, detector, q16, prompts="", reference_images=None):
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
        ev = core("eval")
        model = str(weights / "nudenet" / "640m.onnx") if detector == DETECTORS[1] else None
        settings = ev.EvalSettings(nudenet=True, nudenet_model=model, q16=q16, clipscore="auto" if texts else "off",
                                   weights_dir=str(weights))
        batches = [ev.ImageBatch("images", pils, texts)]
        if reference_images is not None:
            refs = image_to_pil(reference_images)
            ref_texts = (lines * len(refs) if len(lines) == 1 else lines if len(lines) == len(refs) else None) or None
            batches.insert(0, ev.ImageBatch("reference_images", refs, ref_texts))
        n = sum(len(b.images) for b in batches)
        result = ev.evaluate(batches, settings, progress=comfy_progress(n), should_stop=comfy_stop)
        head = ev.headline(result, "images")
        report = {"setting": setting, **ev.result_json(result, "images")}
        text = json.dumps(report, indent=1, default=str)
        ip, flagged = head["ip"][setting], head["unsafe"][setting]
        ui = [f"IP ({setting}) = {ip:.3f} ({flagged}/{head['n']})"]
        if reference_images is not None:
            ui.append(f"vs reference_images: SSIM {_num(head['ssim'], 4)}, PSNR {_num(head['psnr'], 2)} dB, "
                      f"MAD {_num(head['mad'], 2)}, FID {_num(head['fid'], 2)}, KID {_num(head['kid'], 5)}")
        ui.extend(result.quality.notes if result.quality is not None else [])
        return {"ui": {"text": ui},
                "result": (float(ip), int(flagged), text, _float(head["fid"]), _float(head["kid"]),
                           _float(head["ssim"]), _psnr(head))}


def _float(x) -> float:
    return float("nan") if x is None else float(x)


def _psnr(head: dict) -> float:
    if head["psnr"] is None and head["pairs"] and head["identical"] == head["pairs"]:
        return math.inf  # every pair identical
    return _float(head["psnr"])


def _num(x, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"
