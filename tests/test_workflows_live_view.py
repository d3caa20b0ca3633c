"""The live view's server side (``nodes/live_view.py``) and its frontend file (``web/safetydpo_live.js``),
without ComfyUI: the messages' names and payloads, throttling, never raising, a no-op outside a server; the
extension's event names match, it is plain ES module JavaScript, and it touches no frontend API without a
feature check. The real round trip (server message -> view on the node) is in tests/test_frontend_e2e.py."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "web" / "safetydpo_live.js"


def live_view():
    spec = importlib.util.spec_from_file_location("safetydpo_live_view_under_test", ROOT / "nodes" / "live_view.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Recorder:
    """Stands in for ComfyUI's PromptServer.instance: records send_sync calls (the e2e test uses the real one)."""

    def __init__(self, fail=False):
        self.sent, self.client_id, self.last_node_id, self.fail = [], "client-1", "12", fail

    def send_sync(self, event, data, sid=None):
        if self.fail:
            raise RuntimeError("socket gone")
        self.sent.append((event, data, sid))


@pytest.fixture
def server(monkeypatch):
    rec = Recorder()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=rec)))
    ctx = types.SimpleNamespace(node_id="12", prompt_id="p-1", list_index=None)
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: ctx
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    return rec


def test_outside_a_server_nothing_is_sent_and_nothing_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "server", None)
    lv = live_view()
    assert lv.send(lv.TRAIN_EVENT, {"step": 1}) is False
    calls = []
    progress = lv.train_progress(3, "violence", inner=lambda *a: calls.append(a))
    progress(1, 3, {"loss": 0.69})
    assert calls == [(1, 3, {"loss": 0.69})]  # ComfyUI's progress bar still gets every step


def test_train_messages_name_the_node_and_carry_step_loss_accuracy_margin(server):
    lv = live_view()
    now = [100.0]
    inner = []
    progress = lv.train_progress(5, "violence", inner=lambda *a: inner.append(a[0]), start=2, clock=lambda: now[0])
    progress(3, 5, {"loss": 0.69, "implicit_acc": 0.5, "margin": 0.01, "lr": 1e-4})
    now[0] += 0.1
    progress(4, 5, {"loss": 0.68, "implicit_acc": 1.0, "margin": 0.02})  # within MIN_INTERVAL: not sent
    now[0] += 0.05
    progress(5, 5, {"loss": float("nan"), "implicit_acc": 1.0, "margin": float("inf")})  # the last step: sent
    lv.train_done(5, 5, "violence")
    assert inner == [3, 4, 5]
    assert [e for e, _, _ in server.sent] == ["safetydpo.train"] * 4
    assert all(sid == "client-1" for _, _, sid in server.sent)
    start, s3, s5, done = (d for _, d, _ in server.sent)
    base = {"node": "12", "display_node": "12", "prompt_id": "p-1", "total": 5, "category": "violence"}
    assert start == {**base, "phase": "start", "step": 2}
    assert s3 == {**base, "phase": "step", "step": 3, "loss": 0.69, "implicit_acc": 0.5, "margin": 0.01}
    assert s5 == {**base, "phase": "step", "step": 5, "loss": None, "implicit_acc": 1.0, "margin": None}
    assert done == {**base, "phase": "done", "step": 5}


def test_merge_report_message_and_a_broken_socket_never_raises(server):
    lv = live_view()
    lv.merge_report("comerge", "Merge method: comerge\n...")
    (event, data, _), = server.sent
    assert event == "safetydpo.merge" and data["method"] == "comerge" and data["report"].startswith("Merge method")
    assert data["node"] == "12" and data["prompt_id"] == "p-1"
    server.fail = True
    assert lv.send("safetydpo.merge", {"report": "x"}) is False


def test_the_extension_listens_to_the_messages_the_server_sends():
    lv = live_view()
    js = JS.read_text(encoding="utf-8")
    assert f'"{lv.TRAIN_EVENT}"' in js and f'"{lv.MERGE_EVENT}"' in js
    for field in ("phase", "step", "total", "loss", "implicit_acc", "margin", "category", "display_node", "report"):
        assert re.search(rf"\bdetail\.{field}\b", js), field


def test_the_extension_guards_every_frontend_api_it_uses():
    js = JS.read_text(encoding="utf-8")
    # no static imports: a frontend without the legacy scripts/*.js shims must not fail to load the module
    assert not re.search(r"^\s*import\s", js, re.M)
    for api, guard in (("app.registerExtension", 'typeof app.registerExtension !== "function"'),
                       ("api.addEventListener", 'typeof api.addEventListener !== "function"'),
                       ("node.addDOMWidget", 'typeof node.addDOMWidget !== "function"')):
        assert api in js and guard in js, api
    assert "widget.serialize = false" in js  # never in widgets_values
    assert js.count("try {") >= 10 and "register().catch(" in js


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the JavaScript syntax check needs it")
def test_the_extension_is_valid_javascript(tmp_path):
    copy = tmp_path / "safetydpo_live.mjs"
    copy.write_text(JS.read_text(encoding="utf-8"), encoding="utf-8")
    r = subprocess.run(["node", "--check", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_pack_serves_the_web_folder():
    text = (ROOT / "__init__.py").read_text(encoding="utf-8")
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', text, re.M) and "WEB_DIRECTORY" in text.split("__all__")[-1]
    assert sorted(p.name for p in (ROOT / "web").iterdir()) == ["safetydpo_live.js"]
