"""Packaging: the pack imports the way ComfyUI imports it, without ComfyUI, without the network, without its
optional extras and without an installed ``safetydpo_core``; ``requirements.txt`` suits ComfyUI-Manager;
``pyproject.toml`` has the registry's ``[tool.comfy]`` table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server", "execution", "nudenet",
           "onnxruntime", "gguf", "diffusers", "peft", "matplotlib", "accelerate", "safetydpo_core")

# Runs in a fresh interpreter: blocks the modules above and every network connection, then imports the pack
# exactly as ComfyUI's nodes.load_custom_node does (module name = the folder path with "." -> "_x_").
SCRIPT = r"""
import importlib.abc, importlib.util, json, os, socket, sys
BLOCKED = set(json.loads(sys.argv[2]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, Block())
attempts = []
def no_net(*a, **k):
    attempts.append(repr(a[:2]))
    raise OSError("network blocked for this test")
socket.socket.connect = no_net
socket.socket.connect_ex = no_net
socket.create_connection = no_net
module_path = sys.argv[1]
name = module_path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(module_path, "__init__.py"))
mod = importlib.util.module_from_spec(spec)
sys.modules[name] = mod
spec.loader.exec_module(mod)
out = {"nodes": sorted(mod.NODE_CLASS_MAPPINGS), "display": len(mod.NODE_DISPLAY_NAME_MAPPINGS),
       "web": getattr(mod, "WEB_DIRECTORY", None)}
specs = {}
for key, cls in mod.NODE_CLASS_MAPPINGS.items():
    specs[key] = sorted(cls.INPUT_TYPES()["required"])
out["specs"] = specs
out["core"] = sorted(m for m in sys.modules if m.endswith(".safetydpo_core") or m == "safetydpo_core")
out["leaked"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
out["network"] = attempts
print("RESULT " + json.dumps(out))
"""


def _import_in_subprocess(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), json.dumps(BLOCKED)], capture_output=True,
                          text=True, env=env, cwd=str(folder.parent), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".git" not in p.parts and "__pycache__" not in p.parts}


@pytest.mark.parametrize("folder_name", ["ComfyUI-SafetyDPO", "comfyui-safetydpo.v0.1"])
def test_the_pack_imports_like_comfyui_imports_it_with_nothing_optional(tmp_path, folder_name):
    link = tmp_path / folder_name
    os.symlink(ROOT, link)
    before = _tree(ROOT)
    out = _import_in_subprocess(link)
    assert len(out["nodes"]) == 17 and out["display"] == 17 and all(n.startswith("SafetyDPO_") for n in out["nodes"])
    assert out["leaked"] == [], "imported at load time: " + ", ".join(out["leaked"])
    assert out["network"] == []
    assert out["core"] == [str(link).replace(".", "_x_") + ".safetydpo_core"]  # the pack's own copy
    assert all(out["specs"].values())
    assert _tree(ROOT) == before, "importing the pack wrote files into it"
    assert out["web"] is None or (ROOT / out["web"]).is_dir()


def test_requirements_txt_suits_comfyui_manager():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    reqs = [l for l in lines if l and not l.startswith("#")]
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip's environment almost everywhere
        pytest.skip("packaging is not installed")
    names = []
    for l in reqs:
        assert not l.startswith("-"), f"requirements.txt: ComfyUI-Manager runs `pip install <line>`; {l!r} is an option"
        assert " " not in l.split(";")[0].strip(), f"requirements.txt: one package per line: {l!r}"
        names.append(Requirement(l).name.lower())
    assert not {"torch", "torchvision", "torchaudio"} & set(names), "never list torch for ComfyUI-Manager"
    assert len(names) == len(set(names))
    comfy_provides = {"numpy", "safetensors", "transformers", "pillow", "tqdm", "pyyaml", "einops", "scipy"}
    assert not comfy_provides & set(names), "ComfyUI already provides these"


def test_pyproject_has_the_registry_table():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert isinstance(comfy.get(key), str) and comfy[key].strip(), key
    assert comfy["requires-comfyui"].startswith(">=0.8")
    web = comfy.get("web")
    assert (web is None) == (not (ROOT / "web").is_dir()), "[tool.comfy] web must match an existing web/ folder"
    project = data["project"]
    assert project["name"] and "comfyui" not in project["name"].lower()
    assert "Repository" in project.get("urls", {})


def test_root_init_imported_as_a_plain_file_registers_nothing_and_does_not_fail(tmp_path):
    """pytest imports a test tree's root ``__init__.py`` as the plain module ``__init__`` when the folder's name
    is not a Python name (a clone named ``ComfyUI-SafetyDPO``): that import must not fail."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('__init__', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(len(m.NODE_CLASS_MAPPINGS), m.WEB_DIRECTORY)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "__init__.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "./web"]
