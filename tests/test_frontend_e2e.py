"""The shipped workflows and the live view in the real ComfyUI frontend, served by a real ComfyUI server with
this pack (COMFYUI_PATH), driven by headless Chromium (Debian's ``chromium`` package) through Playwright.

One server for the module, started as ``tests/test_comfy_server.py`` starts its own (free 127.0.0.1 port,
``--base-directory`` in a temporary folder, in-memory database, ``--extra-model-paths-config`` adding a
custom_nodes folder that links to this pack under its clone name, and a checkpoints folder). The checkpoint
folder holds a random-weight SD1.5-shaped single-file checkpoint under the stock name the workflows use
(``v1-5-pruned-emaonly-fp16.safetensors``: real SD1.5 shapes, LDM key names, CLIP keys with the
``text_model.`` prefix) and empty placeholders named like the SDXL, SD3.5 and Flux.1 model files (checkpoint,
diffusion model, text encoders, VAE), which are listed but never loaded. The frontend user's settings skip the first-run template browser and the minimap.

Without the browser (always, with COMFYUI_PATH): the kept core node list equals the live ``/object_info``;
the converter gives the same API graphs from live definitions as from the offline ones; the templates and
their thumbnails are listed and served, and so is the extension.

In the browser: the page boots without a console error; a workflow with an unknown node type brings up the
missing-nodes dialog (so the detector below is live); every shipped workflow loads, from the URL the
template browser uses, with no missing-node dialog, no other dialog, no console error, and the frontend's
own ``graphToPrompt`` equals the offline converter's output; then workflow 2 is queued with the Run button
on small settings (64 px, 1 sampling step, 2 training steps) and the live view on the train node follows
the steps to the end. Screenshots go under pytest's tmp dir and are copied to ``test-artifacts/`` (printed).
``SAFETYDPO_UPDATE_THUMBNAILS=1`` also writes each workflow's screenshot as its ``workflows/<name>.jpg``.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safetydpo_workflows import workflow_api as wa  # noqa: E402

from comfyui_support import ComfyServer, comfyui_server  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip() or None
CHROMIUM = os.environ.get("SAFETYDPO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_DIR_NAME = "ComfyUI-SafetyDPO"
WORKFLOWS = ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
ARTIFACTS = ROOT / "test-artifacts"
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
PLACEHOLDERS = (("checkpoints", SDXL), ("checkpoints", "sd3.5_medium.safetensors"),
                ("diffusion_models", "flux1-dev.safetensors"), ("vae", "ae.safetensors"),
                ("text_encoders", "clip_l.safetensors"), ("text_encoders", "clip_g.safetensors"),
                ("text_encoders", "t5xxl_fp16.safetensors"))
UPDATE_THUMBNAILS = os.environ.get("SAFETYDPO_UPDATE_THUMBNAILS", "") == "1"
# no first-run template browser, no minimap or canvas info over the graph, node text at every zoom level
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0}
# workflow 2 on a random-weight SD1.5 on CPU: tiny settings, set in the page before queueing
SMALL = {"SafetyDPO_BuiltinPairs": {"pairs_per_category": 1},
         "SafetyDPO_RenderPairs": {"width": 64, "height": 64, "steps": 1, "cfg": 1.0, "batch_pairs": 1},
         "SafetyDPO_TrainExpert": {"steps": 2, "save_every": 0, "resume": False},
         "SafetyDPO_LossPlot": {"width": 256, "height": 160}}
TRAIN_STEPS = SMALL["SafetyDPO_TrainExpert"]["steps"]

pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow,
    pytest.mark.skipif(COMFYUI_PATH is None, reason="COMFYUI_PATH is not set: these tests start a real ComfyUI "
                                                    "server and its frontend; set COMFYUI_PATH to a ComfyUI 0.8.0 "
                                                    "checkout"),
]


# -- a random-weight SD1.5-shaped single-file checkpoint ------------------------------------------------------
def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint CheckpointLoaderSimple detects as SD1.5: SD1.5's real shapes under LDM names
    (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``),
    random fp16 weights. Written to a temporary name, then renamed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_checkpoint import _vae_to_ldm
    from safetydpo_core.lora.unet_names import UNetNames
    from safetydpo_core.tiny_models import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        names = UNetNames.from_module(unet)
        shapes = {}
        for k, v in unet.state_dict().items():
            mod, _, p = k.rpartition(".")
            shapes[f"model.diffusion_model.{names.to_ldm[mod]}.{p}"] = tuple(v.shape)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=512)
        shapes.update({k: tuple(v.shape) for k, v in _vae_to_ldm(vae.state_dict(), 4).items()})
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
        for k, v in CLIPTextModel(cfg).state_dict().items():
            if not k.endswith("position_ids"):  # transformers 5 drops "text_model."; ComfyUI needs it
                shapes["cond_stage_model.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}")] = \
                    tuple(v.shape)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in sorted(shapes):
        s = shapes[k]
        if k.endswith("bias"):
            t = torch.zeros(s)
        elif len(s) == 1 and ("norm" in k or "ln" in k):
            t = torch.ones(s)
        elif "embedding" in k and len(s) == 2:
            t = torch.randn(s, generator=g) * (0.5 if k.startswith("cond_stage_model") else 0.02)
        elif len(s) >= 2:
            t = torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]))
        else:
            t = torch.randn(s, generator=g) * 0.02
        sd[k] = t.to(torch.float16).contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


# -- the server -------------------------------------------------------------------------------------------
class Server(ComfyServer):
    def fetch(self, path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def get(self, path: str):
        status, _, body = self.fetch(path)
        assert status == 200, f"GET {path} -> {status}: {body[:500]!r}"
        return json.loads(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontend_e2e")
    extra, base = tmp / "extra", tmp / "comfy"
    (extra / "custom_nodes").mkdir(parents=True)
    for folder in ("checkpoints", "diffusion_models", "text_encoders", "vae"):
        (extra / "models" / folder).mkdir(parents=True)
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(ROOT, extra / "custom_nodes" / PACK_DIR_NAME)
    # the frontend user: no first-run template browser, no minimap; the files a fresh user lacks (the
    # frontend asks for them at start and the 404s would be console errors)
    user = base / "user" / "default"
    for d in ("workflows", "subgraphs"):
        (user / d).mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    (user / "user.css").write_text("", encoding="utf-8")
    (user / "comfy.templates.json").write_text("[]", encoding="utf-8")
    yaml_path = tmp / "extra_model_paths.yaml"
    yaml_path.write_text(
        "safetydpo_e2e:\n"
        f"  base_path: {extra}\n"
        "  custom_nodes: custom_nodes\n"
        "  checkpoints: models/checkpoints\n"
        "  diffusion_models: models/diffusion_models\n"
        "  text_encoders: models/text_encoders\n"
        "  vae: models/vae\n", encoding="utf-8")
    checkpoints = extra / "models" / "checkpoints"

    def write_checkpoints():  # while the server starts; listed (by name only) before the first workflow loads
        write_sd15_checkpoint(checkpoints / SD15)
        for folder, name in PLACEHOLDERS:  # listed, never loaded
            (extra / "models" / folder / name).write_bytes(b"")

    try:
        with comfyui_server(Server, base, yaml_path, tmp / "server.log", while_starting=write_checkpoints) as srv:
            failed = [l for l in srv.log().splitlines() if "Cannot import" in l and PACK_DIR_NAME in l]
            assert not failed, "\n".join(failed)
            yield srv
    finally:
        # 2 GB, rebuilt on every run: not left in pytest's kept temporary folders
        (checkpoints / SD15).unlink(missing_ok=True)


def offline_definitions() -> dict:
    from test_workflows import core_data

    return wa.merge_object_info(core_data()["nodes"], wa.pack_object_info())


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


# -- without the browser ----------------------------------------------------------------------------------
def test_the_kept_core_node_list_equals_the_live_object_info(server):
    from test_workflows import core_data, core_interface

    data = core_data()
    live = server.get("/object_info")
    assert server.get("/system_stats")["system"]["comfyui_version"] == data["comfyui_version"]
    drift = []
    for name, kept in data["nodes"].items():
        if name not in live:
            drift.append(f"{name}: not in the live server")
            continue
        files = data["file_lists"].get(name, {})
        got = core_interface(live[name], files)
        if got != kept:
            drift.append(f"{name}: kept {json.dumps(kept)[:600]}\n  live {json.dumps(got)[:600]}")
        for inp in files:
            part = "required" if inp in live[name]["input"].get("required", {}) else "optional"
            entry = live[name]["input"][part][inp]
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            assert isinstance(typ, list) or typ == "COMBO" and isinstance(opts.get("options"), list), \
                f"{name}.{inp} is no longer a file list"
    assert not drift, ("the kept core node list differs from this ComfyUI; review and refresh it with "
                       "`python tests/test_workflows.py --refresh-core-nodes <url>`:\n" + "\n".join(drift))
    assert not set(data["frontend_only"]) & set(live), "a frontend-only node type is now a server node"


def test_the_converter_gives_the_same_api_graphs_from_live_definitions(server):
    live, offline = server.get("/object_info"), offline_definitions()
    for name in NAMES:
        wf = load_workflow(name)
        assert wa.ui_to_api(wf, live) == wa.ui_to_api(wf, offline), name
        assert wa.check_workflow(wf, live, dynamic_combos=wa.file_list_inputs(live)) == [], name


def test_templates_thumbnails_and_the_extension_are_served(server):
    listing = server.get("/workflow_templates")
    assert sorted(listing.get(PACK_DIR_NAME, [])) == NAMES, listing
    for name in NAMES:
        status, ctype, body = server.fetch(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert status == 200 and json.loads(body) == load_workflow(name)
        status, ctype, body = server.fetch(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
        assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff", (name, status, ctype)
    status, ctype, body = server.fetch(f"/extensions/{PACK_DIR_NAME}/safetydpo_live.js")
    assert status == 200 and "javascript" in ctype and b"safetydpo.train" in body
    assert f"/extensions/{PACK_DIR_NAME}/safetydpo_live.js" in server.get("/extensions")


# -- the browser ------------------------------------------------------------------------------------------
# Requested by every bare ComfyUI 0.8.0 + frontend 1.35.9 page and absent there: index.html links a
# user.css next to itself (the frontend package has none), and Chromium asks for /favicon.ico.
BARE_COMFYUI_404 = ("/user.css", "/favicon.ico")


class Page:
    """The Playwright page plus what it logged: console errors, uncaught exceptions, failed requests (except
    the exact URLs of BARE_COMFYUI_404)."""

    def __init__(self, page, shots: Path, origin: str):
        self.page, self.shots, self.origin = page, shots, origin
        self.log: list[tuple[str, str]] = []
        page.on("console", lambda m: self.log.append((m.type, f"{m.text} @ {m.location.get('url', '')}")))
        page.on("pageerror", lambda e: self.log.append(("pageerror", str(e))))
        page.on("requestfailed", lambda r: self.log.append(("requestfailed", f"{r.url}: {r.failure}")))
        page.on("response", lambda r: self.log.append(("http", f"{r.status} {r.url}")) if r.status >= 400 else None)

    def errors(self, since: int = 0) -> list[tuple[str, str]]:
        return [m for m in self.log[since:] if m[0] in ("error", "pageerror", "requestfailed", "http")
                and not any(f"{self.origin}{path}" in m[1] for path in BARE_COMFYUI_404)]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        ARTIFACTS.mkdir(exist_ok=True)
        dest = ARTIFACTS / path.name
        shutil.copyfile(path, dest)
        print(f"\nscreenshot: {dest}")
        return path


@pytest.fixture(scope="module")
def playwright_api():
    """Playwright's sync API, or a skip naming what to install (checked before the server starts)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set SAFETYDPO_CHROMIUM)")
    return pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")


