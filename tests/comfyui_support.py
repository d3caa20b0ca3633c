"""Shared support for tests that run real ComfyUI in-process (no server, no downloads).

* ``COMFYUI_PATH``: the ComfyUI checkout to use, from the environment variable of that name. Tests that
  need ComfyUI mark themselves with :data:`requires_comfyui`, which skips them with a visible reason when
  it is unset.
* :func:`import_comfy`: puts ComfyUI on ``sys.path`` (at the end, so that it shadows nothing of ours) and
  imports it with the CPU forced, as ``main.py --cpu`` would.
* :func:`tiny_sd15` / :func:`tiny_sdxl`: random-weight ``MODEL`` / ``CLIP`` / ``VAE`` triples with the real
  ComfyUI classes (``comfy.supported_models.SD15`` / ``SDXL``, ``comfy.sd.CLIP`` with ComfyUI's CLIP-L /
  CLIP-G code, ``comfy.sd.VAE``), built inside ``torch.inference_mode()`` as ComfyUI's executor builds
  the models of a graph, so that the inference-tensor trap is reproduced.
* :func:`tiny_sd3` / :func:`tiny_flux`: the same for the flow-matching transformers, from
  ``comfy.supported_models.SD3`` (an SD3.5-style MMDiT: RMS q/k norm, a dual-attention block) and
  ``comfy.supported_models.Flux`` / ``FluxSchnell`` (double and single blocks, with or without the guidance
  input), with ComfyUI's SD3 text encoder (CLIP-L + CLIP-G, no T5) and Flux text encoder (CLIP-L + a small
  T5 on ComfyUI's T5 tokenizer) and a 16-channel VAE.
* :func:`backend_module`: imports ``nodes/comfy_*.py`` of this pack. ComfyUI has a top-level module
  ``nodes`` too, so the pack's ``nodes`` folder is loaded under a package name of its own.
* :func:`comfyui_server`: ComfyUI's ``main.py`` in a subprocess on a free port (the server, browser and install
  tests), as a :class:`ComfyServer` subclass of the test module's (:class:`HttpComfyServer`: plain requests);
  :func:`wait_for_restart` follows a restart that the server makes itself (ComfyUI-Manager's reboot).
* For the install tests: :func:`snapshot_repo` (a git repository of the working tree as it would be committed),
  :func:`torch_install` (which torch is installed, read from disk) and :func:`pack_import_failures`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip() or None
REPO_ROOT = Path(__file__).resolve().parents[1]
NODES_PACKAGE = "safetydpo_test_nodes"

requires_comfyui = pytest.mark.skipif(
    COMFYUI_PATH is None,
    reason="COMFYUI_PATH is not set: these tests run real ComfyUI in-process; "
           "set COMFYUI_PATH to a ComfyUI 0.8.0 checkout with its requirements installed")

# The tiny UNets: the smallest widths that ComfyUI's GroupNorm(32) allows, one attention level.
_UNET_COMMON = {"image_size": 32, "use_checkpoint": False, "use_spatial_transformer": True, "legacy": False,
                "use_temporal_attention": False, "use_temporal_resblock": False}
TINY_SD15_UNET = {
    **_UNET_COMMON, "adm_in_channels": None, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "context_dim": 32, "use_linear_in_transformer": False, "in_channels": 4, "out_channels": 4,
    "num_heads": 4, "num_head_channels": -1,
}
TINY_SDXL_UNET = {
    **_UNET_COMMON, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 2,
    "context_dim": 48, "use_linear_in_transformer": True, "in_channels": 4, "out_channels": 4,
    "num_heads": -1, "num_head_channels": 16, "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256,
}
# Text encoders: CLIP-L (hidden 32 for SD1.5; 16 for SDXL's first encoder) and CLIP-G (hidden 32, pooled 32: ComfyUI's projection is square).
_CLIP_SMALL = {"intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
TINY_CLIP_L = dict(_CLIP_SMALL, hidden_size=32, projection_dim=32)
TINY_SDXL_CLIP_L = dict(_CLIP_SMALL, hidden_size=16, projection_dim=16)
TINY_SDXL_CLIP_G = dict(_CLIP_SMALL, hidden_size=32, projection_dim=64)
TINY_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                         "attn_resolutions": [], "dropout": 0.0}}


def import_comfy() -> types.SimpleNamespace:
    """Import ComfyUI from ``COMFYUI_PATH`` with the CPU forced; the modules the tests use."""
    if COMFYUI_PATH is None:
        pytest.skip("COMFYUI_PATH is not set")
    path = str(Path(COMFYUI_PATH).resolve())
    if not Path(path, "comfy", "model_management.py").is_file():
        raise RuntimeError(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no comfy/model_management.py)")
    if path not in sys.path:
        sys.path.append(path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported
    import comfy.lora
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils

    if not comfy.model_management.cpu_mode():
        raise RuntimeError("ComfyUI was imported before the CPU could be forced; import it through comfyui_support")
    return types.SimpleNamespace(comfy=comfy, path=path)


def backend_module(name: str = "comfy_denoiser"):
    """``nodes/<name>.py`` of this pack, imported under :data:`NODES_PACKAGE` (see the module docstring)."""
    if NODES_PACKAGE not in sys.modules:
        pkg = types.ModuleType(NODES_PACKAGE)
        pkg.__path__ = [str(REPO_ROOT / "nodes")]
        pkg.__package__ = NODES_PACKAGE
        sys.modules[NODES_PACKAGE] = pkg
    return importlib.import_module(f"{NODES_PACKAGE}.{name}")


@torch.no_grad()
def _init_random(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """ComfyUI's ops skip weight init (the weights would be whatever memory held): fill them."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        elif p.dim() == 1 and ("norm" in name or "ln" in name or name.endswith("in_layers.0.weight")
                               or name.endswith("out_layers.0.weight") or name.endswith(".out.0.weight")):
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.01)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _model_patcher(comfy, config_cls, unet: dict, seed: int, v_prediction: bool):
    unet_config = dict(unet)
    extra = {k: unet_config.pop(k) for k in ("num_heads", "num_head_channels")}
    model_config = config_cls(unet_config)
    model_config.unet_config.update(extra)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    if v_prediction:  # as a v-prediction checkpoint (SD2.x-768, SDXL "v_pred") loads
        model = type(model)(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    _init_random(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


# The tiny transformers. ComfyUI's SD3 text encoder pads CLIP's output to 4096 (T5-XXL's width), so the tiny MMDiT
# keeps SD3's context width; hidden size = 64 x depth as in every SD3 checkpoint (ComfyUI derives the heads from it).
TINY_SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "num_patches": 256,
    "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "adm_in_channels": 32, "qk_norm": "rms",
    "x_block_self_attn_layers": [0],
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
}
TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 16, "context_in_dim": 32,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [],
}
TINY_SD3_CLIP_L = dict(_CLIP_SMALL, hidden_size=16, projection_dim=16)
TINY_SD3_CLIP_G = dict(_CLIP_SMALL, hidden_size=16, projection_dim=16)
TINY_T5 = {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16, "relative_attention_num_buckets": 8}
TINY_VAE16 = {"embed_dim": 16, "ddconfig": {**TINY_VAE["ddconfig"], "z_channels": 16}}


