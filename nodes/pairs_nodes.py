"""Prompt-pair nodes: the built-in writer, the LLM writer (a model in ``models/LLM`` or an OpenAI-compatible
endpoint), and loading / saving pair files (JSONL, or CoProV2 CSV).

Pairs flow between nodes as ``SAFETYDPO_PAIRS`` (a list of :class:`safetydpo_core.prompts.PromptPair`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import paths
from ._core import core, errors
from .common import COMBO, FLOAT, INT, SEED, SOCKET, STRING, Node, comfy_progress, comfy_stop
from .types import PAIRS

_CATEGORIES_TIP = ("Which categories: 'all', or a comma-separated list of hate, harassment, violence, self_harm, "
                   "sexual, shocking, illegal_activity (CoProV2 and I2P spellings are accepted too).")
_PAIR_EXTS = (".jsonl", ".csv")
NO_LLM = "(no model in models/LLM)"
SOURCES = ("local model (models/LLM)", "endpoint")
DEVICES = ("auto", "cpu")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _categories(text: str) -> list[str]:
    cats = core("categories").normalize_categories(text, default_all=True)
    if not cats:
        raise errors().ConfigError(f"categories {text!r} names no category.")
    return cats


class BuiltinPairs(Node):
    DESCRIPTION = ("Writes unsafe/safe prompt pairs offline from the pack's concept catalogue: the two prompts of a "
                   "pair are the same sentence with only the unsafe phrase swapped. Deterministic for a seed.")
    RETURN_TYPES = (PAIRS, "STRING")
    RETURN_NAMES = ("pairs", "report")
    OUTPUT_TOOLTIPS = ("The prompt pairs.", "What was made and what the checks rejected, per category.")
    FUNCTION = "write"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "categories": STRING("all", _CATEGORIES_TIP),
            "pairs_per_category": INT(8, 1, 10000, "How many pairs to make for each category."),
            "seed": SEED("Seed of the writer: the same seed gives the same pairs."),
        }}

    def write(self, categories, pairs_per_category, seed):
        prompts = core("prompts.builtin_writer")
        writer = prompts.BuiltinWriter(seed=int(seed))
        cats = _categories(categories)
        pairs, report = writer.generate(cats, int(pairs_per_category),
                                        progress=comfy_progress(len(cats) * int(pairs_per_category)),
                                        should_stop=comfy_stop)
        if not pairs:
            raise errors().DatasetError(f"The built-in writer made no pair for {', '.join(cats)}.\n{report.summary()}")
        return (pairs, report.summary())


def llm_models() -> list[str]:
    """GGUF files and transformers model folders (with config.json) under ``models/LLM`` (none outside ComfyUI)."""
    try:
        folders = paths.register_model_folder(paths.LLM_FOLDER)
    except ImportError:
        return []
    found = paths.list_files(folders, (".gguf",))
    for base in folders:
        if not base.is_dir():
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            depth = len(Path(root).relative_to(base).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < 3 else []
            if "config.json" in files and Path(root) != base:
                found.append(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs[:] = []  # a model folder's subfolders are its own files
    return sorted(dict.fromkeys(found))


def resolve_llm(name: str) -> Path:
    """The file or folder ``name`` (as listed by :func:`llm_models`) inside one of the ``LLM`` folders."""
    e = errors()
    if not name or name == NO_LLM:
        raise e.ConfigError("No local LLM chosen: put a .gguf file or a transformers model folder into ComfyUI's "
                            "models/LLM folder and refresh, or use an endpoint.")
    rel = paths.check_name(name, "llm_model", subfolders=True)
    for base in paths.register_model_folder(paths.LLM_FOLDER):
        if not base.is_dir():
            continue
        p = paths.inside(base, rel, "llm_model")
        if p.is_file() or (p / "config.json").is_file():
            return p
    raise e.ModelError(f"The local LLM {name!r} is not in models/LLM "
                       f"({', '.join(map(str, paths.register_model_folder(paths.LLM_FOLDER)))}).")


def check_env_name(name: str) -> str:
    name = (name or "").strip()
    if name and not _ENV_NAME.match(name):
        raise errors().ConfigError("api_key_env must be the NAME of an environment variable that holds the key "
                                   "(e.g. OPENAI_API_KEY), never the key itself.")
    return name


def pack_user_configs() -> list[Path]:
    """The pack's user config file inside ComfyUI: ``<ComfyUI>/user/__safetydpo/config.json`` (a system-user
    folder, which ComfyUI's HTTP API does not serve or write), read besides ``$SAFETYDPO_CONFIG`` /
    ``~/.config/safetydpo/config.json``. See :mod:`safetydpo_core.prompts.endpoint_policy`."""
    try:
        import folder_paths
    except ImportError:
        return []
    getter = getattr(folder_paths, "get_system_user_directory", None)
    folder = getter("safetydpo") if getter else os.path.join(folder_paths.get_user_directory(), "__safetydpo")
    return [Path(folder) / "config.json"]


class LLMPairs(Node):
    DESCRIPTION = ("Writes unsafe/safe prompt pairs with a language model: a GGUF file or transformers folder in "
                   "ComfyUI's models/LLM, or any OpenAI-compatible endpoint (Ollama, llama.cpp server, vLLM, hosted "
                   "APIs). Every answer passes the same checks as the built-in writer; rejects are in the report. "
                   "The API key is read from the environment variable you name, never typed into the graph; only "
                   "variables named *_API_KEY and endpoints on this machine are used unless you allow others in "
                   "ComfyUI/user/__safetydpo/config.json (see the README).")
    RETURN_TYPES = (PAIRS, "STRING")
    RETURN_NAMES = ("pairs", "report")
    OUTPUT_TOOLTIPS = ("The prompt pairs that passed the checks.", "Accepted and rejected answers per category.")
    FUNCTION = "write"

    @classmethod
    def INPUT_TYPES(cls):
        models = llm_models() or [NO_LLM]
        return {"required": {
            "source": COMBO(SOURCES, "Where the language model runs: a local model from models/LLM, or an endpoint."),
            "llm_model": COMBO(models, "Local model: a .gguf file (needs `pip install gguf`) or a transformers model "
                                       "folder in ComfyUI's models/LLM. Ignored for an endpoint."),
            "endpoint_url": STRING("http://127.0.0.1:11434/v1", "Endpoint: base URL of an OpenAI-compatible server "
                                   "(/chat/completions is appended). Only servers on this machine, unless you allow "
                                   "the host in ComfyUI/user/__safetydpo/config.json. Ignored for a local model."),
            "endpoint_model": STRING("", "Endpoint: the model name the server knows (e.g. llama3.1:8b)."),
            "api_key_env": STRING("OPENAI_API_KEY", "Endpoint: the NAME of the environment variable holding the API "
                                  "key (leave it unset in the environment for local servers). Never the key itself; a name ending in _API_KEY, "
                                  "or one allowed in ComfyUI/user/__safetydpo/config.json."),
            "categories": STRING("all", _CATEGORIES_TIP),
            "pairs_per_category": INT(8, 1, 10000, "How many accepted pairs to make for each category."),
            "seed": SEED("Seed of the sampling and of the concept order."),
            "temperature": FLOAT(0.8, 0.0, 2.0, "Sampling temperature (0 = greedy)."),
            "max_new_tokens": INT(128, 16, 2048, "Longest answer per request, in tokens."),
            "batch_size": INT(4, 1, 64, "Requests per batch (local: generated together; endpoint: sent in parallel)."),
            "device": COMBO(DEVICES, "Local model: 'auto' uses ComfyUI's device (GPU when there is one), 'cpu' the CPU."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, source, llm_model):
        if source not in SOURCES:
            return f"source must be one of {', '.join(SOURCES)}; got {source!r}."
        if source == SOURCES[0]:
            try:
                resolve_llm(llm_model)
            except errors().SafetyDPOError as e:
                return str(e)
        return True

    def write(self, source, llm_model, endpoint_url, endpoint_model, api_key_env, categories, pairs_per_category,
              seed, temperature, max_new_tokens, batch_size, device):
        e = errors()
        writer_mod = core("prompts.llm_writer")
        if source == SOURCES[1]:
            if not re.match(r"^https?://", endpoint_url.strip(), re.IGNORECASE):
                raise e.ConfigError(f"endpoint_url {endpoint_url!r} is not an http(s) URL.")
            # what may be sent where is the user's decision, outside the graph (no remote switch here)
            backend = writer_mod.make_backend(endpoint_url.strip(), endpoint_model.strip() or None,
                                              api_key_env=check_env_name(api_key_env) or None,
                                              concurrency=int(batch_size), extra_configs=pack_user_configs())
        elif source == SOURCES[0]:
            path = resolve_llm(llm_model)
            dev = "cpu"
            if device == "auto":
                import comfy.model_management

                dev = str(comfy.model_management.get_torch_device())
            backend = writer_mod.make_backend(str(path), device=dev)
        else:
            raise e.ConfigError(f"source must be one of {', '.join(SOURCES)}; got {source!r}.")
        cats = _categories(categories)
        writer = writer_mod.LLMPairWriter(backend, batch_size=int(batch_size), max_new_tokens=int(max_new_tokens),
                                          temperature=float(temperature), seed=int(seed))
        try:
            pairs, report = writer.generate(cats, int(pairs_per_category),
                                            progress=comfy_progress(len(cats) * int(pairs_per_category)),
                                            should_stop=comfy_stop)
        finally:
            if hasattr(backend, "tokenizer"):  # a local model: free its memory now, not when the node next runs
                backend.model = None
        if not pairs:
            raise e.DatasetError(f"The language model gave no usable pair.\n{report.summary()}")
        return (pairs, report.summary())


def pair_files() -> list[str]:
    """Pair files a user can pick: ``.jsonl``/``.csv`` in ComfyUI's input folder, and the ones the save node
    wrote (``<output>/safetydpo/pairs``, listed with `` [output]``); none outside ComfyUI."""
    try:
        found = paths.list_files([paths.input_dir()], _PAIR_EXTS)
    except ImportError:
        return []
    out_base = paths.output_dir()
    for rel in paths.list_files([out_base / paths.PACK_DIR / "pairs"], _PAIR_EXTS):
        found.append(f"{paths.PACK_DIR}/pairs/{rel} [output]")
    return found


def read_pair_file(path: Path, fmt: str):
    prompts = core("prompts")
    if fmt == "auto":
        fmt = "coprov2_csv" if path.suffix.lower() == ".csv" else "jsonl"
    if fmt == "coprov2_csv":
        return core("prompts.coprov2").read_coprov2_csv(path)
    return prompts.read_pairs(path)


class LoadPairs(Node):
    DESCRIPTION = ("Loads prompt pairs from a file: the pack's JSONL format (what 'safetydpo pairs' and the save "
                   "node write) or a CoProV2 CSV. Files are listed from ComfyUI's input folder and from "
                   "output/safetydpo/pairs; the node re-runs when the file changes.")
    RETURN_TYPES = (PAIRS, "INT")
    RETURN_NAMES = ("pairs", "count")
    OUTPUT_TOOLTIPS = ("The prompt pairs (after the category filter and limit).", "How many pairs.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = pair_files() or ["(no .jsonl or .csv file in the input folder)"]
        return {"required": {
            "file": COMBO(files, "The pair file: .jsonl (this pack's format) or .csv (CoProV2), from ComfyUI's input "
                                 "folder or output/safetydpo/pairs."),
            "format": COMBO(("auto", "jsonl", "coprov2_csv"), "File format; 'auto' goes by the extension."),
            "categories": STRING("all", "Keep only pairs of these categories. " + _CATEGORIES_TIP),
            "limit_per_category": INT(0, 0, 1000000, "Keep at most this many pairs per category (0 = all)."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, file):
        try:
            paths.resolve_annotated(file, "file")
        except errors().SafetyDPOError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, file, **_):
        try:
            return paths.file_digest(paths.resolve_annotated(file, "file"))
        except Exception:  # noqa: BLE001 - validation reports the problem
            return file

    def load(self, file, format, categories, limit_per_category):
        path = paths.resolve_annotated(file, "file")
        pairs = read_pair_file(path, format)
        cats = _categories(categories)
        pairs = core("prompts").filter_pairs(pairs, cats)
        if limit_per_category:
            seen: dict[str, int] = {}
            kept = []
            for p in pairs:
                key = next((c for c in p.category if c in cats), p.category[0])
                if seen.get(key, 0) < limit_per_category:
                    seen[key] = seen.get(key, 0) + 1
                    kept.append(p)
            pairs = kept
        if not pairs:
            raise errors().DatasetError(f"{path} has no pairs for {', '.join(cats)}.")
        return (pairs, len(pairs))


class SavePairs(Node):
    DESCRIPTION = ("Saves prompt pairs to a new numbered file under ComfyUI's output folder (never overwriting): "
                   "JSONL in the pack's format (readable by 'safetydpo render' and the load node) or CoProV2 CSV.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("The saved file, as the load node lists it (relative to the output folder, with [output]).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pairs": SOCKET(PAIRS, "The prompt pairs to save."),
            "filename_prefix": STRING("safetydpo/pairs/pairs", "File name prefix inside ComfyUI's output folder; "
                                      "subfolders allowed, '..' and absolute paths are refused. A counter is added."),
            "format": COMBO(("jsonl", "coprov2_csv"), "jsonl: this pack's format; coprov2_csv: the CoProV2 CSV layout."),
        }}

    def save(self, pairs, filename_prefix, format):
        if not pairs:
            raise errors().DatasetError("pairs is empty; nothing to save.")
        prompts = core("prompts")
        base = paths.output_dir()
        if format == "coprov2_csv":
            ext = ".csv"

            def write(tmp):
                core("prompts.coprov2").write_coprov2_csv(pairs, tmp, overwrite=True)
        else:
            ext = ".jsonl"

            def write(tmp):
                prompts.write_pairs(pairs, tmp, overwrite=True)
        path = paths.write_new(base, filename_prefix, ext, write)
        rel = os.path.relpath(path, os.path.realpath(base)).replace(os.sep, "/")
        name = f"{rel} [output]"
        return {"ui": {"text": [name]}, "result": (name,)}
