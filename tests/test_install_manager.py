"""The pack installed the way most users install it: by ComfyUI-Manager, from a git URL, into a real ComfyUI 0.8.

ComfyUI 0.8 ships the Manager as the pip package its ``manager_requirements.txt`` pins (``comfyui_manager==4.0.4``)
and starts it with ``main.py --enable-manager``. In 4.0.4, installing from a git URL ("Install via Git URL") is a
route of the Manager's legacy UI only: ``POST /v2/customnode/install/git_url`` with the URL as the body (the new
UI's ``/v2/manager/queue/task`` installs only packs of its node database), so the server runs with
``--enable-manager-legacy-ui`` too. That route needs the Manager's ``security_level`` at ``normal-`` (or ``weak``)
with ``--listen`` on a loopback address; at the default ``normal`` it answers 403 (seen with 4.0.4; a user sets
``security_level = normal-`` in ``<user dir>/__manager/config.ini``, as this test does before the first start).
The test installs through that route, then restarts ComfyUI as the Manager's Restart button does
(``GET /v2/manager/reboot``, which replaces the process with a new ``main.py``). On install the Manager clones the
URL with git into ``custom_nodes/<repository name>``, runs ``pip install <line>`` for each line of
``requirements.txt``, and then checks that torch kept its version.

* The URL is ``file://localhost/<tmp>/ComfyUI-SafetyDPO.git``: a bare clone of a snapshot of this working tree
  (uncommitted changes included). The Manager refuses ``file:///path`` URLs (its URL check wants a host).
* The config also says ``network_mode = offline`` (nothing here reaches the internet; otherwise the Manager fetches
  its node lists from GitHub at start) and ``use_uv = False`` (pip, which follows the machine's pip configuration;
  the config the Manager writes by default says ``use_uv = True`` and installs with ``python -m uv pip``).
* ``--base-directory`` puts custom_nodes, the user directory (with the Manager's files) and the models, input and
  output folders in a temporary directory, and the database is in memory: the ComfyUI checkout is not written to.
* The Manager's pip runs with ``PIP_CONSTRAINT`` pinning the installed torch version, so that even a broken
  requirements.txt could not replace this machine's torch (the install would fail instead); the test checks that
  the Manager installed exactly the lines of requirements.txt (never torch) and that torch is the same install
  (version, file, and the wheel's RECORD) after the install as before.

Two server starts (about 15 s each on 2 idle CPU cores, 50 s on a loaded machine) and the install.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import pytest

from comfyui_support import (COMFYUI_PATH, HttpComfyServer, comfyui_server, pack_import_failures, snapshot_repo,
                             torch_install, wait_for_restart)

PACK_DIR_NAME = "ComfyUI-SafetyDPO"
ROOT = Path(__file__).resolve().parents[1]


def _pinned_manager() -> str | None:
    """The comfyui_manager version ComfyUI's manager_requirements.txt pins, or None."""
    req = Path(COMFYUI_PATH or "", "manager_requirements.txt")
    if not COMFYUI_PATH or not req.is_file():
        return None
    m = re.search(r"^\s*comfyui[-_]manager\s*==\s*([\w.]+)", req.read_text(encoding="utf-8"), re.M | re.I)
    return m.group(1) if m else None


def _skip_reason() -> str | None:
    if COMFYUI_PATH is None:
        return "COMFYUI_PATH is not set: this test starts a real ComfyUI 0.8.0 with ComfyUI-Manager"
    pinned = _pinned_manager()
    if pinned is None:
        return f"{COMFYUI_PATH}/manager_requirements.txt does not pin comfyui_manager (ComfyUI older than 0.8?)"
    try:
        have = importlib.metadata.version("comfyui_manager")
    except importlib.metadata.PackageNotFoundError:
        return (f"comfyui_manager is not installed: pip install -r {COMFYUI_PATH}/manager_requirements.txt "
                "(with the torch constraints file, see docs/comfyui-setup.md)")
    if have != pinned:
        return f"comfyui_manager {have} is installed but ComfyUI pins {pinned} in manager_requirements.txt"
    return None


pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _requirement_lines() -> list[str]:
    """The lines ComfyUI-Manager installs from requirements.txt: neither blank nor comments."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def _pip_installs(log: str) -> list[str]:
    """What the Manager ran ``pip install`` on, from its ``## ComfyUI-Manager: EXECUTE => [...]`` log lines
    (its console wraps long lines, so a command may span several)."""
    out = []
    for m in re.finditer(r"EXECUTE => (\[.*?\])", log, re.S):
        cmd = ast.literal_eval(" ".join(m.group(1).split()))
        i = next((k for k in range(len(cmd) - 1) if cmd[k:k + 2] == ["pip", "install"]), None)
        if i is not None:
            out += cmd[i + 2:]
    return out


def _set_manager_config(path: Path, **settings: str) -> None:
    config = configparser.ConfigParser(strict=False)
    config.read(path, encoding="utf-8")
    if not config.has_section("default"):
        config.add_section("default")
    for key, value in settings.items():
        config["default"][key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        config.write(f)


def _reboot(srv: HttpComfyServer) -> None:
    """Restart as the Manager's Restart button does; the request gets no answer (the process is replaced)."""
    starts = srv.starts()
    try:
        srv.request("GET", "/v2/manager/reboot", timeout=30)
    except OSError:
        pass
    wait_for_restart(srv, starts)


def _checkout_listing() -> dict[str, list[str]]:
    top = Path(COMFYUI_PATH)
    return {"top": sorted(os.listdir(top)),
            **{d: sorted(os.listdir(top / d)) for d in ("custom_nodes", "user", "models") if (top / d).is_dir()}}


def test_comfyui_manager_installs_the_pack_from_a_git_url(tmp_path):
    from test_nodes_schema import MAPPINGS  # the pack's node classes, imported without ComfyUI

    snapshot = snapshot_repo(tmp_path / "snapshot")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=snapshot, capture_output=True, text=True,
                            check=True).stdout.strip()
    bare = tmp_path / "served" / f"{PACK_DIR_NAME}.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(snapshot), str(bare)], check=True, capture_output=True)
    url = f"file://localhost{bare}"

    base = tmp_path / "comfy"
    (base / "custom_nodes").mkdir(parents=True)
    config_ini = base / "user" / "__manager" / "config.ini"
    _set_manager_config(config_ini, security_level="normal-", network_mode="offline", use_uv="False")
    constraints = tmp_path / "torch-constraint.txt"
    torch_before = torch_install()
    constraints.write_text(f"torch=={torch_before['version'].split('+')[0]}\n", encoding="utf-8")
    checkout_before = _checkout_listing()

    with comfyui_server(HttpComfyServer, base, None, tmp_path / "server.log",
                        extra_args=["--enable-manager", "--enable-manager-legacy-ui"],
                        extra_env={"PIP_CONSTRAINT": str(constraints), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}) as srv:
        status, version = srv.request("GET", "/v2/manager/version")
        assert status == 200 and version.decode() == f"V{_pinned_manager()}", (status, version)
        torch_served = srv.get("/system_stats")["system"]["pytorch_version"]
        assert not any(name in MAPPINGS for name in srv.get("/object_info")), "the pack is there before the install"

        # 1. install through the Manager's route: git clone + pip install of each requirements.txt line
        mark = len(srv.log())
        status, body = srv.request("POST", "/v2/customnode/install/git_url", url.encode(), timeout=600)
        install_log = srv.log()[mark:]
        assert status == 200, f"install answered {status} {body[:500]!r}:\n{install_log[-6000:]}"
        assert "Installation was successful." in install_log, install_log[-6000:]
        assert "install script failed" not in install_log, install_log[-6000:]
        installed = base / "custom_nodes" / PACK_DIR_NAME
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=installed, capture_output=True, text=True,
                              check=True).stdout.strip()
        assert head == commit, "the Manager's clone is not the served commit"
        assert _pip_installs(install_log) == _requirement_lines(), install_log[-6000:]
        assert not any(re.match(r"torch(vision|audio)?\b", r, re.I) for r in _pip_installs(install_log))

        # 2. restart: ComfyUI imports the pack; every node is listed, torch is the same install
        _reboot(srv)
        log = srv.log()
        assert not pack_import_failures(log, PACK_DIR_NAME), log[-6000:]
        assert re.search(rf"\d+\.\d+ seconds: .*custom_nodes/{re.escape(PACK_DIR_NAME)}\s*$", log, re.M), log[-3000:]
        info = srv.get("/object_info")
        ours = {name for name, node in info.items() if node.get("python_module") == f"custom_nodes.{PACK_DIR_NAME}"}
        assert ours == set(MAPPINGS), f"listed: {sorted(ours)}; the pack has {sorted(MAPPINGS)}"
        assert all(info[name]["category"] == "SafetyDPO" for name in ours)
        imported = srv.get("/v2/customnode/installed?mode=imported")
        assert any(PACK_DIR_NAME.lower() in str(key).lower() for key in imported), imported
        assert srv.get("/system_stats")["system"]["pytorch_version"] == torch_served

    assert torch_install() == torch_before, "installing the pack changed torch"
    assert _checkout_listing() == checkout_before, "the ComfyUI checkout was written to"
