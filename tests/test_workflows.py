"""The shipped workflows (``workflows/*.json``), checked without ComfyUI (CI): the files are UI-format JSON 0.4
with a JPEG thumbnail each, stock model names listed under ``models``, ``properties.cnr_id`` on every pack
node, fixed seeds and a MarkdownNote; every node type exists in the pack or in the kept list of ComfyUI core
nodes (``safetydpo_workflows/comfy_core_nodes.json``); ``widgets_values`` fit each node's widgets in count,
order and type (control values included); every link joins matching types; the converter
(:mod:`safetydpo_workflows.workflow_api`) turns each one into an API graph that passes the server's checks,
re-implemented here independently. Plus the converter's own rules on small graphs (control values,
Reroute, PrimitiveNode, bypassed and muted nodes, list values, upload widgets) and the CLI.

The kept core list is interface data (node names and input definitions as ``/object_info`` reports them for
ComfyUI 0.8.0, tooltips left out, file lists emptied). ``tests/test_frontend_e2e.py`` compares it with a live
server; to refresh it from a running ComfyUI:  ``python tests/test_workflows.py --refresh-core-nodes URL``.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safetydpo_workflows import workflow_api as wa  # noqa: E402

WORKFLOWS = ROOT / "workflows"
CORE_NODES = ROOT / "safetydpo_workflows" / "comfy_core_nodes.json"
PACK_ID = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
FLUX = "flux1-dev.safetensors"
SD35 = "sd3.5_medium.safetensors"
STOCK_MODELS = {SD15: "checkpoints", SDXL: "checkpoints", FLUX: "diffusion_models", SD35: "checkpoints",
                "ae.safetensors": "vae", "clip_l.safetensors": "text_encoders", "clip_g.safetensors": "text_encoders",
                "t5xxl_fp16.safetensors": "text_encoders"}
CATEGORIES = ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")
# combos whose choices are files on the user's machine (the pack's own; the core ones are in the kept list)
PACK_FILE_LISTS = {("SafetyDPO_LoadLoRA", "lora_name"): "loras", ("SafetyDPO_LoadPairs", "file"): "input",
                   ("SafetyDPO_LoadDataset", "dataset"): "datasets", ("SafetyDPO_LLMPairs", "llm_model"): "LLM"}
REQUIRED = {
    "01_build_safety_dataset": SD15,
    "02_train_one_expert": SD15,
    "03_train_seven_experts_comerge": SD15,
    "04_safe_sampling_aligned_vs_unaligned": SD15,
    "05_evaluate_ip_prompt_set": SD15,
    "06_sdxl_train_seven_experts_comerge": SDXL,
    "07_red_team_aligned_model": SD15,
    "08_flux_train_experts_comerge": FLUX,
    "09_sd35_train_experts_comerge": SD35,
}
# the core nodes the kept list holds (what the shipped workflows use, and the usual companions of this pack)
KEPT_CORE = ("CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPSetLastLayer", "EmptyLatentImage",
             "KSampler", "KSamplerAdvanced", "VAEDecode", "VAEEncode", "SaveImage", "PreviewImage", "LoadImage",
             "ImageBatch", "LoraLoader", "LoraLoaderModelOnly", "LoraModelLoader", "SaveLoRA", "UNETLoader",
             "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader", "SaveLatent", "ConditioningCombine")
CORE_FILE_LISTS = {"CheckpointLoaderSimple": {"ckpt_name": "checkpoints"}, "LoraLoader": {"lora_name": "loras"},
                   "LoraLoaderModelOnly": {"lora_name": "loras"}, "UNETLoader": {"unet_name": "diffusion_models"},
                   "CLIPLoader": {"clip_name": "text_encoders"},
                   "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
                   "TripleCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders",
                                        "clip_name3": "text_encoders"},
                   "VAELoader": {"vae_name": "vae"}, "LoadImage": {"image": "input"}}


# -- the kept core list ------------------------------------------------------------------------------------
def core_data() -> dict:
    return json.loads(CORE_NODES.read_text(encoding="utf-8"))


def core_interface(live_node: dict, file_lists: dict) -> dict:
    """A live ``/object_info`` entry reduced to the interface data the kept list holds."""
    def strip(entry, name):
        typ = entry[0]
        opts = {k: v for k, v in (entry[1] if len(entry) > 1 else {}).items() if k != "tooltip"}
        if name in file_lists:  # V1 lists the files as the type, V3 (TripleCLIPLoader) as COMBO options
            typ = []
            if "options" in opts:
                opts["options"] = []
        return [typ, opts]

    inputs = {part: {k: strip(v, k) for k, v in live_node["input"].get(part, {}).items()}
              for part in ("required", "optional") if live_node["input"].get(part)}
    return {"input": inputs, "input_order": {p: live_node["input_order"][p] for p in inputs},
            "output": live_node["output"], "output_is_list": live_node["output_is_list"],
            "output_name": live_node["output_name"], "name": live_node["name"],
            "display_name": live_node["display_name"], "category": live_node["category"],
            "output_node": live_node["output_node"]}


def refresh_core_nodes(url: str) -> None:
    """Rewrite the kept list from a running ComfyUI's /object_info (review the diff before committing)."""
    from safetydpo_core.utils.atomic import atomic_write_text

    live = wa.load_object_info(url)
    with __import__("urllib.request").request.urlopen(url.rstrip("/") + "/system_stats", timeout=30) as r:
        version = json.loads(r.read())["system"]["comfyui_version"]
    data = {
        "about": "Interface data of common ComfyUI core nodes, as GET /object_info reports them (tooltips left out; "
                 "combos listing the user's files emptied and named under file_lists). Used by the workflow checks "
                 "and the converter tests without ComfyUI; tests/test_frontend_e2e.py compares it with a live "
                 "server. Refresh: python tests/test_workflows.py --refresh-core-nodes http://127.0.0.1:8188",
        "comfyui_version": version,
        "frontend_only": sorted(wa.FRONTEND_ONLY),
        "file_lists": CORE_FILE_LISTS,
        "nodes": {n: core_interface(live[n], CORE_FILE_LISTS.get(n, {})) for n in KEPT_CORE},
    }
    atomic_write_text(CORE_NODES, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


# -- shared definitions ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def definitions() -> dict:
    """The pack's nodes (INPUT_TYPES called without ComfyUI) plus the kept core nodes."""
    return wa.merge_object_info(core_data()["nodes"], wa.pack_object_info())


@pytest.fixture(scope="module")
def dynamic_combos() -> set:
    core = {(n, i) for n, inputs in core_data()["file_lists"].items() for i in inputs}
    return core | set(PACK_FILE_LISTS)


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def nodes_of(wf: dict, type_: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == type_]


def widget(wf_node: dict, name: str, defs: dict):
    return wa.map_widget_values(wf_node, defs[wf_node["type"]])[name]


def source(wf: dict, node: dict, input_name: str) -> tuple[dict, int] | None:
    """The node and output slot feeding ``input_name`` of ``node`` (None if unconnected)."""
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    if inp["link"] is None:
        return None
    link = next(l for l in wf["links"] if l[0] == inp["link"])
    return next(n for n in wf["nodes"] if n["id"] == link[1]), link[2]


# -- the files ---------------------------------------------------------------------------------------------
def test_the_kept_core_list_is_well_formed():
    data = core_data()
    assert set(data["nodes"]) == set(KEPT_CORE) and data["comfyui_version"] == "0.8.0"
    assert set(data["frontend_only"]) == set(wa.FRONTEND_ONLY)
    for name, node in data["nodes"].items():
        assert node["name"] == name and set(node["input_order"]) <= {"required", "optional"}
        for part, order in node["input_order"].items():
            assert order == list(node["input"][part])
        for inputs in node["input"].values():
            for inp, (typ, opts) in inputs.items():
                assert "tooltip" not in opts
                assert (typ == []) == (inp in data["file_lists"].get(name, {})), (name, inp)
    assert not set(data["nodes"]) & set(wa.pack_object_info()), "a core name collides with a pack node"


def test_workflows_is_the_only_workflow_folder_and_holds_json_jpg_pairs():
    # ComfyUI mounts every one of these folders on the same URL; a second one would shadow the first
    for other in ("example_workflows", "example", "examples", "workflow"):
        assert not (ROOT / other).exists(), f"{other}/ would shadow workflows/ in the template browser"
    files = sorted(p.name for p in WORKFLOWS.iterdir())
    assert all(not (WORKFLOWS / f).is_dir() for f in files), "the template listing ignores subfolders"
    stems = {Path(f).stem for f in files}
    assert files == sorted([f"{s}.json" for s in stems] + [f"{s}.jpg" for s in stems]), files
    assert set(REQUIRED) <= stems


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_workflow_file_format(name, definitions):
    wf = load(name)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max((l[0] for l in wf["links"]), default=0)
    assert len({l[0] for l in wf["links"]}) == len(wf["links"])
    # models: the stock file names, with where they go and where to get them
    models = {m["name"]: m for m in wf["models"]}
    assert set(models) <= set(STOCK_MODELS) and REQUIRED[name] in models
    for m in wf["models"]:
        assert m["directory"] == STOCK_MODELS[m["name"]] and m["url"].startswith("https://") \
            and m["url"].endswith("/" + m["name"])
    for n in nodes_of(wf, "CheckpointLoaderSimple"):
        ckpt = widget(n, "ckpt_name", definitions)
        assert ckpt == REQUIRED[name] and ckpt in models
        assert [m["name"] for m in n["properties"]["models"]] == [ckpt]
    # every pack node carries the registry id, so the frontend can offer to install the pack
    for n in wf["nodes"]:
        if n["type"].startswith("SafetyDPO_"):
            assert n["properties"].get("cnr_id") == PACK_ID == "safetydpo", n["id"]
        elif n["type"] not in wa.FRONTEND_ONLY:
            assert n["properties"].get("cnr_id") == "comfy-core", n["id"]
        assert n.get("mode", 0) == 0, f"node {n['id']} is muted or bypassed in a shipped workflow"
    # the explanation
    notes = nodes_of(wf, "MarkdownNote")
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert text.startswith("# SafetyDPO") and len(text) > 600 and REQUIRED[name] in text
    assert "**Needs.**" in text and "**Settings" in text
    # the thumbnail the template browser shows: a real JPEG of a useful size
    from PIL import Image

    with Image.open(WORKFLOWS / f"{name}.jpg") as im:
        assert im.format == "JPEG" and im.width >= 400 and im.height >= 250
        assert sum(1 for c in im.convert("L").histogram() if c) > 8, "the thumbnail is blank"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_workflow_passes_the_checks(name, definitions, dynamic_combos):
    wf = load(name)
    for n in wf["nodes"]:
        assert n["type"] in definitions or n["type"] in wa.FRONTEND_ONLY, \
            f"{n['type']} is neither a pack node, a kept core node nor a frontend-only node"
    assert wa.check_workflow(wf, definitions, dynamic_combos) == []
    # every link's type is the one its origin declares (the checks compare it with the target too)
    for lid, origin, slot, target, tslot, typ in wf["links"]:
        src = next(n for n in wf["nodes"] if n["id"] == origin)
        assert definitions[src["type"]]["output"][slot] == typ, lid


# -- what each required workflow does -----------------------------------------------------------------------
def test_1_builds_a_dataset(definitions):
    wf = load("01_build_safety_dataset")
    (render,) = nodes_of(wf, "SafetyDPO_RenderPairs")
    assert source(wf, render, "pairs")[0]["type"] == "SafetyDPO_BuiltinPairs"
    assert {source(wf, render, s)[0]["type"] for s in ("model", "clip", "vae")} == {"CheckpointLoaderSimple"}
    assert widget(render, "if_exists", definitions) == "resume"
    previews = [l for l in wf["links"] if l[1] == render["id"] and l[2] == 1]
    assert previews and all(next(n for n in wf["nodes"] if n["id"] == l[3])["type"] == "PreviewImage" for l in previews)


def test_2_trains_one_expert(definitions):
    wf = load("02_train_one_expert")
    (train,) = nodes_of(wf, "SafetyDPO_TrainExpert")
    (pairs,) = nodes_of(wf, "SafetyDPO_BuiltinPairs")
    assert widget(train, "category", definitions) == widget(pairs, "categories", definitions) == "violence"
    assert source(wf, train, "dataset")[0]["type"] == "SafetyDPO_RenderPairs"
    (plot,) = nodes_of(wf, "SafetyDPO_LossPlot")
    (save,) = nodes_of(wf, "SafetyDPO_SaveLoRA")
    assert source(wf, plot, "metrics") == (train, 1) and source(wf, save, "lora") == (train, 0)
    assert widget(train, "steps", definitions) == 500 and widget(train, "resume", definitions) is True


@pytest.mark.parametrize("name", ["03_train_seven_experts_comerge", "06_sdxl_train_seven_experts_comerge",
                                  "08_flux_train_experts_comerge", "09_sd35_train_experts_comerge"])
def test_3_6_8_9_train_seven_experts_and_co_merge_them_into_a_saved_lora(name, definitions):
    wf = load(name)
    trains = nodes_of(wf, "SafetyDPO_TrainExpert")
    assert sorted(widget(t, "category", definitions) for t in trains) == sorted(CATEGORIES)
    (merge,) = nodes_of(wf, "SafetyDPO_CoMerge")
    fed = {source(wf, merge, f"expert_{i}")[0]["id"] for i in range(1, 8)}
    assert fed == {t["id"] for t in trains} and all(source(wf, merge, f"expert_{i}")[1] == 0 for i in range(1, 8))
    assert widget(merge, "method", definitions) == "comerge-delta"
    assert source(wf, merge, "pairs")[0]["type"] == "SafetyDPO_BuiltinPairs"
    (pairs,) = nodes_of(wf, "SafetyDPO_BuiltinPairs")
    assert widget(pairs, "categories", definitions) == "all"
    (save,) = nodes_of(wf, "SafetyDPO_SaveLoRA")
    model_loader = "UNETLoader" if "flux" in name else "CheckpointLoaderSimple"
    assert source(wf, save, "lora") == (merge, 0) and source(wf, save, "model")[0]["type"] == model_loader
    if "sdxl" in name or "flux" in name or "sd35" in name:
        assert all(widget(t, "gradient_checkpointing", definitions) for t in trains)
    (render,) = nodes_of(wf, "SafetyDPO_RenderPairs")
    clip_sources = {source(wf, n, "clip")[0]["type"] for n in trains + [render, merge]}
    if "flux" in name:  # Flux.1-dev: no CFG (distilled guidance at its default), T5 + CLIP-L, its own VAE
        assert widget(render, "cfg", definitions) == 1.0 and widget(render, "scheduler", definitions) == "simple"
        assert clip_sources == {"DualCLIPLoader"} and source(wf, render, "vae")[0]["type"] == "VAELoader"
        (dual,) = nodes_of(wf, "DualCLIPLoader")
        assert widget(dual, "type", definitions) == "flux"
        assert widget(dual, "clip_name2", definitions) == "t5xxl_fp16.safetensors"
    elif "sd35" in name:  # SD3.5: CLIP-L, CLIP-G and T5 from the triple loader, the checkpoint's MMDiT and VAE
        assert widget(render, "cfg", definitions) == 4.5 and clip_sources == {"TripleCLIPLoader"}
    if "flux" in name or "sd35" in name:  # the optional guidance input stays unconnected (Flux: its default 3.5)
        assert all(i["name"] != "guidance" or i.get("link") is None for n in trains + [render, merge]
                   for i in n["inputs"])


def test_4_samples_aligned_beside_unaligned(definitions):
    wf = load("04_safe_sampling_aligned_vs_unaligned")
    (safe,) = nodes_of(wf, "SafetyDPO_SafeSampler")
    assert source(wf, safe, "safety_lora")[0]["type"] == "SafetyDPO_LoadLoRA"
    comparison = [l for l in wf["links"] if l[1] == safe["id"] and l[2] == 2]
    assert comparison and next(n for n in wf["nodes"] if n["id"] == comparison[0][3])["type"] == "PreviewImage"
    (loader,) = nodes_of(wf, "SafetyDPO_LoadLoRA")
    assert widget(loader, "lora_name", definitions) == "safetydpo/safety_comerge_00001_.safetensors"  # workflow 3's


def test_5_evaluates_ip_with_and_without_the_lora_over_a_prompt_set(definitions):
    wf = load("05_evaluate_ip_prompt_set")
    samplers = nodes_of(wf, "SafetyDPO_SafeSampler")
    prompts = {widget(source(wf, s, "positive")[0], "text", definitions) for s in samplers}
    assert len(samplers) >= 4 and len(prompts) == len(samplers)
    evals = nodes_of(wf, "SafetyDPO_Evaluate")
    assert len(evals) == 2

    def leaves(node, slot):  # the SafeSampler outputs an ImageBatch tree collects
        if node["type"] == "ImageBatch":
            return leaves(*source(wf, node, "image1")) + leaves(*source(wf, node, "image2"))
        assert node["type"] == "SafetyDPO_SafeSampler"
        return [(node["id"], slot)]

    got = sorted(sorted(leaves(*source(wf, e, "images"))) for e in evals)
    ids = sorted(s["id"] for s in samplers)
    assert got == sorted([[(i, 0) for i in ids], [(i, 1) for i in ids]]), "aligned and unaligned, every prompt"


def test_7_attacks_the_base_and_the_aligned_model_and_samples_the_adversarial_conditioning(definitions):
    wf = load("07_red_team_aligned_model")
    attacks = nodes_of(wf, "SafetyDPO_RedTeamAttack")
    assert len(attacks) == 2
    (ckpt,) = nodes_of(wf, "CheckpointLoaderSimple")
    (apply,) = nodes_of(wf, "SafetyDPO_ApplySafetyLoRA")
    assert sorted(source(wf, a, "model")[0]["type"] for a in attacks) == ["CheckpointLoaderSimple",
                                                                          "SafetyDPO_ApplySafetyLoRA"]
    assert all(source(wf, a, "base_model")[0] is ckpt and source(wf, a, "pairs")[0]["type"] == "SafetyDPO_BuiltinPairs"
               for a in attacks)
    # the same attack and settings on both models, so the reports compare them
    assert attacks[0]["widgets_values"] == attacks[1]["widgets_values"]
    assert widget(attacks[0], "attack", definitions) == "ring-a-bell"
    aligned = next(a for a in attacks if source(wf, a, "model")[0] is apply)
    (safe,) = nodes_of(wf, "SafetyDPO_SafeSampler")
    assert source(wf, safe, "positive") == (aligned, 2)
    (pairs,) = nodes_of(wf, "SafetyDPO_BuiltinPairs")
    n = len([c for c in widget(pairs, "categories", definitions).split(",") if c.strip()])
    n *= min(widget(pairs, "pairs_per_category", definitions), widget(aligned, "prompts_per_category", definitions))
    assert widget(source(wf, safe, "latent_image")[0], "batch_size", definitions) == n  # one latent per prompt
    (loader,) = nodes_of(wf, "SafetyDPO_LoadLoRA")
    assert widget(loader, "lora_name", definitions) == "safetydpo/safety_comerge_00001_.safetensors"  # workflow 3's


# -- the converter on the shipped workflows -----------------------------------------------------------------
def validate_api(prompt: dict, defs: dict, file_lists=frozenset()) -> list[str]:
    """The checks ComfyUI's server makes on a prompt (execution.py validate_prompt/validate_inputs), written
    here independently of the converter: known class, an output node, every required input, links to
    existing nodes and outputs of a matching type, widget values of the right type within min/max and among
    a combo's choices (except ``file_lists``: combos of files on the user's machine)."""
    problems = []
    if not any(defs[v["class_type"]].get("output_node") for v in prompt.values() if v["class_type"] in defs):
        problems.append("no output node")
    for nid, node in prompt.items():
        d = defs.get(node["class_type"])
        if d is None or node["class_type"] in wa.FRONTEND_ONLY:
            problems.append(f"{nid}: class {node['class_type']} cannot execute")
            continue
        inputs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        for k in d["input"].get("required", {}):
            if k not in node["inputs"]:
                problems.append(f"{nid}: required input {k} missing")
        for k, v in node["inputs"].items():
            if k not in inputs:
                problems.append(f"{nid}: {k} is not an input of {node['class_type']}")
                continue
            typ, opts = inputs[k][0], (inputs[k][1] if len(inputs[k]) > 1 else {})
            if isinstance(v, list):
                src = prompt.get(v[0])
                if src is None or len(v) != 2 or not isinstance(v[1], int):
                    problems.append(f"{nid}.{k}: link {v} to a missing node")
                    continue
                outs = defs[src["class_type"]]["output"]
                if v[1] >= len(outs) or not wa.types_match(outs[v[1]], "COMBO" if isinstance(typ, list) else typ):
                    problems.append(f"{nid}.{k}: {src['class_type']} output {v[1]} does not fit {typ}")
                continue
            if typ == "INT" and (isinstance(v, bool) or not isinstance(v, int)) \
                    or typ == "FLOAT" and (isinstance(v, bool) or not isinstance(v, (int, float))) \
                    or typ == "BOOLEAN" and not isinstance(v, bool) \
                    or typ in ("STRING",) and not isinstance(v, str) \
                    or isinstance(typ, list) and not isinstance(v, str):
                problems.append(f"{nid}.{k}: {v!r} is not a {typ if not isinstance(typ, list) else 'choice'}")
            elif typ in ("INT", "FLOAT") and not (opts.get("min", v) <= v <= opts.get("max", v)):
                problems.append(f"{nid}.{k}: {v} outside [{opts.get('min')}, {opts.get('max')}]")
            elif isinstance(typ, list) and (node["class_type"], k) not in file_lists and v not in typ:
                problems.append(f"{nid}.{k}: {v!r} not in the choices")
            elif typ not in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO") and not isinstance(typ, list):
                problems.append(f"{nid}.{k}: socket {typ} holds the literal {v!r}")
    return problems


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_workflow_converts_to_a_valid_api_graph(name, definitions, dynamic_combos):
    wf = load(name)
    api = wa.ui_to_api(wf, definitions)
    real = [n for n in wf["nodes"] if n["type"] not in wa.FRONTEND_ONLY]
    assert sorted(api) == sorted(str(n["id"]) for n in real)
    assert validate_api(api, definitions, dynamic_combos) == []
    assert len([1 for n in api.values() for v in n["inputs"].values() if isinstance(v, list)]) == len(wf["links"])
    for n in api.values():
        assert not {v for v in n["inputs"].values() if isinstance(v, str)} & set(wa.CONTROL_VALUES), \
            f"a control value leaked into the API graph: {n}"
        if "seed" in n["inputs"]:
            assert isinstance(n["inputs"]["seed"], int)


def test_workflow_2_converts_to_the_expected_literal_inputs(definitions):
    api = wa.ui_to_api(load("02_train_one_expert"), definitions)
    (train,) = [v for v in api.values() if v["class_type"] == "SafetyDPO_TrainExpert"]
    literals = {k: v for k, v in train["inputs"].items() if not isinstance(v, list)}
    assert literals == {"category": "violence", "steps": 500, "learning_rate": 1e-4, "rank": 4, "beta": 5000.0,
                        "condition": "unsafe", "seed": 0, "gradient_checkpointing": False, "save_every": 100,
                        "resume": True, "allow_model_mismatch": False, "sft_weight": 0.0,
                        "preserve_weight": 0.0, "preserve_prompts": "auto", "adv_weight": 0.0, "objective": "dpo", "esd_eta": 1.0,
                        "targets": "auto", "twin_weight": 0.0, "ema_decay": 0.0}
    assert sorted(k for k, v in train["inputs"].items() if isinstance(v, list)) == ["clip", "dataset", "model"]
    assert train["_meta"]["title"] == "SafetyDPO: Train Safety Expert (DPO)"


# -- the converter's rules on small graphs ------------------------------------------------------------------
DEFS = {
    "Src": {"input": {"required": {}}, "input_order": {"required": []}, "output": ["MODEL", "IMAGE"],
            "output_name": ["model", "image"], "display_name": "Source", "output_node": False},
    "Sampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0, "min": 0, "max": 99}],
                                       "steps": ["INT", {"default": 20, "min": 1, "max": 100}],
                                       "cfg": ["FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0}],
                                       "name": [["euler", "ddim"], {}]},
                          "optional": {"note": ["STRING", {"default": ""}],
                                       "strength": ["FLOAT", {"default": 1.0, "min": 0, "max": 2,
                                                              "forceInput": True}]}},
                "input_order": {"required": ["model", "seed", "steps", "cfg", "name"],
                                "optional": ["note", "strength"]},
                "output": ["IMAGE"], "output_name": ["image"], "display_name": "Sampler", "output_node": True},
    "Pick": {"input": {"required": {"file": [[], {"image_upload": True}],
                                    "mode": ["COMBO", {"options": ["a", "b"], "control_after_generate": True}],
                                    "plain": ["INT", {"default": 1, "min": 0, "max": 9,
                                                      "control_after_generate": False}],
                                    "values": ["STRING", {"default": ""}]}},
             "input_order": {"required": ["file", "mode", "plain", "values"]},
             "output": ["IMAGE"], "output_name": ["image"], "display_name": "Pick", "output_node": True},
}


