"""`rsparse bench kernel|decode`: the GPU benchmarks of rsparse.runtime.bench (their own flags)."""

from __future__ import annotations

import argparse
import importlib


def cmd_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(f"rsparse.runtime.bench.{args.what}").main(args.rest)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="GPU benchmarks: `kernel` (one layer) or `decode` (tokens/s); --help for each")
    p.add_argument("what", choices=["kernel", "decode"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