@pytest.fixture(scope="module")
def page(playwright_api, server, tmp_path_factory):
    pw = playwright_api.sync_playwright().start()
    browser = None
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        p = browser.new_page(viewport={"width": 1440, "height": 900})
        p.set_default_timeout(60_000)
        wrapped = Page(p, tmp_path_factory.mktemp("screenshots"), server.url)
        p.goto(server.url)
        p.wait_for_function("() => window.app && window.app.graph && window.comfyAPI && window.LiteGraph",
                            timeout=120_000)
        p.wait_for_timeout(1500)  # let start-up requests and extensions finish
        names = p.evaluate("() => (window.app.extensions || []).map((e) => e.name)")
        assert "SafetyDPO.LiveView" in names, f"the pack's extension did not register: {wrapped.log[-20:]}"
        yield wrapped
    finally:
        if browser is not None:
            browser.close()
        pw.stop()


LOAD_JS = """async ([url, name]) => {
  const r = await fetch(url);
  if (!r.ok) return {error: `GET ${url} -> ${r.status}`};
  const wf = await r.json();
  await app.loadGraphData(wf, true, true, name);
  await new Promise((res) => setTimeout(res, 800));
  const visible = (el) => !!(el && (el.offsetWidth || el.offsetHeight || el.getClientRects().length));
  const missing = [...document.querySelectorAll('.comfy-missing-nodes, [aria-labelledby="global-missing-nodes"]')]
    .filter(visible).map((el) => el.innerText.slice(0, 300));
  const dialogs = [...document.querySelectorAll('.p-dialog, [role="dialog"]')].filter(visible)
    .map((el) => el.innerText.slice(0, 300));
  // the frontend's schema and link validation report through toasts ("Alert", "Workflow Validation", ...)
  const toasts = [...document.querySelectorAll('.p-toast-message')].filter(visible)
    .map((el) => el.innerText.slice(0, 300));
  for (const el of document.querySelectorAll('.p-toast-message .p-toast-close-button')) el.click();
  const graph = app.rootGraph || app.graph;
  const unregistered = graph.nodes.filter((n) => !(n.type in LiteGraph.registered_node_types)).map((n) => n.type);
  const prompt = await app.graphToPrompt();
  return {missing, dialogs, toasts, unregistered, nodes: graph.nodes.length, output: prompt.output};
}"""