def _clip(comfy, target, model_options: dict, seed: int):
    clip = comfy.sd.CLIP(target, model_options=model_options)
    _init_random(clip.cond_stage_model, seed, std=0.1)
    return clip


def _vae(comfy, seed: int, config: dict = TINY_VAE):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(**config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.ones(s) + torch.randn(s, generator=g) * 0.01 if (len(s) == 1 and "norm" in k)
              else torch.randn(s, generator=g) * (0.01 if len(s) == 1 else 0.1))
          for k, s in shapes.items()}
    vae = comfy.sd.VAE(sd=sd, config={"params": config})
    vae.latent_channels = config["embed_dim"]
    return vae


def tiny_sd15(seed: int = 0, v_prediction: bool = False, with_vae: bool = True):
    """``(MODEL, CLIP, VAE)`` of a random-weight SD1.5-architecture model, built as the executor builds it."""
    c = import_comfy().comfy
    with torch.inference_mode():
        mp = _model_patcher(c, c.supported_models.SD15, TINY_SD15_UNET, seed, v_prediction)
        target = c.supported_models.SD15({}).clip_target()
        clip = _clip(c, target, {"clip_l_model_config": dict(TINY_CLIP_L)}, seed + 1)
        vae = _vae(c, seed + 2) if with_vae else None
    return mp, clip, vae


