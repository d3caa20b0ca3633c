"""The pack as the Comfy Registry gets it: comfy-cli's ``comfy node validate`` and ``comfy node pack`` on a
snapshot of this working tree, what the archive holds, the pack loaded by a real ComfyUI 0.8 from the unpacked
archive, and the registry icon that pyproject.toml points at.

comfy-cli runs as ``python -m comfy_cli`` of this Python, without questions and offline: ``--skip-prompt``
(take defaults instead of asking), ``--no-json`` (plain output when stdout is not a terminal) and
``DO_NOT_TRACK=1`` (no tracking-consent prompt and no telemetry; ``COMFY_NO_TELEMETRY=1`` does the same), with
``HOME`` in a temporary folder so that its config (``~/.config/comfy-cli``) is not written into the user's home.
Neither command opens a network connection (checked with strace, comfy-cli 1.23.0).

What ``comfy node pack`` zips (comfy-cli 1.23.0, ``file_utils.zip_files``) into ``node.zip`` in the current
folder: the files ``git ls-files`` lists (tracked files, so untracked and .gitignored files never go in),
minus those matching the patterns of a ``.comfyignore`` file (gitwildmatch, like .gitignore), plus every file
on disk under each ``[tool.comfy] includes`` path (for built files git does not track; .comfyignore patterns
still apply inside them unless the include names the path itself). Outside a git repository it zips every
file. This pack needs no includes and no .comfyignore: the world weights, web/ and workflows/ are tracked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from comfyui_support import COMFYUI_PATH, HttpComfyServer, comfyui_server, pack_import_failures, snapshot_repo

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-SafetyDPO"
# what ComfyUI loads and uses at run time; all of it must be in the archive
RUNTIME = ("__init__.py", "requirements.txt", "pyproject.toml", "nodes", "safetydpo_core", "web", "workflows")

requires_comfy_cli = pytest.mark.skipif(
    find_spec("comfy_cli") is None,
    reason="comfy-cli is not installed (pip install comfy-cli, with the torch constraints file; see "
           "docs/comfyui-setup.md): these tests run `comfy node validate` and `comfy node pack`")


def comfy_cli(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    env.update(HOME=str(home), DO_NOT_TRACK="1", COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-json", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A snapshot repository of the working tree, with a stray untracked file and an ignored bytecode file
    added after its commit, and the ``node.zip`` that ``comfy node pack`` made of it."""
    tmp = tmp_path_factory.mktemp("registry")
    repo = snapshot_repo(tmp / PACK_DIR_NAME)
    (repo / "notes-not-committed.txt").write_text("untracked\n", encoding="utf-8")
    (repo / "nodes" / "__pycache__").mkdir(exist_ok=True)
    (repo / "nodes" / "__pycache__" / "stray.cpython-311.pyc").write_bytes(b"\0" * 16)  # .gitignore: __pycache__/
    home = tmp / "home"
    home.mkdir()
    r = comfy_cli("node", "pack", cwd=repo, home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / "node.zip").is_file(), r.stdout + r.stderr
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    return {"repo": repo, "zip": repo / "node.zip", "home": home, "tracked": sorted(filter(None, tracked)),
            "tmp": tmp}


@pytest.fixture(scope="module")
def unpacked(packed):
    """node.zip unpacked into a folder named as a user's custom_nodes entry."""
    dest = packed["tmp"] / "custom_nodes" / PACK_DIR_NAME
    with zipfile.ZipFile(packed["zip"]) as z:
        z.extractall(dest)
    return dest