def test_the_page_boots_with_the_extension_and_without_console_errors(page):
    assert page.errors() == [], f"console errors while the frontend started: {page.errors()}"
    assert page.page.evaluate("() => !!document.querySelector('canvas')")


def test_the_detectors_see_a_missing_node_a_broken_link_and_a_malformed_file(page, server):
    """The detectors used below, shown to work: a workflow with an unknown node type brings up the missing-nodes
    dialog; a link its origin does not list and a malformed field bring up the frontend's validation toasts."""
    wf = load_workflow("02_train_one_expert")
    bogus = json.loads(json.dumps(wf))
    bogus["nodes"][1]["type"] = "SafetyDPO_NoSuchNode"
    page.page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'missing-node-check'); }", bogus)
    found = page.page.locator(".comfy-missing-nodes").first
    found.wait_for(state="visible", timeout=15_000)
    assert "SafetyDPO_NoSuchNode" in found.inner_text()
    page.page.keyboard.press("Escape")
    page.page.locator(".comfy-missing-nodes").first.wait_for(state="hidden", timeout=15_000)
    # the frontend's own validation reports through toasts: a link its origin does not list (link check), a
    # malformed field (the zod schema of format 0.4)
    broken = json.loads(json.dumps(wf))
    link = broken["links"][-1]
    next(n for n in broken["nodes"] if n["id"] == link[1])["outputs"][link[2]]["links"].remove(link[0])
    malformed = json.loads(json.dumps(wf))
    malformed["nodes"][1]["pos"] = "here"
    for bad, expected in ((broken, "Workflow Validation"), (malformed, "zod schema")):
        res = page.page.evaluate("""async (wf) => {
          await app.loadGraphData(wf, true, true, 'validation-check');
          await new Promise((res) => setTimeout(res, 800));
          const found = [...document.querySelectorAll('.p-toast-message')].map((el) => el.innerText);
          for (const el of document.querySelectorAll('.p-toast-message .p-toast-close-button')) el.click();
          return found;
        }""", bad)
        assert any(expected in t for t in res), (expected, res)
        page.page.wait_for_timeout(500)


