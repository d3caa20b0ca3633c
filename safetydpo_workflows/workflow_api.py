"""ComfyUI workflows as plain JSON: the UI format (what users drag into the frontend, schema 0.4) turned into
the API format (what ``POST /prompt`` executes), and the checks a shipped workflow must pass. No ComfyUI
import: node definitions come from an ``/object_info``-style dict.

Where node definitions come from (:func:`load_object_info`, :func:`merge_object_info`):

* a running ComfyUI: ``load_object_info("http://127.0.0.1:8188")`` (reads ``/object_info``), exact for that
  install, other packs included;
* a saved ``/object_info`` JSON file (the pack keeps ComfyUI 0.8.0's common core nodes in
  ``safetydpo_workflows/comfy_core_nodes.json``, in that form, used by default);
* this pack's own nodes, from their ``INPUT_TYPES`` called without ComfyUI (:func:`pack_object_info`; only
  where ``safetydpo_workflows`` sits inside the pack's folder, as in a ComfyUI install or a checkout).

What the conversion does, as the frontend's ``graphToPrompt`` (comfyui-frontend-package 1.35.9) does it:

* ``widgets_values`` map onto the node's widget inputs in ``input_order`` (required, then optional), where a
  widget input is an INT / FLOAT / STRING / BOOLEAN (unless ``forceInput``) or a combo. The value that
  follows a widget with a "control after generate" widget (an INT named ``seed`` / ``noise_seed``, or any
  input declaring ``control_after_generate``) is skipped, as is the upload button's value after a combo
  with ``image_upload`` (and the other ``*_upload`` flags). A dict ``widgets_values`` is read by name.
* links become ``[origin id, origin slot]``; links are followed through ``Reroute`` nodes and through
  bypassed nodes (mode 4: the first input of the same type, the same slot preferred); a link from a
  ``PrimitiveNode`` becomes that primitive's value; inputs from muted nodes (mode 2) are dropped.
* frontend-only nodes (``Note``, ``MarkdownNote``, ``Reroute``, ``PrimitiveNode``) and muted or bypassed
  nodes are not in the result; list values are wrapped as ``{"__value__": [...]}``.

Not handled (an error names the node): subgraphs and group nodes, and widgets that frontend extensions of
other packs add to their nodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from safetydpo_core.errors import ConfigError

FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
COMBO_CONTROL_VALUES = CONTROL_VALUES + ("increment-wrap",)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
PACK_NAME = "safetydpo"  # [project].name: the registry id (properties.cnr_id of the pack's nodes)


class WorkflowError(ConfigError):
    """A workflow that cannot be converted or checked; the message names the node and the input."""


@dataclass(frozen=True)
class Widget:
    """One widget of a node as the frontend builds it from the node's definition."""

    name: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN or COMBO
    spec: Mapping[str, Any]  # the input's options (default, min, max, ...)
    options: tuple | None = None  # a combo's choices
    control: bool = False  # a "control after generate" value follows in widgets_values
    upload: bool = False  # an upload button's value follows in widgets_values

    @property
    def slots(self) -> int:
        return 1 + int(self.control) + int(self.upload)


# -- node definitions ------------------------------------------------------------------------------------
def load_object_info(source: str | os.PathLike, timeout: float = 30.0) -> dict:
    """Node definitions from a file (an ``/object_info`` dump, or ``{"nodes": {...}}``) or a ComfyUI URL
    (``http://host:port`` or ``.../object_info``)."""
    s = str(source)
    if s.startswith(("http://", "https://")):
        url = s.rstrip("/")
        if not url.endswith("/object_info"):
            url += "/object_info"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a URL the user gave
                data = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise WorkflowError(f"Cannot read node definitions from {url}: {e}. Is ComfyUI running there?") from e
    else:
        p = Path(s)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise WorkflowError(f"Cannot read node definitions from {p}: {e.strerror or e}.") from e
        except ValueError as e:
            raise WorkflowError(f"{p} is not valid JSON: {e}.") from e
    if isinstance(data, dict) and isinstance(data.get("nodes"), dict):
        data = data["nodes"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "input" in v for v in data.values()):
        raise WorkflowError(f"{s}: expected an /object_info dict (node type -> definition with 'input').")
    return data


