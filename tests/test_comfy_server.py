"""The pack inside a real ComfyUI server (COMFYUI_PATH), as users run it: loaded from a custom_nodes folder,
listed in /object_info, and API graphs executed end to end on a random-weight SD1.5-shaped model.

One server (module fixture) on a free 127.0.0.1 port, started as ComfyUI's own execution tests start theirs:
``main.py --cpu --extra-model-paths-config <yaml>``; the yaml adds a temporary custom_nodes folder (holding a
link to this pack, under the name a user's clone has) and the model folders. ``--base-directory`` points
ComfyUI's input/output/temp/user/models folders at a temporary directory and the database is in memory, so
the ComfyUI checkout is not written to. The model files are written here: a UNet with SD1.5's real shapes
(ComfyUI's loaders refuse other sizes) as a diffusers state dict, CLIP-L with the ``text_model.`` prefix
(transformers 5 drops it, and ComfyUI's CLIPLoader then silently loads nothing) and SD's VAE, all random,
fp16. Images are 64x64 and every sampler runs 3 steps, so the module takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_support import ComfyServer, comfyui_server

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip() or None
ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-SafetyDPO"
AUDIO_NODE_FILES = ("nodes_audio.py", "nodes_lt_audio.py", "nodes_audio_encoder.py")  # torchaudio is absent here

pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow,
    pytest.mark.skipif(COMFYUI_PATH is None, reason="COMFYUI_PATH is not set: these tests start a real ComfyUI "
                                                    "server; set COMFYUI_PATH to a ComfyUI 0.8.0 checkout"),
]


# -- random-weight SD1.5-shaped model files ---------------------------------------------------------------
def _random_state(shapes: dict, seed: int, embed_std: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        s = tuple(shapes[k])
        if k.endswith("bias"):
            t = torch.zeros(s)
        elif len(s) == 1 and ("norm" in k or "ln" in k):
            t = torch.ones(s)
        elif "embedding" in k and len(s) == 2:
            t = torch.randn(s, generator=g) * embed_std
        elif len(s) >= 2:
            t = torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]))
        else:
            t = torch.randn(s, generator=g) * 0.02
        out[k] = t.to(torch.float16).contiguous()
    return out


def write_sd15_files(models: Path) -> dict[str, str]:
    """``diffusion_models/sd15_unet.safetensors``, ``text_encoders/clip_l.safetensors``, ``vae/sd_vae.safetensors``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from safetydpo_core.tiny_models import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = {k: v.shape for k, v in UNet2DConditionModel(**SD15_UNET_CONFIG).state_dict().items()}
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             projection_dim=768)
        clip = {k: v.shape for k, v in CLIPTextModelWithProjection(cfg).state_dict().items()}
        vae = {k: v.shape for k, v in AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=512).state_dict().items()}
    # transformers 5 names the text model's weights without "text_model."; ComfyUI needs the prefix
    clip = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in clip.items()}
    clip = {k: v for k, v in clip.items() if not k.endswith("position_ids")}
    files = {"diffusion_models": ("sd15_unet.safetensors", unet, 1), "text_encoders": ("clip_l.safetensors", clip, 2),
             "vae": ("sd_vae.safetensors", vae, 3)}
    out = {}
    for folder, (name, shapes, seed) in files.items():
        (models / folder).mkdir(parents=True, exist_ok=True)
        sd = _random_state(shapes, seed, embed_std=0.5 if folder == "text_encoders" else 0.02)
        save_file(sd, str(models / folder / name))
        del sd
        out[folder] = name
    return out