def test_every_shipped_workflow_loads_without_missing_nodes_dialogs_or_console_errors(page, server):
    offline = offline_definitions()
    problems = []
    for name in NAMES:
        mark = len(page.log)
        url = f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json"
        res = page.page.evaluate(LOAD_JS, [url, name])
        wf = load_workflow(name)
        if res.get("error"):
            problems.append(f"{name}: {res['error']}")
            continue
        if res["missing"]:
            problems.append(f"{name}: missing-nodes dialog: {res['missing']}")
        if res["dialogs"]:
            problems.append(f"{name}: a dialog opened: {res['dialogs']}")
        if res["toasts"]:
            problems.append(f"{name}: the frontend reported: {res['toasts']}")
        if res["unregistered"] or res["nodes"] != len(wf["nodes"]):
            problems.append(f"{name}: {res['nodes']} nodes in the page for {len(wf['nodes'])}; unknown: "
                            f"{res['unregistered']}")
        if res["output"] != wa.ui_to_api(wf, offline):
            problems.append(f"{name}: the frontend's graphToPrompt differs from the converter:\n"
                            f"  frontend  {json.dumps(res['output'], sort_keys=True)[:1500]}\n"
                            f"  converter {json.dumps(wa.ui_to_api(wf, offline), sort_keys=True)[:1500]}")
        shot = page.shot(f"workflow_{name}")
        if UPDATE_THUMBNAILS:
            write_thumbnail(shot, WORKFLOWS / f"{name}.jpg", page.page.evaluate(BOUNDS_JS))
        errors = page.errors(mark)
        if errors:
            problems.append(f"{name}: console errors: {errors}")
    assert not problems, "\n".join(problems)