def graph(nodes, links) -> dict:
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max([l[0] for l in links], default=0),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def node(id_, type_, widgets=(), inputs=(), outputs=(), mode=0, **kw):
    return {"id": id_, "type": type_, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": id_, "mode": mode,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {},
            "widgets_values": list(widgets), **kw}


def basic():
    return graph([node(1, "Src", outputs=[{"name": "model", "type": "MODEL", "links": [1]},
                                          {"name": "image", "type": "IMAGE", "links": []}]),
                  node(2, "Sampler", [5, "fixed", 30, 6.5, "ddim", "hi"],
                       inputs=[{"name": "model", "type": "MODEL", "link": 1},
                               {"name": "strength", "type": "FLOAT", "link": None}],
                       outputs=[{"name": "image", "type": "IMAGE", "links": []}]),
                  node(3, "MarkdownNote", ["# notes"])],
                 [[1, 1, 0, 2, 0, "MODEL"]])


def test_widgets_values_map_to_the_widget_inputs_skipping_the_seed_control_value():
    assert [(w.name, w.control) for w in wa.widget_inputs(DEFS["Sampler"])] == [
        ("seed", True), ("steps", False), ("cfg", False), ("name", False), ("note", False)]  # forceInput: a socket
    api = wa.ui_to_api(basic(), DEFS)
    assert api == {"1": {"inputs": {}, "class_type": "Src", "_meta": {"title": "Source"}},
                   "2": {"inputs": {"seed": 5, "steps": 30, "cfg": 6.5, "name": "ddim", "note": "hi",
                                    "model": ["1", 0]}, "class_type": "Sampler", "_meta": {"title": "Sampler"}}}
    assert wa.check_workflow(basic(), DEFS) == []


