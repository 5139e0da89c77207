"""The package's shape: the public API, the library never importing the command line, and what
`import rsparse` and `rsparse --help` load (neither torch nor transformers)."""

import subprocess
import sys

import pytest

import rsparse

HEAVY = ("torch", "transformers")


def python(code: str) -> str:
    """stdout of `code` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_public_api_is_a_dozen_names():
    assert set(rsparse.__all__) == {
        "sparsify_", "restore_", "RSparseConfig", "CatsConfig", "GriffinConfig", "ReluConfig", "load_model",
        "load_windows", "collect_activations", "evaluate_perplexity", "evaluate_tasks", "token_mode",
        "save_pretrained", "load_checkpoint", "RsparseError"}
    assert all(hasattr(rsparse, n) for n in rsparse.__all__)
    assert set(rsparse.__all__) <= set(dir(rsparse))
    with pytest.raises(AttributeError):
        rsparse.no_such_name  # noqa: B018


def test_the_library_never_imports_the_cli():
    code = ("import sys, rsparse, rsparse.eval.harness, rsparse.search.evolution, rsparse.analysis.plots, "
            "rsparse.io.tables, rsparse.runtime.generate, rsparse.runtime.engine, rsparse.runtime.bench.decode; print(any(m.startswith('rsparse.cli') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_import_rsparse_loads_neither_torch_nor_transformers():
    assert python(f"import sys, rsparse; print([m for m in {HEAVY} if m in sys.modules])") == "[]"


def test_help_loads_neither_torch_nor_transformers():
    """`rsparse --help` and every `rsparse VERB --help` (bench's sub-verbs too): argparse only."""
    verbs = [[], ["run"], ["eval"], ["compress"], ["generate"], ["chat"], ["search"], ["compare-recipes"],
             ["analyze"], ["bench"]] + [["bench", what] for what in ("kernel", "attention", "decode", "agreement")]
    code = (f"import contextlib, io, sys\nfrom rsparse.cli import main\nhelps = []\nfor argv in {verbs}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "        main(argv + ['--help'])\n"
            "    helps.append(out.getvalue().startswith('usage: rsparse'))\n"
            f"print(all(helps), [m for m in {HEAVY} if m in sys.modules])")
    assert python(code) == "True []"


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tokenizer):
    """A tiny model sparsified and saved by rsparse.save_pretrained."""
    from conftest import TEXT, tiny_model
    from rsparse.core.data import calibration_windows, tokenize_corpus

    model = tiny_model()
    rsparse.sparsify_(model, rsparse.RSparseConfig(sparsity=0.5, ratio=0.8),
                      calibration_windows(tokenize_corpus(tokenizer, [TEXT]), 32, 2))
    return rsparse.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("saved") / "tiny-rsparse")


@pytest.mark.parametrize("rsparse_first", [True, False])
def test_from_pretrained_builds_rsparse_layers_whichever_is_imported_first(saved_dir, rsparse_first):
    """`import rsparse` registers quant_method "rsparse" with transformers without importing it: at
    once when transformers' quantizers are loaded, else when they load (an import hook)."""
    imports = ["import rsparse", "from transformers import AutoModelForCausalLM"]  # the quantizers load in from_pretrained
    if not rsparse_first:
        imports = imports[1:] + ["import transformers.modeling_utils  # loads transformers.quantizers", imports[0]]
    code = "\n".join(imports) + (f"\nmodel = AutoModelForCausalLM.from_pretrained({str(saved_dir)!r})\n"
                                 "print(type(model.model.layers[0].mlp.down_proj).__name__)")
    assert python(code).splitlines()[-1] == "RSparseLinear"
