"""Where the merged LoRA's change to unrelated content comes from, on the built-in concept world (#12's preservation).

Preservation is the share of same-seed plain-shape pictures whose judged attributes the LoRA leaves unchanged
(docs/benchmarks.md, "Recipe"). For each finished ``safetydpo demo`` folder and its merged LoRA (``--lora FILE``
for another LoRA file in the folder, e.g. ``finetuned.safetensors``), this measures three things:

* **floor**: the preservation of random LoRAs with the LoRA's ranks and per-layer update norms, times k
  (``--floor 0.5 1``): what any weight change of that size costs, whatever its direction;
* **branches**: the preservation with the LoRA on one branch of classifier-free guidance only, the prompt's
  (``c``) or the empty prompt's (``u``), the other branch running the untouched model;
* **bands**: the mean squared difference from the base model's prediction, the prompt's (``c``) and the
  guided one that the sampler follows (``u + cfg (c - u)``), in five timestep bands, for the LoRA and each
  random one. The inputs are the preservation set's plain-shape prompts (the training wording, not the
  evaluation's), noised from the base model's own pictures of them, ``--noises`` noises a band (default 4).

The pictures are the demo's 90 plain-shape evaluation prompts with the demo's seeds, sampler steps and guidance,
judged by the world judge (nothing tuned), so the figures compare with the demo's report. Everything is cached
in ``--out``, a folder per demo and LoRA file, and a rerun reads it back::

    safetydpo demo --seed 0 --out demos/s0      # and --seed 1, 2
    python benchmarks/science_preservation.py --demos demos/s0 demos/s1 demos/s2 --out preservation
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safetydpo_core.lora.lora_set import LoraLayer, LoraSet  # noqa: E402

BANDS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))
BRANCHES = ("c", "u")


def random_like(lora: LoraSet, k: float, seed: int = 1234) -> LoraSet:
    """Random factors of each layer's shapes, scaled so that each layer's update has ``k`` times the Frobenius
    norm of ``lora``'s: a change of the same size in a random direction (the same for a seed)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, layer in lora.items():
        down = torch.randn(layer.down.shape, generator=g)
        up = torch.randn(layer.up.shape, generator=g)
        made = LoraLayer(down, up, layer.alpha)
        norm = made.delta().norm()
        target = layer.delta().norm() * k
        layers[name] = LoraLayer(down, up * (target / norm) if norm > 0 else up * 0, layer.alpha)
    return LoraSet(layers, lora.naming, dict(lora.metadata))


@contextlib.contextmanager
def lora_on_branch(den, lora: LoraSet, branch: str) -> Iterator[None]:
    """Inside the block every guided prediction of ``den`` (the batch ``[uncond, cond]`` that the sampler makes)
    runs ``lora`` on one half only: ``"c"`` the prompt's, ``"u"`` the empty prompt's."""
    from safetydpo_core.lora.apply import lora_applied

    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}; got {branch!r}")
    plain = den.predict

    def predict(x, t, cond):
        if x.shape[0] % 2:
            raise ValueError("lora_on_branch needs guided sampling (cfg != 1): an uncond and a cond half.")
        n = x.shape[0] // 2
        out = []
        for half, part in zip(BRANCHES[::-1], (slice(0, n), slice(n, None))):  # the sampler's order: uncond, cond
            with lora_applied(den.module, [(lora, 1.0)]) if half == branch else contextlib.nullcontext():
                out.append(plain(x[part], t[part], cond.index(part)))
        return torch.cat(out)

    den.predict = predict
    try:
        yield
    finally:
        del den.predict  # the class's method again


