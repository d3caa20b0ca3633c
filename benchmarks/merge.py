"""Benchmark of the merges: seven rank-8 experts on the SD1.5 UNet's attention layers (random weights).

Measures, each in a fresh subprocess so that peak memory is the phase's own:

* calibration on the full-size SD1.5 UNet (random weights, a small 768-wide CLIP text encoder, 64x64 latents
  as at 512 px): seconds per calibration input (one prompt at one timestep) with the per-expert rank hooks,
  the same without rank statistics, and with the ``X^T X`` statistics; peak RSS;
* every merge method on the seven experts, with the statistics of that calibration: seconds and peak RSS.

Prints a Markdown table (the figures in docs/benchmarks.md, section "Merge") and writes JSON with ``--json``.

    python benchmarks/merge.py                 # everything (a few minutes on 2 CPU cores)
    python benchmarks/merge.py --inputs 2 --methods comerge comerge-delta
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_EXPERTS = 7
RANK = 8
CATEGORIES = ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def peak_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def attn_shapes():
    from safetydpo_core.lora.targets import matches, parse_targets
    from safetydpo_core.lora.unet_names import UNetNames
    from safetydpo_core.tiny_models import SD15_UNET_CONFIG

    names = UNetNames.from_config(SD15_UNET_CONFIG)
    return {n: s for n, s in names.shapes["diffusers"].items() if matches(n, parse_targets("attn"))}


def make_experts():
    import torch

    from safetydpo_core.lora.lora_set import LoraLayer, LoraSet

    shapes = attn_shapes()
    out = []
    for e in range(N_EXPERTS):
        g = torch.Generator().manual_seed(e)
        layers = {n: LoraLayer(torch.randn(RANK, s[1], generator=g) / RANK ** 0.5,
                               torch.randn(s[0], RANK, generator=g) * 0.01, float(RANK)) for n, s in shapes.items()}
        out.append(LoraSet(layers, "diffusers", {"safetydpo_category": CATEGORIES[e]}))
    return out


def sd15_denoiser():
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
    from safetydpo_core.denoiser.loading import DiffusersComponents
    from safetydpo_core.tiny_models import SD15_UNET_CONFIG, write_word_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    tok_dir = Path(tempfile.mkdtemp()) / "tok"
    write_word_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                         bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1)
    enc = CLIPTextModel(cfg).eval().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    parts = DiffusersComponents(unet, sched, [tok], [enc], None, "benchmark", {"base_model_version": "sd_v1"})
    return DiffusersDenoiser(parts)


PROMPTS = ["a photo of a man holding a red house at night", "a painting of a woman with a dog in the street",
           "a cat on a blue house", "the man and the woman at night"]


def phase_calibration(args) -> dict:
    import torch

    from safetydpo_core.merge import CalibrationOptions, calibrate

    den = sd15_denoiser()
    experts = make_experts()
    out = {"setup_rss_mb": rss_mb()}
    # the forward pass alone (after a warm-up pass), for the hook overhead
    with torch.no_grad():
        cond = den.encode_prompts(PROMPTS[:1])
        x = torch.randn(1, 4, args.size, args.size)
        t = torch.tensor([800])
        den.predict(x, t, cond)
        t0 = time.perf_counter()
        for _ in range(2):
            den.predict(x, t, cond)
        out["forward_seconds"] = (time.perf_counter() - t0) / 2
    half = max(1, args.inputs // 2)
    for mode, n in (("experts", args.inputs), ("none", half), ("gram", half)):
        reset_peak()
        base = rss_mb()
        t0 = time.perf_counter()
        stats = calibrate(den, PROMPTS, experts=experts,
                          options=CalibrationOptions(num_inputs=n, batch_size=1, size=args.size, rank_stats=mode))
        dt = time.perf_counter() - t0
        out[mode] = {"inputs": n, "seconds": dt, "seconds_per_input": dt / n, "peak_rss_mb": peak_mb(),
                     "peak_over_start_mb": peak_mb() - base, "stats_mb": stats.nbytes() / 2 ** 20}
        if mode == "experts":
            stats.save(args.stats)
        del stats
    return out


def phase_merge(args) -> dict:
    from safetydpo_core.merge import CalibrationStats, MergeOptions, merge_experts

    experts = make_experts()
    stats = CalibrationStats.load(args.stats)
    reset_peak()
    base = rss_mb()
    opts = MergeOptions(rank=None if args.method in ("comerge", "concat") else RANK)
    t0 = time.perf_counter()
    res = merge_experts(experts, args.method, stats, opts)
    dt = time.perf_counter() - t0
    ov = res.report.overall()
    return {"method": args.method, "seconds": dt, "peak_rss_mb": peak_mb(), "peak_over_start_mb": peak_mb() - base,
            "start_rss_mb": base, "svd_rel_error": (ov.get("svd_rel_error") or {}).get("energy_weighted"),
            "sum_deviation": ov["sum_deviation"], "retention_mean": sum(v for v in ov["retention"].values()) / N_EXPERTS,
            "shares": ov.get("shares"), "rank": ov["rank"]}


def run_phase(argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"benchmark phase {argv} failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPU cores ({model or platform.processor()}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    from safetydpo_core.merge import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=4, help="calibration inputs per mode (default 4)")
    ap.add_argument("--size", type=int, default=64, help="latent side (64 = SD1.5 at 512 px; default)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--phase", choices=["calibration", "merge"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "calibration":
        print(json.dumps(phase_calibration(args)))
        return
    if args.phase == "merge":
        print(json.dumps(phase_merge(args)))
        return
    shapes = attn_shapes()
    n_weights = sum(s[0] * s[1] for s in shapes.values())
    with tempfile.TemporaryDirectory() as tmp:
        stats = str(Path(tmp) / "stats.safetensors")
        print(f"# Merge benchmark: {N_EXPERTS} rank-{RANK} experts on SD1.5 attention ({len(shapes)} layers, "
              f"{n_weights / 1e6:.1f} M weights per full update)")
        print(f"machine: {machine()}\n", flush=True)
        cal = run_phase(["--phase", "calibration", "--inputs", str(args.inputs), "--size", str(args.size), "--stats", stats])
        print(f"Calibration, full SD1.5 UNet (random weights), {args.size}x{args.size} latents, batch 1; "
              f"one plain forward pass: {cal['forward_seconds']:.2f} s\n")
        print("| rank statistics | inputs | s / input | peak RSS (MB) | statistics (MB) |")
        print("|---|---|---|---|---|")
        for mode in ("experts", "none", "gram"):
            c = cal[mode]
            print(f"| {mode} | {c['inputs']} | {c['seconds_per_input']:.2f} | {c['peak_rss_mb']:.0f} | {c['stats_mb']:.1f} |")
        print("\n| method | seconds | peak RSS (MB) | over start (MB) | SVD rel. error | deviation from sum | mean retention |")
        print("|---|---|---|---|---|---|---|", flush=True)
        rows = []
        for m in args.methods:
            r = run_phase(["--phase", "merge", "--method", m, "--stats", stats])
            rows.append(r)
            err = f"{r['svd_rel_error']:.3f}" if r["svd_rel_error"] is not None else "-"
            print(f"| {m} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_over_start_mb']:.0f} | {err} | "
                  f"{r['sum_deviation']:.3f} | {r['retention_mean']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "calibration": cal, "merge": rows}, indent=1))


if __name__ == "__main__":
    main()
