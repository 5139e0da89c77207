"""The package's shape: the public API, the old module paths rsparse/runtime still imports, and
the library never importing the command line."""

import subprocess
import sys

import rsparse


def test_public_api_is_a_dozen_names():
    assert set(rsparse.__all__) == {
        "sparsify_", "restore_", "RSparseConfig", "CatsConfig", "GriffinConfig", "ReluConfig", "load_model",
        "load_windows", "collect_activations", "evaluate_perplexity", "evaluate_tasks", "token_mode",
        "save_checkpoint", "load_checkpoint", "RsparseError"}
    assert all(hasattr(rsparse, n) for n in rsparse.__all__)


def test_old_module_paths_still_import():
    from rsparse.calibrate import calibrate_threshold, collect_activations, restore_, sparsify_  # noqa: F401
    from rsparse.core.layer import RSparseLinear
    from rsparse.layer import RSparseLinear as Old
    from rsparse.layer import set_token_mode  # noqa: F401

    assert Old is RSparseLinear and sparsify_ is rsparse.sparsify_


def test_the_library_never_imports_the_cli():
    code = ("import sys, rsparse, rsparse.eval.harness, rsparse.search.evolution, rsparse.analysis.plots, "
            "rsparse.io.tables, rsparse.generate; print(any(m.startswith('rsparse.cli') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
