"""``safetydpo workflow``: ComfyUI workflow files without ComfyUI.

* ``safetydpo workflow to-api UI.json --out API.json``: the API-format prompt (what ``POST /prompt`` takes) of
  a UI-format workflow (what the frontend saves and loads);
* ``safetydpo workflow check UI.json ...``: the checks the pack's shipped workflows pass (node types exist,
  ``widgets_values`` fit the widgets in count, order and type, fixed seeds, links join matching types).

Node definitions: this pack's own nodes when ``safetydpo_workflows`` sits in the pack's folder, plus every
``--object-info`` given: a running ComfyUI's URL (``http://127.0.0.1:8188``) or a saved ``/object_info`` JSON
(by default ComfyUI 0.8.0's common core nodes, kept in ``safetydpo_workflows/comfy_core_nodes.json``).
See :mod:`safetydpo_workflows.workflow_api`. The ``safetydpo`` command table (``safetydpo_core/cli/main.py``)
names this module; :func:`register` adds the sub-command, the converter is imported when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetydpo_core.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("workflow", help="convert a ComfyUI UI workflow to the API format, or check it",
                       description="ComfyUI workflow files without ComfyUI: UI -> API conversion and checks.")
    wsub = p.add_subparsers(dest="workflow_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--object-info", action="append", default=[], metavar="URL_OR_FILE",
                       help="node definitions: a running ComfyUI (http://127.0.0.1:8188) or a saved /object_info "
                            "JSON; repeat to combine (later ones win). The pack's own nodes are always included "
                            "when available.")
        q.add_argument("--no-pack", action="store_true",
                       help="do not add this pack's node definitions (use only --object-info)")
        q.add_argument("--no-core", action="store_true",
                       help="do not add the kept definitions of ComfyUI 0.8.0's core nodes")

    t = wsub.add_parser("to-api", help="write the API-format prompt of a UI workflow",
                        description="Convert a UI-format workflow (frontend 'Save') to the API format "
                                    "('Export (API)'), as the frontend does when it queues the graph.")
    t.add_argument("workflow", metavar="UI.json")
    t.add_argument("--out", required=True, metavar="API.json", help="where to write the API-format prompt")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    t.add_argument("--lenient", action="store_true",
                   help="as the frontend: ignore extra widget values and leave unconnected required inputs to the "
                        "server (default: refuse, naming the node)")
    common(t)
    t.set_defaults(func=_to_api)

    c = wsub.add_parser("check", help="check UI workflows against the node definitions",
                        description="Check UI-format workflows: node types exist, widgets_values fit each node's "
                                    "widgets (count, order, types, ranges, seed control values), links join "
                                    "matching types, required inputs are connected. Exit status 1 if any "
                                    "problem is found.")
    c.add_argument("workflows", nargs="+", metavar="UI.json")
    c.add_argument("--allow-random-seeds", action="store_true",
                   help="accept 'randomize'/'increment'/'decrement' after seeds (shared workflows use 'fixed')")
    common(c)
    c.set_defaults(func=_check)


_HINT = (" Give the definitions with --object-info: a running ComfyUI's URL (http://127.0.0.1:8188) or a saved "
         "/object_info JSON (the kept ComfyUI 0.8.0 core nodes are used unless --no-core).")


def _definitions(args) -> dict:
    from . import workflow_api as wa

    infos = [] if args.no_core else [wa.core_object_info()]
    if not args.no_pack and wa.pack_root() is not None:
        infos.append(wa.pack_object_info())
    for src in args.object_info:
        infos.append(wa.load_object_info(src))
    if not infos:
        raise ConfigError("No node definitions: pass --object-info with a running ComfyUI's URL or a saved "
                          "/object_info JSON.")
    return wa.merge_object_info(*infos)


def _read(path: str) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"Cannot read {p}: {e.strerror or e}.") from e
    except ValueError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}.") from e


def _to_api(args) -> int:
    from safetydpo_core.utils.atomic import atomic_write_text

    from . import workflow_api as wa

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it.")
    wf = _read(args.workflow)
    defs = _definitions(args)
    try:
        prompt = wa.ui_to_api(wf, defs, strict=not args.lenient)
    except wa.WorkflowError as e:
        hint = _HINT if "no definition for node type" in str(e) else ""
        raise wa.WorkflowError(f"{args.workflow}: {e}{hint}") from e
    atomic_write_text(out, json.dumps(prompt, indent=1, ensure_ascii=False) + "\n", what="API workflow")
    print(f"{out}: {len(prompt)} nodes")
    return 0


def _check(args) -> int:
    from . import workflow_api as wa

    defs = _definitions(args)
    bad = 0
    for path in args.workflows:
        problems = wa.check_workflow(_read(path), defs, require_fixed_seeds=not args.allow_random_seeds,
                                     dynamic_combos=wa.file_list_inputs(defs))
        if problems:
            bad += 1
            print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
            for p in problems:
                print(f"  {p}")
            if any("unknown node type" in p for p in problems):
                print(f"  ({_HINT.strip()})")
        else:
            print(f"{path}: ok")
    return 1 if bad else 0