@requires_comfy_cli
def test_comfy_node_validate_passes_with_no_security_warning(packed):
    r = comfy_cli("node", "validate", cwd=packed["repo"], home=packed["home"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Running security checks" in out, out
    # the registry says these (exec/eval, several statements on a line) will soon be errors
    assert "Security warnings found" not in out, out


@requires_comfy_cli
def test_the_archive_holds_everything_the_pack_needs(packed):
    with zipfile.ZipFile(packed["zip"]) as z:
        names = {i.filename for i in z.infolist() if not i.is_dir()}
        content = {n: z.read(n) for n in names}
    repo = packed["repo"]
    assert names == set(packed["tracked"]), (
        f"not the tracked files: extra {sorted(names - set(packed['tracked']))[:10]}, "
        f"missing {sorted(set(packed['tracked']) - names)[:10]}")
    assert "notes-not-committed.txt" not in names and not any("__pycache__" in n for n in names)
    runtime = [n for n in packed["tracked"] if n.split("/")[0] in RUNTIME]
    changed = [n for n in runtime if content[n] != (repo / n).read_bytes()]
    assert not changed, f"differ from the working tree: {changed[:10]}"

    # the package data setuptools ships (pyproject's package-data patterns), as it is in the working tree
    data = {str(p.relative_to(ROOT)) for pattern in ("*.json", "*.txt", "*.safetensors", "*.md")
            for package in ("safetydpo_core", "safetydpo_workflows")
            for p in (ROOT / package).rglob(pattern) if "__pycache__" not in p.parts}
    data |= {str(p.relative_to(ROOT)) for p in (ROOT / "safetydpo_core" / "world" / "weights").rglob("*")
             if p.is_file()}
    assert not sorted(data - names), f"package data missing from the archive: {sorted(data - names)[:10]}"
    weights = "safetydpo_core/world/weights/"
    for need in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors", "model/safetydpo.json",
                 "model/text_encoder/model.safetensors", "model/tokenizer/vocab.json", "judge.safetensors",
                 "judge.json"):
        assert weights + need in names, need
    assert {"web/safetydpo_live.js", "__init__.py", "requirements.txt", "pyproject.toml"} <= names
    # the `safetydpo workflow` command's package (beside the core) and its kept ComfyUI core-node definitions
    assert {"safetydpo_workflows/__init__.py", "safetydpo_workflows/workflow_api.py", "safetydpo_workflows/cli.py",
            "safetydpo_workflows/comfy_core_nodes.json"} <= names
    flows = {n for n in names if n.startswith("workflows/")}
    assert flows == {str(p.relative_to(ROOT)) for p in (ROOT / "workflows").iterdir() if p.is_file()}
    assert any(n.endswith(".json") for n in flows) and any(n.endswith(".jpg") for n in flows)


@requires_comfy_cli
def test_the_world_model_and_judge_run_from_the_unpacked_archive(unpacked):
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from safetydpo_core.world import judge, model
assert model.__file__.startswith(sys.argv[1]) and judge.__file__.startswith(sys.argv[1]), model.__file__
den = model.load_world_model()
images = model.generate(den, ["a red circle"], seeds=0, steps=2)
reading = judge.load_judge().read(images)
print("RESULT " + json.dumps({"shape": list(images.shape), "finite": bool(torch.isfinite(images).all()),
                              "reading": len(reading)}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", code, str(unpacked)], cwd=unpacked.parent, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert out == {"shape": [1, 3, 32, 32], "finite": True, "reading": 1}, out


@requires_comfy_cli
@pytest.mark.skipif(COMFYUI_PATH is None, reason="COMFYUI_PATH is not set: this test starts a real ComfyUI 0.8.0 "
                                                 "server on the unpacked archive")
@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_loads_the_pack_from_the_unpacked_archive(unpacked, tmp_path):
    from test_nodes_schema import MAPPINGS  # the pack's node classes, imported without ComfyUI

    base = tmp_path / "comfy"
    shutil.copytree(unpacked.parent, base / "custom_nodes")
    with comfyui_server(HttpComfyServer, base, None, tmp_path / "server.log") as srv:
        log = srv.log()
        assert not pack_import_failures(log, PACK_DIR_NAME), log[-6000:]
        info = srv.get("/object_info")
        ours = {name for name, node in info.items() if node.get("python_module") == f"custom_nodes.{PACK_DIR_NAME}"}
        assert ours == set(MAPPINGS), f"listed: {sorted(ours)}; the pack has {sorted(MAPPINGS)}"
        scripts = [s for s in srv.get("/extensions") if s.endswith("/safetydpo_live.js")]
        assert scripts, "the pack's web extension is not served"
        assert srv.get_bytes(scripts[0]) == (ROOT / "web" / "safetydpo_live.js").read_bytes()


def test_the_registry_icon_is_the_png_pyproject_points_at():
    from PIL import Image

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    icon, repo = data["tool"]["comfy"]["Icon"], data["project"]["urls"]["Repository"]
    m = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/main/(.+)", icon)
    assert m, f"Icon should be a raw.githubusercontent.com URL of the main branch: {icon}"
    assert repo.rstrip("/").endswith("github.com/" + m.group(1)), f"Icon {icon} is not in the Repository {repo}"
    path = ROOT / m.group(2)
    assert path.is_file(), f"{m.group(2)} does not exist"
    with Image.open(path) as im:  # the registry takes SVG, PNG, JPG or GIF up to 800x400 px
        assert im.format == "PNG" and im.width == im.height and im.width <= 400, (im.format, im.size)
        im.load()
        colors = im.convert("RGB").resize((16, 16)).getcolors(256)
        assert colors is None or len(colors) > 4, "the icon is blank"