def test_the_checks_catch_shifted_values_wrong_types_loose_seeds_and_unknown_nodes():
    wf = basic()
    wf["nodes"][1]["widgets_values"] = [5, 30, 6.5, "ddim", "hi"]  # the control value forgotten
    (p,) = wa.check_workflow(wf, DEFS)
    assert "5 widgets_values for 6 widget slots (seed, <control of seed>, steps, cfg, name, note)" in p
    with pytest.raises(wa.WorkflowError, match=r"node 2 \(Sampler\): 5 widgets_values for 6"):
        wa.ui_to_api(wf, DEFS)
    wf["nodes"][1]["widgets_values"] = [5, 30, "fixed", 6.5, "ddim", "hi"]  # shifted by one
    problems = wa.check_workflow(wf, DEFS)
    assert any("control after 'seed' must be one of" in p and "got 30" in p for p in problems), problems
    assert any("widget 'steps'" in p and "expected an integer, got 'fixed'" in p for p in problems), problems
    wf["nodes"][1]["widgets_values"] = [5, "randomize", 300, 6.5, "plms", True]
    problems = wa.check_workflow(wf, DEFS)
    assert any("'randomize'; shared workflows use 'fixed'" in p for p in problems)
    assert any("widget 'steps'" in p and "300 is outside [1, 100]" in p for p in problems)
    assert any("widget 'name'" in p and "'plms' is not one of ['euler', 'ddim']" in p for p in problems)
    assert any("widget 'note'" in p and "expected a string, got True" in p for p in problems)
    assert wa.check_workflow(wf, DEFS, require_fixed_seeds=False) != problems
    wf = basic()
    wf["nodes"][1]["type"] = "Sampler2"
    assert wa.check_workflow(wf, DEFS) == ["node 2 (Sampler2): unknown node type 'Sampler2'"]
    with pytest.raises(wa.WorkflowError, match="no definition for node type 'Sampler2'.*running ComfyUI's URL"):
        wa.ui_to_api(wf, DEFS)


