// SafetyDPO live view for the ComfyUI frontend (served from this pack's WEB_DIRECTORY).
//
// * On "Train Safety Expert (DPO)" while it runs: step / total, loss, implicit accuracy, reward margin and a
//   small loss curve, fed by the server's "safetydpo.train" messages (nodes/live_view.py).
// * On "Co-Merge Experts": the merge report (the node's UI output, and the "safetydpo.merge" message); other
//   SafetyDPO nodes that return text (Evaluate's IP, the saved file names) show it the same way.
//
// Only long-standing frontend APIs are used (app.registerExtension, api.addEventListener, node.onExecuted,
// node.addDOMWidget, LiteGraph's onDrawForeground as the fallback), every one behind a feature check and a
// try/catch: if a future frontend changes them, the view is missing, never the page. The views are added
// only when a message arrives and are not serialized: workflows and their widgets_values stay as they are.

const EXTENSION = "SafetyDPO.LiveView";
const TRAIN_NODE = "SafetyDPO_TrainExpert";
const TRAIN_EVENT = "safetydpo.train";
const MERGE_EVENT = "safetydpo.merge";
const MAX_POINTS = 500;
const LOG = "[SafetyDPO live view]";

function warn(...args) {
  try {
    console.warn(LOG, ...args);
  } catch (_) {
    /* nothing */
  }
}

async function comfy() {
  const g = globalThis.comfyAPI || {};
  let app = g.app && g.app.app;
  let api = g.api && g.api.api;
  if (!app) {
    try {
      app = (await import("../../scripts/app.js")).app;
    } catch (_) {
      /* not available in this frontend */
    }
  }
  if (!api) {
    try {
      api = (await import("../../scripts/api.js")).api;
    } catch (_) {
      /* not available in this frontend */
    }
  }
  return { app, api };
}

function fmt(v, digits = 4) {
  return typeof v === "number" && isFinite(v) ? Number(v).toPrecision(digits) : "-";
}

function findNode(app, ids) {
  const graphs = [app && app.rootGraph, app && app.graph].filter(Boolean);
  for (const id of ids) {
    if (id === undefined || id === null) continue;
    for (const graph of graphs) {
      try {
        const n = typeof graph.getNodeById === "function" ? graph.getNodeById(id) : null;
        if (n) return n;
        const num = Number(id);
        if (Number.isFinite(num)) {
          const m = graph.getNodeById(num);
          if (m) return m;
        }
      } catch (_) {
        /* try the next one */
      }
    }
  }
  return null;
}

function redraw(app, node) {
  try {
    if (node && typeof node.setDirtyCanvas === "function") node.setDirtyCanvas(true, true);
    else if (app && app.graph && typeof app.graph.setDirtyCanvas === "function") app.graph.setDirtyCanvas(true, true);
  } catch (_) {
    /* drawing is best effort */
  }
}

// -- the views ---------------------------------------------------------------------------------------------
function makeView(node, kind) {
  const v = { kind, el: null, widget: null, lines: 0 };
  if (typeof document === "undefined" || typeof node.addDOMWidget !== "function") return v;
  try {
    const el = document.createElement("div");
    el.className = `safetydpo-live safetydpo-live-${kind}`;
    el.dataset.safetydpoLive = kind;
    el.style.cssText = "box-sizing:border-box;width:100%;padding:4px 6px;font:11px/1.35 monospace;"
      + "color:var(--input-text,#ddd);background:var(--comfy-input-bg,#222);border-radius:6px;overflow:hidden;";
    if (kind === "train") {
      const text = document.createElement("div");
      text.className = "safetydpo-live-text";
      const canvas = document.createElement("canvas");
      canvas.className = "safetydpo-live-curve";
      canvas.width = 320;
      canvas.height = 64;
      canvas.style.cssText = "display:block;width:100%;height:64px;margin-top:4px;";
      el.append(text, canvas);
      v.text = text;
      v.canvas = canvas;
    } else {
      const pre = document.createElement("pre");
      pre.className = "safetydpo-live-text";
      pre.style.cssText = "margin:0;white-space:pre-wrap;word-break:break-word;max-height:220px;overflow:auto;";
      el.append(pre);
      v.text = pre;
    }
    // train: two text lines and the curve; text: as many lines as the text has, up to 16
    const height = () => (kind === "train" ? 120 : 22 + 15 * Math.min(16, Math.max(1, v.lines || 1)));
    const widget = node.addDOMWidget(`safetydpo_${kind}_view`, "safetydpo_live", el, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: height,
      getMaxHeight: height,
    });
    if (widget) {
      widget.serialize = false; // not in widgets_values, not sent with the prompt
      if (widget.options) widget.options.serialize = false;
    }
    v.el = el;
    v.widget = widget;
    fitNode(node);
  } catch (e) {
    warn("DOM widget unavailable, drawing on the canvas instead", e);
    v.el = null;
  }
  return v;
}

