"""Progress of the long phases (calibration, sparsifying, perplexity, search, ...).

On a terminal, a tqdm bar. Elsewhere (CI, nohup, `| tee`, `make run > log 2>&1`) a bar would
write a carriage-return frame per refresh into the log, so instead one line per phase, when it
ends: what, how many, how long,

    calibration: 16 batches in 12.4 s

and nothing per step. TQDM_DISABLE=1 (tqdm's own switch; the tests set it) silences both.

    for batch in progress(batches, desc="calibration", unit="batch"):
        ...
    bar = progress(total=n, desc="search", unit="generation")   # or updated by hand
    bar.update(); bar.close()
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TextIO


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "step",
             initial: int = 0, leave: bool = True, disable: bool = False, file: TextIO | None = None):
    """A tqdm bar on a terminal, a one-line summary of the phase elsewhere (see the module
    docstring). Iterate over it, or call update(n) and close(); a context manager too. leave=False:
    the bar vanishes when done (the line is printed all the same); disable=True: nothing at all."""
    file = file if file is not None else sys.stderr
    if disable or os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        return _tqdm(iterable, desc=desc, total=total, disable=True)
    if _isatty(file):  # disable=False: decided here (tqdm reads TQDM_DISABLE once, when first imported)
        return _tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, file=file,
                     disable=False)
    return Phase(iterable, desc=desc, total=total, unit=unit, initial=initial, file=file)


def _tqdm(iterable, **kwargs):
    from tqdm.auto import tqdm  # imported when a bar is made: `rsparse --help` never pays for it

    return tqdm(iterable, **kwargs)


def _isatty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class Phase:
    """tqdm's interface (iteration, update, close, with), counting steps and printing one line
    when closed: `desc: N units in T s`, and where it stopped short of its total."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "step",
                 initial: int = 0, file: TextIO | None = None):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.file = file if file is not None else sys.stderr
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:  # the end of the loop, a break or an error: the phase ends
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        """Nothing: a bar's live figures; the phase's one line has no room for them."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = self.n - self.initial
        line = f"{self.desc}: {done} {_plural(self.unit, done)} in {time.perf_counter() - self.start:.1f} s"
        if self.total is not None and self.n < self.total:
            line += f" (stopped at {self.n} of {self.total})"
        print(line, file=self.file, flush=True)

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
