"""The package's shape: the public API, and the library never importing the command line."""

import subprocess
import sys

import rsparse


def test_public_api_is_a_dozen_names():
    assert set(rsparse.__all__) == {
        "sparsify_", "restore_", "RSparseConfig", "CatsConfig", "GriffinConfig", "ReluConfig", "load_model",
        "load_windows", "collect_activations", "evaluate_perplexity", "evaluate_tasks", "token_mode",
        "save_pretrained", "load_checkpoint", "RsparseError"}
    assert all(hasattr(rsparse, n) for n in rsparse.__all__)


def test_the_library_never_imports_the_cli():
    code = ("import sys, rsparse, rsparse.eval.harness, rsparse.search.evolution, rsparse.analysis.plots, "
            "rsparse.io.tables, rsparse.runtime.generate, rsparse.runtime.engine, rsparse.runtime.bench.decode; print(any(m.startswith('rsparse.cli') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
