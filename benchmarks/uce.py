"""Benchmark: how long UCE's closed-form edit takes, on the world model and on an SD1.5-shaped model.

* ``world``: the shipped concept-world model, the science baseline's edit (the seven concepts' 14 training
  words -> their safe twins' words, 59 preserved words and phrases; see ``benchmarks/science_baselines.py``);
* ``sd15``: the full SD1.5 UNet (random weights, 860 M parameters) with a full-size CLIP ViT-L/14 text encoder
  (12 layers, 768 wide, random weights) and a word tokenizer; 7 concepts -> 7 guides, 10 preserved.

The time is the whole ``uce_edit`` call (token checks, text encoding, the solve, every key/value layer's
factors), the median of ``--repeats`` runs after one warm-up, with ``--threads`` torch threads (default 2,
the goal's "2 CPU cores"). Loading the model is not counted. Also printed: the number of edited layers, the
update's rank and the mean relative error of a rank-1 export. Goals (issue 16): <= 5 s on the world model,
<= 30 s on the SD1.5-shaped model.

    python benchmarks/uce.py
    python benchmarks/uce.py --models world --repeats 5 --json uce.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = {"world": 5.0, "sd15": 30.0}


def world_case():
    from benchmarks.science_baselines import uce_concepts
    from safetydpo_core.world import load_world_model

    erase, guide, preserve = uce_concepts()
    return load_world_model(), erase, guide, preserve


def sd15_case():
    from transformers import CLIPTextConfig, CLIPTextModel

    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
    from safetydpo_core.tiny_models import BASE_WORDS, SD15_UNET_CONFIG, build_tiny_pipeline

    folder = build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="bench-uce-")) / "m", kind="sd15",
                                 unet_config=dict(SD15_UNET_CONFIG), text_dim=768, vae=False)
    den = DiffusersDenoiser.from_pretrained(folder)
    old = den.parts.text_encoders[0].config
    clip_l = CLIPTextConfig(vocab_size=old.vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                            bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id)
    den.parts.text_encoders[0] = CLIPTextModel(clip_l).eval()
    words = list(BASE_WORDS)
    erase = ["cat", "dog", "man", "woman", "house", "street", "night"]
    guide = ["painting", "picture", "person", "photo", "red", "blue", "green"]
    preserve = [w for w in words if w not in erase and w not in guide][:10]
    return den, erase, guide, preserve


def measure(name: str, repeats: int) -> dict:
    import torch

    from safetydpo_core.erase import uce_edit

    den, erase, guide, preserve = {"world": world_case, "sd15": sd15_case}[name]()
    params = sum(p.numel() for p in den.unet.parameters())
    uce_edit(den, erase, guide, preserve)  # warm-up (first-call allocations, tokenizer caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = uce_edit(den, erase, guide, preserve)
        times.append(time.perf_counter() - t0)
    r1 = uce_edit(den, erase, guide, preserve, rank=1)
    errs = list(r1.rel_errors.values())
    return {"model": name, "unet_parameters": params, "layers": len(res.lora), "concepts": len(erase),
            "preserved": len(preserve), "update_rank": res.update_rank, "seconds_median": statistics.median(times),
            "seconds_max": max(times), "rank1_mean_rel_error": sum(errs) / len(errs), "goal_seconds": GOALS[name],
            "goal_met": statistics.median(times) <= GOALS[name], "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["world", "sd15"], choices=["world", "sd15"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    rows = [measure(m, a.repeats) for m in a.models]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"UCE edit, median of {a.repeats} runs, {a.threads} torch threads; machine: {machine}\n")
    print("| model | UNet parameters | edited layers | concepts / preserved | update rank | seconds (median) | "
          "seconds (max) | rank-1 export: mean rel. error | goal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['unet_parameters'] / 1e6:.1f} M | {r['layers']} | {r['concepts']} / {r['preserved']} | "
              f"{r['update_rank']} | {r['seconds_median']:.2f} | {r['seconds_max']:.2f} | {r['rank1_mean_rel_error']:.3f} | "
              f"<= {r['goal_seconds']:.0f} s: {'met' if r['goal_met'] else 'missed'} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