@torch.no_grad()
def band_errors(den, loras: dict[str, LoraSet], prompts: list[str], *, cfg: float, steps: int, seed: int = 7,
                noises: int = 4) -> dict[str, dict[str, tuple[float, float]]]:
    """For each named LoRA, ``{band: (c error, guided error)}``: the mean squared difference from the base model's
    prediction, on ``prompts`` noised from the base model's pictures of them (``noises`` noises a band)."""
    from safetydpo_core.denoiser.protocol import Conditioning
    from safetydpo_core.lora.apply import lora_applied
    from safetydpo_core.world.model import seed_noise
    from safetydpo_core.world.spec import IMAGE_SIZE

    cond, uncond = den.encode_prompts(prompts), den.encode_prompts([""] * len(prompts))
    shape = den.latent_shape(IMAGE_SIZE, IMAGE_SIZE)
    x0 = den.sample(cond, uncond, seed_noise([seed * 100_000 + i for i in range(len(prompts))], shape),
                    steps=steps, cfg=cfg)
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for lo, hi in BANDS:
        for _ in range(noises):
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(lo, hi, (x0.shape[0],), generator=g)
            inputs.append((f"{lo}-{hi}", den.add_noise(x0, noise, t), t))
    both = Conditioning.cat([uncond, cond])

    def predictions():
        out = []
        for band, x_t, t in inputs:
            pu, pc = den.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both).float().chunk(2)
            out.append((band, pc, pu + cfg * (pc - pu)))
        return out

    base = predictions()
    result = {}
    for name, lora in loras.items():
        with lora_applied(den.module, [(lora, 1.0)]):
            moved = predictions()
        sums: dict[str, list[float]] = {}
        for (band, bc, bg), (_, pc, pg) in zip(base, moved):
            s = sums.setdefault(band, [0.0, 0.0])
            s[0] += float(((pc - bc) ** 2).mean()) / noises
            s[1] += float(((pg - bg) ** 2).mean()) / noises
        result[name] = {band: (c, gd) for band, (c, gd) in sums.items()}
    return result


