"""Benchmark: one Diffusion-DPO step with the adapters-off reference vs. the official two-network approach.

For an SD1.5-shaped UNet (random weights, 64 px images = 8x8 latents, rank 4, one pair), for the tiny
test model, and for an SD3.5-medium-shaped transformer (``sd35m``: SD3.5-medium's real widths, attention
layout and position table, its first ``--sd35-layers`` joint blocks of 24, since the full 2.5 B parameters
twice over do not fit a 24 GB machine; text states of SD3's real length, 77 CLIP + 256 T5 tokens, given
directly), it measures in separate processes (so peak memory is each approach's own):

* ``ours``: a DPO step as this pack's trainer does it (reference = same UNet with the LoRA switched off);
* ``official``: the official SafetyDPO code's approach, a frozen deep copy of the UNet as the reference;
* ``parts``: the policy forward+backward on the pair alone, and the reference forward on the pair alone.

It prints a table and writes JSON (``--json``). Targets (issue 2): step time <= 1.10 x the sum of its
parts; peak memory <= 0.6 x the official approach.

    python benchmarks/dpo_step.py                   # all models, all modes
    python benchmarks/dpo_step.py --models tiny     # quick
    python benchmarks/dpo_step.py --models sd35m --size 256 --sd35-layers 6
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_sd35m(layers: int, device: str):
    """An SD3.5-medium-shaped transformer (random weights) seen through the flow-matching backend."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from safetydpo_core.denoiser.diffusers_flow import DiffusersFlowDenoiser
    from safetydpo_core.denoiser.loading import DiffusersComponents
    from safetydpo_core.lora.transformer_names import build_transformer
    from safetydpo_core.tiny_models import SD35_MEDIUM_TRANSFORMER_CONFIG

    cfg = dict(SD35_MEDIUM_TRANSFORMER_CONFIG, num_layers=layers,
               dual_attention_layers=[i for i in SD35_MEDIUM_TRANSFORMER_CONFIG["dual_attention_layers"] if i < layers - 1])
    model = build_transformer(cfg).to(device).eval().requires_grad_(False)
    parts = DiffusersComponents(None, FlowMatchEulerDiscreteScheduler(shift=3.0), [None, None], [None, None], None,
                                "sd35m", {"sample_size": 1024}, transformer=model)
    return DiffusersFlowDenoiser(parts, device=device)


