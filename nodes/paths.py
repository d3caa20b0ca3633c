"""Safe file names from node inputs, and the ComfyUI folders the pack reads and writes.

Every name that comes from a node input (a dataset name, a file-name prefix, a file picked in a list) goes
through :func:`check_name` and :func:`inside`: it must be a relative path without ``..``, drive letters or
control characters, and once symbolic links are resolved it must still lie inside the ComfyUI folder it
is meant for. Anything else is refused with an error that names the input.

Where files go (all under ComfyUI's folders, created on first use):

* prompt pairs: ``<output>/safetydpo/pairs/`` (save node); read from ``<input>/`` or that folder;
* preference datasets: ``<output>/safetydpo/datasets/<name>/`` (a ``SAFETYDPO_DATASET`` input is read only
  from there, see :func:`dataset_folder`);
* training checkpoints and metric logs: ``<output>/safetydpo/checkpoints/<category>-<settings hash>/``;
* LoRA files: the first ``loras`` folder (``models/loras``), else ``<output>/loras``;
* local LLMs: ``models/LLM`` (registered with ComfyUI's ``folder_paths`` on first use);
* evaluation weights: ``models/safetydpo_eval`` (NudeNet 640m, Q16, CLIP).

ComfyUI's ``folder_paths`` is imported inside functions; :func:`check_name` and :func:`inside` work
without ComfyUI.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

from ._core import errors

PACK_DIR = "safetydpo"
LLM_FOLDER = "LLM"
EVAL_FOLDER = "safetydpo_eval"
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')
_ANNOTATIONS = ("output", "input", "temp")
_COUNTER = re.compile(r"_(\d{5,})_$")


def _error(msg: str) -> Exception:
    return errors().ConfigError(msg)


def check_name(value: str, what: str, *, subfolders: bool = False) -> str:
    """A file or folder name from a node input, as a relative POSIX path; refuses anything that could escape.

    ``subfolders``: allow ``a/b/c`` (each part checked); otherwise a single name.
    """
    if not isinstance(value, str):
        raise _error(f"{what} must be text; got {type(value).__name__}.")
    name = value.strip().replace("\\", "/")
    if not name:
        raise _error(f"{what} is empty; give a name.")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _error(f"{what} {value!r} is an absolute path; give a name relative to ComfyUI's folder.")
    parts = name.split("/")
    if not subfolders and len(parts) > 1:
        raise _error(f"{what} {value!r} must be a plain name without '/'.")
    for part in parts:
        if part in ("", ".", ".."):
            raise _error(f"{what} {value!r} contains an empty, '.' or '..' part; it must stay inside ComfyUI's folder.")
        if _BAD_CHARS.search(part):
            raise _error(f"{what} {value!r} contains a character that is not allowed in file names "
                         f"(control characters or any of <>:\"|?*).")
        if part.strip() != part or part.endswith("."):
            raise _error(f"{what} {value!r}: a name part may not start or end with a space or end with a dot.")
        if len(part.encode("utf-8")) > 200:
            raise _error(f"{what} {value!r}: a name part is longer than 200 bytes.")
    return "/".join(parts)


def inside(base: str | os.PathLike, rel: str, what: str) -> Path:
    """``base/rel`` with links resolved, refused unless it lies inside ``base`` (also resolved)."""
    root = Path(os.path.realpath(base))
    target = Path(os.path.realpath(os.path.join(root, rel)))
    try:
        ok = os.path.commonpath([root, target]) == str(root)
    except ValueError:  # different drives
        ok = False
    if not ok or target == root:
        raise _error(f"{what} {rel!r} leads outside {root}; give a name inside that folder.")
    return target


def safe_join(base: str | os.PathLike, value: str, what: str, *, subfolders: bool = False) -> Path:
    """:func:`check_name` then :func:`inside`."""
    return inside(base, check_name(value, what, subfolders=subfolders), what)


# -- ComfyUI folders ------------------------------------------------------------------------------------
def _fp():
    import folder_paths

    return folder_paths


def output_dir() -> Path:
    return Path(_fp().get_output_directory())


def input_dir() -> Path:
    return Path(_fp().get_input_directory())


def temp_dir() -> Path:
    return Path(_fp().get_temp_directory())


def pack_output(kind: str) -> Path:
    """``<output>/safetydpo/<kind>`` (created)."""
    d = output_dir() / PACK_DIR / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def loras_dir() -> Path:
    """Where LoRA files are saved: the first ``loras`` folder ComfyUI knows (``models/loras``), created if
    needed; ``<output>/loras`` when that one cannot be written."""
    fp = _fp()
    candidates = [Path(p) for p in fp.get_folder_paths("loras")] + [output_dir() / "loras"]
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK | os.X_OK):
            return d
    raise errors().SafetyDPOError(f"No LoRA folder can be written: tried {', '.join(map(str, candidates))}.")


def datasets_root(create: bool = True) -> Path:
    """``<output>/safetydpo/datasets``: the only place a ``SAFETYDPO_DATASET`` may point to."""
    return pack_output("datasets") if create else output_dir() / PACK_DIR / "datasets"


def dataset_folder(value, what: str = "dataset") -> Path:
    """The folder of a ``SAFETYDPO_DATASET`` input, refused unless it resolves (links followed) inside
    ``<output>/safetydpo/datasets``, whatever made the value: the render and load nodes make such dicts, but a
    prompt sent through ComfyUI's API can hand any literal ``{"path": ...}`` to a node."""
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(path, str) or not path.strip():
        raise _error(f"{what}: expected a SAFETYDPO_DATASET from the render or load-dataset node (a dataset folder "
                     f"under output/{PACK_DIR}/datasets).")
    root = output_dir() / PACK_DIR / "datasets"
    try:
        return inside(root, path, what)
    except errors().ConfigError:
        raise _error(f"{what}: the dataset path {path!r} is not inside {os.path.realpath(root)}. Datasets are read "
                     f"only from there: render the dataset with the render node, or put it in that folder and pick it "
                     f"with the load-dataset node.") from None


