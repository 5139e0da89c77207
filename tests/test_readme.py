"""The README's `make run` table is the committed run's output, and that run is `make run` as it is now."""

import importlib.util
import json
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed() -> dict:
    return json.loads((ROOT / "docs" / "results" / "make-run" / "results.json").read_text(encoding="utf-8"))


def test_readme_table_is_the_committed_run():
    render = _script()
    block = render.readme_block((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block == render.render(_committed()), "README.md differs from docs/results/make-run: run scripts/render_readme.py"
    # the committed pair is one run: its results.md holds the same table
    table = block.split("\n\n")[0]
    assert table in (ROOT / "docs" / "results" / "make-run" / "results.md").read_text(encoding="utf-8")


def test_committed_run_has_make_runs_settings():
    """`rsparse run`'s defaults (or the Makefile's flags) changed: the committed results, and so
    the README, are not what `make run` prints any more. Run it and commit its results."""
    from rsparse.cli import build_parser, common

    recipe = next(line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if "rsparse run" in line)
    argv = shlex.split(recipe.split("rsparse", 1)[1])
    now = common.settings(build_parser().parse_args(argv))
    committed = _committed()["settings"]
    # where the results were written is no setting of the run
    assert {k: v for k, v in committed.items() if k != "out"} == {k: v for k, v in now.items() if k != "out"}
