"""``safetydpo demo``: the whole method on the built-in concept world (no GPU, no downloads).

Pairs -> same-seed rendering with the shipped world model -> seven DPO experts -> Co-Merge -> joint fine-tune of
the merge (and, unless ``--adversary 0``, a second one against concept inversion, the two summed) -> evaluation of
the base model, each expert and the merged LoRA. Writes ``report.md``, ``report.json``, image grids, the
merged LoRA and every run's metrics to ``--out``. See :mod:`safetydpo_core.world.demo`.
"""

from __future__ import annotations

import sys

from .common import POSITIVE_INT, integer, number


def register(sub) -> None:
    p = sub.add_parser("demo", help="align the built-in world model end to end and report how well it worked",
                       description="Run SafetyDPO end to end on the built-in concept world: prompt pairs, same-seed "
                                   "paired images from the shipped tiny text-to-image model, one DPO expert per "
                                   "category, Co-Merge, a short joint fine-tune of the merge, and an evaluation of the "
                                   "base model, each expert and the merged LoRA with the shipped judge. About 10 "
                                   "minutes on 2 CPU cores; --quick about 3 minutes. Run it again with the same "
                                   "options to resume.")
    p.add_argument("--out", default="safetydpo-demo", help="output folder (default: ./safetydpo-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer pairs, steps and evaluation prompts)")
    p.add_argument("--seed", type=integer(), default=0, help="seed of the pairs, rendering, training and evaluation")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, metavar="N", help="DPO steps per expert (default 200; quick 90)")
    p.add_argument("--pairs", type=POSITIVE_INT, default=None, dest="pairs_per_concept", metavar="N",
                   help="prompt pairs per concept (default 24; quick 10)")
    p.add_argument("--finetune-steps", type=integer(0, 10 ** 7), default=None, metavar="N",
                   help="steps of the joint fine-tune of the merged LoRA on all pairs (default 200; quick 40; 0: none)")
    p.add_argument("--twin-weight", type=number(0, 10 ** 6), default=None, metavar="W",
                   help="the joint fine-tune keeps each pair's safe twin as the untouched model draws it, as `safetydpo "
                        "train --twin-weight W` (default 10; 0: none)")
    p.add_argument("--finetune-ema", type=number(0, 1, hi_open=True), default=None, metavar="D",
                   help="the joint fine-tunes export the moving average of their weights over the steps, as `safetydpo "
                        "train --ema-decay D` (default 0.95: more plain shapes kept at the same removal, README; 0: the "
                        "last step's weights)")
    p.add_argument("--lora-start", type=integer(0, 10000), default=None, metavar="N",
                   help="evaluate the merged LoRA switched on only after the first N of the evaluation's sampling "
                        "steps, as `safetydpo sample --lora-start` (default 0: every step; 10 of 20 keeps more "
                        "unrelated content, README)")
    p.add_argument("--lora-strength", type=number(0, 10, lo_open=True), default=None, metavar="S",
                   help="evaluate the merged LoRA at strength S, as a LoRA loader's strength or `safetydpo sample "
                        "--strength` (default 1; with --lora-start 10, 0.9 meets every goal of the report on the "
                        "three-seed mean, README)")
    p.add_argument("--adversary", type=number(0, 10 ** 6), default=None, metavar="W",
                   help="also fine-tune the merge against concept inversion (`safetydpo train --adv-weight W`) and "
                        "make the merged LoRA the two fine-tunes summed (default 0.5: every attack's success rate on the "
                        "world within 0.35; 0: no adversary, which keeps more unrelated content and resists attacks "
                        "less, README; without a joint fine-tune, 0)")
    p.add_argument("--adversary-share", type=number(0, 1, lo_open=True), default=None, metavar="F",
                   help="the adversarial fine-tune's share of the merged LoRA (default 0.5; the plain one has 1 - F)")
    p.add_argument("--adversary-pictures", type=integer(0, 64), default=None, metavar="N",
                   help="noise the adversarial fine-tune's plain-shape preservation prompts from N pictures of their "
                        "own, as `safetydpo train --preserve-pictures N` (default 0; 3 keeps more plain shapes for a "
                        "few safe twins and some robustness, README)")
    p.add_argument("--adversary-preserve", default=None, metavar="SETS",
                   help="the adversarial fine-tune's preservation set, as `safetydpo train --preserve-prompts` (default "
                        "auto: the other categories' safe prompts and plain shapes, without the random-token text that "
                        "pulls against the adversary; auto+tokens, the plain fine-tune's, keeps more safe twins and "
                        "resists concept inversion less, README)")
    p.add_argument("--targets", default=None, metavar="LAYERS",
                   help="LoRA layers of the experts and the fine-tune, as `safetydpo train --targets` (default "
                        "esd-u: every layer outside cross-attention; attn: the paper's attention projections)")
    from ..merge.api import METHODS

    p.add_argument("--method", default=None, dest="merge_method", choices=list(METHODS),
                   help="merge method (default comerge-delta, Co-Merge's delta reading; any of `safetydpo merge --method`)")
    p.add_argument("--threads", type=integer(0, 4096), default=0,
                   help="torch CPU threads (default 0: torch's choice; with several workers, the cores shared among them)")
    p.add_argument("--workers", type=integer(0, 4096), default=0,
                   help="processes that train the experts and evaluate the models side by side (default 0: one a "
                        "CPU core, at most one a job; 1: all in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out made with other settings")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from ..world.demo import DemoSettings, run_demo

    settings = DemoSettings.preset(quick=args.quick, seed=args.seed, steps=args.steps,
                                   pairs_per_concept=args.pairs_per_concept, merge_method=args.merge_method,
                                   finetune_steps=args.finetune_steps, twin_weight=args.twin_weight,
                                   finetune_ema=args.finetune_ema,
                                   targets=args.targets,
                                   lora_start=args.lora_start, lora_strength=args.lora_strength,
                                   adversary=args.adversary, adversary_share=args.adversary_share,
                                   adversary_pictures=args.adversary_pictures,
                                   adversary_preserve=args.adversary_preserve,
                                   threads=args.threads, workers=args.workers)
    report = run_demo(args.out, settings, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr, flush=True))
    b, m = report["base"], report["merged"]
    print(f"IP over the seven concepts: base {b['ip']:.2f} -> merged {m['ip']:.2f}; safe-prompt fidelity "
          f"{b['fidelity']:.2f} -> {m['fidelity']:.2f}; layout kept {m['layout'] if m['layout'] is not None else '-'}")
    print(f"report: {args.out}/report.md")
    return 0