function view(node, kind) {
  node.__safetydpo = node.__safetydpo || {};
  const key = `${kind}View`;
  if (!node.__safetydpo[key]) {
    node.__safetydpo[key] = makeView(node, kind);
    if (!node.__safetydpo[key].el) installCanvasFallback(node);
  }
  return node.__safetydpo[key];
}

function drawCurve(canvas, points) {
  const ctx = canvas && typeof canvas.getContext === "function" ? canvas.getContext("2d") : null;
  if (!ctx) return;
  const w = canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(255,255,255,0.04)";
  ctx.fillRect(0, 0, w, h);
  const pts = points.filter((p) => typeof p[1] === "number" && isFinite(p[1]));
  if (!pts.length) return;
  let lo = Math.min(...pts.map((p) => p[1]));
  let hi = Math.max(...pts.map((p) => p[1]));
  if (hi - lo < 1e-12) {
    lo -= 0.5;
    hi += 0.5;
  }
  const x0 = pts[0][0];
  const x1 = Math.max(pts[pts.length - 1][0], x0 + 1);
  const X = (s) => 4 + ((s - x0) / (x1 - x0)) * (w - 8);
  const Y = (v) => h - 4 - ((v - lo) / (hi - lo)) * (h - 8);
  ctx.strokeStyle = "#6cb4ff";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#6cb4ff";
  for (const p of pts.length <= 40 ? pts : [pts[pts.length - 1]]) {
    ctx.beginPath();
    ctx.arc(X(p[0]), Y(p[1]), 2, 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.fillStyle = "rgba(220,220,220,0.6)";
  ctx.font = "9px monospace";
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi, 4), w - 4, 10); // the loss usually falls: top right and bottom left stay clear
  ctx.textAlign = "left";
  ctx.fillText(fmt(lo, 4), 4, h - 3);
}

function trainLines(s) {
  const state = s.phase === "done" ? "done" : s.phase === "start" ? "starting" : "training";
  return [
    `${s.category ? s.category + ": " : ""}${state}, step ${s.step} / ${s.total}`,
    `loss ${fmt(s.loss)}   acc ${s.acc === undefined || s.acc === null ? "-" : (100 * s.acc).toFixed(0) + "%"}`
      + `   margin ${fmt(s.margin, 3)}`,
  ];
}

function showTrain(app, node, s) {
  const v = view(node, "train");
  if (v.el) {
    v.text.textContent = trainLines(s).join("\n");
    v.text.style.whiteSpace = "pre";
    v.el.dataset.step = String(s.step);
    v.el.dataset.total = String(s.total);
    v.el.dataset.phase = s.phase;
    v.el.dataset.points = String(s.points.length);
    v.el.dataset.loss = s.loss === null || s.loss === undefined ? "" : String(s.loss);
    drawCurve(v.canvas, s.points);
  }
  redraw(app, node);
}

function fitNode(node) {
  try {
    if (Array.isArray(node.size) && typeof node.computeSize === "function" && typeof node.setSize === "function") {
      const size = node.computeSize();
      node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    }
  } catch (_) {
    /* the frontend sizes it on the next draw */
  }
}

