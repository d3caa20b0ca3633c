"""LoRA nodes: load a LoRA file as ``LORA_MODEL``, save one (kohya keys + metadata, never overwriting),
apply one to a MODEL, and collect experts into a list for the merge node.

Files are read and written as safetensors only (a pickled file is refused, never opened). Saved files go
to the first ``loras`` folder (``models/loras``), so core ``LoraLoader`` lists them, and load there with
every key used (no "lora key not loaded" line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import paths
from ._core import core, errors
from .common import (FLOAT, SOCKET, STRING, COMBO, Node, apply_lora, denoiser, lora_model_from_set,
                     lora_set_from_input)
from .types import EXPERTS, LORA_MODEL, LoraModel, metadata_of

NO_LORA = "(no .safetensors file in the loras folders)"


def lora_files() -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (schema checks)
        return []
    return [f for f in folder_paths.get_filename_list("loras") if f.lower().endswith(".safetensors")]


def resolve_lora(name: str) -> Path:
    """The file ``name`` (as ``LoraLoader`` lists it) inside one of ComfyUI's ``loras`` folders."""
    import folder_paths

    e = errors()
    if not name or name == NO_LORA:
        raise e.LoraError("No LoRA file chosen: put a .safetensors LoRA into ComfyUI's models/loras folder and refresh.")
    rel = paths.check_name(name, "lora_name", subfolders=True)
    if not rel.lower().endswith(".safetensors"):
        raise e.LoraError(f"lora_name {name!r} is not a .safetensors file. Pickled formats (.ckpt, .pt, .bin) are "
                          f"refused because loading them can run arbitrary code; convert it to safetensors first.")
    for base in folder_paths.get_folder_paths("loras"):
        if not os.path.isdir(base):
            continue
        p = paths.inside(base, rel, "lora_name")
        if p.is_file():
            return p
    raise e.LoraError(f"The LoRA file {name!r} is not in ComfyUI's loras folders "
                      f"({', '.join(folder_paths.get_folder_paths('loras'))}).")


class LoadLoRA(Node):
    DESCRIPTION = ("Loads a LoRA file (kohya, ComfyUI or diffusers/peft keys) from ComfyUI's loras folders as a "
                   "LORA_MODEL for the merge, apply and sampler nodes, checking that it fits the connected MODEL. "
                   "Only .safetensors files are read.")
    RETURN_TYPES = (LORA_MODEL, "STRING")
    RETURN_NAMES = ("lora", "metadata")
    OUTPUT_TOOLTIPS = ("The LoRA, with ComfyUI keys, and its file metadata riding along.",
                       "The file's metadata (category, training settings, ...) as JSON.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The model the LoRA was trained for (names its layers and checks the shapes)."),
            "lora_name": COMBO(lora_files() or [NO_LORA], "A .safetensors LoRA in ComfyUI's loras folders."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        try:
            resolve_lora(lora_name)
        except errors().SafetyDPOError as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        try:
            st = resolve_lora(lora_name).stat()
            return f"{lora_name}:{st.st_size}:{st.st_mtime_ns}"
        except Exception:  # noqa: BLE001 - validation reports it
            return lora_name

    def load(self, model, lora_name):
        path = resolve_lora(lora_name)
        den = denoiser(model)
        names = den.names()
        lora = core("lora.io").load_lora(path, names=names)
        if lora.naming != "ldm":
            lora = names.convert_lora(lora, "ldm")
        try:
            lora.check_fits(den.weight_shapes(), "the connected model")
        except errors().SafetyDPOError as err:
            raise errors().LoraError(f"The LoRA file {path}: {err}") from err
        out = lora_model_from_set(lora)
        return (out, json.dumps(out.metadata, indent=1, sort_keys=True))


class SaveLoRA(Node):
    DESCRIPTION = ("Saves a LORA_MODEL as a .safetensors file with kohya keys and metadata (category, training and "
                   "merge settings) into ComfyUI's loras folder, under a new numbered name (never overwriting). Core "
                   "Load LoRA, A1111/Forge and diffusers read it.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name as Load LoRA lists it (relative to the loras folder).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": SOCKET(LORA_MODEL, "The LoRA to save (from the train, merge or load node, or core nodes)."),
            "filename_prefix": STRING("safetydpo/safety_expert", "File name prefix inside the loras folder; "
                                      "subfolders allowed, '..' and absolute paths are refused. A counter is added."),
        }, "optional": {
            "model": SOCKET("MODEL", "The LoRA's model. With it, SD1.x/2.x keys use the diffusers layer names that "
                                     "kohya and A1111 write; without it, LDM layer names (ComfyUI reads both)."),
        }}

    def save(self, lora, filename_prefix, model=None):
        names = None
        lora_set = None
        if model is not None:
            den = denoiser(model)
            names = den.names()
            lora_set = lora_set_from_input(lora, "lora", names=names)
            lora_set.metadata.setdefault("ss_base_model_version", den.base_model_version)
            try:
                lora_set.check_fits(den.weight_shapes(), "the connected model")
            except errors().SafetyDPOError as err:
                raise errors().LoraError(f"lora: {err}") from err
        else:
            lora_set = lora_set_from_input(lora, "lora")
            lora_set.metadata.setdefault("ss_base_model_version", core("lora.base_model").base_model_version_of_lora(lora_set))
        save_lora = core("lora.io").save_lora
        base = paths.loras_dir()
        diff = all(k.endswith(".diff") for k in lora)  # full-rank weight diffs (UCE's exact export) stay diffs
        path = paths.write_new(base, filename_prefix, ".safetensors",
                               lambda tmp: save_lora(lora_set, tmp, names=names, diff=diff))
        rel = os.path.relpath(path, os.path.realpath(base)).replace(os.sep, "/")
        return {"ui": {"text": [rel]}, "result": (rel,)}


class ApplySafetyLoRA(Node):
    DESCRIPTION = ("Applies a safety LoRA (an expert or the merged LoRA) to a MODEL at a strength, through ComfyUI's "
                   "own LoRA patching; refuses a LoRA whose layers do not match the model instead of silently "
                   "skipping them.")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the MODEL with the LoRA applied (the input MODEL is unchanged).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The model to make safer."),
            "lora": SOCKET(LORA_MODEL, "The safety LoRA."),
            "strength": FLOAT(1.0, -10.0, 10.0, "LoRA strength (1 = as trained).", step=0.05),
        }}

    def apply(self, model, lora, strength):
        return (apply_lora(model, lora, strength, "lora"),)


class ExpertList(Node):
    DESCRIPTION = ("Adds an expert (with a merge weight) to a list of experts for the Co-Merge node; chain as many as "
                   "you like.")
    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The experts so far, with this one appended.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": SOCKET(LORA_MODEL, "The expert to add."),
            "weight": FLOAT(1.0, -10.0, 10.0, "Its weight in the merge (1 = as trained).", step=0.05),
        }, "optional": {
            "experts": SOCKET(EXPERTS, "The list to extend (leave unconnected to start one)."),
        }}

    def add(self, lora, weight, experts=None):
        if not isinstance(lora, dict) or not lora:
            raise errors().LoraError("lora: expected a LORA_MODEL (a dict of tensors) with at least one layer.")
        out = list(experts or [])
        out.append((lora if isinstance(lora, LoraModel) else LoraModel(lora, metadata_of(lora)), float(weight)))
        return (out,)
