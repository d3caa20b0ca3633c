"""Train the world's judge: ``python tools/world/train_judge.py`` (a script, not part of the library).

Renders a balanced training set and a separate held-out set (other render seeds), trains
:class:`safetydpo_core.world.judge.JudgeNet` with cross-entropy on its four heads under degradations like
those of generated pictures (:func:`safetydpo_core.world.degrade.degrade`), then measures per-attribute accuracy on the held-out renders, clean and degraded, and
writes ``judge.safetensors`` (fp16) and ``judge.json`` (classes, architecture, settings, accuracy, CPU time).
Checkpoints to its work folder and resumes from there.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout: python tools/world/train_judge.py
    sys.path.insert(0, str(ROOT))

from safetydpo_core.errors import ConfigError, SafetyDPOError  # noqa: E402
from safetydpo_core.utils.atomic import atomic_path, atomic_write_text  # noqa: E402
from safetydpo_core.world.dataset import rendered_set  # noqa: E402
from safetydpo_core.world.degrade import degrade  # noqa: E402
from safetydpo_core.world.judge import ARCH, HEADS, WEIGHTS_DIR, JudgeNet  # noqa: E402
from safetydpo_core.world.spec import WORLD  # noqa: E402

DEFAULTS = {"steps": 2500, "batch": 128, "lr": 2e-3, "weight_decay": 1e-4, "train_size": 30000, "test_size": 3000,
            "seed": 101, "test_seed": 202}


def lr_at(step: int, s: dict) -> float:
    warm = 100
    if step < warm:
        return s["lr"] * (step + 1) / warm
    return s["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, s["steps"] - warm))))


@torch.no_grad()
def accuracy(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator | None = None) -> dict:
    """Per-attribute accuracy (and the share with all four right) of ``net`` on uint8 images."""
    net.eval()
    correct = {h: 0 for h in HEADS}
    allright = 0
    for i in range(0, images.shape[0], 500):
        x = images[i:i + 500].float() / 255
        if g is not None:
            x = degrade(x, g)
        out = net(x)
        ok = torch.ones(x.shape[0], dtype=torch.bool)
        for j, h in enumerate(HEADS):
            hit = out[h].argmax(-1) == labels[i:i + 500, j]
            correct[h] += int(hit.sum())
            ok &= hit
        allright += int(ok.sum())
    n = images.shape[0]
    res = {h: round(c / n, 4) for h, c in correct.items()}
    res["all"] = round(allright / n, 4)
    return res


@torch.no_grad()
def confusions(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> dict:
    """The most frequent shape mistakes on degraded held-out renders: ``"true -> read": count``."""
    net.eval()
    x = degrade(images.float() / 255, g)
    pred = net(x)["shape"].argmax(-1)
    names = WORLD.ids("shape")
    counts: dict[str, int] = {}
    for t, p in zip(labels[:, 0].tolist(), pred.tolist()):
        if t != p:
            k = f"{names[t]} -> {names[p]}"
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train(settings: dict, out: str | Path, work: str | Path, *, threads: int = 1, fresh: bool = False,
          checkpoint_every: int = 500, log_every: int = 100) -> dict:
    s = dict(settings)
    if s["steps"] <= 0 or s["batch"] <= 0:
        raise ConfigError("--steps and --batch must be positive.")
    if s["seed"] == s["test_seed"]:
        raise ConfigError("--seed and --test-seed must differ: the held-out renders must not be training renders.")
    torch.set_num_threads(threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    prog = lambda i, n: _log(f"rendered {i}/{n}")  # noqa: E731
    train_set = rendered_set(s["train_size"], s["seed"], work / f"judge_train_{s['train_size']}_{s['seed']}.npz", prog)
    test_set = rendered_set(s["test_size"], s["test_seed"], work / f"judge_test_{s['test_size']}_{s['test_seed']}.npz", prog)
    images, labels = torch.from_numpy(train_set.images), torch.from_numpy(train_set.labels)
    timages, tlabels = torch.from_numpy(test_set.images), torch.from_numpy(test_set.labels)
    torch.manual_seed(s["seed"])
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    g = torch.Generator().manual_seed(s["seed"])
    step, cpu_before = 0, 0.0
    ckpt = work / "judge_checkpoint.pt"
    if ckpt.exists() and not fresh:
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        if ck["settings"] != s:
            raise ConfigError(f"The checkpoint {ckpt} was made with other settings; pass --fresh or the same settings.")
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["gen"])
        step, cpu_before = ck["step"], ck["cpu_s"]
        _log(f"resumed at step {step}")
    cpu0 = time.process_time()
    run, n = 0.0, 0
    while step < s["steps"]:
        net.train()
        idx = torch.randint(0, images.shape[0], (s["batch"],), generator=g)
        x = degrade(images[idx].float() / 255, g, strength=float(torch.rand(1, generator=g)) * 1.3)
        logits = net(x)
        y = labels[idx]
        loss = sum(F.cross_entropy(logits[h], y[:, j], label_smoothing=0.05) for j, h in enumerate(HEADS))
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run += loss.item()
        n += 1
        if step % log_every == 0 or step == s["steps"]:
            _log(f"step {step}/{s['steps']} loss {run / n:.4f} cpu {(cpu_before + time.process_time() - cpu0) / 60:.1f} min")
            run, n = 0.0, 0
        if step % checkpoint_every == 0 and step < s["steps"]:
            with atomic_path(ckpt, "checkpoint") as tmp:
                torch.save({"settings": s, "net": net.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(),
                            "step": step, "cpu_s": cpu_before + time.process_time() - cpu0}, tmp)
    cpu = cpu_before + time.process_time() - cpu0
    net.eval()
    # measured on the fp16 weights that ship
    from safetensors.torch import save_file

    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() for k, v in state.items()})
    eval_g = torch.Generator().manual_seed(s["test_seed"])
    report = {"held_out_clean": accuracy(net, timages, tlabels),
              "held_out_degraded": accuracy(net, timages, tlabels, eval_g),
              "training_renders_clean": accuracy(net, images[:3000], labels[:3000]),
              "top_shape_confusions_degraded": confusions(net, timages, tlabels, torch.Generator().manual_seed(7))}
    _log(f"held-out accuracy: clean {report['held_out_clean']} degraded {report['held_out_degraded']}")
    config = {"classes": {h: list(WORLD.ids(h)) for h in HEADS}, "arch": ARCH, "settings": s, "accuracy": report,
              "n_test": int(timages.shape[0]), "cpu_seconds": round(cpu, 1), "threads": threads,
              "world_version": WORLD.version, "torch": torch.__version__, "python": platform.python_version(),
              "command": "python tools/world/train_judge.py " + " ".join(sys.argv[1:]),
              "unsafe_rule": "sum of the unsafe glyph probabilities >= 0.5"}
    out = Path(out)
    with atomic_path(out, "judge weights") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "world": WORLD.version})
    atomic_write_text(out.with_suffix(".json"), json.dumps(config, indent=1))
    _log(f"saved the judge to {out} ({cpu / 60:.1f} CPU minutes)")
    return config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/world/train_judge.py", description=__doc__.split("\n\n")[0])
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--out", default=str(WEIGHTS_DIR / "judge.safetensors"))
    p.add_argument("--work", default="/tmp/safetydpo_world_judge")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        train({k: getattr(a, k) for k in DEFAULTS}, a.out, a.work, threads=a.threads, fresh=a.fresh)
    except SafetyDPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