def build(model: str, size: int, device: str, sd35_layers: int = 6):
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
    if model == "sd35m":
        return build_sd35m(sd35_layers, device)
    from safetydpo_core.tiny_models import SD15_UNET_CONFIG, build_tiny_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    if model == "sd15":
        cfg = dict(SD15_UNET_CONFIG, sample_size=size // 4)
        folder = build_tiny_pipeline(tmp / "m", kind="sd15", unet_config=cfg, text_dim=768, image_size=size)
    else:
        folder = build_tiny_pipeline(tmp / "m", kind="sd15", image_size=size)
    return DiffusersDenoiser.from_pretrained(folder, device=device)


def run_mode(model: str, mode: str, steps: int, size: int, device: str, sd35_layers: int = 6) -> dict:
    import torch

    from safetydpo_core.denoiser.protocol import Conditioning
    from safetydpo_core.training.objectives import diffusion_dpo

    torch.manual_seed(0)
    den = build(model, size, device, sd35_layers)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    c, h, w = den.latent_shape(size, size)
    x0 = torch.randn(2, c, h, w, device=device)
    noise = torch.randn(1, c, h, w, device=device).repeat(2, 1, 1, 1)
    t = torch.tensor([500, 500], device=device)
    if model == "sd35m":  # SD3's text states: 77 CLIP + 256 T5 tokens at 4096 wide, pooled CLIP-L + CLIP-G
        t = t.float()
        cond = Conditioning({"encoder_hidden_states": torch.randn(1, 77 + 256, 4096, device=device),
                             "pooled_projections": torch.randn(1, 2048, device=device)}).repeat(2)
    else:
        cond = den.encode_prompts(["a photo of a cat"]).repeat(2)
    x_t = den.add_noise(x0, noise, t)
    target = den.target(x0, noise, t)  # epsilon (UNets) or the flow velocity (SD3)
    adapter = den.attach_lora(4, targets="attn")
    params = adapter.parameters()
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.01)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ref_unet = copy.deepcopy(den.module) if mode == "official" else None
    ref_den = None
    if ref_unet is not None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in ref_unet.modules():
            if isinstance(m, BaseTunerLayer):
                m.enable_adapters(False)
        if model == "sd35m":  # the same backend on the frozen copy
            ref_den = copy.copy(den)
            ref_den.transformer = ref_unet

    def ref_forward():
        with torch.no_grad():
            if ref_den is not None:
                return ref_den.predict(x_t, t, cond)
            if ref_unet is not None:
                return ref_unet(x_t, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample
            with adapter.disabled():
                return den.predict(x_t, t, cond)

    def policy_fb():
        pred = den.predict(x_t, t, cond)
        loss = (pred - target).pow(2).mean()
        loss.backward()
        opt.zero_grad(set_to_none=True)

    def dpo_step():
        ref = ref_forward()
        pred = den.predict(x_t, t, cond)
        out = diffusion_dpo(pred, ref, target, 5000.0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        sync()
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return out

    result = {"model": model, "mode": mode, "size": size, "device": device,
              "parameters_m": round(sum(p.numel() for p in den.module.parameters()) / 1e6, 1)}
    if mode == "parts":
        result["policy_fwd_bwd_s"] = statistics.median(timed(policy_fb))
        result["ref_fwd_s"] = statistics.median(timed(ref_forward))
    else:
        result["step_s"] = statistics.median(timed(dpo_step))
    result["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else peak_rss_mb()
    result["memory_kind"] = "cuda max_memory_allocated" if device.startswith("cuda") else "process peak RSS"
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,sd15,sd35m")
    ap.add_argument("--sd35-layers", type=int, default=6, help="joint blocks of the SD3.5-medium-shaped transformer "
                                                              "(24 in the real model; 6 fits twice in 24 GB in fp32)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_mode(a.child[0], a.child[1], a.steps, a.size, a.device, a.sd35_layers)))
        return 0
    rows = []
    for model in a.models.split(","):
        for mode in ("ours", "official", "parts"):
            cmd = [sys.executable, __file__, "--child", model, mode, "--steps", str(a.steps), "--size", str(a.size),
                   "--device", a.device, "--sd35-layers", str(a.sd35_layers)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {a.device}"
    try:
        machine = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].splitlines()[0].strip() + f" ({os.cpu_count()} CPUs), torch {torch.__version__}, device {a.device}"
    except Exception:  # noqa: BLE001 - lscpu is optional
        pass
    print(f"machine: {machine}; {a.size} px, rank 4, one pair, median of {a.steps} steps")
    print(f"{'model':6} {'step ours':>10} {'parts sum':>10} {'ratio':>6} {'step official':>14} {'peak ours':>10} {'peak official':>14} {'mem ratio':>9}")
    summary = []
    for model in a.models.split(","):
        r = {x["mode"]: x for x in rows if x["model"] == model}
        parts = r["parts"]["policy_fwd_bwd_s"] + r["parts"]["ref_fwd_s"]
        s = {"model": model, "step_ours_s": r["ours"]["step_s"], "parts_sum_s": parts,
             "time_ratio": r["ours"]["step_s"] / parts, "step_official_s": r["official"]["step_s"],
             "peak_ours_mb": r["ours"]["peak_mb"], "peak_official_mb": r["official"]["peak_mb"],
             "memory_ratio": r["ours"]["peak_mb"] / r["official"]["peak_mb"], "memory_kind": r["ours"]["memory_kind"]}
        summary.append(s)
        print(f"{model:6} {s['step_ours_s']:10.3f} {parts:10.3f} {s['time_ratio']:6.2f} {s['step_official_s']:14.3f} "
              f"{s['peak_ours_mb']:9.0f}M {s['peak_official_mb']:13.0f}M {s['memory_ratio']:9.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
