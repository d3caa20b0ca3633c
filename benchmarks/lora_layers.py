"""Benchmark: what a training step costs with each choice of LoRA layers (``--targets``) on the built-in world model.

For every preset given, the world model gets a rank-4 LoRA on those layers and this script times, on a batch of
``--batch`` noisy latents at mid noise: the adapted model's forward and backward pass (what the trainer does
for the policy) and the forward pass with the adapters switched off (the DPO reference). A LoRA on the
ResNet convolutions (``esd-u``, which includes ``conv_in``) makes the backward pass run through the whole
network; on attention layers only it stops at the first transformer block. Prints a Markdown table::

    python benchmarks/lora_layers.py                        # attn, attn-self+ff, esd-u; 2 threads
    python benchmarks/lora_layers.py --targets attn,esd-u --threads 1 --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def measure(den, targets: str, batch: int, repeats: int) -> dict:
    h, w = den.default_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *den.latent_shape(h, w)), generator=gen)
    t = torch.full((batch,), den.num_train_timesteps // 2)
    cond = den.encode_prompts(["a red circle in the center"] * batch, size=(h, w))
    adapter = den.attach_lora(4, targets=targets)
    try:
        layers = len(adapter.parameters()) // 2
        for _ in range(2):  # the first round warms up
            t0 = time.perf_counter()
            for _ in range(repeats):
                den.predict(x, t, cond).square().mean().backward()
            t1 = time.perf_counter()
            with torch.no_grad(), adapter.disabled():
                for _ in range(repeats):
                    den.predict(x, t, cond)
            t2 = time.perf_counter()
    finally:
        adapter.remove()
    return {"targets": targets, "layers": layers, "train": (t1 - t0) / repeats, "reference": (t2 - t1) / repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="attn,attn-self+ff,esd-u", help="comma-separated presets")
    ap.add_argument("--batch", type=int, default=16, help="latents per pass (default 16: a DPO micro-batch of 4 "
                                                          "pairs with its preservation prompts is 12-16)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from safetydpo_core.world.model import load_world_model

    torch.set_num_threads(args.threads)
    den = load_world_model()
    rows = [measure(den, tg, args.batch, args.repeats) for tg in args.targets.split(",") if tg.strip()]
    print(f"LoRA layers on the world model ({platform.machine()}, torch {torch.__version__}, {args.threads} "
          f"thread(s), batch {args.batch}, mean of {args.repeats}):\n")
    print("| targets | adapted layers | forward + backward (s) | reference forward (s) | train / attn |")
    print("|---|---|---|---|---|")
    base = next((r["train"] for r in rows if r["targets"] == "attn"), None)
    for r in rows:
        ratio = f"{r['train'] / base:.2f}" if base else "-"
        print(f"| `{r['targets']}` | {r['layers']} | {r['train']:.3f} | {r['reference']:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
