"""Arguments shared by the verbs. Their defaults are read from the config dataclasses
(RSparseConfig, DataConfig, SearchConfig, ...), so each default is written once.

Building the parser imports neither torch nor transformers (`rsparse VERB --help` answers at
once): the verb modules import them, and the library, inside their command functions."""

from __future__ import annotations

import argparse
import os
import sys

from rsparse.core.config import RSparseConfig
from rsparse.core.data import DataConfig
from rsparse.errors import BadInputError, MissingDataError

# The defaults: the dataclasses' class attributes (an instance would validate, which imports torch).
RSPARSE, DATA = RSparseConfig, DataConfig
CORPORA_HELP = "coqa, boolq, sciq, squad (offline), wikitext2, c4 (hub) or a text file"
DTYPES = ["float32", "bfloat16", "float16"]


def add_model(p: argparse.ArgumentParser, what: str = "hub id, local directory or .gguf file") -> None:
    p.add_argument("--model", default=None, help=f"{what} (default: embedded SmolLM2-135M-Instruct)")


def add_sparsify(p: argparse.ArgumentParser, sparsity: bool = True) -> None:
    """--sparsity, --ratio, --recipe: what RSparseConfig takes."""
    if sparsity:
        p.add_argument("--sparsity", type=float, default=RSPARSE.sparsity, help="target model-level sparsity in [0, 1)")
    p.add_argument("--ratio", type=float, default=RSPARSE.ratio,
                   help="uniform rho for rsparse: sparse share of each layer's budget")
    p.add_argument("--recipe", default=None, help="per-layer recipe JSON for rsparse (overrides --ratio)")


def add_calibration(p: argparse.ArgumentParser, seq_len: int = RSPARSE.seq_len, corpus_flag: str = "--calib-corpus",
                    samples_flag: str = "--calib-samples", samples: int = RSPARSE.calibration_samples) -> None:
    p.add_argument(corpus_flag, default=DATA.calibration_corpus, help=f"calibration corpus: {CORPORA_HELP}")
    p.add_argument(samples_flag, type=int, default=samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per window")


def add_refine_mix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine-corpus", default=None,
                   help="re-set thresholds on the calibration windows plus this many windows of another text "
                        "(e.g. squad), so that the sparsity achieved on unseen text meets the target (default: off)")
    p.add_argument("--refine-windows", type=int, default=16, help="windows of --refine-corpus in the mix")


def refine_mix(tokenizer, args, calibration):
    """The held-out windows of --refine-corpus (same length as the calibration's), or None."""
    if not getattr(args, "refine_corpus", None):
        return None
    from rsparse.core.data import load_windows

    return load_windows(tokenizer, args.refine_corpus, calibration.shape[1], args.refine_windows, "calibration",
                        args.seed + 1)


def check_refine_mix(args) -> None:
    if getattr(args, "refine_corpus", None):
        check_corpora(args.refine_corpus)
        require(args.refine_windows >= 1, f"--refine-windows must be >= 1, got {args.refine_windows}")


def add_device(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    if dtype:
        p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=RSPARSE.seed)


def settings(args: argparse.Namespace) -> dict:
    """The command's arguments, for the record in a results file."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "debug")}


def parse_names(text: str | None, allowed, what: str) -> list[str]:
    """Comma-separated names, each one of `allowed`, in the given order, none twice."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise BadInputError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise BadInputError(f"a {what} is given twice")
    return names


def parse_floats(text: str | None, what: str, check=None) -> list[float]:
    """Comma-separated numbers, each passed through check(value, what) when given."""
    values = []
    for t in [t.strip() for t in (text or "").split(",") if t.strip()]:
        try:
            v = float(t)
        except ValueError:
            raise BadInputError(f"{what} {t!r} is not a number") from None
        values.append(check(v, what) if check is not None else v)
    return values


def check_device(device: str | None) -> None:
    from rsparse.core.models import check_device

    check_device(device)


def check_corpora(*names: str) -> None:
    from rsparse.core.data import check_corpus

    for name in names:
        check_corpus(name)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BadInputError(message)


def require_hqq(what: str) -> None:
    """One line naming the extra when HQQ (an optional dependency) is missing."""
    try:
        import hqq  # noqa: F401
    except ImportError:
        raise MissingDataError(f"{what} needs HQQ: pip install 'rsparse[quant]' (hqq==0.2.8.post1)") from None


def check_model(name, seq_len: int | None = None, config=None):
    """Before load_model: the model's config and decoder projections, read without its weights
    (rsparse.core.models.model_spec), and against them --seq-len and the recipe of `config` (an
    RSparseConfig: layer names, shapes, values, duplicates, missing layers). Returns the spec."""
    from rsparse.core.config import layer_budgets
    from rsparse.core.models import check_seq_len, model_spec

    spec = model_spec(name)
    if config is not None and config.recipe is not None:
        if spec.linears is None:
            raise BadInputError(f"{name} is an rsparse checkpoint, already sparsified: a --recipe does not apply to "
                                "it; pass the original model")
        layer_budgets(config, spec.linears)
    check_seq_len(spec, seq_len)
    return spec


def machine() -> dict:
    """The CPU, the cores this process may use and the vector instructions torch's CPU kernels use
    (another set sums in another order: a sparse row's perplexity moves), for a run's record."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # not Linux
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def add_allocation(p: argparse.ArgumentParser) -> None:
    """The knobs of the per-layer sparsity allocations (AllocationConfig; `search`, `compare-recipes`)."""
    from rsparse.search.config import AllocationConfig

    p.add_argument("--alloc-step", type=float, default=AllocationConfig.step,
                   help="greedy: share of a block's bytes one greedy step moves to sparsity")
    p.add_argument("--max-sparsity", type=float, default=AllocationConfig.max_sparsity,
                   help="greedy/evolve: no layer sparser than this")
    p.add_argument("--sparsity-spread", type=float, default=AllocationConfig.spread,
                   help="evolve: spread of the initial per-layer sparsities")