def tiny_sdxl(seed: int = 0, v_prediction: bool = False, with_vae: bool = True):
    """``(MODEL, CLIP, VAE)`` of a random-weight SDXL-architecture model (two text encoders, pooled ``y``)."""
    c = import_comfy().comfy
    with torch.inference_mode():
        mp = _model_patcher(c, c.supported_models.SDXL, TINY_SDXL_UNET, seed, v_prediction)
        target = c.supported_models.SDXL({}).clip_target()
        clip = _clip(c, target, {"clip_l_model_config": dict(TINY_SDXL_CLIP_L),
                                 "clip_g_model_config": dict(TINY_SDXL_CLIP_G)}, seed + 1)
        vae = _vae(c, seed + 2) if with_vae else None
    return mp, clip, vae


def _transformer_patcher(comfy, config_cls, unet: dict, seed: int):
    model_config = config_cls(dict(unet))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    _init_random(model.diffusion_model, seed)
    pos = getattr(model.diffusion_model, "pos_embed", None)
    if isinstance(pos, torch.Tensor):  # MMDiT's position table is a buffer that the checkpoint fills
        pos.copy_(torch.randn(pos.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.05)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_sd3(seed: int = 0, with_vae: bool = True):
    """``(MODEL, CLIP, VAE)`` of a random-weight SD3.5-style MMDiT (ComfyUI's SD3 model, flow sampling with shift 3)."""
    c = import_comfy().comfy
    import comfy.text_encoders.sd3_clip as sd3_clip
    from comfy.supported_models_base import ClipTarget

    with torch.inference_mode():
        mp = _transformer_patcher(c, c.supported_models.SD3, TINY_SD3_MMDIT, seed)
        target = ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
        clip = _clip(c, target, {"clip_l_model_config": dict(TINY_SD3_CLIP_L),
                                 "clip_g_model_config": dict(TINY_SD3_CLIP_G)}, seed + 1)
        vae = _vae(c, seed + 2, TINY_VAE16) if with_vae else None
    return mp, clip, vae


def tiny_flux(seed: int = 0, guidance: bool = True, with_vae: bool = True):
    """``(MODEL, CLIP, VAE)`` of a random-weight Flux.1-style model: ``guidance`` True is ComfyUI's Flux (dev: guidance
    input, ModelSamplingFlux), False its FluxSchnell (no guidance input, discrete-flow sampling)."""
    c = import_comfy().comfy
    import comfy.text_encoders.flux as flux_te
    from comfy.supported_models_base import ClipTarget

    unet = dict(TINY_FLUX, guidance_embed=guidance)
    with torch.inference_mode():
        mp = _transformer_patcher(c, c.supported_models.Flux if guidance else c.supported_models.FluxSchnell, unet, seed)
        target = ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip())
        clip = _clip(c, target, {"clip_l_model_config": dict(TINY_SD3_CLIP_L), "t5xxl_model_config": dict(TINY_T5)},
                     seed + 1)
        vae = _vae(c, seed + 2, TINY_VAE16) if with_vae else None
    return mp, clip, vae


def diffusion_state(mp) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer of the diffusion model (to check it is left untouched)."""
    with torch.inference_mode():
        return {k: v.detach().clone() for k, v in mp.model.diffusion_model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], mp) -> None:
    after = mp.model.diffusion_model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k]) or before[k].dtype != after[k].dtype]
    assert not changed, f"{len(changed)} tensors of the loaded model changed, e.g. {changed[:3]}"


# -- a real ComfyUI server (main.py in a subprocess) -------------------------------------------------------
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ComfyServer:
    """A running ``main.py``: its URL, process, log file and base directory. Test modules subclass it with
    the requests they make; a subclass provides ``get(path)`` (used to wait for the server)."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path, base: Path, **attrs):
        self.url, self.proc, self.log_path, self.base = url, proc, log, base
        self.__dict__.update(attrs)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str):
        raise NotImplementedError

    def starts(self) -> int:
        """How many times the server has started listening so far (its log says so once a start)."""
        return self.log().count(SERVER_STARTED)


SERVER_STARTED = "To see the GUI go to:"  # main.py logs this once it listens


