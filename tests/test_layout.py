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


def _imports(path, module: str, package: bool) -> set[str]:
    """The rsparse modules a file imports (at module level or inside functions), relative ones resolved."""
    import ast

    base = module if package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (parent, node.module or "") if p)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {name for name in found if name == "rsparse" or name.startswith("rsparse.")}


def _module_graph() -> dict[str, set[str]]:
    from pathlib import Path

    root = Path(rsparse.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        edges = set()
        for name in _imports(path, module, path.name == "__init__.py"):
            while name and name not in files:  # `from pkg.mod import function` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def test_no_import_circles():
    """Core stands on the ground floor: no module reaches itself through the modules it imports."""
    graph = _module_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, circles[:3]


def test_core_knows_nothing_of_files_evaluation_or_the_runtime_above_the_kernel_ops():
    graph = _module_graph()
    for module, edges in graph.items():
        if module.startswith("rsparse.core"):
            bad = [e for e in edges if e.startswith(("rsparse.io", "rsparse.eval", "rsparse.methods", "rsparse.search",
                                                     "rsparse.cli", "rsparse.analysis"))]
            assert not bad, f"{module} imports {bad}"


def test_every_module_is_at_most_450_lines():
    from pathlib import Path

    root = Path(rsparse.__file__).parent.parent
    long = {str(p.relative_to(root)): n for p in [*(root / "rsparse").rglob("*.py"), *(root / "tests").rglob("*.py"),
                                                   *(root / "scripts").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


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
