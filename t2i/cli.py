"""The `t2i` command. Each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module): each module defines `register(subparsers)`, which adds its parser and sets
# `func` on it, so this file never grows with the subcommands' options.
SUBCOMMANDS = [
    ("generate", "t2i.generate_cli"),
    ("data", "t2i.data.cli"),
    ("train", "t2i.train.cli"),
    ("distill", "t2i.distill.cli"),
    ("unclip", "t2i.systems.unclip_cli"),
    ("eval", "t2i.eval.cli"),
    ("convert", "t2i.convert_cli"),
    ("models", "t2i.systems.models_cli"),
    ("serve", "t2i.serve.cli"),
    ("worker", "t2i.serve.worker_cli"),
]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    from t2i import __version__

    parser = argparse.ArgumentParser(prog="t2i", description="Text-to-image generation, training and evaluation.")
    parser.add_argument("--version", action="version", version=f"t2i {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # the subcommand is not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"t2i {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m t2i.cli`: run the imported module's main, so that the UserError the subcommands
    # raise (t2i.cli.UserError) is the class caught there, not a second copy defined in __main__.
    from t2i.cli import main as package_main

    sys.exit(package_main())
