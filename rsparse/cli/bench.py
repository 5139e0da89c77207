"""`rsparse bench kernel|kernel-int4|attention|decode|agreement`: the benchmarks of rsparse.runtime.bench (their own flags)."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys


def cmd_bench(args: argparse.Namespace) -> int:
    from rsparse.runtime.bench import flags

    getattr(flags, args.what.replace("-", "_"))().parse_args(args.rest)  # --help and bad flags: answered before torch loads
    module = f"rsparse.runtime.bench.{args.what.replace('-', '_')}"
    if args.what.startswith("kernel") and "--smoke" in args.rest and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # the CPU smoke test needs Triton's interpreter, which triton chooses when it is first
        # imported: run the benchmark in a fresh process, whatever this one has imported
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", module, *args.rest], env=env).returncode
    return importlib.import_module(module).main(args.rest)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: `kernel` (one layer), `kernel-int4` (one 4-bit layer), `attention` (decode attention), "
                                            "`decode` (tokens/s), `agreement` (engine vs transformers tokens on a "
                                            "real model); --help for each")
    p.add_argument("what", choices=["kernel", "kernel-int4", "attention", "decode", "agreement"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
