"""Peak resident memory of each phase of an rsparse command (Linux only).

    PYTHONPATH=. python scripts/memory_phases.py compress --out /tmp/c --overwrite
    PYTHONPATH=. python scripts/memory_phases.py run --out /tmp/r --overwrite

Runs the command in this process with its main steps wrapped; at every phase boundary it reads
the kernel's high-water mark of resident memory (VmHWM) and resets it (/proc/self/clear_refs),
so each phase's peak is exact, not sampled. A phase's peak includes its sub-phases. Printed as a
table on stderr at the end. (The command's own "peak memory" line is then meaningless: the reset
lowers ru_maxrss too.)
"""

from __future__ import annotations

import functools
import re
import sys
import time

_STATUS = "/proc/self/status"
peaks: dict[str, float] = {}
order: list[str] = []
stack: list[str] = ["import"]


def _hwm_mb() -> float:
    with open(_STATUS) as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024 / 1e6


def _rss_mb() -> float:
    with open(_STATUS) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024 / 1e6


def _boundary() -> None:
    """Charge the high-water mark since the last boundary to every open phase, then reset it."""
    h = _hwm_mb()
    for name in stack:
        peaks[name] = max(peaks.get(name, 0.0), h)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def phase(name: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _boundary()
        full = f"{stack[-1]}/{name}" if len(stack) > 1 else name
        stack.append(full)
        if full not in order:
            order.append(full)
        start, t0 = _rss_mb(), time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            _boundary()
            stack.pop()
            print(f"[memory] {full}: peak {peaks[full]:.0f} MB (RSS {start:.0f} -> {_rss_mb():.0f} MB, "
                  f"{time.time() - t0:.0f} s)", file=sys.stderr)
    return wrapped


def patch(module, attr: str, name: str) -> None:
    # the verbs import what they call inside their command functions: patching its module is enough
    setattr(module, attr, phase(name, getattr(module, attr)))


def main() -> int:
    t0 = time.time()
    order.append("import")
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rsparse.cli
    import rsparse.core.calibrate as calibrate
    import rsparse.core.data as data
    import rsparse.core.models as models
    import rsparse.eval.perplexity as perplexity
    import rsparse.io.transformers_format as tf_format
    import rsparse.methods.rsparse as methods_rsparse

    _boundary()
    stack.pop()
    stack.append("command")
    order.append("command")

    patch(models, "load_model", "load_model")
    AutoTokenizer.from_pretrained = phase("tokenizer", AutoTokenizer.from_pretrained)
    AutoModelForCausalLM.from_pretrained = phase("weights", AutoModelForCausalLM.from_pretrained)
    patch(gguf_utils, "load_gguf_checkpoint", "gguf_read")
    patch(data, "load_windows", "load_windows")
    patch(calibrate, "collect_activations", "collect_activations")
    patch(calibrate, "_sample_group", "sample")  # each pass over the calibration windows
    patch(methods_rsparse, "sparsify_rsparse_", "sparsify")
    patch(methods_rsparse, "refine_thresholds_", "refine")
    patch(perplexity, "evaluate_perplexity", "perplexity")
    patch(tf_format, "save_pretrained", "save")
    rc = rsparse.cli.main(sys.argv[1:])
    _boundary()
    print(f"\n| phase | peak RSS MB |\n|---|---|", file=sys.stderr)
    for name in order:
        print(f"| {name} | {peaks.get(name, 0):.0f} |", file=sys.stderr)
    print(f"| (whole command) | {max(peaks.values()):.0f} |  ({time.time() - t0:.0f} s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