def test_the_checks_catch_links_of_the_wrong_type_and_broken_links():
    wf = basic()
    wf["links"][0] = [1, 1, 1, 2, 0, "IMAGE"]  # the IMAGE output into the MODEL input
    wf["nodes"][0]["outputs"][0]["links"], wf["nodes"][0]["outputs"][1]["links"] = [], [1]
    (p,) = wa.check_workflow(wf, DEFS)
    assert "output 1 (IMAGE) -> node 2 (Sampler) input 'model' (MODEL)" in p and "do not match" in p
    wf = basic()
    wf["links"][0][5] = "LATENT"  # the link's own type disagrees
    assert any("link typed 'LATENT'" in p for p in wa.check_workflow(wf, DEFS))
    wf = basic()
    wf["nodes"][1]["inputs"][0]["link"] = None  # the target does not hold the link; model is unconnected
    problems = wa.check_workflow(wf, DEFS)
    assert "node 2 (Sampler): required input 'model' is not connected" in problems
    assert any("does not hold it" in p for p in problems)
    with pytest.raises(wa.WorkflowError, match=r"required input 'model' not connected"):
        wa.ui_to_api(wf, DEFS)
    assert "model" not in wa.ui_to_api(wf, DEFS, strict=False)["2"]["inputs"]
    assert wa.types_match("IMAGE,MASK", "mask") and wa.types_match("*", "MODEL") and not wa.types_match("A", "B")