class HttpComfyServer(ComfyServer):
    """A :class:`ComfyServer` with plain HTTP requests: ``get`` (JSON), ``get_bytes`` and ``request``."""

    def request(self, method: str, path: str, data: bytes | None = None, timeout: float = 120) -> tuple[int, bytes]:
        """``(status, body)`` of one request; HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self.get_bytes(path))


def _wait_until_ready(srv: ComfyServer, timeout: float, what: str, ready: Callable[[], bool] = lambda: True) -> None:
    """Wait until ``ready()`` holds and ``/system_stats`` answers; fail with the log's end if the server exits
    or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while True:
        if srv.proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {srv.proc.returncode}:\n{srv.log()[-6000:]}")
        try:
            if ready():
                srv.get("/system_stats")
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > end:
            raise AssertionError(f"ComfyUI did not {what} in {timeout:.0f} s:\n{srv.log()[-6000:]}")
        time.sleep(1)


def wait_for_restart(srv: ComfyServer, starts_before: int, timeout: float = 180) -> None:
    """Wait until a server that restarts itself in place (ComfyUI-Manager's reboot replaces the process with a
    new ``main.py``, same pid and log) has started again after ``starts_before`` starts, and answers."""
    _wait_until_ready(srv, timeout, "start again", lambda: srv.starts() > starts_before)


@contextlib.contextmanager
def comfyui_server(cls: type[ComfyServer], base: Path, extra_model_paths: Path | None, log: Path, *,
                   while_starting: Callable[[], None] | None = None, start_timeout: float = 180,
                   extra_args: Sequence[str] = (), extra_env: Mapping[str, str] | None = None,
                   **attrs) -> Iterator[ComfyServer]:
    """Start ComfyUI from ``COMFYUI_PATH`` on the CPU on a free local port (``--base-directory base``,
    ``--extra-model-paths-config extra_model_paths`` unless None, then ``extra_args``; environment plus
    ``extra_env``; output to ``log``), run ``while_starting()`` while it starts, wait until ``/system_stats``
    answers, yield ``cls(url, proc, log, base, **attrs)``, and stop the server's whole process group afterwards."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="4294967296",
               MALLOC_TRIM_THRESHOLD_="68719476736")
    env.pop("COMFYUI_PATH", None)
    env.update(extra_env or {})
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--preview-method", "none"]
    if extra_model_paths is not None:
        cmd += ["--extra-model-paths-config", str(extra_model_paths)]
    cmd += list(extra_args)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = cls(f"http://127.0.0.1:{port}", proc, log, base, **attrs)
    try:
        if while_starting is not None:
            while_starting()
        _wait_until_ready(srv, start_timeout, "answer")
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# -- the install tests ------------------------------------------------------------------------------------
def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=safetydpo-tests", "-c", "user.email=tests@localhost",
                           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


def snapshot_repo(dest: Path) -> Path:
    """A new git repository at ``dest`` with one commit holding this checkout as it would be committed now:
    the tracked files with their uncommitted changes, and the untracked files that .gitignore does not
    ignore (so a test run sees work in progress). Skips when ``git`` or a git checkout is missing."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the install tests clone and pack a git repository of the pack")
    try:
        listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT)
    except subprocess.CalledProcessError:
        pytest.skip(f"{REPO_ROOT} is not a git checkout: the install tests need one")
    dest.mkdir(parents=True)
    for rel in filter(None, listed.split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is left out, as a commit would
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _git("init", "-q", cwd=dest)
    _git("add", "-A", cwd=dest)
    _git("commit", "-q", "-m", "snapshot of the working tree for the install tests", cwd=dest)
    return dest


_TORCH_PROBE = r"""
import hashlib, importlib.metadata as md, importlib.util, json, os
dist = md.distribution("torch")
origin = importlib.util.find_spec("torch").origin
record = dist.read_text("RECORD") or ""
st = os.stat(origin)
print(json.dumps({"version": dist.version, "file": origin, "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns,
                  "record_sha256": hashlib.sha256(record.encode()).hexdigest()}))
"""


def torch_install() -> dict:
    """Which torch a fresh interpreter of this Python finds, read from disk without importing it: version, the
    path of ``torch/__init__.py`` with its size and mtime, and the hash of the wheel's RECORD (any reinstall,
    even of the same version, changes the mtime)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, check=True, env=env,
                         timeout=120).stdout
    return json.loads(out)


def pack_import_failures(log: str, pack_dir_name: str) -> list[str]:
    """The lines of a ComfyUI log that say this pack (folder ``pack_dir_name``) failed to import."""
    return [line for line in log.splitlines() if ("IMPORT FAILED" in line or "Cannot import" in line)
            and (pack_dir_name in line or "safetydpo" in line.lower())]
