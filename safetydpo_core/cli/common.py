"""Options and helpers shared by the sub-commands: model loading flags, checked numbers, config files,
progress bars, refusing to overwrite, outputs that are never inputs, output locks, and writing the resolved
configuration beside an output (only once the output itself is written)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, SafetyDPOError
from ..utils.atomic import atomic_write_text
from ..utils.numbers import check_number, describe_range

if TYPE_CHECKING:
    from ..denoiser.protocol import RenderingDenoiser

# options a --config file may not set: they are the user's own decision, typed on the command line
COMMAND_LINE_ONLY = {"allow_remote_endpoint"}
MAX_SIZE = 8192  # image side in pixels (as the ComfyUI nodes)


class number:
    """An argparse ``type`` that parses and checks a number with :func:`check_number` (finite, in range).

    ``apply_config_file`` runs the same :meth:`check` on values from a --config file, so NaN cannot come in
    that way either.
    """

    def __init__(self, lo=None, hi=None, *, integer: bool = False, lo_open: bool = False, hi_open: bool = False):
        self.kw = dict(lo=lo, hi=hi, integer=integer, lo_open=lo_open, hi_open=hi_open)
        self.__name__ = describe_range(lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open)

    def check(self, value, name: str = "the value"):
        return check_number(value, name, **self.kw)

    def __call__(self, text: str):
        try:
            return self.check(text, "")
        except ConfigError as e:  # argparse puts "argument --name: " in front
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    def __repr__(self) -> str:
        return self.__name__


def integer(lo=None, hi=None) -> number:
    return number(lo, hi, integer=True)


POSITIVE_INT = integer(1)
COUNT = integer(0)
SEED = integer(0, 2 ** 64 - 1)
IMAGE_SIZE = integer(8, MAX_SIZE)


WORLD_MODEL = "world"


def model_argument(value: str) -> str:
    """``--model``: a path as given, or ``world`` -> the folder of the built-in concept-world model."""
    if value.strip().lower() != WORLD_MODEL:
        return value
    from ..errors import ModelError
    from ..world.model import world_model_path

    try:
        return str(world_model_path())
    except ModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=WORLD_MODEL, type=model_argument, metavar="MODEL",
                   help="a local diffusers pipeline folder (SD1.x/2.x, SDXL, SD3/SD3.5 or Flux.1), a single-file "
                        "SD1.5/SDXL .safetensors checkpoint, or 'world' (default): the built-in concept-world model "
                        "that `safetydpo demo` aligns")
    p.add_argument("--model-config", default=None, metavar="DIR",
                   help="for a single-file checkpoint: a diffusers folder with its configs and tokenizer(s) "
                        "(default: the shipped SD1.5/SDXL configs and a CLIP tokenizer found on this machine)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weight dtype of the frozen model (auto: fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--guidance", type=float, default=None,
                   help="distilled guidance of guidance-distilled models (Flux.1-dev; default 3.5); an error for "
                        "models without a guidance input")


def load_denoiser(args: argparse.Namespace) -> RenderingDenoiser:
    from ..denoiser.devices import resolve_device, resolve_dtype
    from ..denoiser.diffusers_backend import DiffusersDenoiser

    device = resolve_device(args.device)
    return DiffusersDenoiser.from_pretrained(args.model, device=device, dtype=resolve_dtype(args.dtype, device),
                                             config=getattr(args, "model_config", None),
                                             guidance=getattr(args, "guidance", None))


def default_cfg(args: argparse.Namespace, denoiser: RenderingDenoiser) -> float:
    """``--cfg`` as given, else the model's usual guidance scale (7.5 for UNets, 4.5 SD3, 1.0 Flux.1-dev)."""
    cfg = getattr(args, "cfg", None)
    return float(cfg) if cfg is not None else float(denoiser.default_cfg)


def read_config_file(path: str | None) -> dict[str, Any]:
    """Settings from a TOML, YAML or JSON file (keys as the long option names, with - or _)."""
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"The config file {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"The config file {p} must end in .toml, .yaml, .yml or .json.")
    except (ValueError, ImportError) as e:
        raise ConfigError(f"The config file {p} cannot be parsed: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"The config file {p} must hold a table of settings.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv_flags: set[str]) -> None:
    """Fill ``args`` from ``--config``; flags given on the command line win."""
    data = read_config_file(getattr(args, "config", None))
    actions = {a.dest: a for a in parser._actions}
    for k, v in data.items():
        if k not in actions:
            raise ConfigError(f"Unknown setting {k!r} in {args.config}; settings are the long option names of "
                              f"`safetydpo {args.command} --help`.")
        if k in COMMAND_LINE_ONLY:
            raise ConfigError(f"{args.config} sets {k!r}, which may only be given on the command line "
                              f"(--{k.replace('_', '-')}), so that a shared config file cannot switch it on.")
        if k in argv_flags:
            continue
        check = getattr(actions[k].type, "check", None)
        if check is not None and v is not None:
            try:
                v = [check(x, k) for x in v] if isinstance(v, list) else check(v, k)
            except ConfigError as e:
                raise ConfigError(f"{args.config}: {e}") from None
        setattr(args, k, v)


def given_flags(argv: list[str] | None = None) -> set[str]:
    """Option names given on the command line (``main`` keeps its argv, so in-process calls work too)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def refuse_existing(path: Path, overwrite: bool, what: str = "output", hint: str = "--overwrite") -> None:
    if path.exists() and not overwrite:
        raise SafetyDPOError(f"The {what} {path} already exists. Pass {hint} to replace it, or choose another path.")


def config_path(target: Path) -> Path:
    """Where :func:`write_resolved_config` writes: ``<out>.config.json`` or ``<folder>/config.json``."""
    target = Path(target)
    if target.suffix == "" or target.is_dir():
        return target / "config.json"
    return target.with_suffix(".config.json")


def write_resolved_config(target: Path, settings: dict[str, Any]) -> Path:
    """``<out>.config.json`` beside an output file, or ``config.json`` inside an output folder. Commands call
    it only after their output is written, so a refused or failed run leaves no (or the old) configuration."""
    out = config_path(target)
    if out.name == "config.json":
        Path(target).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(settings, indent=1, default=str) + "\n", "configuration file")
    return out


def refuse_overlaps(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """No output of a command may be one of its inputs (see :mod:`safetydpo_core.utils.outputs`)."""
    from ..utils.outputs import refuse_overlaps as check

    check(outputs, inputs)


def output_lock(*outputs, what: str = "output"):
    """Hold ``<output>.lock`` for each output while the command writes (see :mod:`safetydpo_core.utils.lock`)."""
    from ..utils.lock import output_lock as lock

    return lock(*outputs, what=what)


class Progress:
    """A tqdm bar fed by (done, total, info) callbacks."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, done: int, total: int, info: dict | None = None) -> None:
        self.bar.total = total
        self.bar.n = done
        if info:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