CORE_NODES_FILE = Path(__file__).with_name("comfy_core_nodes.json")


def core_object_info() -> dict:
    """The kept interface definitions of ComfyUI 0.8.0's common core nodes (refresh them from a live server
    with ``python tests/test_workflows.py --refresh-core-nodes URL``)."""
    return load_object_info(CORE_NODES_FILE)


def merge_object_info(*infos: Mapping | None) -> dict:
    """One definition dict from several; later ones win for a node type defined twice."""
    out: dict = {}
    for info in infos:
        out.update(info or {})
    return out


def pack_root() -> Path | None:
    """The pack's folder when ``safetydpo_workflows`` sits in it (a ComfyUI install or a checkout), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "__init__.py").is_file() and (root / "nodes" / "__init__.py").is_file() else None


def _spec_json(entry) -> list:
    typ, opts = (entry[0], entry[1] if len(entry) > 1 else {}) if isinstance(entry, (tuple, list)) else (entry, {})
    return [list(typ) if isinstance(typ, (list, tuple)) else typ, json.loads(json.dumps(dict(opts or {}), default=str))]


def node_class_info(name: str, cls, display_name: str | None = None) -> dict:
    """The ``/object_info`` entry ComfyUI's server builds for a V1 node class (``server.py`` ``node_info``)."""
    spec = cls.INPUT_TYPES()
    inputs = {part: {k: _spec_json(v) for k, v in spec[part].items()} for part in ("required", "optional", "hidden")
              if part in spec}
    outputs = list(getattr(cls, "RETURN_TYPES", ()))
    return {
        "input": inputs,
        "input_order": {part: list(spec[part]) for part in inputs},
        "output": [list(t) if isinstance(t, (list, tuple)) else t for t in outputs],
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(outputs))),
        "output_name": list(getattr(cls, "RETURN_NAMES", outputs)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


class _HiddenModules:
    """Make ``import folder_paths`` / ``import comfy`` fail while the pack's INPUT_TYPES run outside ComfyUI,
    so that they use their fallbacks instead of reaching (and creating folders in) some ComfyUI checkout."""

    NAMES = ("folder_paths", "comfy")

    def __enter__(self):
        self.hidden = [n for n in self.NAMES if n not in sys.modules]
        for n in self.hidden:
            sys.modules[n] = None  # type: ignore[assignment]
        return self

    def __exit__(self, *exc):
        for n in self.hidden:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]


def pack_object_info(root: str | os.PathLike | None = None) -> dict:
    """Definitions of this pack's nodes from their ``INPUT_TYPES``, called without ComfyUI (file lists such
    as ``lora_name`` then hold only a placeholder)."""
    root = Path(root) if root is not None else pack_root()
    if root is None or not (Path(root) / "__init__.py").is_file():
        raise WorkflowError("The pack's node definitions are not available here (safetydpo_workflows is not inside "
                            "the ComfyUI-SafetyDPO folder); pass a running ComfyUI's URL or a saved /object_info file.")
    modname = "_safetydpo_pack_for_object_info"
    with _HiddenModules():
        mod = sys.modules.get(modname)
        if mod is None or Path(getattr(mod, "__file__", "")).resolve() != (Path(root) / "__init__.py").resolve():
            spec = importlib.util.spec_from_file_location(modname, Path(root) / "__init__.py",
                                                          submodule_search_locations=[str(root)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[modname] = mod
            try:
                spec.loader.exec_module(mod)
            except Exception:
                sys.modules.pop(modname, None)
                raise
        names = getattr(mod, "NODE_DISPLAY_NAME_MAPPINGS", {})
        return {k: node_class_info(k, cls, names.get(k)) for k, cls in mod.NODE_CLASS_MAPPINGS.items()}


# -- widgets ----------------------------------------------------------------------------------------------
def _input_entries(node_def: Mapping) -> list[tuple[str, Any, dict]]:
    inputs = node_def.get("input", {})
    order = node_def.get("input_order") or {part: list(inputs.get(part, {})) for part in ("required", "optional")}
    out = []
    for part in ("required", "optional"):
        for name in order.get(part, []):
            entry = inputs.get(part, {}).get(name)
            if entry is None:
                continue
            typ = entry[0] if isinstance(entry, (list, tuple)) else entry
            opts = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, typ, opts))
    return out


