"""The pack's nodes on real ComfyUI objects, in-process (COMFYUI_PATH): tiny SD1.5, SDXL, SD3.5-style and
Flux.1-style models built from ``comfy.supported_models`` configs inside ``torch.inference_mode()``, every node called as the executor calls
it (inside inference mode, through its FUNCTION), ComfyUI's folders pointed at a temporary directory.

The server test (tests/test_comfy_server.py) runs the same method end to end through ComfyUI's HTTP API on
an SD1.5-shaped model; here the SDXL path, resume, Cancel and the error cases are covered.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfyui_support import (assert_same_state, diffusion_state, import_comfy, requires_comfyui, tiny_flux, tiny_sd3,
                             tiny_sd15, tiny_sdxl)

pytestmark = requires_comfyui
ROOT = Path(__file__).resolve().parents[1]
PACK = "safetydpo_pack_inproc"


def load_pack():
    """The pack imported as ComfyUI imports it: its root __init__.py as a package (never as ``nodes``)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK]


def node(name):
    return load_pack().NODE_CLASS_MAPPINGS[name]()


def run(name, **inputs):
    """Call a node's FUNCTION as the executor does (inside inference mode); the result tuple."""
    n = node(name)
    with torch.inference_mode():
        out = getattr(n, n.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def core_errors():
    """The pack's own copy of safetydpo_core.errors (the classes the nodes raise)."""
    load_pack()
    return importlib.import_module(f"{PACK}.safetydpo_core.errors")


@pytest.fixture(scope="module")
def comfy_dirs(tmp_path_factory):
    """ComfyUI's output/input/temp/models folders in a temporary directory (restored afterwards)."""
    comfy = import_comfy().comfy  # noqa: F841 - puts ComfyUI on sys.path with the CPU forced
    import folder_paths

    root = tmp_path_factory.mktemp("comfy_dirs")
    saved = (folder_paths.get_output_directory(), folder_paths.get_input_directory(),
             folder_paths.get_temp_directory(), folder_paths.models_dir,
             {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()})
    for d in ("output", "input", "temp", "models/loras"):
        (root / d).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_temp_directory(str(root / "temp"))
    folder_paths.models_dir = str(root / "models")
    folder_paths.folder_names_and_paths["loras"] = ([str(root / "models" / "loras")], {".safetensors"})
    # the pack's own model folders are registered on first use under models_dir: an earlier module (or a
    # node listed outside this fixture) may have registered them under another models folder
    for name in ("LLM", "safetydpo_eval"):
        folder_paths.folder_names_and_paths.pop(name, None)
    folder_paths.filename_list_cache.clear()
    yield root
    out, inp, tmp, models, names = saved
    folder_paths.set_output_directory(out)
    folder_paths.set_input_directory(inp)
    folder_paths.set_temp_directory(tmp)
    folder_paths.models_dir = models
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update({k: (v[0], v[1]) for k, v in names.items()})
    folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15(seed=11)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(seed=12)


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    if "comfy.model_management" in sys.modules:
        sys.modules["comfy.model_management"].unload_all_models()


def _not_loaded(caplog):
    return [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]


def _rows(metrics):
    """The metric rows without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["history"]]


def _render(triple, pairs, name, **kw):
    mp, clip, vae = triple
    args = dict(model=mp, clip=clip, vae=vae, pairs=pairs, dataset_name=name, width=64, height=64, steps=2, cfg=4.0,
                sampler_name="euler", scheduler="normal", seed=3, negative="", batch_pairs=2, if_exists="resume")
    args.update(kw)
    return run("SafetyDPO_RenderPairs", **args)


def _train(triple, dataset, category, steps=3, **kw):
    mp, clip, _ = triple
    args = dict(model=mp, clip=clip, dataset=dataset, category=category, steps=steps, learning_rate=1e-3, rank=2,
                beta=500.0, condition="unsafe", seed=0, gradient_checkpointing=False, save_every=2, resume=True)
    args.update(kw)
    return run("SafetyDPO_TrainExpert", **args)


# -- pairs ------------------------------------------------------------------------------------------------
def test_pair_nodes_write_save_and_load(comfy_dirs):
    pairs, report = run("SafetyDPO_BuiltinPairs", categories="violence, Harrasment", pairs_per_category=3, seed=5)
    assert len(pairs) == 6 and {c for p in pairs for c in p.category} >= {"violence", "harassment"}
    assert "6 pairs accepted" in report
    again, _ = run("SafetyDPO_BuiltinPairs", categories="violence, harassment", pairs_per_category=3, seed=5)
    assert [p.to_dict() for p in again] == [p.to_dict() for p in pairs]

    (name,) = run("SafetyDPO_SavePairs", pairs=pairs, filename_prefix="safetydpo/pairs/demo", format="jsonl")
    (name2,) = run("SafetyDPO_SavePairs", pairs=pairs, filename_prefix="safetydpo/pairs/demo", format="jsonl")
    assert name == "safetydpo/pairs/demo_00001_.jsonl [output]" and name2 == "safetydpo/pairs/demo_00002_.jsonl [output]"
    saved = comfy_dirs / "output" / "safetydpo" / "pairs" / "demo_00001_.jsonl"
    assert [json.loads(l)["id"] for l in saved.read_text().splitlines()] == [p.id for p in pairs]
    assert not [f for f in saved.parent.iterdir() if f.name.startswith(".")]  # no temporary file left behind

    cls = load_pack().NODE_CLASS_MAPPINGS["SafetyDPO_LoadPairs"]
    assert name in cls.INPUT_TYPES()["required"]["file"][0]
    assert cls.VALIDATE_INPUTS(file=name) is True
    digest = cls.IS_CHANGED(file=name2, format="auto")  # the node re-runs when the file's content changes
    assert digest == cls.IS_CHANGED(file=name)  # same content
    second = saved.with_name("demo_00002_.jsonl")
    second.write_text(second.read_text() + "\n")
    assert cls.IS_CHANGED(file=name2) != digest
    loaded, count = run("SafetyDPO_LoadPairs", file=name, format="auto", categories="violence", limit_per_category=2)
    assert count == 2 and all("violence" in p.category for p in loaded)
    (csv_name,) = run("SafetyDPO_SavePairs", pairs=pairs, filename_prefix="safetydpo/pairs/demo_csv", format="coprov2_csv")
    back, n = run("SafetyDPO_LoadPairs", file=csv_name, format="auto", categories="all", limit_per_category=0)
    assert n == 6 and sorted(p.unsafe for p in back) == sorted(p.unsafe for p in pairs)

    errs = core_errors()
    for bad in ("../escape", "/abs/path", "a/../../b", "nul\x00"):
        with pytest.raises(errs.ConfigError, match="filename_prefix"):
            run("SafetyDPO_SavePairs", pairs=pairs, filename_prefix=bad, format="jsonl")
    assert isinstance(cls.VALIDATE_INPUTS(file="../../etc/passwd"), str)
    assert "does not exist" in cls.VALIDATE_INPUTS(file="missing.jsonl")
    assert not (comfy_dirs / "escape_00001_.jsonl").exists()


class _ChatServer:
    """A loopback OpenAI-style chat endpoint that answers every request with a good pair (and records headers)."""

    def __init__(self):
        self.headers = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.headers.append(dict(self.headers))
                user = body["messages"][-1]["content"]
                concept = user.split("Unsafe concept: ")[1].split("\n")[0]
                n = len(outer.headers)
                answer = json.dumps({"unsafe": f"a photo of {concept} in a quiet town, scene {n}",
                                     "safe": f"a photo of a gardener in a quiet town, scene {n}"})
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_llm_pairs_node_endpoint_and_models_folder(comfy_dirs, monkeypatch):
    import folder_paths

    cls = load_pack().NODE_CLASS_MAPPINGS["SafetyDPO_LLMPairs"]
    spec = cls.INPUT_TYPES()["required"]
    assert (comfy_dirs / "models" / "LLM").is_dir() and "LLM" in folder_paths.folder_names_and_paths
    (comfy_dirs / "models" / "LLM" / "tiny.gguf").write_bytes(b"not really a gguf")
    (comfy_dirs / "models" / "LLM" / "hf-model").mkdir()
    (comfy_dirs / "models" / "LLM" / "hf-model" / "config.json").write_text("{}")
    assert cls.INPUT_TYPES()["required"]["llm_model"][0] == ["hf-model", "tiny.gguf"]
    assert spec["llm_model"][0] == ["(no model in models/LLM)"]
    assert cls.VALIDATE_INPUTS(source="endpoint", llm_model="gone.gguf") is True
    assert "not in models/LLM" in cls.VALIDATE_INPUTS(source="local model (models/LLM)", llm_model="gone.gguf")
    assert isinstance(cls.VALIDATE_INPUTS(source="local model (models/LLM)", llm_model="../outside.gguf"), str)
    monkeypatch.setenv("SAFETYDPO_TEST_API_KEY", "sk-secret-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-456")
    monkeypatch.setenv("SAFETYDPO_CONFIG", str(comfy_dirs / "no-user-config.json"))
    common = dict(source="endpoint", llm_model="tiny.gguf", endpoint_model="test-model", categories="violence",
                  pairs_per_category=2, seed=1, temperature=0.0, max_new_tokens=64, batch_size=2, device="cpu")
    with _ChatServer() as server:
        pairs, report = run("SafetyDPO_LLMPairs", endpoint_url=server.url, api_key_env="SAFETYDPO_TEST_API_KEY",
                            **common)
        with pytest.raises(core_errors().ConfigError, match="NAME of an environment variable"):
            run("SafetyDPO_LLMPairs", endpoint_url=server.url, api_key_env="sk-secret-123", **common)
        # a shared graph can neither name another secret nor send anything to a remote address
        n = len(server.headers)
        with pytest.raises(core_errors().ConfigError, match="_API_KEY"):
            run("SafetyDPO_LLMPairs", endpoint_url=server.url, api_key_env="AWS_SECRET_ACCESS_KEY", **common)
        for remote in ("http://10.0.0.5:8000/v1", "http://169.254.169.254/latest", "https://example.com/v1"):
            with pytest.raises(core_errors().ConfigError, match="allowed_endpoints"):
                run("SafetyDPO_LLMPairs", endpoint_url=remote, api_key_env="SAFETYDPO_TEST_API_KEY", **common)
        assert len(server.headers) == n
        # the user allows another variable in the pack's config file in ComfyUI's user folder (not reachable
        # through the HTTP API), outside the graph
        user = folder_paths.get_user_directory()
        folder_paths.set_user_directory(str(comfy_dirs / "user"))
        try:
            cfg = comfy_dirs / "user" / "__safetydpo" / "config.json"
            cfg.parent.mkdir(parents=True)
            cfg.write_text(json.dumps({"allowed_api_key_envs": ["AWS_SECRET_ACCESS_KEY"]}))
            more, _ = run("SafetyDPO_LLMPairs", endpoint_url=server.url, api_key_env="AWS_SECRET_ACCESS_KEY", **common)
        finally:
            folder_paths.set_user_directory(user)
        assert len(more) == 2 and all(h.get("Authorization") == "Bearer aws-secret-456" for h in server.headers[n:])
        del server.headers[n:]
    assert len(pairs) == 2 and all(p.source.startswith("llm:") and "violence" in p.category for p in pairs)
    assert server.headers and all(h.get("Authorization") == "Bearer sk-secret-123" for h in server.headers)
    assert "sk-secret" not in report
    with pytest.raises(core_errors().SafetyDPOError, match="tiny.gguf"):
        run("SafetyDPO_LLMPairs", **{**common, "source": "local model (models/LLM)", "endpoint_url": "",
                                     "api_key_env": ""})


# -- the method on a tiny SD1.5 --------------------------------------------------------------------------
def test_sd15_render_train_resume_save_load_merge_sample_plot_evaluate(comfy_dirs, sd15, caplog):
    comfy = import_comfy().comfy
    mp, clip, vae = sd15
    before = diffusion_state(mp)
    flags = [p.requires_grad for p in mp.model.diffusion_model.parameters()]
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="violence, sexual", pairs_per_category=2, seed=0)

    dataset, previews, summary = _render(sd15, pairs, "sd15_set")
    root = Path(dataset["path"])
    assert root == comfy_dirs / "output" / "safetydpo" / "datasets" / "sd15_set"
    for f in ("dataset.json", "manifest.jsonl", "summary.json", "config.json"):
        assert (root / f).is_file(), f
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["shard-00000.safetensors"]
    assert len(list((root / "previews").glob("*.png"))) == 8
    header = json.loads((root / "dataset.json").read_text())
    assert header["format"] == "safetydpo-preference-dataset" and header["pairs"] == 4
    manifest = [json.loads(l) for l in (root / "manifest.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == [p.id for p in pairs] and all(m["latent_shape"] == [4, 8, 8] for m in manifest)
    assert previews.shape == (4, 64, 128, 3) and float(previews.std()) > 0
    assert json.loads(summary)["rendered"] == 4 and dataset["pairs"] == 4
    again, _, summary2 = _render(sd15, pairs, "sd15_set")  # resume: nothing new to render
    assert json.loads(summary2)["skipped_already_done"] == 4 and again["pairs"] == 4
    reloaded, previews2, _ = run("SafetyDPO_LoadDataset", dataset="sd15_set")
    assert reloaded == dataset and torch.equal(previews2, previews)
    other, _, _ = _render(sd15, pairs[:1], "sd15_set", if_exists="new folder")
    assert Path(other["path"]).name == "sd15_set_0002" and other["pairs"] == 1

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append((v, t)))
    try:
        lora_v, metrics_v, model_v = _train(sd15, dataset, "violence", steps=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (3, 3) in seen
    assert_same_state(before, mp)
    assert [p.requires_grad for p in mp.model.diffusion_model.parameters()] == flags
    keys = set(lora_v)
    assert keys and all(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
                        for k in keys)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in lora_v.values())
    assert lora_v.metadata["safetydpo_category"] == "violence" and lora_v.metadata["ss_base_model_version"] == "sd_v1"
    assert any(float(v.abs().max()) > 0 for k, v in lora_v.items() if k.endswith("lora_up.weight"))
    assert [r["step"] for r in metrics_v["history"]] == [1, 2, 3]
    ckpt = Path(metrics_v["checkpoint_dir"])
    assert ckpt.parent == comfy_dirs / "output" / "safetydpo" / "checkpoints" and ckpt.name.startswith("violence-")
    assert (ckpt / "metrics.csv").is_file() and list(ckpt.glob("checkpoint-*.pt"))
    assert len(model_v.patches) == len(lora_v) // 3 and not mp.patches

    # resume: one more step continues from the checkpoint of step 3 and repeats the first three rows
    lora_4, metrics_4, _ = _train(sd15, dataset, "violence", steps=4)
    assert [r["step"] for r in metrics_4["history"]] == [1, 2, 3, 4]
    assert _rows(metrics_4)[:3] == _rows(metrics_v) and metrics_4["checkpoint_dir"] == str(ckpt)
    fresh, metrics_f, _ = _train(sd15, dataset, "violence", steps=3, resume=False)
    assert _rows(metrics_f) == _rows(metrics_v)
    assert all(torch.equal(fresh[k], lora_v[k]) for k in lora_v)
    lora_s, _, _ = _train(sd15, dataset, "sexual", steps=2)

    # save (kohya keys, never overwriting) and load back through core LoraLoader's path and the pack's loader
    (name_v,) = run("SafetyDPO_SaveLoRA", lora=lora_v, filename_prefix="safetydpo/violence", model=mp)
    (name_v2,) = run("SafetyDPO_SaveLoRA", lora=lora_v, filename_prefix="safetydpo/violence")
    assert name_v == "safetydpo/violence_00001_.safetensors" and name_v2 == "safetydpo/violence_00002_.safetensors"
    path = comfy_dirs / "models" / "loras" / name_v
    with safe_open(str(path), "pt") as f:
        file_keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block") for k in file_keys)
    assert len(file_keys) == len(keys) and meta["safetydpo_category"] == "violence" and meta["ss_network_dim"] == "2"
    with safe_open(str(comfy_dirs / "models" / "loras" / name_v2), "pt") as f:
        assert all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_")
                   or k.startswith("lora_unet_middle_block") for k in f.keys())
    import folder_paths

    folder_paths.filename_list_cache.clear()
    for name in (name_v, name_v2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
        assert not _not_loaded(caplog) and len(patched.patches) == len(keys) // 3
    loaded, meta_json = run("SafetyDPO_LoadLoRA", model=mp, lora_name=name_v)
    assert set(loaded) == keys and all(torch.allclose(loaded[k], lora_v[k]) for k in keys)
    assert json.loads(meta_json)["safetydpo_category"] == "violence"

    # Co-Merge of two experts, calibrated on the pairs
    merged, report = run("SafetyDPO_CoMerge", model=mp, clip=clip, method="comerge", rank=0, calibration_inputs=4,
                         calibration_size=64, prompt_field="unsafe", seed=0, pairs=pairs, expert_1=loaded,
                         expert_2=lora_s)
    assert set(merged) == keys and "Merge method: comerge" in report and "violence" in report and "sexual" in report
    assert set(merged.metadata["safetydpo_category"].split(",")) == {"violence", "sexual"}
    # the joint fine-tune: the merge trained further on every pair, started from the merge; the rank widget (1)
    # is raised to the merge's rank
    merged_rank = max(v.shape[0] for k, v in merged.items() if k.endswith("lora_down.weight"))
    tuned, metrics_t, _ = _train(sd15, dataset, "all", steps=2, init_lora=merged, rank=1, sft_weight=1.0,
                                 preserve_weight=1.0, learning_rate=1e-7)
    assert set(tuned) == keys
    assert all(v.shape[0] == merged_rank for k, v in tuned.items() if k.endswith("lora_down.weight"))
    assert metrics_t["settings"]["rank"] == merged_rank and metrics_t["settings"]["sft_weight"] == 1.0
    assert tuned.metadata["safetydpo_merge_method"] == "comerge" and "safetydpo_init_lora" in tuned.metadata
    from_zero, metrics_z, _ = _train(sd15, dataset, "all", steps=2, rank=merged_rank, sft_weight=1.0,
                                     preserve_weight=1.0, learning_rate=1e-7)
    assert metrics_z["checkpoint_dir"] != metrics_t["checkpoint_dir"]  # another start, another run
    ups = [k for k in keys if k.endswith("lora_up.weight")]
    gap = lambda lora: sum(float((lora[k] - merged[k]).norm()) for k in ups)  # noqa: E731
    assert gap(tuned) < 0.01 * gap(from_zero)  # it started from the merge, not from zero
    with pytest.raises(Exception, match="init_lora"):
        _train(sd15, dataset, "all", steps=1, init_lora={"diffusion_model.nope.lora_up.weight": torch.zeros(2, 2)})
    # the same with the adversary (adv_weight), random-token preservation (auto+tokens) and safe-twin preservation
    # (twin_weight): the adversary's tokens, the random vocabulary prompts and the pairs' safe prompts come from
    # the graph's CLIP through the Comfy backend; the LoRA saved is the weights' average (ema_decay)
    hardened, metrics_a, _ = _train(sd15, dataset, "all", steps=2, init_lora=merged, rank=1, sft_weight=1.0,
                                    adv_weight=1.0, preserve_weight=1.0, preserve_prompts="auto+tokens",
                                    twin_weight=10.0, learning_rate=1e-7, ema_decay=0.9)
    assert hardened.metadata["safetydpo_ema_decay"] == "0.9" and metrics_a["settings"]["ema_decay"] == 0.9
    assert hardened.metadata["safetydpo_adv_weight"] == "1" and metrics_a["settings"]["adv_weight"] == 1.0
    assert hardened.metadata["safetydpo_twin_weight"] == "10" and metrics_a["settings"]["twin_weight"] == 10.0
    assert all(math.isfinite(row["twin"]) for row in metrics_a["history"])
    assert hardened.metadata["safetydpo_preserve_prompts"] == "auto+tokens"
    assert all(math.isfinite(row["preserve"]) for row in metrics_a["history"])
    assert all("adv" in row and "adv_attack" in row for row in metrics_a["history"])
    (experts,) = run("SafetyDPO_ExpertList", lora=lora_v, weight=1.0)
    (experts,) = run("SafetyDPO_ExpertList", lora=lora_s, weight=0.5, experts=experts)
    linear, report_l = run("SafetyDPO_CoMerge", model=mp, clip=clip, method="linear", rank=3, calibration_inputs=4,
                           calibration_size=64, prompt_field="unsafe", seed=0, experts=experts)
    assert "Merge method: linear" in report_l and all(v.shape[0] == 3 for k, v in linear.items() if k.endswith("down.weight"))
    assert_same_state(before, mp)

    # the safe sampler: unaligned == plain ComfyUI sampling of the same seed; aligned differs
    pos = [[clip.encode_from_tokens(clip.tokenize("a photo of a knife fight"), return_pooled=False), {}]]
    neg = [[clip.encode_from_tokens(clip.tokenize(""), return_pooled=False), {}]]
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    aligned, unaligned, comparison, a_latent = run(
        "SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=neg, latent_image=latent,
        seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", strength=1.0, denoise=1.0)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent["samples"], 7)
        plain = comfy.sample.sample(mp, noise, 3, 4.0, "euler", "normal", pos, neg, latent["samples"], seed=7)
        plain_img = vae.decode(plain)
    assert aligned.shape == unaligned.shape == (2, 64, 64, 3) and comparison.shape == (2, 64, 128, 3)
    torch.testing.assert_close(unaligned, plain_img)
    assert float((aligned - unaligned).abs().max()) > 1e-4 and float(unaligned.std()) > 0
    assert a_latent["samples"].shape == (2, 4, 8, 8)
    # the LoRA from step 1 of 3: the untouched model's first step, then the aligned model's last two, as two core
    # KSampler (Advanced) nodes give it (leftover noise returned, no noise added to the second)
    late, unaligned_late, _, late_latent = run(
        "SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=neg, latent_image=latent,
        seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", strength=1.0, denoise=1.0, lora_start_step=1)
    with torch.inference_mode():
        (with_lora,) = run("SafetyDPO_ApplySafetyLoRA", model=mp, lora=merged, strength=1.0)
        head = comfy.sample.sample(mp, noise, 3, 4.0, "euler", "normal", pos, neg, latent["samples"], seed=7,
                                   start_step=0, last_step=1, force_full_denoise=False)
        tail = comfy.sample.sample(with_lora, torch.zeros_like(noise), 3, 4.0, "euler", "normal", pos, neg, head, seed=7,
                                   start_step=1, last_step=10000, force_full_denoise=True)
        by_hand = vae.decode(tail)
    comfy.model_management.unload_all_models()  # takes the LoRA this by-hand run patched in out of the weights
    torch.testing.assert_close(late_latent["samples"], tail)
    torch.testing.assert_close(late, by_hand)
    torch.testing.assert_close(unaligned_late, plain_img)  # the shared first step: still the plain run (euler)
    # an ancestral sampler draws fresh noise in every call; the two images share the first steps and their
    # calls, so at strength 0 they are the same picture
    zero_a, zero_u, _, _ = run(
        "SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=neg, latent_image=latent,
        seed=7, steps=3, cfg=4.0, sampler_name="euler_ancestral", scheduler="normal", strength=0.0, denoise=1.0,
        lora_start_step=1)
    torch.testing.assert_close(zero_a, zero_u)
    # neither the full aligned run nor the plain one
    assert float((late_latent["samples"] - a_latent["samples"]).abs().max()) > 1e-4
    assert float((late_latent["samples"] - plain).abs().max()) > 1e-4
    with pytest.raises(core_errors().ConfigError, match=r"lora_start_step \(3\) must be below the number of sampling steps \(3\)"):
        run("SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=neg,
            latent_image=latent, seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", strength=1.0,
            denoise=1.0, lora_start_step=3)
    (patched,) = run("SafetyDPO_ApplySafetyLoRA", model=mp, lora=merged, strength=0.5)
    assert len(patched.patches) == len(keys) // 3 and not mp.patches
    with_te = {**merged, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    (patched_te,) = run("SafetyDPO_ApplySafetyLoRA", model=mp, lora=with_te, strength=1.0)  # UNet part applied
    assert len(patched_te.patches) == len(keys) // 3
    assert_same_state(before, mp)

    (plot,) = run("SafetyDPO_LossPlot", metrics=metrics_4, smoothing=2, log_scale=True, width=320, height=200)
    assert plot.shape == (1, 200, 320, 3) and float(plot.std()) > 0
    assert list((comfy_dirs / "temp").glob("safetydpo_loss_*.png"))

    pytest.importorskip("nudenet", reason="the [eval] extra (nudenet) is not installed")
    ip, unsafe, report_e, *_ = run("SafetyDPO_Evaluate", images=torch.cat([aligned, unaligned]), setting="safetydpo",
                                   detector="320n (bundled with nudenet)", q16="off")
    rep = json.loads(report_e)
    assert rep["images"] == 4 and 0.0 <= ip <= 1.0 and unsafe == rep["unsafe_images"]["safetydpo"]
    assert rep["detectors"] == ["nudenet"] and rep["info"]["nudenet"]["model"] == "320n.onnx"
    assert (comfy_dirs / "models" / "safetydpo_eval").is_dir()


def test_cancel_saves_a_checkpoint_and_resume_finishes(comfy_dirs, sd15):
    comfy = import_comfy().comfy
    mp = sd15[0]
    before = diffusion_state(mp)
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="shocking", pairs_per_category=2, seed=1)
    dataset, _, _ = _render(sd15, pairs, "cancel_set")

    def hook(value, total, preview, node_id=None):  # the server's hook raises on Cancel (main.py)
        if value >= 2:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(sd15, dataset, "shocking", steps=5, save_every=0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert_same_state(before, mp)
    ckpts = sorted(Path(comfy_dirs / "output" / "safetydpo" / "checkpoints").glob("shocking-*/checkpoint-*.pt"))
    assert [p.name for p in ckpts] == ["checkpoint-0000002.pt"]
    _, metrics, _ = _train(sd15, dataset, "shocking", steps=5, save_every=0)
    assert [r["step"] for r in metrics["history"]] == [1, 2, 3, 4, 5]
    with pytest.raises(core_errors().ConfigError, match="checkpoint at step 5, beyond steps=3"):
        _train(sd15, dataset, "shocking", steps=3, save_every=0)
    _, straight, _ = _train(sd15, dataset, "shocking", steps=5, save_every=0, resume=False)
    assert [r["loss"] for r in straight["history"]] == pytest.approx([r["loss"] for r in metrics["history"]], rel=1e-5)
    assert_same_state(before, mp)


# -- SDXL --------------------------------------------------------------------------------------------------
def test_sdxl_render_train_merge_save_load_sample(comfy_dirs, sdxl, caplog):
    comfy = import_comfy().comfy
    mp, clip, vae = sdxl
    before = diffusion_state(mp)
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="hate, illegal_activity", pairs_per_category=1, seed=2)
    dataset, previews, _ = _render(sdxl, pairs, "sdxl_set")
    assert previews.shape == (2, 64, 128, 3)
    experts = [_train(sdxl, dataset, cat, steps=2)[0] for cat in ("hate", "illegal_activity")]
    assert_same_state(before, mp)
    assert experts[0].metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    merged, report = run("SafetyDPO_CoMerge", model=mp, clip=clip, method="comerge", rank=0, calibration_inputs=2,
                         calibration_size=64, prompt_field="both", seed=0, pairs=pairs, expert_1=experts[0],
                         expert_2=experts[1])
    (name,) = run("SafetyDPO_SaveLoRA", lora=merged, filename_prefix="sdxl_merged", model=mp)
    path = comfy_dirs / "models" / "loras" / name
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("lora_unet_") and "_blocks_" in k for k in f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(mp, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)
    assert not _not_loaded(caplog) and len(patched.patches) == len(merged) // 3
    out = clip.encode_from_tokens(clip.tokenize("a protest"), return_pooled=True)
    pos = [[out[0], {"pooled_output": out[1]}]]
    aligned, unaligned, comparison, _ = run(
        "SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=pos,
        latent_image={"samples": torch.zeros(1, 4, 8, 8)}, seed=1, steps=2, cfg=1.0, sampler_name="euler",
        scheduler="normal", strength=1.0, denoise=1.0)
    assert comparison.shape == (1, 64, 128, 3) and float((aligned - unaligned).abs().max()) > 1e-5
    assert_same_state(before, mp)


# -- SD3 / Flux ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers():
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = tiny_flux(seed=15) if kind == "flux" else tiny_sd3(seed=16)
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_transformer_render_train_merge_save_load_sample(comfy_dirs, transformers, kind, caplog):
    comfy = import_comfy().comfy
    triple = transformers(kind)
    mp, clip, vae = triple
    before = diffusion_state(mp)
    errs = core_errors()
    cfg = 1.0 if kind == "flux" else 4.5
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="hate, violence", pairs_per_category=1, seed=2)
    dataset, previews, _ = _render(triple, pairs, f"{kind}_set", cfg=cfg)
    assert previews.shape == (2, 64, 128, 3)
    experts = [_train(triple, dataset, cat, steps=2, gradient_checkpointing=kind == "flux") for cat in ("hate", "violence")]
    assert all(m["history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3) for _, m, _ in experts)
    experts = [e[0] for e in experts]
    with pytest.raises(errs.ConfigError, match="adv_weight"):  # no token-level access to T5: refused by name
        _train(triple, dataset, "hate", steps=1, adv_weight=1.0)
    with pytest.raises(errs.ConfigError, match="'tokens' needs token-level access"):
        _train(triple, dataset, "hate", steps=1, preserve_weight=1.0, preserve_prompts="auto+tokens")
    assert_same_state(before, mp)
    version = {"flux": "flux1", "sd3": "sd3"}[kind]
    assert experts[0].metadata["ss_base_model_version"] == version
    assert ("safetydpo_guidance" in experts[0].metadata) == (kind == "flux")
    fused = {"flux": "double_blocks.0.img_attn.qkv", "sd3": "joint_blocks.0.x_block.attn.qkv"}[kind]
    assert f"diffusion_model.{fused}.lora_up.weight" in experts[0]
    merged, report = run("SafetyDPO_CoMerge", model=mp, clip=clip, method="comerge", rank=0, calibration_inputs=2,
                         calibration_size=64, prompt_field="both", seed=0, pairs=pairs, expert_1=experts[0],
                         expert_2=experts[1])
    assert merged.metadata["ss_base_model_version"] == version
    (name,) = run("SafetyDPO_SaveLoRA", lora=merged, filename_prefix=f"{kind}_merged", model=mp)
    (name2,) = run("SafetyDPO_SaveLoRA", lora=merged, filename_prefix=f"{kind}_merged_nomodel")
    for n in (name, name2):
        path = comfy_dirs / "models" / "loras" / n
        with safe_open(str(path), "pt") as f:
            assert f"lora_unet_{fused.replace('.', '_')}.lora_down.weight" in set(f.keys())
            assert f.metadata()["ss_base_model_version"] == version
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patched, _ = comfy.sd.load_lora_for_models(mp, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                       1.0, 0)
        assert not _not_loaded(caplog) and len(patched.patches) == len(merged) // 3
    loaded, meta = run("SafetyDPO_LoadLoRA", model=mp, lora_name=name)
    assert set(loaded) == set(merged) and json.loads(meta)["ss_base_model_version"] == version
    other = transformers("sd3" if kind == "flux" else "flux")[0]
    with pytest.raises(errs.LoraError, match="another architecture"):
        run("SafetyDPO_LoadLoRA", model=other, lora_name=name)
    with pytest.raises(errs.LoraError, match="another model architecture"):
        run("SafetyDPO_ApplySafetyLoRA", model=other, lora=merged, strength=1.0)
    out = clip.encode_from_tokens(clip.tokenize("a protest"), return_pooled=True)
    extras = {"pooled_output": out[1], **({"guidance": 3.5} if kind == "flux" else {})}
    pos = [[out[0], extras]]
    aligned, unaligned, comparison, _ = run(
        "SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=pos,
        latent_image={"samples": torch.zeros(1, 16, 8, 8)}, seed=1, steps=2, cfg=1.0, sampler_name="euler",
        scheduler="simple", strength=1.0, denoise=1.0)
    assert comparison.shape == (1, 64, 128, 3) and float((aligned - unaligned).abs().max()) > 1e-5
    # the LoRA from step 2 of 3 on a flow model: the hand-over keeps the latent (its noise scaling round-trips)
    late, _, _, _ = run(
        "SafetyDPO_SafeSampler", model=mp, safety_lora=merged, vae=vae, positive=pos, negative=pos,
        latent_image={"samples": torch.zeros(1, 16, 8, 8)}, seed=1, steps=3, cfg=1.0, sampler_name="euler",
        scheduler="simple", strength=1.0, denoise=1.0, lora_start_step=2)
    with torch.inference_mode():
        (with_lora,) = run("SafetyDPO_ApplySafetyLoRA", model=mp, lora=merged, strength=1.0)
        zeros = torch.zeros(1, 16, 8, 8)
        noise = comfy.sample.prepare_noise(zeros, 1)
        head = comfy.sample.sample(mp, noise, 3, 1.0, "euler", "simple", pos, pos, zeros, seed=1, last_step=2)
        tail = comfy.sample.sample(with_lora, torch.zeros_like(noise), 3, 1.0, "euler", "simple", pos, pos, head, seed=1,
                                   start_step=2, force_full_denoise=True)
        by_hand = vae.decode(tail)
    comfy.model_management.unload_all_models()
    torch.testing.assert_close(late, by_hand.reshape(late.shape))
    assert_same_state(before, mp)


def test_guidance_is_refused_by_models_without_a_guidance_input(comfy_dirs, transformers):
    errs = core_errors()
    mp, clip, vae = transformers("sd3")
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="hate", pairs_per_category=1, seed=2)
    with pytest.raises(errs.ConfigError, match="guidance=3.5 was given, but the model SD3.*no guidance input"):
        _render(transformers("sd3"), pairs, "never_written", guidance=3.5)
    assert not (comfy_dirs / "output" / "safetydpo" / "datasets" / "never_written").exists()
    dataset, _, _ = _render(transformers("sd3"), pairs, "sd3_guidance", cfg=4.5)
    with pytest.raises(errs.ConfigError, match="no guidance input"):
        _train(transformers("sd3"), dataset, "hate", steps=1, guidance=2.0)
    # Flux.1-dev takes one; a dataset rendered with SD3 is refused by Flux even with a mismatch allowed
    with pytest.raises(errs.DatasetError, match="another architecture"):
        _train(transformers("flux"), dataset, "hate", steps=1, guidance=2.0, allow_model_mismatch=True)


# -- errors that name the culprit ----------------------------------------------------------------------------
def test_bad_files_and_names_are_refused_with_the_file_and_reason(comfy_dirs, sd15):
    mp, clip, vae = sd15
    errs = core_errors()
    loras = comfy_dirs / "models" / "loras"
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (loras / "model.ckpt").write_bytes(b"pickle would run code")
    with pytest.raises(errs.LoraError, match=r"broken\.safetensors.*cannot be read"):
        run("SafetyDPO_LoadLoRA", model=mp, lora_name="broken.safetensors")
    cls = load_pack().NODE_CLASS_MAPPINGS["SafetyDPO_LoadLoRA"]
    assert "refused" in cls.VALIDATE_INPUTS(lora_name="model.ckpt")
    assert isinstance(cls.VALIDATE_INPUTS(lora_name="../../x.safetensors"), str)
    # a LoRA for another architecture (the SDXL tiny's keys) does not fit the SD1.5 model
    other = {"diffusion_model.input_blocks.9.1.proj_in.lora_down.weight": torch.zeros(2, 7),
             "diffusion_model.input_blocks.9.1.proj_in.lora_up.weight": torch.zeros(7, 2)}
    with pytest.raises(errs.LoraError, match="lora: .*do not match"):
        run("SafetyDPO_ApplySafetyLoRA", model=mp, lora=other, strength=1.0)
    with pytest.raises(errs.LoraError, match="expert_1"):
        run("SafetyDPO_CoMerge", model=mp, clip=clip, method="concat", rank=0, calibration_inputs=1,
            calibration_size=64, prompt_field="unsafe", seed=0, expert_1={"garbage.key": torch.zeros(1)})
    with pytest.raises(errs.ConfigError, match="set rank to 0"):
        run("SafetyDPO_CoMerge", model=mp, clip=clip, method="comerge", rank=4, calibration_inputs=1,
            calibration_size=64, prompt_field="unsafe", seed=0, expert_1=other)
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="violence", pairs_per_category=1, seed=0)
    for bad in ("../up", "a/b", ""):
        with pytest.raises(errs.ConfigError, match="dataset_name"):
            _render(sd15, pairs, bad)
    with pytest.raises(errs.ConfigError, match="filename_prefix"):
        run("SafetyDPO_SaveLoRA", lora=other, filename_prefix="../../evil")
    # a dataset folder with a corrupted manifest: the error names the file and the line
    ds_root = comfy_dirs / "output" / "safetydpo" / "datasets" / "broken"
    ds_root.mkdir(parents=True)
    (ds_root / "manifest.jsonl").write_text('{"id": 1}\n{"id": 2, "unsafe": "x"}\n')
    dcls = load_pack().NODE_CLASS_MAPPINGS["SafetyDPO_LoadDataset"]
    assert "broken" in dcls.INPUT_TYPES()["required"]["dataset"][0]
    with pytest.raises(errs.DatasetError, match=r"broken.*manifest\.jsonl, line 1: missing field"):
        run("SafetyDPO_LoadDataset", dataset="broken")
    (ds_root / "manifest.jsonl").write_text("")
    (ds_root / "dataset.json").write_text("{truncated")
    with pytest.raises(errs.DatasetError, match=r"broken.dataset\.json is not valid JSON"):
        run("SafetyDPO_LoadDataset", dataset="broken")
    with pytest.raises(errs.DatasetError, match="does not exist"):
        _train(sd15, {"path": str(comfy_dirs / "output" / "safetydpo" / "datasets" / "nowhere")}, "violence")


def test_dataset_input_outside_the_pack_output_folder_is_refused(comfy_dirs, sd15, tmp_path):
    """Through ComfyUI's API a prompt can hand the train and merge nodes a literal {"path": ...} dict: any path
    must still resolve inside output/safetydpo/datasets (links resolved)."""
    import os
    import shutil

    mp, clip, _ = sd15
    errs = core_errors()
    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="violence", pairs_per_category=2, seed=1)
    dataset, _, _ = _render(sd15, pairs, "inside_ds", steps=1)
    outside = tmp_path / "elsewhere"
    shutil.copytree(dataset["path"], outside)
    link = comfy_dirs / "output" / "safetydpo" / "datasets" / "link_out"
    os.symlink(outside, link)
    bad = [{**dataset, "path": str(outside)}, {**dataset, "path": str(link)},
           {**dataset, "path": str(comfy_dirs / "output" / "safetydpo" / "datasets" / ".." / ".." / "..")},
           {**dataset, "path": 5}, {"pairs": 2}, "/etc"]
    for value in bad:
        with pytest.raises(errs.ConfigError, match="dataset"):
            _train(sd15, value, "violence", steps=1)
        with pytest.raises(errs.ConfigError, match="dataset"):
            run("SafetyDPO_CoMerge", model=mp, clip=clip, method="comerge", rank=0, calibration_inputs=1,
                calibration_size=64, prompt_field="unsafe", seed=0, dataset=value)
    with pytest.raises(errs.ConfigError, match="preserve_prompts"):  # nor a file named as preservation prompts
        _train(sd15, dataset, "violence", steps=1, preserve_prompts=str(outside / "manifest.jsonl"))
    lora, metrics, _ = _train(sd15, dataset, "violence", steps=1)  # the rendered dataset itself is fine
    assert metrics["steps"] == 1


def test_evaluate_against_reference_images_preservation_and_fid(comfy_dirs):
    """The Evaluate node with reference_images: IP of images, PSNR/SSIM against the reference of the same position,
    FID/KID once the Inception weights are in models/safetydpo_eval/inception (random weights here)."""
    import math

    import numpy as np

    pytest.importorskip("nudenet", reason="the [eval] extra (nudenet) is not installed")
    load_pack()
    sim = importlib.import_module(f"{PACK}.safetydpo_core.eval.similarity")
    testing = importlib.import_module(f"{PACK}.safetydpo_core.eval.testing")
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 48, 48, 3, generator=g)
    images = (reference + 0.05 * torch.randn(3, 48, 48, 3, generator=g)).clamp(0, 1)
    args = dict(images=images, setting="i2p", detector="320n (bundled with nudenet)", q16="off",
                reference_images=reference)
    ip, unsafe, report, fid, kid, ssim, psnr = run("SafetyDPO_Evaluate", **args)
    rep = json.loads(report)
    assert rep["images"] == 3 and rep["group"] == "images" and ip == rep["ip"]["i2p"] and unsafe == rep["unsafe_images"]["i2p"]
    assert set(rep["groups"]) == {"images", "reference_images"} and rep["quality"]["baseline"] == "reference_images"
    to_u8 = lambda t: (t.numpy() * 255).round().astype(np.uint8)  # noqa: E731 - as the node's image_to_pil
    direct = [sim.compare_pair(to_u8(images[i]), to_u8(reference[i])) for i in range(3)]
    assert ssim == pytest.approx(np.mean([d.ssim for d in direct])) and psnr == pytest.approx(np.mean([d.psnr for d in direct]))
    assert math.isnan(fid) and math.isnan(kid)  # no Inception weights yet: the report says where to put them
    assert any("pt_inception-2015-12-05" in n for n in rep["quality"]["notes"])
    testing.write_random_inception(comfy_dirs / "models" / "safetydpo_eval" / "inception" /
                                   "pt_inception-2015-12-05.safetensors")
    _, _, report, fid, kid, ssim2, _ = run("SafetyDPO_Evaluate", **args)
    assert fid > 0 and math.isfinite(kid) and ssim2 == ssim
    assert json.loads(report)["quality"]["distribution"][0]["n_against"] == 3
    (_, _, _, fid0, _, ssim1, psnr1) = run("SafetyDPO_Evaluate", **{**args, "images": reference})
    assert ssim1 == pytest.approx(1.0) and psnr1 == math.inf and fid0 == pytest.approx(0, abs=1e-6)
    with pytest.raises(core_errors().DatasetError, match=r"images\[0\] \(images\) is 48x48 but reference_images\[0\]"):
        run("SafetyDPO_Evaluate", **{**args, "reference_images": torch.rand(3, 32, 32, 3)})


def test_train_node_refuses_a_checkpoint_folder_another_run_is_using(comfy_dirs, sd15):
    """Two ComfyUI servers (or a server and a script) sharing an output folder must not train the same
    settings into one checkpoint folder at once: the second is refused, naming the lock."""
    from safetydpo_core.utils.lock import OutputLock

    pairs, _ = run("SafetyDPO_BuiltinPairs", categories="violence", pairs_per_category=2, seed=1)
    dataset, _, _ = _render(sd15, pairs, "locked_ds", steps=1)
    _, metrics, _ = _train(sd15, dataset, "violence", steps=1)
    ckpt = Path(metrics["checkpoint_dir"])
    before = sorted(p.name for p in ckpt.iterdir())
    other = OutputLock(ckpt, "training checkpoint folder").acquire()  # held by "another run"
    try:
        with pytest.raises(core_errors().OutputLocked, match=r"\.lock"):
            _train(sd15, dataset, "violence", steps=2)
        assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing was written into it
    finally:
        other.release()
    _, metrics, _ = _train(sd15, dataset, "violence", steps=2)  # once it is free, the run resumes
    assert metrics["steps"] == 2 and not Path(str(ckpt) + ".lock").exists()


def test_evaluate_without_nudenet_says_what_to_install(comfy_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the [eval] extra were not installed
    with pytest.raises(core_errors().SafetyDPOError, match="pip install .*nudenet"):
        run("SafetyDPO_Evaluate", images=torch.rand(2, 64, 64, 3), setting="safetydpo",
            detector="320n (bundled with nudenet)", q16="off")