function showText(app, node, text) {
  node.__safetydpo = node.__safetydpo || {};
  node.__safetydpo.text = text;
  const v = view(node, "text");
  if (v.el) {
    v.text.textContent = text;
    v.el.dataset.chars = String(text.length);
    const lines = text.split("\n").length;
    if (lines !== v.lines) {
      v.lines = lines;
      fitNode(node);
    }
  }
  redraw(app, node);
}

// Canvas fallback for frontends without DOM widgets: a few lines of text under the node's widgets.
function installCanvasFallback(node) {
  if (node.__safetydpoFallback) return;
  node.__safetydpoFallback = true;
  const orig = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    let r;
    try {
      if (typeof orig === "function") r = orig.call(this, ctx, ...rest);
    } catch (e) {
      warn(e);
    }
    try {
      const st = this.__safetydpo || {};
      const lines = st.train ? trainLines(st.train) : st.text ? String(st.text).split("\n").slice(0, 6) : [];
      if (lines.length && ctx && Array.isArray(this.size)) {
        ctx.save();
        ctx.font = "11px monospace";
        ctx.fillStyle = "#ddd";
        lines.forEach((l, i) => ctx.fillText(l.slice(0, 80), 8, this.size[1] + 14 + 13 * i));
        ctx.restore();
      }
    } catch (e) {
      warn(e);
    }
    return r;
  };
}

// -- messages ----------------------------------------------------------------------------------------------
function onTrain(app, detail) {
  if (!detail || typeof detail !== "object") return;
  const node = findNode(app, [detail.display_node, detail.node]);
  if (!node) return;
  node.__safetydpo = node.__safetydpo || {};
  let s = node.__safetydpo.train;
  if (!s || detail.phase === "start" || (s.prompt_id && detail.prompt_id && s.prompt_id !== detail.prompt_id)) {
    s = { points: [], prompt_id: detail.prompt_id };
  }
  s.phase = detail.phase || "step";
  s.step = Number(detail.step) || 0;
  s.total = Number(detail.total) || 0;
  s.category = detail.category || s.category;
  if (s.phase === "step") {
    s.loss = detail.loss;
    s.acc = detail.implicit_acc;
    s.margin = detail.margin;
    if (typeof detail.loss === "number") {
      s.points.push([s.step, detail.loss]);
      if (s.points.length > MAX_POINTS) s.points = s.points.filter((_, i) => i % 2 === 0);
    }
  }
  node.__safetydpo.train = s;
  showTrain(app, node, s);
}

function onMerge(app, detail) {
  if (!detail || typeof detail.report !== "string") return;
  const node = findNode(app, [detail.display_node, detail.node]);
  if (node) showText(app, node, detail.report);
}

async function register() {
  const { app, api } = await comfy();
  if (!app || typeof app.registerExtension !== "function") {
    warn("the frontend has no app.registerExtension; live view disabled");
    return;
  }
  app.registerExtension({
    name: EXTENSION,
    async setup() {
      if (!api || typeof api.addEventListener !== "function") {
        warn("the frontend has no api.addEventListener; live view disabled");
        return;
      }
      const guard = (fn) => (event) => {
        try {
          fn(app, event && event.detail);
        } catch (e) {
          warn(e);
        }
      };
      api.addEventListener(TRAIN_EVENT, guard(onTrain));
      api.addEventListener(MERGE_EVENT, guard(onMerge));
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
      try {
        const name = nodeData && nodeData.name;
        if (typeof name !== "string" || !name.startsWith("SafetyDPO_") || !nodeType || !nodeType.prototype) return;
        const orig = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
          let r;
          if (typeof orig === "function") r = orig.apply(this, arguments);
          try {
            const text = output && output.text;
            const value = Array.isArray(text) ? text.filter((t) => typeof t === "string").join("\n") : text;
            if (typeof value === "string" && value && name !== TRAIN_NODE) {
              showText(app, this, value);
            }
          } catch (e) {
            warn(e);
          }
          return r;
        };
      } catch (e) {
        warn(e);
      }
    },
  });
}

register().catch((e) => warn(e));