def test_links_through_reroutes_primitives_bypassed_and_muted_nodes():
    src_out = [{"name": "model", "type": "MODEL", "links": [1]}, {"name": "image", "type": "IMAGE", "links": []}]
    sampler_inputs = [{"name": "model", "type": "MODEL", "link": 2},
                      {"name": "steps", "type": "INT", "link": 3, "widget": {"name": "steps"}}]
    wf = graph([
        node(1, "Src", outputs=src_out),
        node(4, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
             outputs=[{"name": "", "type": "MODEL", "links": [2]}]),
        node(5, "PrimitiveNode", [42, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [3],
                                                         "widget": {"name": "steps"}}]),
        node(2, "Sampler", [5, "fixed", 30, 6.5, "ddim", ""], inputs=sampler_inputs,
             outputs=[{"name": "image", "type": "IMAGE", "links": [4]}], title="My sampler"),
        # bypassed: its IMAGE output is replaced by its IMAGE input (the sampler's image)
        node(6, "Sampler", [1, "fixed", 2, 1.0, "euler", ""], mode=4,
             inputs=[{"name": "model", "type": "MODEL", "link": None}, {"name": "image", "type": "IMAGE", "link": 4}],
             outputs=[{"name": "image", "type": "IMAGE", "links": [5]}]),
        node(7, "Pick", ["photo.png", "image", "b", "fixed", 3, "x"],
             inputs=[{"name": "values", "type": "STRING", "link": None, "widget": {"name": "values"}}],
             outputs=[{"name": "image", "type": "IMAGE", "links": []}]),
    ], [[1, 1, 0, 4, 0, "*"], [2, 4, 0, 2, 0, "MODEL"], [3, 5, 0, 2, 1, "INT"], [4, 2, 0, 6, 1, "IMAGE"],
        [5, 6, 0, 7, 0, "IMAGE"]])
    defs = copy.deepcopy(DEFS)
    defs["Sampler"]["input"]["optional"]["image"] = ["IMAGE"]
    defs["Sampler"]["input_order"]["optional"].append("image")
    defs["Pick"]["input"]["optional"] = {"image": ["IMAGE"]}
    defs["Pick"]["input_order"]["optional"] = ["image"]
    wf["nodes"][5]["inputs"].insert(0, {"name": "image", "type": "IMAGE", "link": 5})
    wf["links"][4] = [5, 6, 0, 7, 0, "IMAGE"]
    api = wa.ui_to_api(wf, defs)
    assert set(api) == {"1", "2", "7"}  # Reroute, PrimitiveNode and the bypassed node are gone
    assert api["2"]["inputs"] == {"seed": 5, "steps": 42, "cfg": 6.5, "name": "ddim", "note": "",
                                  "model": ["1", 0]}
    assert api["2"]["_meta"]["title"] == "My sampler"
    # the upload button's value and the combo's control value are skipped; the INT declares no control
    assert api["7"]["inputs"] == {"file": "photo.png", "mode": "b", "plain": 3, "values": "x", "image": ["2", 0]}
    assert [w.slots for w in wa.widget_inputs(defs["Pick"])] == [2, 2, 1, 1]
    # muted (mode 2): left out, and so are the inputs it fed
    wf["nodes"][3]["mode"] = 2
    api = wa.ui_to_api(wf, defs, strict=False)
    assert "2" not in api and "image" not in api["7"]["inputs"]
    with pytest.raises(wa.WorkflowError, match="loop"):
        loop = graph([node(1, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}],
                           outputs=[{"name": "", "type": "*", "links": [1]}]),
                      node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
                           outputs=[{"name": "", "type": "*", "links": [2, 3]}]),
                      node(3, "Sampler", [1, "fixed", 2, 1.0, "euler", ""],
                           inputs=[{"name": "model", "type": "MODEL", "link": 3}])],
                     [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"], [3, 2, 0, 3, 0, "MODEL"]])
        wa.ui_to_api(loop, defs)


def test_list_values_are_wrapped_and_dict_widgets_values_are_read_by_name():
    wf = basic()
    wf["nodes"][1]["widgets_values"] = {"seed": 1, "steps": 2, "cfg": 3.0, "name": "euler", "note": ["a", "b"]}
    api = wa.ui_to_api(wf, DEFS)
    assert api["2"]["inputs"]["note"] == {"__value__": ["a", "b"]} and api["2"]["inputs"]["steps"] == 2


def test_not_a_ui_workflow_is_refused_with_a_clear_error():
    with pytest.raises(wa.WorkflowError, match="API-format prompt needs no conversion"):
        wa.ui_to_api({"1": {"class_type": "Src", "inputs": {}}}, DEFS)
    with pytest.raises(wa.WorkflowError, match="subgraphs"):
        wa.ui_to_api(dict(basic(), definitions={"subgraphs": [{"id": "x"}]}), DEFS)
    with pytest.raises(wa.WorkflowError, match="link 9 is not in the workflow's links"):
        wf = basic()
        wf["nodes"][1]["inputs"][0]["link"] = 9
        wa.ui_to_api(wf, DEFS)


def test_pack_definitions_are_read_without_comfyui(definitions):
    info = wa.pack_object_info()
    assert len(info) == 17 and all(k.startswith("SafetyDPO_") for k in info)
    train = info["SafetyDPO_TrainExpert"]
    assert [w.name for w in wa.widget_inputs(train)] == [
        "category", "steps", "learning_rate", "rank", "beta", "condition", "seed", "gradient_checkpointing",
        "save_every", "resume", "allow_model_mismatch", "sft_weight", "preserve_weight", "preserve_prompts", "adv_weight",
        "objective", "esd_eta", "targets", "twin_weight", "ema_decay"]
    assert [w.name for w in wa.widget_inputs(train) if w.control] == ["seed"]
    assert train["output"] == ["LORA_MODEL", "SAFETYDPO_METRICS", "MODEL"] and not train["output_node"]
    assert "folder_paths" not in sys.modules or sys.modules["folder_paths"] is not None


def test_the_widget_order_table_in_the_readme_matches_the_definitions():
    doc = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(SafetyDPO_\w+)` \| (`[^|]*`) \|$", doc, re.M))
    for name, d in wa.pack_object_info().items():
        assert [w.name for w in wa.widget_inputs(d)] == re.findall(r"`(\w+)`", rows[name]), name


# -- the command line ---------------------------------------------------------------------------------------
def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safetydpo_core.cli.main", "workflow", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_to_api_and_check(tmp_path, definitions):
    out = tmp_path / "sub" / "api.json"
    src = WORKFLOWS / "02_train_one_expert.json"
    r = run_cli("to-api", str(src), "--out", str(out), "--object-info", str(CORE_NODES))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == wa.ui_to_api(load("02_train_one_expert"), definitions)
    assert str(out) in r.stdout
    r = run_cli("to-api", str(src), "--out", str(out), "--object-info", str(CORE_NODES))
    assert r.returncode == 2 and "exists" in r.stderr and "--overwrite" in r.stderr
    # offline the kept core definitions are used by default
    r = run_cli("to-api", str(src), "--out", str(tmp_path / "y.json"))
    assert r.returncode == 0 and json.loads((tmp_path / "y.json").read_text(encoding="utf-8")) == json.loads(out.read_text(encoding="utf-8"))
    # without the core definitions the core loader is unknown: a clear error, no file
    r = run_cli("to-api", str(src), "--out", str(tmp_path / "x.json"), "--no-core")
    assert r.returncode == 2 and "CheckpointLoaderSimple" in r.stderr and "--object-info" in r.stderr
    assert not (tmp_path / "x.json").exists()
    r = run_cli("check", *map(str, sorted(WORKFLOWS.glob("*.json"))), "--object-info", str(CORE_NODES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok") == len(REQUIRED)
    bad = tmp_path / "bad.json"
    wf = load("02_train_one_expert")
    next(n for n in wf["nodes"] if n["type"] == "SafetyDPO_TrainExpert")["widgets_values"].remove("fixed")
    bad.write_text(json.dumps(wf), encoding="utf-8")
    r = run_cli("check", str(bad), "--object-info", str(CORE_NODES))
    assert r.returncode == 1 and "20 widgets_values for 21 widget slots" in r.stdout


if __name__ == "__main__":  # python tests/test_workflows.py --refresh-core-nodes http://127.0.0.1:8188
    if len(sys.argv) == 3 and sys.argv[1] == "--refresh-core-nodes":
        refresh_core_nodes(sys.argv[2])
        print(f"wrote {CORE_NODES}")
    else:
        sys.exit(__doc__)
