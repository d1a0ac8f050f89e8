"""Entry point of the ``slimkv`` console script."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import SlimKVError
from . import calibrate, datastore, demo, eval, generate, methods, serve, store
from .common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimkv", description="Run language models with a slim KV cache (real bytes saved)."
    )
    parser.add_argument("--version", action="version", version=f"slimkv {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.add_parser(sub)
    methods.add_parser(sub)
    demo.add_parser(sub)
    store.add_parser(sub)
    eval.add_parser(sub)
    datastore.add_parser(sub)
    calibrate.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except SlimKVError as exc:
        print(f"slimkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
