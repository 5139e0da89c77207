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
            "rsparse.io.tables, rsparse.generate, rsparse.runtime.engine, rsparse.runtime.bench.decode; print(any(m.startswith('rsparse.cli') for m in sys.modules))")
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