# -- the server -------------------------------------------------------------------------------------------
class Server(ComfyServer):
    files: dict

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:3000]}") from None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "safetydpo-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the server exited:\n{self.log()[-4000:]}"
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            raise AssertionError(f"the graph failed: {json.dumps(errors, indent=1)[:4000]}")
        return entry["outputs"]

    def image(self, info: dict) -> torch.Tensor:
        """A PNG written by SaveImage/PreviewImage, as [H, W, 3] uint8."""
        import numpy as np
        from PIL import Image

        folder = {"output": "output", "temp": "temp"}[info["type"]]
        p = self.base / folder / info.get("subfolder", "") / info["filename"]
        with Image.open(p) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_server")
    extra, base = tmp / "extra", tmp / "comfy"
    (extra / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes").mkdir(parents=True)  # ComfyUI lists it at start; left empty
    os.symlink(ROOT, extra / "custom_nodes" / PACK_DIR_NAME)
    files = write_sd15_files(extra / "models")
    yaml_path = tmp / "extra_model_paths.yaml"
    yaml_path.write_text(
        "safetydpo_tests:\n"
        f"  base_path: {extra}\n"
        "  custom_nodes: custom_nodes\n"
        "  diffusion_models: models/diffusion_models\n"
        "  text_encoders: models/text_encoders\n"
        "  vae: models/vae\n"
        "  loras: models/extra_loras\n", encoding="utf-8")
    with comfyui_server(Server, base, yaml_path, tmp / "server.log", files=files) as srv:
        yield srv


# -- graphs -----------------------------------------------------------------------------------------------
class Graph:
    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    @staticmethod
    def out(nid: str, index: int = 0) -> list:
        return [nid, index]


def _loaders(g: Graph, files: dict) -> tuple[list, list, list]:
    m = g.add("UNETLoader", unet_name=files["diffusion_models"], weight_dtype="default")
    c = g.add("CLIPLoader", clip_name=files["text_encoders"], type="stable_diffusion")
    v = g.add("VAELoader", vae_name=files["vae"])
    return g.out(m), g.out(c), g.out(v)


SAMPLING = dict(seed=7, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal")  # cfg 1: one UNet pass a step
PROMPT = "a photo of two men fighting with knives"


def _conds(g: Graph, clip) -> tuple[list, list, list]:
    pos = g.add("CLIPTextEncode", text=PROMPT, clip=clip)
    neg = g.add("CLIPTextEncode", text="", clip=clip)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    return g.out(pos), g.out(neg), g.out(lat)


def _plain_image_graph(files: dict, prefix: str) -> dict:
    g = Graph()
    model, clip, vae = _loaders(g, files)
    pos, neg, lat = _conds(g, clip)
    ks = g.add("KSampler", model=model, positive=pos, negative=neg, latent_image=lat, denoise=1.0, **SAMPLING)
    dec = g.add("VAEDecode", samples=g.out(ks), vae=vae)
    g.add("SaveImage", images=g.out(dec), filename_prefix=prefix)
    g.add("SaveLatent", samples=g.out(ks), filename_prefix=f"latents/{prefix}")
    return g.nodes


def _latent(server, prefix: str) -> torch.Tensor:
    (path,) = (server.base / "output" / "latents").glob(f"{prefix}_*.latent")
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latent_tensor")


def _import_failed_lines(log: str) -> list[str]:
    return [l for l in log.splitlines() if "IMPORT FAILED" in l or "Cannot import" in l]


# -- tests ------------------------------------------------------------------------------------------------
def test_the_pack_loads_and_every_node_is_listed(server):
    log = server.log()
    failed = _import_failed_lines(log)
    ours = [l for l in failed if PACK_DIR_NAME in l or "safetydpo" in l.lower()]
    assert not ours, "\n".join(ours) + "\n" + log[-6000:]
    others = [l for l in failed if "IMPORT FAILED" in l and not any(a in l for a in AUDIO_NODE_FILES)]
    assert not others, "unexpected import failures:\n" + "\n".join(others)
    assert re.search(rf"\d+\.\d+ seconds: .*custom_nodes/{re.escape(PACK_DIR_NAME)}\s*$", log, re.M), log[-3000:]

    import inspect

    from test_nodes_schema import EXPECTED, MAPPINGS  # the classes, as imported without ComfyUI

    info = server.get("/object_info")
    assert EXPECTED <= set(info)
    for name in EXPECTED:
        node, cls = info[name], MAPPINGS[name]
        assert node["python_module"] == f"custom_nodes.{PACK_DIR_NAME}" and node["category"] == "SafetyDPO"
        assert node["description"] == cls.DESCRIPTION and node["display_name"].startswith("SafetyDPO: ")
        assert list(node["output"]) == list(cls.RETURN_TYPES) and list(node["output_name"]) == list(cls.RETURN_NAMES)
        order = node["input_order"]
        assert order["required"] == list(node["input"]["required"])
        # the server's inputs are the FUNCTION's parameters (INPUT_TYPES is not called here: in this process
        # it would reach the ComfyUI checkout's own folders)
        params = [p.name for p in inspect.signature(getattr(cls, cls.FUNCTION)).parameters.values()
                  if p.name != "self" and p.kind is not p.VAR_KEYWORD]
        served = order["required"] + order.get("optional", [])
        assert sorted(served) == sorted(params) or (name == "SafetyDPO_CoMerge" and set(params) < set(served))
    one = server.get("/object_info/SafetyDPO_TrainExpert")["SafetyDPO_TrainExpert"]
    assert one["input"]["required"]["steps"][1]["tooltip"]
    assert one["output_name"] == ["lora", "metrics", "model"]
    assert server.get("/object_info/SafetyDPO_RenderPairs")["SafetyDPO_RenderPairs"]["input"]["required"][
        "sampler_name"][0] == server.get("/object_info/KSampler")["KSampler"]["input"]["required"]["sampler_name"][0]


def test_the_method_end_to_end_through_the_api(server):
    files = server.files
    # 1. the untouched model's image for a seed, before any training
    before_out = server.run(_plain_image_graph(files, "before"))
    before = server.image(next(o for o in before_out.values() if "images" in o)["images"][0])
    assert before.float().std() > 1.0, "the base model's image is constant (did the CLIP weights load?)"

    # 2. pairs -> render -> two experts -> Co-Merge -> save (ours and core's) -> loss plot -> safe sampler -> IP
    g = Graph()
    model, clip, vae = _loaders(g, files)
    pairs = g.add("SafetyDPO_BuiltinPairs", categories="violence, sexual", pairs_per_category=1, seed=0)
    render = g.add("SafetyDPO_RenderPairs", model=model, clip=clip, vae=vae, pairs=g.out(pairs), dataset_name="api_set",
                   width=64, height=64, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal", seed=1,
                   negative="", batch_pairs=2, if_exists="overwrite")
    g.add("PreviewImage", images=g.out(render, 1))
    train = dict(model=model, clip=clip, dataset=g.out(render), learning_rate=1e-4, rank=2, beta=5000.0,
                 condition="unsafe", seed=0, save_every=0, resume=False)
    violence = g.add("SafetyDPO_TrainExpert", category="violence", steps=1, gradient_checkpointing=True, **train)
    sexual = g.add("SafetyDPO_TrainExpert", category="sexual", steps=1, gradient_checkpointing=False, **train)
    merged = g.add("SafetyDPO_CoMerge", model=model, clip=clip, method="comerge", rank=0, calibration_inputs=2,
                   calibration_size=64, prompt_field="unsafe", seed=0, pairs=g.out(pairs),
                   expert_1=g.out(violence), expert_2=g.out(sexual))
    save_merged = g.add("SafetyDPO_SaveLoRA", lora=g.out(merged), filename_prefix="safetydpo_test/merged", model=model)
    save_expert = g.add("SafetyDPO_SaveLoRA", lora=g.out(violence), filename_prefix="safetydpo_test/violence")
    g.add("SaveLoRA", lora=g.out(merged), prefix="loras/core_saved")  # core SaveLoRA takes our LORA_MODEL
    plot = g.add("SafetyDPO_LossPlot", metrics=g.out(violence, 1), smoothing=1, log_scale=False, width=320, height=200)
    pos, neg, lat = _conds(g, clip)
    safe = g.add("SafetyDPO_SafeSampler", model=model, safety_lora=g.out(merged), vae=vae, positive=pos, negative=neg,
                 latent_image=lat, strength=1.0, denoise=1.0, **SAMPLING)
    unaligned = g.add("PreviewImage", images=g.out(safe, 1))
    comparison = g.add("PreviewImage", images=g.out(safe, 2))
    core_loader = g.add("LoraModelLoader", model=model, lora=g.out(merged), strength_model=1.0)  # core node, our dict
    ks = g.add("KSampler", model=g.out(core_loader), positive=pos, negative=neg, latent_image=lat, denoise=1.0,
               **SAMPLING)
    via_core = g.add("PreviewImage", images=g.out(g.add("VAEDecode", samples=g.out(ks), vae=vae)))
    evaluate = g.add("SafetyDPO_Evaluate", images=g.out(safe, 2), setting="safetydpo",
                     detector="320n (bundled with nudenet)", q16="off")
    out = server.run(g.nodes, timeout=900)

    # the dataset: the format the command line writes, under the output folder
    ds = server.base / "output" / "safetydpo" / "datasets" / "api_set"
    assert {p.name for p in ds.iterdir()} == {"dataset.json", "manifest.jsonl", "shards", "previews", "summary.json",
                                               "config.json", "manifest.index.safetensors"}
    from safetydpo_core.data.preference_dataset import PreferenceDataset

    dataset = PreferenceDataset(ds)
    assert len(dataset) == 2 and dataset.per_category() == {"sexual": 1, "violence": 1}
    s, u = dataset.load_pair(0)
    assert s.shape == (4, 8, 8) and not torch.equal(s, u)
    # the loaded model was not changed by training: the unaligned image equals the image made before training
    after = server.image(out[unaligned]["images"][0])
    assert torch.equal(after, before), "the graph's MODEL changed during training"
    comp = server.image(out[comparison]["images"][0])
    assert comp.shape == (64, 128, 3) and torch.equal(comp[:, 64:], before)
    assert not torch.equal(comp[:, :64], before), "the safety LoRA had no effect on the aligned image"
    assert server.image(out[via_core]["images"][0]).float().std() > 1.0
    assert server.image(out[plot]["images"][0]).shape == (200, 320, 3)
    assert "IP (safetydpo)" in out[evaluate]["text"][0]

    # the saved files: kohya keys (SD1.5 diffusers layer names with the model; LDM names without), metadata
    name_merged, name_expert = out[save_merged]["text"][0], out[save_expert]["text"][0]
    assert name_merged == "safetydpo_test/merged_00001_.safetensors"
    loras = server.base / "models" / "loras"
    with safe_open(str(loras / name_merged), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys and all(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_.*\.(lora_up\.weight|lora_down\.weight"
                                 r"|alpha)$", k) for k in keys)
    assert meta["safetydpo_merge_method"] == "comerge" and set(meta["safetydpo_category"].split(",")) == {"violence",
                                                                                                          "sexual"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "2"
    with safe_open(str(loras / name_expert), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys()) and f.metadata()["safetydpo_category"] == "violence"
    assert list((server.base / "output" / "loras").glob("core_saved_*.safetensors"))
    assert list((server.base / "output" / "safetydpo" / "checkpoints").glob("violence-*/checkpoint-*.pt"))

    # 3. the saved file in core LoraLoader: listed, loaded with every key, and it changes the image
    mark = len(server.log())
    listed = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert name_merged in listed and name_expert in listed
    g = Graph()
    model, clip, vae = _loaders(g, files)
    ll = g.add("LoraLoader", model=model, clip=clip, lora_name=name_merged, strength_model=1.0, strength_clip=1.0)
    pos, neg, lat = _conds(g, clip)
    ks = g.add("KSampler", model=g.out(ll), positive=pos, negative=neg, latent_image=lat, denoise=1.0, **SAMPLING)
    prev = g.add("PreviewImage", images=g.out(g.add("VAEDecode", samples=g.out(ks), vae=vae)))
    # and the untouched model, sampled again after all the training (KSamplerAdvanced: the same sampling as
    # KSampler, but not served from ComfyUI's cache): the latent is bit for bit the one from before training
    adv = g.add("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=SAMPLING["seed"],
                steps=SAMPLING["steps"], cfg=SAMPLING["cfg"], sampler_name=SAMPLING["sampler_name"],
                scheduler=SAMPLING["scheduler"], positive=pos, negative=neg, latent_image=lat, start_at_step=0,
                end_at_step=10000, return_with_leftover_noise="disable")
    g.add("SaveLatent", samples=g.out(adv), filename_prefix="latents/after")
    out = server.run(g.nodes)
    assert torch.equal(_latent(server, "after"), _latent(server, "before")), "the loaded model changed in training"
    new_log = server.log()[mark:]
    assert "lora key not loaded" not in new_log.lower(), new_log[-3000:]
    print("\n".join(l for l in server.log().splitlines() if "Prompt executed" in l))  # timings, shown with -s
    with_lora = server.image(out[prev]["images"][0])
    assert torch.equal(with_lora, comp[:, :64]), "core LoraLoader + KSampler differ from the safe sampler's aligned image"


def test_cancel_stops_training_with_a_checkpoint_and_resume_continues(server):
    files = server.files
    g = Graph()
    model, clip, vae = _loaders(g, files)
    pairs = g.add("SafetyDPO_BuiltinPairs", categories="hate", pairs_per_category=1, seed=3)
    render = g.add("SafetyDPO_RenderPairs", model=model, clip=clip, vae=vae, pairs=g.out(pairs), dataset_name="cancel",
                   width=64, height=64, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", seed=1,
                   negative="", batch_pairs=1, if_exists="overwrite")
    train = g.add("SafetyDPO_TrainExpert", model=model, clip=clip, dataset=g.out(render), category="hate", steps=400,
                  learning_rate=1e-4, rank=2, beta=5000.0, condition="unsafe", seed=0, gradient_checkpointing=False,
                  save_every=1, resume=True)
    g.add("SafetyDPO_SaveLoRA", lora=g.out(train), filename_prefix="safetydpo_test/cancelled")
    pid = server.queue(g.nodes)
    ckpts = server.base / "output" / "safetydpo" / "checkpoints"
    end = time.monotonic() + 300
    while not list(ckpts.glob("hate-*/checkpoint-*.pt")):
        assert time.monotonic() < end, server.log()[-3000:]
        time.sleep(0.5)
    server.post("/interrupt")
    entry = server.wait(pid, 120)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and entry["status"]["status_str"] == "error", kinds
    steps = sorted(int(p.stem.split("-")[1]) for p in ckpts.glob("hate-*/checkpoint-*.pt"))
    assert steps and steps[-1] < 400
    assert not list((server.base / "models" / "loras").glob("safetydpo_test/cancelled*"))
    # resume: the same settings with fewer steps than already done finish at once from the checkpoint
    g.nodes[train]["inputs"]["steps"] = steps[-1]
    out = server.run(g.nodes)
    assert list(out.values())[0]["text"][0].startswith("safetydpo_test/cancelled_00001_")
