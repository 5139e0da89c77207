"""`rsparse convert`: an rsparse.json checkpoint (the older format) to a transformers directory."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert an older rsparse.json checkpoint to the transformers directory "
                                              "format that rsparse loads")
    p.add_argument("source", help="the older checkpoint directory (has rsparse.json)")
    p.add_argument("target", help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty target directory")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rsparse.io.checkpoint import check_target, save_pretrained
    from rsparse.io.convert import read_legacy

    check_target(args.target, args.overwrite)  # before the minutes of reading
    model, tokenizer, config, report = read_legacy(args.source)
    out = save_pretrained(model, tokenizer, args.target, config=config, report=report,
                          source=str(Path(args.source).resolve()), overwrite=args.overwrite)
    print(f"converted {args.source} -> {out}")
    return 0
