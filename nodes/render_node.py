"""Rendering prompt pairs with the graph's MODEL/CLIP/VAE into a preference dataset, and loading one.

The render node calls the core renderer (:func:`safetydpo_core.data.render.render_pairs`) through the
ComfyUI denoiser backend, so the dataset folder is exactly what ``safetydpo render`` writes
(``dataset.json``, ``manifest.jsonl``, ``shards/``, ``previews/``, ``summary.json``, ``config.json``):
both prompts of a pair start from the same seed and noise. Datasets live in
``<output>/safetydpo/datasets/<name>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import paths
from ._core import core, errors
from .common import (COMBO, FLOAT, GUIDANCE, INT, SEED, SOCKET, STRING, Node, comfy_progress, comfy_stop, denoiser,
                     pil_to_image)
from .types import DATASET, PAIRS

IF_EXISTS = ("resume", "overwrite", "new folder")
MAX_PREVIEWS = 64
_FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc"]
_FALLBACK_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]


def samplers() -> list[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS)
    except ImportError:  # outside ComfyUI (schema checks): a representative list
        return list(_FALLBACK_SAMPLERS)


def schedulers() -> list[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return list(_FALLBACK_SCHEDULERS)


def datasets_root(create: bool = True) -> Path:
    return paths.datasets_root(create)


def open_dataset(path, **kw):
    """The core's :class:`PreferenceDataset`; any failure to read it becomes a DatasetError naming the folder
    (the core lets a malformed dataset.json through as a bare JSON error)."""
    e = errors()
    try:
        return core("data.preference_dataset").PreferenceDataset(path, **kw)
    except e.SafetyDPOError:
        raise
    except (ValueError, OSError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise e.DatasetError(f"The dataset {path} cannot be read: {type(err).__name__}: {err}. Render it again "
                             f"(if_exists = overwrite) or remove the folder.") from err


def dataset_info(path: Path) -> dict:
    """The ``SAFETYDPO_DATASET`` value for a dataset folder (checked by opening it)."""
    ds = open_dataset(path)
    return {"path": str(path), "name": path.name, "pairs": len(ds), "per_category": ds.per_category(),
            "model_fingerprint": ds.model_fingerprint}


def previews(path: Path, ids, limit: int = MAX_PREVIEWS):
    """IMAGE batch: each pair's safe image beside its unsafe image (from the dataset's previews)."""
    from PIL import Image

    preview_paths = core("data.preference_dataset").preview_paths
    images, size = [], None
    for pid in list(ids)[:limit]:
        s, u = (path / rel for rel in preview_paths(pid))
        if not (s.is_file() and u.is_file()):
            continue
        with Image.open(s) as a, Image.open(u) as b:
            a, b = a.convert("RGB"), b.convert("RGB")
            if size is None:
                size = a.size
            if a.size != size or b.size != size:
                continue
            both = Image.new("RGB", (2 * size[0], size[1]))
            both.paste(a, (0, 0))
            both.paste(b, (size[0], 0))
            images.append(both)
    return pil_to_image(images)


class RenderPairs(Node):
    DESCRIPTION = ("Renders every prompt pair with the loaded checkpoint: the safe and the unsafe prompt from the SAME "
                   "seed and noise, so the two images differ only where the prompts do. Writes a preference dataset "
                   "(latents + previews) to output/safetydpo/datasets/<dataset_name> in the format the command line "
                   "writes, for the train node. Cancel keeps finished pairs; 'resume' continues.")
    RETURN_TYPES = (DATASET, "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "previews", "summary")
    OUTPUT_TOOLTIPS = ("The preference dataset (a folder under output/safetydpo/datasets).",
                       f"Safe image (left) beside unsafe image (right) for each pair (at most {MAX_PREVIEWS}).",
                       "What was rendered, skipped and kept, as JSON.")
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The model to align (its own outputs become the training pairs)."),
            "clip": SOCKET("CLIP", "The checkpoint's text encoder."),
            "vae": SOCKET("VAE", "The checkpoint's VAE (for the latents' previews)."),
            "pairs": SOCKET(PAIRS, "The prompt pairs to render."),
            "dataset_name": STRING("safety_pairs", "Folder name under output/safetydpo/datasets (a plain name)."),
            "width": INT(0, 0, 8192, "Image width in pixels, a multiple of 8 (0 = the model's native size).", step=8),
            "height": INT(0, 0, 8192, "Image height in pixels, a multiple of 8 (0 = the model's native size).", step=8),
            "steps": INT(20, 1, 1000, "Sampling steps per image."),
            "cfg": FLOAT(7.5, 0.0, 100.0, "Classifier-free guidance scale.", step=0.1),
            "sampler_name": COMBO(samplers(), "ComfyUI sampler.", default="euler"),
            "scheduler": COMBO(schedulers(), "ComfyUI scheduler.", default="normal"),
            "seed": SEED("Base seed: each pair's seed derives from it and the pair's id (so resuming reproduces it)."),
            "negative": STRING("", "Negative prompt for both images of every pair.", multiline=True),
            "batch_pairs": INT(2, 1, 64, "Pairs rendered together (4 images per 2 pairs); lower it if memory is short."),
            "if_exists": COMBO(IF_EXISTS, "When the dataset folder exists: 'resume' skips pairs already rendered and adds "
                                          "the rest; 'overwrite' replaces it; 'new folder' adds a counter to the name."),
        }, "optional": {
            "guidance": GUIDANCE(),
        }}

    def render(self, model, clip, vae, pairs, dataset_name, width, height, steps, cfg, sampler_name, scheduler, seed,
               negative, batch_pairs, if_exists, guidance=None):
        e = errors()
        if not pairs:
            raise e.DatasetError("pairs is empty; nothing to render.")
        if if_exists not in IF_EXISTS:
            raise e.ConfigError(f"if_exists must be one of {', '.join(IF_EXISTS)}; got {if_exists!r}.")
        render = core("data.render")
        root = datasets_root()
        name = paths.check_name(dataset_name, "dataset_name")
        out = paths.inside(root, name, "dataset_name")
        if if_exists == "new folder" and (out / "manifest.jsonl").exists():
            i = 2
            while (root / f"{name}_{i:04d}").exists():
                i += 1
            out = paths.inside(root, f"{name}_{i:04d}", "dataset_name")
        den = denoiser(model, clip, vae, guidance=guidance)
        settings = render.RenderSettings(height=int(height) or None, width=int(width) or None, steps=int(steps),
                                         cfg=float(cfg), sampler=sampler_name, scheduler=scheduler, seed=int(seed),
                                         negative=negative, batch_pairs=int(batch_pairs))
        summary = render.render_pairs(den, list(pairs), out, settings, resume=if_exists == "resume",
                                      overwrite=if_exists == "overwrite", progress=comfy_progress(len(pairs)),
                                      should_stop=comfy_stop)
        # the configuration is written with the result, never before (a refused or failed render leaves it)
        config = {"command": "render", "source": "ComfyUI SafetyDPO_RenderPairs", "model": den.fingerprint(),
                  "pairs": f"{len(pairs)} pairs from the graph", "if_exists": if_exists, "guidance": den.guidance,
                  **vars(settings)}
        core("utils.atomic").atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str) + "\n",
                                               "configuration file")
        info = dataset_info(out)
        return (info, previews(out, [p.id for p in pairs]), json.dumps(summary.to_json(), indent=1))


def dataset_folders() -> list[str]:
    root = datasets_root(create=False)  # listing creates nothing (INPUT_TYPES runs on every /object_info)
    # (hidden folders are a replacement being rendered, ``.<name>.new``, or the old copy during the swap)
    return sorted(d.name for d in root.iterdir()
                  if not d.name.startswith(".") and (d / "manifest.jsonl").is_file()) if root.is_dir() else []


class LoadDataset(Node):
    DESCRIPTION = ("Loads a preference dataset rendered earlier (by the render node or 'safetydpo render' with its "
                   "--out under output/safetydpo/datasets), to train without rendering again.")
    RETURN_TYPES = (DATASET, "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "previews", "summary")
    OUTPUT_TOOLTIPS = ("The preference dataset.", f"Safe beside unsafe previews (at most {MAX_PREVIEWS}).",
                       "Pairs per category, as JSON.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        try:
            names = dataset_folders()
        except ImportError:  # outside ComfyUI
            names = []
        return {"required": {
            "dataset": COMBO(names or ["(no dataset in output/safetydpo/datasets)"],
                             "A dataset folder under output/safetydpo/datasets."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, dataset):
        try:
            cls._path(dataset)
        except errors().SafetyDPOError as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, dataset):
        try:
            st = (cls._path(dataset) / "manifest.jsonl").stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        except Exception:  # noqa: BLE001 - validation reports it
            return dataset

    @staticmethod
    def _path(dataset: str) -> Path:
        p = paths.safe_join(datasets_root(), dataset, "dataset")
        if not (p / "manifest.jsonl").is_file():
            raise errors().DatasetError(f"dataset {dataset!r}: {p} is not a preference dataset (no manifest.jsonl).")
        return p

    def load(self, dataset):
        path = self._path(dataset)
        info = dataset_info(path)
        ids = [r.id for r in open_dataset(path).records]
        return (info, previews(path, ids), json.dumps({k: v for k, v in info.items() if k != "path"}, indent=1))