def widget_inputs(node_def: Mapping) -> list[Widget]:
    """The node's widgets in ``widgets_values`` order, as the frontend creates them from the definition."""
    out = []
    for name, typ, opts in _input_entries(node_def):
        if isinstance(typ, (list, tuple)) or typ == "COMBO":
            choices = tuple(typ) if isinstance(typ, (list, tuple)) else tuple(opts.get("options") or ())
            upload = any(k.endswith("_upload") and v is True for k, v in opts.items())
            out.append(Widget(name, "COMBO", opts, choices, bool(opts.get("control_after_generate")), upload))
        elif typ in WIDGET_TYPES and not opts.get("forceInput"):
            control = opts.get("control_after_generate")
            if control is None:
                control = typ == "INT" and name in ("seed", "noise_seed")
            out.append(Widget(name, typ, opts, None, bool(control) and typ in ("INT", "FLOAT")))
    return out


def socket_inputs(node_def: Mapping) -> dict[str, str]:
    """Every input of the node with its type name (``COMBO`` for combos), for link checks."""
    return {name: ("COMBO" if isinstance(typ, (list, tuple)) else str(typ)) for name, typ, _ in _input_entries(node_def)}


def required_inputs(node_def: Mapping) -> list[str]:
    order = node_def.get("input_order") or {}
    return list(order.get("required") or node_def.get("input", {}).get("required", {}))


def map_widget_values(node: Mapping, node_def: Mapping, strict: bool = True) -> dict[str, Any]:
    """``{widget name: value}`` from the node's ``widgets_values``, the control values left out. ``strict``:
    the number of values must be what the definition gives (else a WorkflowError); otherwise missing values
    are left out and extra trailing values ignored, as the frontend does."""
    widgets = widget_inputs(node_def)
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):
        return {w.name: values[w.name] for w in widgets if w.name in values}
    if not isinstance(values, list):
        raise WorkflowError(f"{_where(node)}: widgets_values must be a list, not {type(values).__name__}.")
    expected = sum(w.slots for w in widgets)
    if strict and len(values) != expected:
        raise WorkflowError(f"{_where(node)}: {len(values)} widgets_values for {expected} widget slots "
                            f"({', '.join(_slot_names(widgets))}).")
    out, i = {}, 0
    for w in widgets:
        if i >= len(values):
            break
        out[w.name] = values[i]
        i += w.slots
    return out


def _slot_names(widgets: Iterable[Widget]) -> list[str]:
    names = []
    for w in widgets:
        names.append(w.name)
        if w.control:
            names.append(f"<control of {w.name}>")
        if w.upload:
            names.append(f"<upload of {w.name}>")
    return names


def _where(node: Mapping) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(title) if title else ''})"


def file_list_inputs(object_info: Mapping) -> set[tuple[str, str]]:
    """``(node type, input)`` of the combos whose choices are files on some machine, so that a shared workflow's
    value need not be among them: combos a definition lists empty or with only a placeholder such as
    ``"(no .safetensors file in the loras folders)"`` (this pack's lists outside ComfyUI), and the model
    loaders' ``*_name`` inputs (``ckpt_name``, ``lora_name``, ``unet_name``, ``vae_name``, ``clip_name*``)."""
    out = set()
    for name, d in object_info.items():
        for inp, typ, _ in _input_entries(d):
            if isinstance(typ, (list, tuple)) and (not typ or (len(typ) == 1 and str(typ[0]).startswith("("))):
                out.add((name, inp))
            elif inp in ("ckpt_name", "lora_name", "unet_name", "vae_name") or inp.startswith("clip_name"):
                out.add((name, inp))
    return out


