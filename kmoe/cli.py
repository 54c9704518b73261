"""The `kmoe` command line: one entry point; each subcommand is a thin function over the packages."""

from __future__ import annotations

import argparse
import logging
import sys

from kmoe.configtree import ConfigError


def command_modules() -> list[str]:
    """Every `kmoe/cmd_*.py` registers its subcommands with `register(subparsers)`."""
    import pkgutil

    import kmoe

    return sorted(f"kmoe.{m.name}" for m in pkgutil.iter_modules(kmoe.__path__) if m.name.startswith("cmd_"))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="kmoe",
        description="Korean-first MoE pipeline: data, tokenizer, training with a verifiable ledger, export, quantization.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kmoe import quiet

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet.install(args.verbose)  # known third-party noise, before any heavy library is imported
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback (use -v for one).
        if args.verbose:
            raise
        sys.stderr.write(f"kmoe: error: {e}\n")  # one write: the lines of several ranks do not interleave
        return 2


if __name__ == "__main__":
    sys.exit(main())
