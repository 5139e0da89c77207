"""The README's `make run` table, rendered from the results file that run wrote.

    make run && cp out/run/results.json out/run/results.md docs/results/make-run/
    PYTHONPATH=. .venv/bin/python scripts/render_readme.py          # rewrites the README block
    PYTHONPATH=. .venv/bin/python scripts/render_readme.py --check  # exit 1 if the README differs

The block sits between the two MARKERS lines of README.md. The table is the one `rsparse run`
prints (the same columns and formatting: rsparse.cli.run.RUN_COLUMNS), and the line under it
(time, machine, data) comes from the same file, so the README cannot show numbers that no
committed run printed. tests/test_readme.py fails when the README differs from the committed
results, or when those results were made with other settings than `make run`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results" / "make-run" / "results.json"
MARKERS = ("<!-- make-run: rendered from docs/results/make-run/results.json by scripts/render_readme.py -->",
           "<!-- /make-run -->")


def render(results: dict) -> str:
    """The block between the markers: the run's table and what it was measured on."""
    from rsparse.cli.run import RUN_COLUMNS
    from rsparse.io.results import markdown_table

    ppl, calib, machine = results["perplexity"], results["calibration"], results["machine"]
    ratios = sorted({r["ratio"] for r in results["rows"] if r["ratio"] is not None})
    caption = (f"(`make run`: {results['wall_seconds'] / 60:.1f} minutes on {machine['cores']} cores ({machine['cpu']}, "
               f"{machine['cpu_capability']} kernels). {results['model']}; perplexity of {ppl['windows']} "
               f"{ppl['corpus']} windows of {ppl['seq_len']} tokens, {ppl['scored']} scored; calibration on "
               f"{calib['windows']} {calib['corpus']} windows" + "".join(f"; rho = {r:g}" for r in ratios) + ".)")
    return f"{markdown_table(results['rows'], RUN_COLUMNS)}\n\n{textwrap.fill(caption, width=100)}"


def readme_block(text: str) -> str:
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    return text[start:end].strip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare only: exit 1 if the README differs")
    args = p.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    block = render(json.loads(RESULTS.read_text(encoding="utf-8")))
    if readme_block(text) == block:
        return 0
    if args.check:
        print(f"README.md's make-run table differs from {RESULTS.relative_to(ROOT)}: run scripts/render_readme.py",
              file=sys.stderr)
        return 1
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    README.write_text(text[:start] + "\n" + block + "\n" + text[end:], encoding="utf-8")
    print(f"README.md: make-run block rendered from {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
