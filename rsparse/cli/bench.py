"""`rsparse bench kernel|attention|decode|agreement`: the benchmarks of rsparse.runtime.bench (their own flags)."""

from __future__ import annotations

import argparse
import importlib


def cmd_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(f"rsparse.runtime.bench.{args.what}").main(args.rest)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: `kernel` (one layer), `attention` (decode attention), "
                                            "`decode` (tokens/s), `agreement` (engine vs transformers tokens on a "
                                            "real model); --help for each")
    p.add_argument("what", choices=["kernel", "attention", "decode", "agreement"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
