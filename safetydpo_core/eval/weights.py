"""Where the evaluation weights live, and the messages that say what to download when one is missing.

Nothing is ever downloaded. The evaluators read local files only:

* NudeNet: the ``nudenet`` package (the ``[eval]`` extra) ships its 320n ONNX detector; the larger 640m
  detector is optional (``<weights>/nudenet/640m.onnx``, used at resolution 640).
* Q16: CLIP ViT-L/14 as a transformers folder (``<weights>/clip-vit-large-patch14``) and the Q16 prompt
  embeddings converted from ``prompts.p`` to ``.npy`` or ``.safetensors`` (``<weights>/q16/prompts.npy``).
* CLIPScore: any CLIP transformers folder (``<weights>/clipscore``, else the ViT-L/14 folder above).
  SafetyDPO's own number uses open_clip ViT-H-14 ``laion2b_s32b_b79k``, which exists as a transformers folder
  (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).

* FID/KID: the FID Inception-v3 weights of pytorch-fid, ``pt_inception-2015-12-05-6726825d.pth`` (read with
  ``torch.load(weights_only=True)``) or its ``.safetensors`` conversion, in ``<weights>/inception/``.

``<weights>`` is ``$SAFETYDPO_EVAL_WEIGHTS`` if set, else ``~/.cache/safetydpo/eval``; the command line
takes ``--weights-dir`` and the ComfyUI node passes its own models folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SafetyDPOError


class MissingWeights(SafetyDPOError):
    """An evaluation model or file is not on disk (or not installed); the message says what to get and where."""


ENV_VAR = "SAFETYDPO_EVAL_WEIGHTS"
CLIP_L14_DIR = "clip-vit-large-patch14"
CLIPSCORE_DIR = "clipscore"
Q16_CANDIDATES = ("q16/prompts.npy", "q16/prompts.safetensors")
NUDENET_640M = "nudenet/640m.onnx"
INCEPTION_CANDIDATES = ("inception/pt_inception-2015-12-05.safetensors", "inception/pt_inception-2015-12-05-6726825d.pth")
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")

CLIP_FOLDER_HELP = ("a transformers CLIP folder holds config.json, model.safetensors, preprocessor_config.json and the "
                    "tokenizer files (vocab.json, merges.txt, tokenizer_config.json)")

Q16_CONVERT = (
    "Q16's official prompts.p is a pickle, which this pack never loads. Convert it once, in a Python you trust, "
    "with: python -c \"import pickle, numpy; numpy.save('prompts.npy', numpy.asarray(pickle.load(open('prompts.p', "
    "'rb')), dtype='float32'))\"")


def default_weights_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safetydpo" / "eval"


def resolve_weights_dir(path: str | os.PathLike | None) -> Path:
    return (Path(path).expanduser() if path else default_weights_dir()).absolute()


def clip_l14_help(weights_dir: Path, purpose: str = "Q16") -> str:
    return (f"{purpose} needs CLIP ViT-L/14 weights as a transformers folder: download openai/clip-vit-large-patch14 "
            f"from the Hugging Face Hub (config.json, model.safetensors, preprocessor_config.json, tokenizer files) "
            f"into {weights_dir / CLIP_L14_DIR}, or pass its folder explicitly ({CLIP_FOLDER_HELP}).")


def q16_help(weights_dir: Path) -> str:
    return (f"Q16 needs its learned prompt embeddings: take data/ViT-L-14/prompts.p from the ml-research/Q16 "
            f"repository on GitHub, convert it to {weights_dir / Q16_CANDIDATES[0]} and put it there, or pass the "
            f"converted file explicitly. {Q16_CONVERT}")


def clipscore_help(weights_dir: Path) -> str:
    return (f"CLIPScore needs CLIP weights as a transformers folder: put one at {weights_dir / CLIPSCORE_DIR} (for "
            f"SafetyDPO's number: laion/CLIP-ViT-H-14-laion2B-s32B-b79K from the Hugging Face Hub) or at "
            f"{weights_dir / CLIP_L14_DIR} (openai/clip-vit-large-patch14), or pass its folder explicitly "
            f"({CLIP_FOLDER_HELP}).")


def inception_help(weights_dir: Path) -> str:
    return (f"FID and KID need the FID Inception-v3 weights of pytorch-fid: download pt_inception-2015-12-05-6726825d.pth "
            f"({INCEPTION_URL}, about 92 MiB) on a machine with internet and put it at "
            f"{weights_dir / INCEPTION_CANDIDATES[1]}, or convert it first with `python -m "
            f"safetydpo_core.eval.inception pt_inception-2015-12-05-6726825d.pth "
            f"{weights_dir / INCEPTION_CANDIDATES[0]}`, or pass the file explicitly (--inception).")


def find_inception(weights_dir: Path, path: str | os.PathLike | None) -> Path | None:
    """The explicit file if given, else the first conventional file under ``weights_dir`` (None where absent)."""
    if path:
        return Path(path).expanduser()
    return next((weights_dir / n for n in INCEPTION_CANDIDATES if (weights_dir / n).is_file()), None)


def nudenet_install_help() -> str:
    return ("NudeNet is not installed. Install the evaluation extra: pip install 'safetydpo[eval]' (or pip install "
            "nudenet onnxruntime); it ships its 320n detector, so nothing is downloaded at run time.")


def find_q16(weights_dir: Path, clip: str | os.PathLike | None, embeddings: str | os.PathLike | None
             ) -> tuple[Path | None, Path | None]:
    """Explicit paths win; otherwise the conventional places under ``weights_dir`` (None where absent)."""
    c = Path(clip).expanduser() if clip else (weights_dir / CLIP_L14_DIR)
    if not clip and not (c / "config.json").exists():
        c = None
    if embeddings:
        e = Path(embeddings).expanduser()
    else:
        e = next((weights_dir / n for n in Q16_CANDIDATES if (weights_dir / n).exists()), None)
    return c, e


def find_clipscore(weights_dir: Path, clip: str | os.PathLike | None) -> Path | None:
    if clip:
        return Path(clip).expanduser()
    for name in (CLIPSCORE_DIR, CLIP_L14_DIR):
        if (weights_dir / name / "config.json").exists():
            return weights_dir / name
    return None
