"""Every node class of the pack, checked without ComfyUI (CI): INPUT_TYPES well formed with a tooltip on every
input, defaults within min/max and in their combo lists, FUNCTION with a signature that matches the inputs,
RETURN_TYPES / RETURN_NAMES / OUTPUT_TOOLTIPS consistent, a DESCRIPTION, the SafetyDPO name prefix and
category, and every custom socket type produced by some node."""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "safetydpo_pack_schema"
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
COMFY_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "LORA_MODEL"}
EXPECTED = {
    "SafetyDPO_BuiltinPairs", "SafetyDPO_LLMPairs", "SafetyDPO_LoadPairs", "SafetyDPO_SavePairs",
    "SafetyDPO_RenderPairs", "SafetyDPO_LoadDataset", "SafetyDPO_TrainExpert", "SafetyDPO_LoadLoRA",
    "SafetyDPO_SaveLoRA", "SafetyDPO_ApplySafetyLoRA", "SafetyDPO_ExpertList", "SafetyDPO_CoMerge",
    "SafetyDPO_SafeSampler", "SafetyDPO_LossPlot", "SafetyDPO_Evaluate", "SafetyDPO_EraseConceptsUCE",
    "SafetyDPO_RedTeamAttack",
}


def _pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK]


MAPPINGS = _pack().NODE_CLASS_MAPPINGS
DISPLAY = _pack().NODE_DISPLAY_NAME_MAPPINGS


@pytest.fixture(autouse=True)
def _without_comfyui(monkeypatch):
    """As in CI without ComfyUI, even when another test module put ComfyUI on sys.path: INPUT_TYPES must not
    reach ComfyUI's folders (it would list or create folders in that checkout)."""
    monkeypatch.setitem(sys.modules, "folder_paths", None)


def _inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_the_node_set_and_display_names():
    assert set(MAPPINGS) == EXPECTED
    assert set(DISPLAY) == set(MAPPINGS) and all(v.startswith("SafetyDPO: ") for v in DISPLAY.values())
    assert len(set(DISPLAY.values())) == len(DISPLAY)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_node_class_is_well_formed(name):
    cls = MAPPINGS[name]
    assert name.startswith("SafetyDPO_") and cls.CATEGORY == "SafetyDPO"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    names = [n for part in ("required", "optional") for n in spec.get(part, {})]
    assert len(names) == len(set(names))
    for part in ("required", "optional"):
        for inp, entry in spec.get(part, {}).items():
            where = f"{name}.{inp}"
            assert isinstance(entry, tuple) and len(entry) == 2, where
            typ, opts = entry
            assert isinstance(opts, dict) and isinstance(opts.get("tooltip"), str) and opts["tooltip"].strip(), where
            if isinstance(typ, list):
                assert typ and all(isinstance(v, str) for v in typ), where
                assert opts.get("default", typ[0]) in typ, where
                continue
            assert isinstance(typ, str) and typ, where
            if typ in ("INT", "FLOAT"):
                lo, hi, d, step = opts["min"], opts["max"], opts["default"], opts.get("step", 1)
                assert lo <= d <= hi and step > 0, where
                assert all(isinstance(v, int) for v in (lo, hi, d, step)) if typ == "INT" else \
                    all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi, d, step)), where
                if typ == "INT" and step > 1:
                    assert d % step == 0 and lo % step == 0, where
            elif typ == "BOOLEAN":
                assert isinstance(opts["default"], bool), where
            elif typ == "STRING":
                assert isinstance(opts["default"], str), where
            else:  # a socket
                assert typ.isupper() and "default" not in opts, where
    # FUNCTION: a method whose parameters are the inputs; required inputs without defaults, optional with
    fn = getattr(cls, cls.FUNCTION)
    assert callable(fn)
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params if p.kind is not p.VAR_KEYWORD}
    for inp in spec["required"]:
        assert inp in named or var_kw, f"{name}: required input {inp} is not a parameter of {cls.FUNCTION}"
    for inp in spec.get("optional", {}):
        assert inp in named and named[inp].default is not inspect.Parameter.empty or (inp not in named and var_kw), \
            f"{name}: optional input {inp} needs a default in {cls.FUNCTION}"
    for p in named.values():
        assert p.name in names, f"{name}: parameter {p.name} of {cls.FUNCTION} is not an input"
        if p.default is inspect.Parameter.empty:
            assert p.name in spec["required"], f"{name}: {p.name} has no default but is not required"
    # outputs
    rt, rn = cls.RETURN_TYPES, cls.RETURN_NAMES
    assert isinstance(rt, tuple) and rt and all(isinstance(t, str) and t for t in rt)
    assert isinstance(rn, tuple) and len(rn) == len(rt) and len(set(rn)) == len(rn)
    assert len(cls.OUTPUT_TOOLTIPS) == len(rt) and all(t.strip() for t in cls.OUTPUT_TOOLTIPS)
    # optional hooks: classmethods whose parameters are inputs; no "always re-run" (caching is a feature)
    for hook in ("VALIDATE_INPUTS", "IS_CHANGED"):
        h = getattr(cls, hook, None)
        if h is None:
            continue
        assert inspect.ismethod(h) and h.__self__ is cls, f"{name}.{hook} must be a classmethod"
        for p in inspect.signature(h).parameters.values():
            assert p.kind is p.VAR_KEYWORD or p.name in names, f"{name}.{hook}: {p.name} is not an input"


def test_custom_socket_types_are_produced_somewhere():
    produced = {t for cls in MAPPINGS.values() for t in cls.RETURN_TYPES}
    consumed = {e[0] for cls in MAPPINGS.values() for e in _inputs(cls).values() if isinstance(e[0], str)}
    sockets = {t for t in consumed if t not in ("INT", "FLOAT", "STRING", "BOOLEAN")}
    assert sockets - produced <= COMFY_TYPES
    custom = {t for t in produced | consumed if t.startswith("SAFETYDPO_")}
    assert custom == {"SAFETYDPO_PAIRS", "SAFETYDPO_DATASET", "SAFETYDPO_METRICS", "SAFETYDPO_EXPERTS"}
    assert custom <= produced


def test_training_nodes_keep_comfyui_caching_and_writers_are_output_nodes():
    for name in ("SafetyDPO_TrainExpert", "SafetyDPO_RenderPairs", "SafetyDPO_CoMerge"):
        assert not hasattr(MAPPINGS[name], "IS_CHANGED") and not getattr(MAPPINGS[name], "NOT_IDEMPOTENT", False)
    outputs = {n for n, c in MAPPINGS.items() if getattr(c, "OUTPUT_NODE", False)}
    assert outputs == {"SafetyDPO_SavePairs", "SafetyDPO_SaveLoRA", "SafetyDPO_LossPlot", "SafetyDPO_Evaluate"}


def test_the_widget_order_documented_in_the_readme_section():
    """README.md lists each node's widgets in order: it must match INPUT_TYPES."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = text.split("### Widget order", 1)[1].split("\n### ", 1)[0]
    for name, cls in MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        widgets = [n for part in ("required", "optional") for n, e in spec.get(part, {}).items()
                   if isinstance(e[0], list) or e[0] in WIDGETS and not e[1].get("forceInput")]  # forceInput: a socket
        line = next((l for l in text.splitlines() if l.startswith(f"| `{name}`")), None)
        assert line is not None, f"{name} is missing from the widget table"
        documented = line.split("|")[2].strip()
        assert documented == ", ".join(f"`{w}`" for w in widgets) if widgets else documented == "-", name