def register_model_folder(name: str) -> list[Path]:
    """Register ``models/<name>`` with ComfyUI's ``folder_paths`` (once; created) and return its folders."""
    fp = _fp()
    default = os.path.join(fp.models_dir, name)
    if name not in fp.folder_names_and_paths:
        fp.add_model_folder_path(name, default, is_default=True)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass
    return [Path(p) for p in fp.get_folder_paths(name)]


def next_free(folder: Path, stem: str, ext: str) -> Path:
    """``folder/<stem>_<counter:05>_<ext>`` with a counter above every existing file of that stem (never an
    existing file: ComfyUI's own naming for saved outputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Path(stem).name
    counter = 0
    for f in folder.iterdir():
        if f.name.startswith(base + "_") and f.name.endswith(ext):
            m = _COUNTER.search(f.name[len(base):-len(ext)] if ext else f.name[len(base):])
            if m:
                counter = max(counter, int(m.group(1)))
    while True:
        counter += 1
        p = folder / f"{base}_{counter:05d}_{ext}"
        if not p.exists():
            return p


def save_target(base: Path, prefix: str, ext: str, what: str = "filename_prefix") -> Path:
    """A new file for ``prefix`` (``sub/folder/name``) under ``base``: checked, inside, numbered, never existing."""
    rel = check_name(prefix, what, subfolders=True)
    folder_rel, _, stem = rel.rpartition("/")
    folder = inside(base, folder_rel, what) if folder_rel else Path(os.path.realpath(base))
    folder.mkdir(parents=True, exist_ok=True)
    path = next_free(folder, stem, ext)
    inside(base, os.path.relpath(path, os.path.realpath(base)), what)
    return path


def write_new(base: Path, prefix: str, ext: str, write, what: str = "filename_prefix") -> Path:
    """Create a new numbered file for ``prefix`` under ``base`` without ever replacing one.

    ``write(tmp_path)`` writes the content to a temporary name beside the target; the finished file is then
    hard-linked to its final name, which fails rather than overwrite if that name appeared meanwhile (then
    the next counter is tried). Returns the final path.
    """
    for _ in range(1000):
        target = save_target(base, prefix, ext, what)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial{ext}")
        try:
            write(tmp)
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                if target.exists():
                    continue
                os.replace(tmp, target)
            return target
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    raise errors().SafetyDPOError(f"Could not find a free file name for {prefix!r} in {base}.")


def list_files(folders: Iterable[Path], exts: tuple[str, ...], annotate: str | None = None,
               max_depth: int = 3) -> list[str]:
    """Relative paths (POSIX) of files with one of ``exts`` under ``folders`` (at most ``max_depth`` folder
    levels down, hidden folders skipped: the lists are rebuilt on every /object_info request); `` [annotate]``
    appended."""
    out: list[str] = []
    for base in folders:
        if not base.is_dir():
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            depth = len(Path(root).relative_to(base).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
            for f in sorted(files):
                if f.lower().endswith(exts) and not f.startswith("."):
                    rel = os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/")
                    out.append(f"{rel} [{annotate}]" if annotate else rel)
    return sorted(dict.fromkeys(out))


def split_annotation(name: str) -> tuple[str, str]:
    """``("a/b.jsonl", "output")`` for ``"a/b.jsonl [output]"``; the folder defaults to ``input``."""
    for a in _ANNOTATIONS:
        suffix = f" [{a}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], a
    return name, "input"


def resolve_annotated(name: str, what: str) -> Path:
    """A file picked in a list (``name``, ``name [output]``, ``name [temp]``): inside that folder, existing."""
    rel, where = split_annotation(name)
    base = {"input": input_dir, "output": output_dir, "temp": temp_dir}[where]()
    path = safe_join(base, rel, what, subfolders=True)
    if not path.is_file():
        raise errors().DatasetError(f"{what} {name!r}: the file {path} does not exist.")
    return path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
