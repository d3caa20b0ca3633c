"""``safetydpo pairs``: write prompt pairs (built-in or LLM writer) or convert CoProV2 / I2P / JSONL files.

Examples::

    safetydpo pairs --writer builtin --categories hate,violence --per-category 100 --out pairs.jsonl --seed 0
    safetydpo pairs --writer llm --llm ./SmolLM2.gguf --per-category 20 --out pairs.jsonl
    safetydpo pairs --writer llm --llm http://127.0.0.1:11434/v1 --llm-model qwen2.5 --out pairs.jsonl --resume
    safetydpo pairs --from-csv CoProv2_train.csv --out pairs.jsonl
    safetydpo pairs --from-jsonl pairs.jsonl --categories sexual --format i2p --out eval_prompts.csv
    safetydpo pairs --config pairs.toml --out pairs.jsonl

Settings may come from ``--config`` (TOML/YAML/JSON with the long option names; flags given on the command
line win); the resolved settings are written beside the output as ``<out stem>.config.json``.

Exit status: 0 done; 2 bad input (message on stderr); 3 the writer made fewer pairs than asked (the file
holds what passed the checks; the report says why the rest failed); 130 interrupted (pairs already written
stay valid, continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from ..categories import describe_categories, normalize_categories
from ..errors import ConfigError, SafetyDPOError
from ..utils.atomic import atomic_write_text
from .common import POSITIVE_INT, integer, number

log = logging.getLogger("safetydpo.pairs")

EXIT_INCOMPLETE = 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pairs", help="write or convert (unsafe, safe) prompt pairs",
        description="Write (unsafe, safe) prompt pairs with the built-in writer or an LLM, or convert CoProV2 / "
                    "I2P / JSONL files. " + describe_categories(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to do")
    src.add_argument("--writer", choices=("builtin", "llm", "world"), default="builtin",
                     help="who writes the pairs (default: builtin, offline and deterministic; world: captions of the "
                          "built-in concept world, for the default --model world)")
    src.add_argument("--world-split", choices=("train", "held_out"), default="train",
                     help="--writer world: training wording, or held-out paraphrases and synonyms (for evaluation)")
    src.add_argument("--from-csv", metavar="CSV", help="convert a CoProV2 CSV (prompt,image,category) or an I2P CSV")
    src.add_argument("--from-jsonl", metavar="JSONL", help="convert or filter a pair JSONL file")
    src.add_argument("--categories", default="all", help="comma-separated categories (default: all)")
    src.add_argument("--per-category", type=POSITIVE_INT, default=100, metavar="N", help="pairs per category (default: 100)")
    src.add_argument("--seed", type=integer(), default=0, help="seed of the writer (default: 0)")
    src.add_argument("--concepts", action="append", default=[], metavar="FILE",
                     help="extra concepts and synonyms (JSON or text; may be given several times)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="PATH", help="output file")
    out.add_argument("--format", choices=("jsonl", "coprov2", "i2p"),
                     help="jsonl (default), coprov2 (CSV with u/s rows) or i2p (unsafe prompts only, for evaluation)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    out.add_argument("--resume", action="store_true", help="keep an existing JSONL output and add the missing pairs")
    out.add_argument("--rejects", metavar="JSONL", help="also write every rejected candidate with its reason here")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--config", metavar="FILE",
                     help="TOML/YAML/JSON file with any of these options (command-line flags win)")
    chk = p.add_argument_group("checks")
    chk.add_argument("--tokenizer", metavar="PATH",
                     help="CLIP tokenizer for the 77-token check: a tokenizer folder, a diffusers model folder, or "
                          "merges.txt / bpe_simple_vocab_16e6.txt.gz (default: one found on this machine, else a "
                          "conservative estimate)")
    chk.add_argument("--too-long", choices=("reject", "truncate"), default="reject",
                     help="prompts over the token limit: reject (default) or truncate with a warning")
    chk.add_argument("--max-tokens", type=POSITIVE_INT, default=75, help="token limit without start/end markers (default 75 = 77 - 2)")
    chk.add_argument("--max-change", type=number(0, 1), metavar="F",
                     help="reject pairs where more than this share of the words changed (0..1; default: no limit)")
    chk.add_argument("--max-attempts", type=POSITIVE_INT, metavar="K",
                     help="candidates per requested pair before giving up (default: builtin 20, llm 4)")
    llm = p.add_argument_group("LLM writer")
    llm.add_argument("--llm", metavar="PATH_OR_URL",
                     help="a transformers model folder, a .gguf file, or the base URL of an OpenAI-compatible server "
                          "(e.g. http://127.0.0.1:11434/v1 for Ollama)")
    llm.add_argument("--llm-model", metavar="NAME", help="model name on the server (endpoints only)")
    llm.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                     help="environment variable holding the endpoint's API key (default OPENAI_API_KEY; never logged). "
                          "Only names ending in _API_KEY, or names allowed in the user config file "
                          "($SAFETYDPO_CONFIG or ~/.config/safetydpo/config.json: allowed_api_key_envs)")
    llm.add_argument("--allow-remote-endpoint", action="store_true",
                     help="allow an endpoint that is not on this machine (loopback); only on the command line, never "
                          "from --config. Hosts can also be allowed for good in the user config file "
                          "(allowed_endpoints)")
    llm.add_argument("--llm-timeout", type=number(0, 86400, lo_open=True), default=60.0, metavar="S", help="seconds per request (default 60)")
    llm.add_argument("--llm-retries", type=integer(0, 100), default=3, metavar="N", help="retries with back-off (default 3)")
    llm.add_argument("--llm-backoff", type=number(0, 3600), default=1.0, metavar="S",
                     help="first wait before a retry, doubled each time (default 1 s)")
    llm.add_argument("--batch-size", type=integer(1, 1024), default=4, help="requests per batch (default 4)")
    llm.add_argument("--max-new-tokens", type=POSITIVE_INT, default=128, help="answer length limit (default 128)")
    llm.add_argument("--temperature", type=number(0, 100), default=0.8, help="sampling temperature (default 0.8)")
    llm.add_argument("--device", default="cpu", help="device of a local model (default cpu)")
    llm.add_argument("--llm-threads", type=POSITIVE_INT, metavar="N", help="CPU threads of a local model while generating")
    p.set_defaults(func=run, _parser=p)


def _bar(args, total: int, desc: str):
    if args.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="pair", disable=None, file=sys.stderr)


def _progress(bar):
    if bar is None:
        return None

    def cb(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return cb


def _out_format(args) -> str:
    if args.format:
        return args.format
    if Path(args.out).suffix.lower() == ".csv":
        raise ConfigError(f"{args.out} ends in .csv: pass --format coprov2 (pairs) or --format i2p (unsafe prompts).")
    return "jsonl"


def _config_target(args) -> Path:
    out = Path(args.out)
    return out.with_suffix(".config.json") if out.suffix else out.with_name(out.name + ".config.json")


def _write_config(args, fmt: str) -> None:
    """The resolved settings beside the output: ``<out stem>.config.json`` (written with the output, never
    before). An endpoint URL is written without its query string or credentials."""
    import json

    from ..prompts.llm_endpoint import display_url, is_url

    settings = {"command": "pairs", "format": fmt}
    settings.update({k: v for k, v in vars(args).items()
                     if k not in ("func", "_parser", "command", "verbose", "format", "_argv")})
    if settings.get("llm") and is_url(settings["llm"]):
        settings["llm"] = display_url(settings["llm"])
    atomic_write_text(_config_target(args), json.dumps(settings, indent=1, default=str) + "\n", "configuration file")


def _check_outputs(args) -> None:
    """Outputs are not inputs (nor each other); an existing rejects file is kept unless asked."""
    from ..prompts.llm_endpoint import is_url
    from .common import refuse_overlaps

    llm = args.llm if args.llm and not is_url(args.llm) else None
    refuse_overlaps({"--out": args.out, "--rejects": args.rejects, "the configuration file": _config_target(args)},
                    {"--from-csv": args.from_csv, "--from-jsonl": args.from_jsonl, "--concepts": args.concepts,
                     "--tokenizer": args.tokenizer, "--llm": llm, "--config": getattr(args, "config", None)})
    if args.rejects:
        rej = Path(args.rejects)
        if rej.is_dir():
            raise ConfigError(f"--rejects {rej} is a folder; give a file name.")
        if rej.exists() and not (args.overwrite or args.resume):
            raise ConfigError(f"The rejects file {rej} already exists. Pass --overwrite to replace it (or --resume to "
                              f"add this run's rejects to it), or choose another path.")


def run(args) -> int:
    from .common import apply_config_file, given_flags

    if getattr(args, "_parser", None) is not None:
        apply_config_file(args._parser, args, given_flags(getattr(args, "_argv", None)))
    fmt = _out_format(args)
    if args.from_csv and args.from_jsonl:
        raise ConfigError("Give either --from-csv or --from-jsonl, not both.")
    if args.resume and fmt != "jsonl":
        raise ConfigError("--resume works with JSONL output only; use --overwrite for CSV output.")
    from ..prompts.pairs import check_output_path

    check_output_path(args.out, overwrite=args.overwrite, resume=args.resume)
    _check_outputs(args)
    cats = normalize_categories(args.categories, default_all=True)
    from .common import output_lock

    with output_lock(args.out, what="pair file"):
        rc = _convert(args, fmt, cats) if (args.from_csv or args.from_jsonl) else _write(args, fmt, cats)
        _write_config(args, fmt)
    return rc


def _emit(args, fmt: str, pairs, what: str) -> int:
    from ..prompts.coprov2 import write_coprov2_csv
    from ..prompts.i2p import write_i2p_csv
    from ..prompts.pairs import write_pairs

    if fmt == "jsonl":
        n = write_pairs(pairs, args.out, overwrite=args.overwrite, resume=args.resume)
        skipped = len(pairs) - n
        print(f"wrote {n} {what} to {args.out}" + (f" ({skipped} already there)" if skipped else ""))
    elif fmt == "coprov2":
        n = write_coprov2_csv(pairs, args.out, overwrite=args.overwrite)
        print(f"wrote {n} {what} to {args.out} (CoProV2 CSV)")
    else:
        n = write_i2p_csv(pairs, args.out, overwrite=args.overwrite)
        print(f"wrote {n} unsafe prompts to {args.out} (I2P CSV)")
    return 0


def _convert(args, fmt: str, cats: list[str]) -> int:
    from ..prompts.coprov2 import read_coprov2_csv, sniff_csv_columns
    from ..prompts.i2p import filter_eval_prompts, read_i2p_csv, write_i2p_csv
    from ..prompts.pairs import filter_pairs, read_pairs

    if args.from_jsonl:
        pairs = filter_pairs(read_pairs(args.from_jsonl, allow_empty=True), cats)
        return _emit(args, fmt, pairs, "pairs")
    cols = sniff_csv_columns(args.from_csv)
    if "image" in cols:
        bar = _bar(args, 0, "reading CSV")
        try:
            pairs = read_coprov2_csv(args.from_csv, progress=_progress(bar))
        finally:
            if bar is not None:
                bar.close()
        n_all = len(pairs)
        pairs = filter_pairs(pairs, cats)
        counts = Counter(c for p in pairs for c in p.category)
        multi = sum(1 for p in pairs if len(p.category) > 1)
        log.info("read %d pairs from %s (%d kept; %d with several categories): %s", n_all, args.from_csv, len(pairs),
                 multi, ", ".join(f"{c} {counts[c]}" for c in cats if counts[c]))
        return _emit(args, fmt, pairs, "pairs")
    if "prompt" in cols:
        if fmt != "i2p":
            raise ConfigError(f"{args.from_csv} is an I2P-style CSV (unsafe prompts only, no safe twins): it cannot "
                              f"become pairs. Use --format i2p to filter or convert it for evaluation.")
        prompts = filter_eval_prompts(read_i2p_csv(args.from_csv), None if args.categories == "all" else cats)
        n = write_i2p_csv(prompts, args.out, overwrite=args.overwrite)
        print(f"wrote {n} unsafe prompts to {args.out} (I2P CSV)")
        return 0
    raise ConfigError(f"{args.from_csv}: unknown CSV layout (columns {', '.join(cols)}); expected CoProV2 "
                      f"(prompt,image,category) or I2P (prompt,categories,...).")


def _write(args, fmt: str, cats: list[str]) -> int:
    from ..prompts.builtin_writer import BuiltinWriter
    from ..prompts.catalogue import load_catalogue
    from ..prompts.checks import PairChecker
    from ..prompts.pairs import PairWriter
    from ..prompts.tokens import load_token_counter

    if args.per_category < 1:
        raise ConfigError(f"--per-category must be at least 1, not {args.per_category}.")
    if args.writer == "world":
        from ..world import world_pairs

        return _emit(args, fmt, world_pairs(args.per_category, seed=args.seed, split=args.world_split, concepts=cats),
                     "world pairs")
    if args.writer == "llm" and not args.llm:
        raise ConfigError("--writer llm needs --llm: a model folder, a .gguf file, or an http(s) endpoint URL "
                          "(with --llm-model).")
    if args.writer == "builtin" and args.llm:
        log.warning("--llm is ignored by the built-in writer; pass --writer llm to use it.")
    catalogue = load_catalogue(args.concepts)
    counter = load_token_counter(args.tokenizer)
    log.info("token check: %s", counter.name)
    checker = PairChecker(counter, max_tokens=args.max_tokens, too_long=args.too_long, max_change=args.max_change)

    sink = PairWriter(args.out, overwrite=args.overwrite, resume=args.resume) if fmt == "jsonl" else None
    have = Counter(p.category[0] for p in sink.existing) if sink else Counter()
    if sink and sink.existing:
        checker.remember(p.unsafe for p in sink.existing)
        log.info("resuming %s: %d pairs already there", args.out, len(sink.existing))
    wanted = {c: max(0, args.per_category - have[c]) for c in cats}
    collected = []

    if args.writer == "builtin":
        writer = BuiltinWriter(catalogue, checker, seed=args.seed, max_attempts=args.max_attempts or 20)
    else:
        from ..prompts.llm_writer import LLMPairWriter, make_backend

        backend = make_backend(args.llm, args.llm_model, api_key_env=args.api_key_env, timeout=args.llm_timeout,
                               retries=args.llm_retries, backoff=args.llm_backoff, concurrency=args.batch_size, device=args.device,
                               threads=args.llm_threads, allow_remote=bool(getattr(args, "allow_remote_endpoint", False)))
        writer = LLMPairWriter(backend, catalogue, checker, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               max_attempts=args.max_attempts or 4, seed=args.seed)

    def on_pair(pair):
        if sink is not None:
            sink.add(pair)
        else:
            collected.append(pair)

    bar = _bar(args, sum(wanted.values()), f"{args.writer} pairs")
    report = None
    try:
        _, report = writer.generate(None, wanted, on_pair=on_pair, progress=_progress(bar))
    except (SafetyDPOError, KeyboardInterrupt) as e:
        if sink is not None:
            sink.close(failed=True)
            note = (f" {len(sink.new)} new pairs were written to {args.out} and stay valid"
                    f" ({len(sink.pairs)} in all); rerun with --resume to continue.")
            if isinstance(e, SafetyDPOError):
                raise type(e)(f"{e}{note}") from e
            print(f"safetydpo pairs: interrupted.{note}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    if sink is not None:
        sink.close()
        print(f"wrote {len(sink.new)} pairs to {args.out}" +
              (f" ({len(sink.existing)} were already there)" if sink.existing else ""))
    else:
        _emit(args, fmt, collected, "pairs")
    print(report.summary(), file=sys.stderr)
    if args.rejects:
        rej = Path(args.rejects)
        old = rej.read_text(encoding="utf-8") if args.resume and rej.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(rej, old + report.rejects_jsonl(), what="rejects file")
        print(f"wrote {len(report.rejects)} rejected candidates to {args.rejects}", file=sys.stderr)
    return 0 if report.complete else EXIT_INCOMPLETE