# -- the graph --------------------------------------------------------------------------------------------
class _Graph:
    def __init__(self, workflow: Mapping):
        if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
            raise WorkflowError("Not a UI workflow: expected a JSON object with a 'nodes' list (an API-format "
                                "prompt needs no conversion).")
        if workflow.get("version") == 1 or "state" in workflow:
            raise WorkflowError("Workflow schema version 1 (link objects) is not supported; save the workflow in "
                                "the frontend's default format (version 0.4).")
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise WorkflowError("The workflow has subgraphs; unpack them in the frontend before converting.")
        self.nodes: dict[int, Mapping] = {}
        for n in workflow["nodes"]:
            if not isinstance(n, Mapping) or "id" not in n or "type" not in n:
                raise WorkflowError(f"A node without 'id' or 'type': {json.dumps(n)[:200]}")
            if n["id"] in self.nodes:
                raise WorkflowError(f"Two nodes have the id {n['id']}.")
            self.nodes[n["id"]] = n
        self.links: dict[int, tuple] = {}
        for link in workflow.get("links") or []:
            if isinstance(link, Mapping):  # the link-object form some tools write
                link = [link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                        link.get("target_slot"), link.get("type")]
            if not isinstance(link, (list, tuple)) or len(link) < 6:
                raise WorkflowError(f"A malformed link: {json.dumps(link)[:200]}")
            self.links[link[0]] = tuple(link[:6])

    def link(self, link_id, where: str) -> tuple:
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"{where}: link {link_id} is not in the workflow's links.")
        if link[1] not in self.nodes:
            raise WorkflowError(f"{where}: link {link_id} starts at node {link[1]}, which is not in the workflow.")
        return link

    def input_link(self, node: Mapping, slot: int):
        inputs = node.get("inputs") or []
        return inputs[slot].get("link") if 0 <= slot < len(inputs) else None

    def resolve(self, link_id, want_type: str, where: str, seen: frozenset = frozenset()):
        """Follow a link to a real output: ``("link", id, slot)``, ``("value", v)`` or None (nothing)."""
        if link_id in seen:
            raise WorkflowError(f"{where}: the links form a loop through link {link_id}.")
        seen = seen | {link_id}
        _, origin, slot, _, _, _ = self.link(link_id, where)
        src = self.nodes[origin]
        mode = src.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if src["type"] == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            if not vals:
                raise WorkflowError(f"{_where(src)}: a primitive without a value.")
            return ("value", vals[0])
        if src["type"] == "Reroute":
            up = self.input_link(src, 0)
            return None if up is None else self.resolve(up, want_type, where, seen)
        if src["type"] in FRONTEND_ONLY:
            raise WorkflowError(f"{where}: linked from {_where(src)}, a frontend-only node with no output.")
        if mode == MODE_BYPASS:
            idx = self._bypass_slot(src, slot, want_type)
            up = None if idx < 0 else self.input_link(src, idx)
            return None if up is None else self.resolve(up, want_type, where, seen)
        return ("link", origin, slot)

    @staticmethod
    def _bypass_slot(node: Mapping, slot: int, want: str) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else want
        if want in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs) and types_match(inputs[slot].get("type"), out_type) \
                and types_match(inputs[slot].get("type"), want):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want:
                return i
        for i, inp in enumerate(inputs):
            if types_match(inp.get("type"), out_type) and types_match(inp.get("type"), want):
                return i
        return -1


