"""Entry point of the ``safetydpo`` command: parses arguments and dispatches to the sub-command modules.

Each sub-command lives in ``safetydpo_core/cli/<name>.py`` (``safetydpo workflow``: in the ComfyUI tooling
package, ``safetydpo_workflows/cli.py``) and exposes ``register(subparsers)``; :data:`COMMANDS` names them.
Errors a user can fix (:class:`~safetydpo_core.errors.SafetyDPOError`) are printed without a traceback and
exit with status 2; Ctrl-C exits with 130 after the command has saved what it can.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import SafetyDPOError

# sub-command -> the module whose ``register(subparsers)`` adds it: this package's own modules (".name"), and the
# ComfyUI workflow tooling, which lives outside the neutral core (safetydpo_workflows) and is imported only here
COMMANDS = {name: f".{name}" for name in ("pairs", "render", "dataset", "train", "erase", "merge", "sample", "eval",
                                          "attack", "demo")} | {"workflow": "safetydpo_workflows.cli"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safetydpo",
        description="Safety-align text-to-image models with SafetyDPO: prompt pairs, paired datasets, "
                    "DPO safety experts (LoRA), Co-Merge and evaluation.")
    parser.add_argument("--version", action="version", version=f"safetydpo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module, __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a refused argument (argparse printed why): exit status 2, also in-process
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2
    args._argv = list(sys.argv[1:] if argv is None else argv)  # flags given explicitly win over --config
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        rc = args.func(args)
    except SafetyDPOError as e:
        print(f"safetydpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safetydpo {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk where no writer named its file: still one line, never a traceback
        from ..utils.atomic import is_disk_full

        if not is_disk_full(e):
            raise
        where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"safetydpo {args.command}: error: No space left on device{where}. Free some space and run the same "
              f"command again (with --resume where it has one).", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
