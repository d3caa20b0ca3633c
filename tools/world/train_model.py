"""Train the world's text-to-image model from scratch: ``python tools/world/train_model.py`` (a script, not
part of the library).

Renders a balanced set of captioned world pictures, trains the pixel-space UNet and the small CLIP text
encoder of :mod:`safetydpo_core.world.model` jointly with the v-prediction diffusion loss (which, unlike epsilon prediction,
weights the noisy timesteps where colour, place and shape are decided) (captions drawn afresh every
step from all templates and synonyms, 10% empty captions for classifier-free guidance, some with the colour
or position left out), keeps an exponential moving average of the weights and saves the EMA weights as a
diffusers pipeline folder with ``training.json`` (settings, seed, losses, CPU time) beside them.

The run checkpoints to its work folder every ``--checkpoint-every`` steps and resumes from there when
started again with the same settings. Progress lines go to stdout; run it in the background with a log::

    nohup python tools/world/train_model.py > /tmp/world_model.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout: python tools/world/train_model.py
    sys.path.insert(0, str(ROOT))

from safetydpo_core.errors import ConfigError, SafetyDPOError, TrainingDiverged  # noqa: E402
from safetydpo_core.utils.atomic import atomic_path, atomic_write_text  # noqa: E402
from safetydpo_core.world.captions import caption, training_caption  # noqa: E402
from safetydpo_core.world.dataset import rendered_set, scene_of  # noqa: E402
from safetydpo_core.world.model import (MAX_TOKENS, MODEL_DIR, SAMPLING, SCHEDULER_CONFIG, TEXT_CONFIG,  # noqa: E402
                                        UNET_CONFIG, build_modules, save_pipeline)
from safetydpo_core.world.spec import WORLD  # noqa: E402

DEFAULTS = {"steps": 5000, "batch": 32, "lr": 6e-4, "text_lr_ratio": 1.0, "token_init_std": 1.0, "warmup": 200, "min_lr_ratio": 0.1, "weight_decay": 0.0,
            "ema": 0.999, "grad_clip": 1.0, "dataset_size": 40000, "seed": 0, "p_empty": 0.1,
            "p_omit_colour": 0.08, "p_omit_position": 0.08}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/world/train_model.py", description=__doc__.split("\n\n")[0])
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--out", default=str(MODEL_DIR), help="where to write the pipeline folder (default: the shipped one)")
    p.add_argument("--work", default="/tmp/safetydpo_world_model", help="work folder: render cache and checkpoints")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start again")
    p.add_argument("--unet-config", default=None, help="JSON object overriding UNet config keys (experiments)")
    return p


def lr_at(step: int, s: dict) -> float:
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    frac = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["lr"] * (s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train(settings: dict, out: str | os.PathLike, work: str | os.PathLike, *, threads: int = 1,
          checkpoint_every: int = 250, log_every: int = 50, fresh: bool = False, unet_config: dict | None = None) -> dict:
    """Train (or resume) and write the pipeline folder to ``out``; returns the training record."""
    s = dict(settings)
    if s["steps"] <= 0 or s["batch"] <= 0:
        raise ConfigError("--steps and --batch must be positive.")
    torch.set_num_threads(threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    data = rendered_set(s["dataset_size"], s["seed"], work / f"renders_{s['dataset_size']}_{s['seed']}.npz",
                        progress=lambda i, n: _log(f"rendered {i}/{n} training pictures"))
    images = torch.from_numpy(data.images)
    unet_config = dict(unet_config or UNET_CONFIG)
    unet, text_encoder, tokenizer, scheduler = build_modules(work / "tokenizer", seed=s["seed"], unet_config=unet_config)
    ema_unet, ema_text = build_modules(work / "tokenizer", seed=s["seed"], unet_config=unet_config)[:2]
    tokenizer_files = {f.name: f.read_text(encoding="utf-8") for f in (work / "tokenizer").iterdir() if f.is_file()}
    ema_unet.load_state_dict(unet.state_dict())
    for m in (ema_unet, ema_text):
        m.requires_grad_(False).eval()
    # Word embeddings start large (CLIP's default is 0.02) so that each word stays visible in the encoder's
    # output: with small ones the encoder learned the background word (a whole-picture signal) first and
    # squeezed the object's words to a few percent of its output, and the UNet never learned to use them.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0, s["token_init_std"])
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr_ratio": 1.0},
                             {"params": list(text_encoder.parameters()), "lr_ratio": s["text_lr_ratio"]}],
                            lr=s["lr"], weight_decay=s["weight_decay"])
    alphas = scheduler.alphas_cumprod.float()
    rng = np.random.default_rng(s["seed"] + 1)
    torch.manual_seed(s["seed"] + 2)
    step, cpu_before, wall_before, history = 0, 0.0, 0.0, []
    if ckpt_path.exists() and not fresh:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["settings"] != s or ck.get("unet_config") != unet_config:
            raise ConfigError(f"The checkpoint {ckpt_path} was made with other settings or another UNet ({ck['settings']}); "
                              f"pass --fresh to start again or use the same settings.")
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        for name, text in ck["tokenizer_files"].items():  # the exact tokenizer the run started with
            (work / "tokenizer" / name).write_text(text, encoding="utf-8")
        tokenizer = type(tokenizer).from_pretrained(str(work / "tokenizer"))
        rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
        step, cpu_before, wall_before, history = ck["step"], ck["cpu_s"], ck["wall_s"], ck["history"]
        _log(f"resumed from {ckpt_path} at step {step}")
    probe = _text_probe(data, tokenizer, alphas, s["seed"])
    cpu0, wall0 = time.process_time(), time.time()
    run_loss, run_n = 0.0, 0
    unet.train()
    text_encoder.train()

    def save_checkpoint() -> None:
        with atomic_path(ckpt_path, "checkpoint") as tmp:
            torch.save({"settings": s, "step": step, "unet": unet.state_dict(), "text": text_encoder.state_dict(),
                        "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(), "opt": opt.state_dict(),
                        "np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                        "cpu_s": cpu_before + time.process_time() - cpu0, "wall_s": wall_before + time.time() - wall0,
                        "history": history, "tokenizer_files": tokenizer_files, "unet_config": unet_config}, tmp)

    while step < s["steps"]:
        idx = rng.integers(len(data), size=s["batch"])
        x0 = images[idx].float() / 127.5 - 1
        caps = [training_caption(scene_of(data.labels[i]), rng, p_empty=s["p_empty"], p_omit_colour=s["p_omit_colour"],
                                 p_omit_position=s["p_omit_position"]) for i in idx]
        ids = tokenizer(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (s["batch"],))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s) * g["lr_ratio"]
        cond = text_encoder(ids)[0]
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        if SCHEDULER_CONFIG["prediction_type"] == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = noise
        loss = torch.nn.functional.mse_loss(pred, target)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"World model training diverged at step {step} (loss {loss.item()}); lower --lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        step += 1
        decay = min(s["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (text_encoder, ema_text)):
                for ps, pd in zip(src.parameters(), dst.parameters()):
                    pd.lerp_(ps, 1 - decay)
        run_loss += loss.item()
        run_n += 1
        if step % log_every == 0 or step == s["steps"]:
            cpu = cpu_before + time.process_time() - cpu0
            wall = wall_before + time.time() - wall0
            history.append({"step": step, "loss": round(run_loss / run_n, 5), "cpu_s": round(cpu, 1)})
            eta = (wall / step) * (s["steps"] - step) if step else 0
            gain = ""
            if step % (log_every * 5) == 0 or step == s["steps"]:
                g = probe(unet, text_encoder)
                history[-1]["text_gain"] = g
                gain = f" text gain {g:+.3f}"
            _log(f"step {step}/{s['steps']} loss {run_loss / run_n:.4f}{gain} lr {lr_at(step, s):.2e} "
                 f"cpu {cpu / 60:.1f} min wall {wall / 60:.1f} min eta {eta / 60:.1f} min")
            run_loss, run_n = 0.0, 0
        if step % checkpoint_every == 0 and step < s["steps"]:
            save_checkpoint()
    save_checkpoint()
    cpu = cpu_before + time.process_time() - cpu0
    wall = wall_before + time.time() - wall0
    record = {"settings": s, "threads": threads, "steps_done": step, "cpu_seconds": round(cpu, 1),
              "wall_seconds": round(wall, 1), "final_loss": history[-1]["loss"] if history else None,
              "loss_history": history[:: max(1, len(history) // 60)],
              "unet_config": unet_config, "text_config": TEXT_CONFIG, "scheduler_config": SCHEDULER_CONFIG,
              "torch": torch.__version__, "python": platform.python_version(),
              "command": "python tools/world/train_model.py " + " ".join(sys.argv[1:])}
    _export(out, ema_unet, ema_text, work / "tokenizer", scheduler, record)
    _log(f"saved the world model to {out} ({cpu / 60:.1f} CPU minutes)")
    return record


def _text_probe(data, tokenizer, alphas: torch.Tensor, seed: int):
    """A check that the model reads the object's words: on a fixed batch of noisy training pictures, the
    relative rise of the loss when the captions name another object (kind, colour and position of another
    picture; same background). 0 means the object's words are ignored."""
    rng = np.random.default_rng(seed + 99)
    idx = rng.integers(len(data), size=48)
    scenes = [scene_of(data.labels[i]) for i in idx]
    other = [scenes[(k + 1) % len(scenes)] for k in range(len(scenes))]
    good = [caption(sc, seed=k, background=True) for k, sc in enumerate(scenes)]
    bad = [caption(sc.replace(shape=o.shape, colour=o.colour, position=o.position), seed=k, background=True)
           for k, (sc, o) in enumerate(zip(scenes, other))]
    x0 = torch.from_numpy(data.images[idx]).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed + 98)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([900, 700, 500, 300] * (len(idx) // 4))
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if SCHEDULER_CONFIG["prediction_type"] == "v_prediction" else noise
    ids = {k: tokenizer(v, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
           for k, v in (("good", good), ("bad", bad))}

    @torch.no_grad()
    def run(unet, text_encoder) -> float:
        losses = {k: torch.nn.functional.mse_loss(unet(x_t, t, encoder_hidden_states=text_encoder(v)[0]).sample,
                                                  target).item() for k, v in ids.items()}
        return round(losses["bad"] / losses["good"] - 1, 4)

    return run


def _export(out, unet, text_encoder, tokenizer_dir, scheduler, record) -> None:
    """Write the folder beside ``out`` first and swap it in, so ``out`` is never half-written."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-new")
    old = out.with_name(out.name + ".tmp-old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    info = {"base_model_version": WORLD.version, "kind": "pixel-space text-to-image model of the concept world",
            "image_size": WORLD.image_size, "sampling": SAMPLING}
    save_pipeline(tmp, unet, text_encoder, tokenizer_dir, scheduler, info)
    atomic_write_text(tmp / "training.json", json.dumps(record, indent=1))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    settings = {k: getattr(a, k) for k in DEFAULTS}
    try:
        ucfg = dict(UNET_CONFIG, **json.loads(a.unet_config)) if a.unet_config else None
        train(settings, a.out, a.work, threads=a.threads, checkpoint_every=a.checkpoint_every, log_every=a.log_every,
              fresh=a.fresh, unet_config=ucfg)
    except SafetyDPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