BOUNDS_JS = """() => {
  const graph = app.rootGraph || app.graph, ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of graph.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const s = (x, y) => [(x + ds.offset[0]) * ds.scale + r.left, (y + ds.offset[1]) * ds.scale + r.top];
  return [...s(x0, y0), ...s(x1, y1)];
}"""


def write_thumbnail(png: Path, jpg: Path, bounds: list[float]) -> None:
    """The template browser's thumbnail: the screenshot cut to the graph (plus a margin), on a 4:3 canvas of
    the frontend's background colour, 800 x 600 JPEG."""
    from PIL import Image

    from safetydpo_core.utils.atomic import atomic_write_bytes

    with Image.open(png) as im:
        im = im.convert("RGB")
        x0, y0, x1, y1 = bounds
        pad = 16
        box = (max(0, int(x0) - pad), max(0, int(y0) - pad), min(im.width, int(x1) + pad), min(im.height, int(y1) + pad))
        graph = im.crop(box)
        bg = im.getpixel((im.width - 5, im.height // 2))
        w = max(graph.width, round(graph.height * 4 / 3))
        h = max(graph.height, round(w * 3 / 4))
        canvas = Image.new("RGB", (w, h), bg)
        canvas.paste(graph, ((w - graph.width) // 2, (h - graph.height) // 2))
        canvas = canvas.resize((800, 600), Image.LANCZOS)
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=85, optimize=True)
    atomic_write_bytes(jpg, buf.getvalue())


SET_WIDGETS_JS = """(edits) => {
  const graph = app.rootGraph || app.graph;
  const done = [];
  for (const node of graph.nodes) {
    for (const [name, value] of Object.entries(edits[node.type] || {})) {
      const w = (node.widgets || []).find((x) => x.name === name);
      if (!w) throw new Error(`${node.type} has no widget ${name}`);
      w.value = value;
      done.push(`${node.type}.${name}`);
    }
  }
  graph.setDirtyCanvas(true, true);
  return done;
}"""

WATCH_JS = """() => {
  const api = window.comfyAPI.api.api;
  window.__sdpo = {train: [], status: null, error: null, shown: []};
  // what the view on the node showed, as it changed (the view is created by the first message)
  new MutationObserver((records) => {
    for (const r of records) {
      const el = r.target;
      if (el.dataset && el.dataset.safetydpoLive === 'train') window.__sdpo.shown.push(`${el.dataset.phase}:${el.dataset.step}`);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-step', 'data-phase']});
  api.addEventListener('safetydpo.train', (e) => window.__sdpo.train.push(e.detail));
  api.addEventListener('execution_success', (e) => { window.__sdpo.status = 'success'; });
  api.addEventListener('execution_error', (e) => { window.__sdpo.status = 'error'; window.__sdpo.error = e.detail; });
  api.addEventListener('execution_interrupted', (e) => { window.__sdpo.status = 'interrupted'; });
}"""


def test_queueing_workflow_2_trains_with_the_live_view(page, server):
    mark = len(page.log)
    name = "02_train_one_expert"
    res = page.page.evaluate(LOAD_JS, [f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json", name])
    assert not res.get("error") and not res["missing"] and not res["dialogs"] and not res["toasts"], res
    edited = page.page.evaluate(SET_WIDGETS_JS, SMALL)
    assert len(edited) == sum(len(v) for v in SMALL.values())
    prompt = page.page.evaluate("async () => (await app.graphToPrompt()).output")
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SafetyDPO_TrainExpert")
    assert prompt[train_id]["inputs"]["steps"] == TRAIN_STEPS
    page.page.evaluate(WATCH_JS)
    run = page.page.locator('[data-testid="queue-button"]').first
    run.wait_for(state="visible", timeout=15_000)
    run.click()
    t0 = time.monotonic()
    # the live view appears on the train node while it trains, and ends at the last step
    view = page.page.locator('[data-safetydpo-live="train"]').first
    view.wait_for(state="attached", timeout=420_000)
    page.page.wait_for_function("() => window.__sdpo.status !== null", timeout=420_000, polling=500)
    state = page.page.evaluate("() => window.__sdpo")
    assert state["status"] == "success", f"{state['status']}: {json.dumps(state['error'])[:3000]}\n" \
                                         f"{server.log()[-3000:]}"
    print(f"\nworkflow 2 ran in {time.monotonic() - t0:.0f} s")
    events = state["train"]
    phases = [e["phase"] for e in events]
    assert phases[0] == "start" and phases[-1] == "done" and "step" in phases, phases
    steps = [e for e in events if e["phase"] == "step"]
    assert steps[-1]["step"] == steps[-1]["total"] == TRAIN_STEPS
    assert all(e["node"] == train_id and e["display_node"] == train_id and e["category"] == "violence"
               for e in events)
    assert all(isinstance(e["loss"], float) and 0 <= e["implicit_acc"] <= 1 for e in steps)
    page.page.wait_for_function("() => document.querySelector('[data-safetydpo-live=\"train\"]')"
                                ".dataset.phase === 'done'", timeout=30_000)
    # the view followed the run: it showed every step it was sent, in order, then "done" (the "start" state
    # may come before the frontend has put the new view into the page)
    shown = [x for x in dict.fromkeys(page.page.evaluate("() => window.__sdpo.shown")) if not x.startswith("start")]
    assert shown == [f"{e['phase']}:{e['step']}" for e in events if e["phase"] != "start"], (shown, events)
    shown = page.page.evaluate("""() => {
      const el = document.querySelector('[data-safetydpo-live="train"]');
      const c = el.querySelector('canvas');
      const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let lit = 0;
      for (let i = 0; i < px.length; i += 4) if (px[i + 2] > 200 && px[i] < 150) lit++;  // the curve's blue
      const r = el.getBoundingClientRect();
      return {text: el.innerText, step: el.dataset.step, total: el.dataset.total, points: +el.dataset.points,
              loss: el.dataset.loss, lit, visible: r.width > 50 && r.height > 30};
    }""")
    assert shown["step"] == shown["total"] == str(TRAIN_STEPS), shown
    assert f"step {TRAIN_STEPS} / {TRAIN_STEPS}" in shown["text"] and "loss" in shown["text"] and "acc" in shown["text"]
    assert shown["points"] == len(steps) and float(shown["loss"]) == pytest.approx(steps[-1]["loss"])
    assert shown["lit"] > 10, "no loss curve drawn"
    assert shown["visible"], shown
    # the save node shows its file name (the node's UI text, through onExecuted)
    saved = page.page.locator('[data-safetydpo-live="text"]', has_text="violence_expert_00001_").first
    saved.wait_for(state="attached", timeout=30_000)
    assert (server.base / "models" / "loras" / "safetydpo" / "violence_expert_00001_.safetensors").is_file()
    page.page.evaluate("""() => {
      const graph = app.rootGraph || app.graph;
      const node = graph.nodes.find((n) => n.type === 'SafetyDPO_TrainExpert');
      app.canvas.ds.scale = 1;
      app.canvas.centerOnNode(node);
      graph.setDirtyCanvas(true, true);
    }""")
    page.page.wait_for_timeout(500)
    page.shot("workflow_02_trained_live_view")
    assert page.errors(mark) == [], f"console errors: {page.errors(mark)}"
    # the live view is display only: the workflow the page would save has the same widgets_values as before
    saved_wf = page.page.evaluate("() => (app.rootGraph || app.graph).serialize()")
    train = next(n for n in saved_wf["nodes"] if n["type"] == "SafetyDPO_TrainExpert")
    assert len(train["widgets_values"]) == 21 and train["widgets_values"][1] == TRAIN_STEPS