def measure(den, judge, demo: Path, lora_file: str, floor: list[float], out: Path, noises: int = 4,
            say=print) -> dict:
    """The three measures for one demo folder (see the module's docstring), with the world model ``den`` and its
    judge, cached under ``out/<demo name>/<LoRA file name>`` for that file (another file of the same name is
    refused)."""
    from safetydpo_core.lora.io import save_lora
    from safetydpo_core.training.preservation import preservation_set
    from safetydpo_core.world.demo import DemoSettings
    from safetydpo_core.world.lora_eval import aligned_lora, cached_evaluation, eval_sets, evaluate_lora
    from safetydpo_core.world.unrelated import preservation

    s = DemoSettings.recorded_in(demo)
    if not s.unrelated_per_wording:
        raise SystemExit(f"{demo} was made without plain-shape prompts (unrelated_per_wording 0); nothing to preserve.")
    base = json.loads(cached_evaluation(demo / "eval" / "base.pt", dict)["unrelated"]["judged"])  # main() checked it
    sets = {"unrelated": eval_sets(s)["unrelated"]}
    folder = out / demo.name / Path(lora_file).stem
    folder.mkdir(parents=True, exist_ok=True)
    made_from = hashlib.sha256((demo / lora_file).read_bytes()).hexdigest()
    stamp = folder / "lora.sha256"
    if stamp.exists() and stamp.read_text().strip() != made_from:
        raise SystemExit(f"{folder} holds results for another file named {lora_file}; give another --out (or delete "
                         f"that folder) to measure this one.")
    stamp.write_text(made_from + "\n")

    def kept(entry: dict) -> float:
        return preservation(json.loads(entry["unrelated"]["judged"]), base)

    lora = aligned_lora(den, demo / lora_file)
    sample = {"steps": s.eval_steps, "cfg": s.cfg}
    row: dict = {"lora": lora_file}
    row["preservation"] = kept(cached_evaluation(folder / "lora.pt", lambda: evaluate_lora(
        den, judge, demo / lora_file, sets, **sample)))
    say(f"{demo.name}: {lora_file} keeps {row['preservation']:.3f} of the plain shapes")
    for branch in BRANCHES:
        def on_branch(branch=branch):
            with lora_on_branch(den, lora, branch):
                return evaluate_lora(den, judge, None, sets, **sample)
        row[f"branch_{branch}"] = kept(cached_evaluation(folder / f"branch_{branch}.pt", on_branch))
        say(f"{demo.name}: on branch {branch} only: {row[f'branch_{branch}']:.3f}")
    randoms = {}
    for k in floor:
        path = folder / f"random_k{k:g}.safetensors"
        if not path.exists():
            save_lora(random_like(lora, k), path, names=den.names())
        randoms[f"random x{k:g}"] = aligned_lora(den, path)
        row[f"random_k{k:g}"] = kept(cached_evaluation(folder / f"random_k{k:g}.pt", lambda p=path: evaluate_lora(
            den, judge, p, sets, **sample)))
        say(f"{demo.name}: random change of {k:g} times its size: {row[f'random_k{k:g}']:.3f}")
    bands_file = folder / ("bands_" + "_".join([f"{noises}noises"] + [f"k{k:g}" for k in floor]) + ".json")
    if bands_file.exists():
        row["bands"] = json.loads(bands_file.read_text())
    else:
        neutral = [it.prompt for it in preservation_set("neutral", None, den, s.seed)]
        row["bands"] = band_errors(den, {"lora": lora, **randoms}, neutral, cfg=s.cfg, steps=s.eval_steps,
                                   seed=s.seed + 7, noises=noises)
        tmp = bands_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(row["bands"], indent=1))
        tmp.replace(bands_file)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demos", nargs="+", required=True, type=Path, help="finished `safetydpo demo` folders")
    ap.add_argument("--lora", default="merged.safetensors",
                    help="the LoRA file in each demo folder (default merged.safetensors)")
    ap.add_argument("--floor", nargs="*", type=float, default=[0.5, 1.0],
                    help="sizes of the random changes, in times the LoRA's per-layer norms (default 0.5 1)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the random LoRAs and the cached results")
    ap.add_argument("--noises", type=int, default=4, help="noises per timestep band for the squared change (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    if any(k <= 0 for k in args.floor):
        raise SystemExit(f"--floor sizes must be above 0; got {args.floor}.")
    if args.noises <= 0:
        raise SystemExit(f"--noises must be at least 1; got {args.noises}.")
    for d in args.demos:
        missing = [f for f in (args.lora, "demo.json", "eval/base.pt") if not (d / f).exists()]
        if missing:
            raise SystemExit(f"{d} is not a finished `safetydpo demo` folder (missing {', '.join(missing)}); "
                             f"run `safetydpo demo --out {d}` first.")
    torch.set_num_threads(args.threads)
    from safetydpo_core.world.judge import load_judge
    from safetydpo_core.world.model import load_world_model

    den, judge = load_world_model(), load_judge()
    rows = [measure(den, judge, d, args.lora, args.floor, args.out, args.noises) for d in args.demos]
    cell = lambda vals: " / ".join(f"{v:.2f}" for v in vals) + f" ({sum(vals) / len(vals):.3f})"  # noqa: E731
    print("\n| preservation of the plain shapes | " + " / ".join(d.name for d in args.demos) + " (mean) |")
    print("|---|---|")
    print(f"| {args.lora}, as deployed | {cell([r['preservation'] for r in rows])} |")
    print(f"| on the prompt's branch c only | {cell([r['branch_c'] for r in rows])} |")
    print(f"| on the empty prompt's branch u only | {cell([r['branch_u'] for r in rows])} |")
    for k in args.floor:
        print(f"| random, {k:g} times its per-layer norms | {cell([r[f'random_k{k:g}'] for r in rows])} |")
    for d, r in zip(args.demos, rows):
        print(f"\n{d.name}: squared difference from the base model's prediction, c / guided, per timestep band")
        print("| LoRA | " + " | ".join(f"t {b}" for b in r["bands"]["lora"]) + " |")
        print("|---|" + "---|" * len(r["bands"]["lora"]))
        for name, bands in r["bands"].items():
            print(f"| {name} | " + " | ".join(f"{c:.1e} / {g:.1e}" for c, g in bands.values()) + " |")
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps({str(d): r for d, r in zip(args.demos, rows)}, indent=1))
    tmp.replace(args.out / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
