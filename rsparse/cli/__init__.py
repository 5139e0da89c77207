"""The `rsparse` command: one module per verb, each with `register(subparsers)` and its command.

This is the one place where expected errors become what a user sees: an `RsparseError`
(rsparse.errors: bad input, unsupported model, recipe mismatch, corrupt checkpoint, missing
data, ...) prints one line `error: <message>` and exits with status 2; Ctrl-C prints
`interrupted` and exits with 130; `--debug` shows the traceback instead. Anything else is a bug
and keeps its traceback. The library never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rsparse.errors import RsparseError

# verb modules, in the order of `rsparse --help`
VERBS = ("run", "eval", "compress", "convert", "generate", "search", "compare_recipes", "analyze", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsparse", description="Rank-aware activation sparsity (R-Sparse) for LLMs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        importlib.import_module(f"rsparse.cli.{verb}").register(sub)
    for p in sub.choices.values():  # `rsparse VERB ... --debug` works too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():
        # in a log, transformers' and the hub's bars would write a frame per step (ours write one
        # line per phase: rsparse.progress); read when huggingface_hub is imported, so now
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except RsparseError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