def types_match(a, b) -> bool:
    """Whether an output of type ``a`` may feed an input of type ``b`` (LiteGraph's and ComfyUI's rule: equal
    names ignoring case, ``*`` or empty matches anything, comma-separated lists match on any member)."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):  # a combo's choices
        a = "COMBO" if isinstance(a, (list, tuple)) else a
        b = "COMBO" if isinstance(b, (list, tuple)) else b
    a = "" if a in (None, "*") else str(a)
    b = "" if b in (None, "*") else str(b)
    if not a or not b:
        return True
    sa = {t.strip().lower() for t in a.split(",")}
    sb = {t.strip().lower() for t in b.split(",")}
    return bool(sa & sb)


def _definition(object_info: Mapping, node: Mapping) -> Mapping:
    d = object_info.get(node["type"])
    if d is None:
        raise WorkflowError(f"{_where(node)}: no definition for node type {node['type']!r}. The pack that provides "
                            f"it is not installed, or the node definitions given do not include it (pass a running "
                            f"ComfyUI's URL or its saved /object_info).")
    return d


def ui_to_api(workflow: Mapping, object_info: Mapping, strict: bool = True) -> dict:
    """The API-format prompt (``{id: {"class_type", "inputs", "_meta"}}``) of a UI-format workflow.

    ``object_info`` defines every node type the workflow uses (frontend-only nodes need none). ``strict``: a
    node whose ``widgets_values`` do not fit its widgets, or whose required input is not connected, is an
    error (a WorkflowError naming the node and input) instead of being passed on for the server to refuse."""
    g = _Graph(workflow)
    out: dict[str, dict] = {}
    for nid, node in g.nodes.items():
        if node["type"] in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        d = _definition(object_info, node)
        inputs: dict[str, Any] = {}
        for name, value in map_widget_values(node, d, strict=strict).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            where = f"{_where(node)}, input {name!r}"
            r = g.resolve(inp["link"], inp.get("type", "*"), where)
            if r is None:  # nothing behind the link: the widget's own value (if any) stays
                continue
            if r[0] == "value":
                inputs[name] = {"__value__": r[1]} if isinstance(r[1], list) else r[1]
            else:
                inputs[name] = [str(r[1]), int(r[2])]
        title = node.get("title") or d.get("display_name") or node["type"]
        out[str(nid)] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    # inputs from nodes that were left out (muted, or not in the result) are dropped, as the frontend does
    for entry in out.values():
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and v[0] not in out:
                del entry["inputs"][k]
    if strict:
        by_id = {str(k): v for k, v in g.nodes.items()}
        for nid, entry in out.items():
            d = object_info[entry["class_type"]]
            missing = [k for k in required_inputs(d) if k not in entry["inputs"]]
            if missing:
                raise WorkflowError(f"{_where(by_id[nid])}: required input{'s' if len(missing) > 1 else ''} "
                                    f"{', '.join(map(repr, missing))} not connected.")
    return out


# -- checks -----------------------------------------------------------------------------------------------
def _value_problem(w: Widget, value, dynamic: bool) -> str | None:
    if w.kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"expected true/false, got {value!r}"
    if w.kind == "STRING":
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if w.kind in ("INT", "FLOAT"):
        ok = isinstance(value, int) if w.kind == "INT" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            return f"expected {'an integer' if w.kind == 'INT' else 'a number'}, got {value!r}"
        lo, hi = w.spec.get("min"), w.spec.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            return f"{value!r} is outside [{lo}, {hi}]"
        return None
    if not isinstance(value, str):
        return f"expected one of the choices (a string), got {value!r}"
    if not dynamic and w.options and value not in w.options:
        return f"{value!r} is not one of {list(w.options)[:12]}"
    return None


def check_workflow(workflow: Mapping, object_info: Mapping, dynamic_combos: Iterable[tuple[str, str]] = (),
                   require_fixed_seeds: bool = True) -> list[str]:
    """Problems of a UI workflow against node definitions, one line each (empty: none): unknown node types;
    ``widgets_values`` whose count, order or types do not fit the widgets (control values included: one of
    "fixed", "increment", "decrement", "randomize", and "fixed" when ``require_fixed_seeds``); values
    outside min/max or not among a combo's choices (except the ``(node type, input)`` pairs in
    ``dynamic_combos``, whose choices are files on the user's machine); links that do not exist on both
    ends, whose slots disagree with the nodes, or that join types that do not match; required inputs left
    unconnected."""
    problems: list[str] = []
    try:
        g = _Graph(workflow)
    except WorkflowError as e:
        return [str(e)]
    dynamic = set(map(tuple, dynamic_combos))
    for node in g.nodes.values():
        t = node["type"]
        if t in FRONTEND_ONLY:
            continue
        d = object_info.get(t)
        if d is None:
            problems.append(f"{_where(node)}: unknown node type {t!r}")
            continue
        widgets = widget_inputs(d)
        values = node.get("widgets_values")
        if values is None:
            values = []
        if not isinstance(values, list):
            problems.append(f"{_where(node)}: widgets_values is not a list")
            continue
        expected = sum(w.slots for w in widgets)
        if len(values) != expected:
            problems.append(f"{_where(node)}: {len(values)} widgets_values for {expected} widget slots "
                            f"({', '.join(_slot_names(widgets))})")
            continue
        i = 0
        for w in widgets:
            p = _value_problem(w, values[i], (t, w.name) in dynamic)
            if p:
                problems.append(f"{_where(node)}, widget {w.name!r} (value {i}): {p}")
            if w.control:
                c = values[i + 1]
                allowed = COMBO_CONTROL_VALUES if w.kind == "COMBO" else CONTROL_VALUES
                if c not in allowed:
                    problems.append(f"{_where(node)}, value {i + 1}: the control after {w.name!r} must be one of "
                                    f"{', '.join(allowed)}, got {c!r} (values shifted?)")
                elif require_fixed_seeds and c != "fixed":
                    problems.append(f"{_where(node)}: {w.name!r} is followed by {c!r}; shared workflows use 'fixed'")
            i += w.slots
        sockets = socket_inputs(d)
        connected = set()
        for slot, inp in enumerate(node.get("inputs") or []):
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if name not in sockets:
                problems.append(f"{_where(node)}: input {name!r} is not an input of {t}")
                continue
            if inp.get("link") is not None:
                connected.add(name)
        for name in required_inputs(d):
            if name not in connected and name not in {w.name for w in widgets}:
                problems.append(f"{_where(node)}: required input {name!r} is not connected")
        for slot, out in enumerate(node.get("outputs") or []):
            types = d.get("output") or []
            if slot >= len(types):
                problems.append(f"{_where(node)}: output slot {slot} does not exist ({t} has {len(types)})")
            elif not types_match(out.get("type"), types[slot]) or str(out.get("type")) != str(types[slot]):
                problems.append(f"{_where(node)}: output {slot} is typed {out.get('type')!r}, {t} gives "
                                f"{types[slot]!r}")
    problems += _link_problems(g, object_info)
    return problems


def _link_problems(g: _Graph, object_info: Mapping) -> list[str]:
    problems = []
    for lid, (_, origin, oslot, target, tslot, ltype) in g.links.items():
        src, dst = g.nodes.get(origin), g.nodes.get(target)
        if src is None or dst is None:
            problems.append(f"link {lid}: node {origin if src is None else target} does not exist")
            continue
        outs, ins = src.get("outputs") or [], dst.get("inputs") or []
        if not (0 <= oslot < len(outs)) or lid not in (outs[oslot].get("links") or []):
            problems.append(f"link {lid}: {_where(src)} output {oslot} does not list it")
            continue
        if not (0 <= tslot < len(ins)) or ins[tslot].get("link") != lid:
            problems.append(f"link {lid}: {_where(dst)} input {tslot} does not hold it")
            continue
        out_type = outs[oslot].get("type")
        if src["type"] not in FRONTEND_ONLY and src["type"] in object_info:
            declared = (object_info[src["type"]].get("output") or [])
            out_type = declared[oslot] if oslot < len(declared) else out_type
        inp = ins[tslot]
        name = (inp.get("widget") or {}).get("name") or inp.get("name")
        in_type = inp.get("type")
        if dst["type"] not in FRONTEND_ONLY and dst["type"] in object_info:
            in_type = socket_inputs(object_info[dst["type"]]).get(name, in_type)
        if not (types_match(out_type, in_type) and types_match(ltype, in_type) and types_match(out_type, ltype)):
            problems.append(f"link {lid}: {_where(src)} output {oslot} ({out_type}) -> {_where(dst)} input "
                            f"{name!r} ({in_type}), link typed {ltype!r}: the types do not match")
    return problems
