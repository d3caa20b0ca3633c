"""``safetydpo attack``: red-team a model (with its safety LoRAs) with an adversarial attack and measure the attack
success rate (ASR) per category, beside the un-attacked rate.

Examples::

    safetydpo attack --lora demo-out/merged.safetensors --attack wording --prompts pairs.jsonl --out attacks/wording
    safetydpo attack --model ./sd15 --lora merged.safetensors --attack unlearndiff --prompts pairs.jsonl \\
        --out attacks/uda --budget 4 --steps 40 --seed 0

Under ``accelerate launch`` the prompts' chunks are shared out over the processes (see
:mod:`safetydpo_core.scaleout`); the files are those one process writes.

Writes ``adversarial.jsonl`` (the adversarial text prompts as prompt pairs, which ``safetydpo sample --prompts``
reads), ``attack.json``, ``records.jsonl``, ``images/`` and ``report.md`` to ``--out``. The same command again
resumes an interrupted run; a folder holding a run with other settings is refused unless ``--overwrite``.
See :mod:`safetydpo_core.attacks`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraError, SafetyDPOError
from .common import (IMAGE_SIZE, POSITIVE_INT, SEED, Progress, add_model_args, apply_config_file,
                     given_flags, integer, load_denoiser, number, output_lock, refuse_overlaps, write_resolved_config)

if TYPE_CHECKING:
    from ..denoiser.protocol import Denoiser

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..attacks.oracles import ORACLES
    from ..attacks.runner import ATTACK_NAMES

    p = sub.add_parser("attack", help="red-team a model with an adversarial attack and report the attack success rate",
                       description="Attack the model (with its LoRAs) on unsafe prompts and measure the attack success "
                                   "rate (ASR): the share of prompts whose adversarial picture is judged unsafe "
                                   "(the world judge on the built-in world; NudeNet and Q16 for real models), per "
                                   "category, beside the un-attacked rate. Attacks: wording (synonyms, paraphrase, "
                                   "character noise, dilution), ring-a-bell (concept vector, soft and hard), "
                                   "unlearndiff (UnlearnDiffAtk, white-box) and inversion (concept inversion, "
                                   "white-box). Run the same command again to resume.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--lora", action="append", default=[], metavar="L",
                   help="a LoRA file applied at strength 1 (the aligned model); repeat for several")
    p.add_argument("--attack", required=True, choices=list(ATTACK_NAMES), help="the attack")
    p.add_argument("--prompts", required=True, metavar="P.jsonl",
                   help="prompt pairs (the unsafe prompt is attacked) or lines with id, category, concept and prompt")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help="target-model queries per prompt (pictures made and judged); default: the attack's, e.g. 8 "
                        "for wording on the world, 4 for the others")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimisation steps (ring-a-bell: genetic generations; unlearndiff, inversion: gradient steps)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of everything random (default 0)")
    p.add_argument("--config", help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    p.add_argument("--judge", default="auto", choices=list(ORACLES),
                   help="success oracle: auto (default: the world judge on the world, else NudeNet+Q16), world, "
                        "nudenet-q16 or none (no ASR; attacks run their whole budget)")
    p.add_argument("--nudenet-setting", default="i2p", choices=["i2p", "safetydpo"],
                   help="NudeNet rule for the nudenet-q16 judge (default i2p)")
    p.add_argument("--weights-dir", default=None, help="evaluation weights folder (NudeNet 640m, Q16, CLIP)")
    p.add_argument("--categories", help="only prompts of these categories (comma-separated)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="at most this many prompts per category")
    p.add_argument("--sample-steps", type=integer(1, 10000), default=None,
                   help="sampling steps of each query's picture (default 20)")
    p.add_argument("--cfg", type=number(0, 100), default=None, help="guidance scale (default 3 on the world, else 7.5)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "dpmpp_2m"])
    p.add_argument("--size", type=IMAGE_SIZE, default=None, help="picture side in pixels (default: the model's)")
    p.add_argument("--negative", default="", help="negative prompt (default empty)")
    p.add_argument("--batch-size", type=integer(1, 1024), default=None, help="pictures rendered together (default 64 on the world, else 4)")
    p.add_argument("--lora-start", type=integer(0, 10000), default=0, metavar="N",
                   help="judge pictures sampled with the LoRAs switched on only after the first N steps, as "
                        "`safetydpo sample --lora-start N` makes them (default 0: every step); the white-box attacks "
                        "still optimise against the LoRAs at every step")
    p.add_argument("--eta", type=number(0, 1000), default=None, help="ring-a-bell: strength of the concept vector (default 3)")
    p.add_argument("--tokens", type=POSITIVE_INT, default=None,
                   help="ring-a-bell: tokens of the hard prompt (16); unlearndiff: prepended tokens (3 world, 5 else)")
    p.add_argument("--population", type=integer(2, 100000), default=None, help="ring-a-bell: genetic population (64 world, 200 else)")
    p.add_argument("--lr", type=number(0, 1000), default=None,
                   help="unlearndiff / inversion: learning rate, relative to the vocabulary's embedding scale")
    p.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --out")
    p.set_defaults(func=run, _parser=p)


def _load_loras(den: Denoiser, files: list[str]) -> tuple[list, list[dict]]:
    from ..lora.io import load_lora
    from ..merge.experts import align_experts
    from ..sampling import _lora_fingerprint

    loras, info = [], []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise LoraError(f"--lora {path} does not exist.")
        try:
            lora = load_lora(path, names=den.names())
            lora = align_experts([lora], naming=den.naming, names=den.names(), weight_shapes=den.weight_shapes())[0]
        except SafetyDPOError as e:
            raise LoraError(f"--lora {path} does not fit this model ({den.base_model_version}): {e}") from e
        loras.append(lora)
        info.append({"file": str(path), "fingerprint": _lora_fingerprint(lora)})
    return loras, info


def run(args: argparse.Namespace) -> int:
    import contextlib

    from ..attacks.base import Sampling, read_attack_prompts
    from ..attacks.oracles import is_world, make_oracle
    from ..attacks.runner import AttackSettings, run_attack
    from ..lora.apply import lora_applied, lora_withheld_until

    apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)))
    from ..errors import ConfigError

    if args.budget is not None and args.budget <= 0:
        raise ConfigError(f"--budget must be a positive number of queries per prompt; got {args.budget}.")
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps must be positive; got {args.steps}.")
    out = Path(args.out)
    refuse_overlaps({"--out": out},  # the folder holds every output, config.json too
                    {"--prompts": args.prompts, "--lora": args.lora, "--model": args.model,
                     "--model-config": getattr(args, "model_config", None), "--config": getattr(args, "config", None),
                     "--weights-dir": args.weights_dir})
    prompts = read_attack_prompts(args.prompts, categories=args.categories, limit=args.limit)
    from ..scaleout_commands import open_split

    # under `accelerate launch` each process attacks its share of the prompt chunks; None: one process
    split = open_split(args, "attack", out, [p.id for p in prompts], resume=True)
    options = {k: getattr(args, k) for k in ("eta", "tokens", "population", "lr") if getattr(args, k) is not None}
    # settings are checked before the model loads
    probe = AttackSettings(args.attack, queries=args.budget, steps=args.steps, seed=args.seed, options=options,
                           sampling=Sampling(steps=args.sample_steps or 20, lora_start=args.lora_start))
    if args.lora_start and not args.lora:
        raise ConfigError(f"--lora-start {args.lora_start} switches the LoRA on after the first steps, but no --lora "
                          f"was given; add the aligned model's --lora, or leave --lora-start out.")
    den = load_denoiser(args)
    world = is_world(den)
    sampling = Sampling(steps=args.sample_steps or 20, cfg=args.cfg if args.cfg is not None else (3.0 if world else 7.5),
                        sampler=args.sampler, height=args.size, width=args.size, negative=args.negative,
                        batch_size=args.batch_size or (64 if world else 4), lora_start=args.lora_start)
    settings = AttackSettings(probe.attack, queries=probe.queries, steps=probe.steps, seed=probe.seed,
                              sampling=sampling, options=options)
    loras, lora_info = _load_loras(den, args.lora)
    oracle = make_oracle(args.judge, den, setting=args.nudenet_setting, weights_dir=args.weights_dir)
    bar = Progress(len(prompts), f"attack {args.attack}")
    applied = [(l, 1.0) for l in loras]
    try:
        # the lock (<out>.lock beside the folder) keeps a second run off this folder while this one writes
        with output_lock(*((out,) if split is None or split.is_main else ()), what="attack run"):
            result = run_attack(den, prompts, settings, oracle=oracle, out=out, overwrite=args.overwrite,
                                attacked=(lambda: lora_applied(den.module, applied)) if applied else None,
                                base=lambda: contextlib.nullcontext(den),
                                lora_switch=(lambda: lora_withheld_until(den.module, applied, args.lora_start))
                                if applied else None,
                                model={"path": str(args.model), "loras": lora_info}, world=world,
                                log=lambda m: print(m, file=sys.stderr, flush=True),
                                progress=lambda d, n, i: bar(round(d, 2), n, i), split=split)
            if result is None:  # not the main process of a split run: the main process joined the parts
                return 0
            write_resolved_config(out, {"command": "attack", "model": str(args.model), "loras": args.lora,
                                        "prompts": str(args.prompts), "judge": args.judge, **settings.to_json(),
                                        "budget": {"queries": result.budget.queries, "steps": result.budget.steps}})
    except KeyboardInterrupt:
        log.warning("Stopped. Run the same command again to resume; finished prompts are kept.")
        raise
    finally:
        bar.close()
    print(json.dumps({"attack": result.attack, "oracle": result.oracle,
                      "budget": {"queries": result.budget.queries, "steps": result.budget.steps},
                      "asr": {v: s["asr"] for v, s in result.summary.items()},
                      "no_attack": {v: s["no_attack"] for v, s in result.summary.items()},
                      "report": str(out / "report.md"), "adversarial_prompts": str(out / "adversarial.jsonl")},
                     indent=1))
    return 0
