"""`rsparse run` on a tiny model: the results files, and bad input refused before loading."""

import json
import math

import pytest

from conftest import cli_error

pytestmark = pytest.mark.cli


def test_cli_run_on_tiny_model(tmp_path, tokenizer, text_file, tiny_model_dir):
    from rsparse.cli import main

    model_dir = tiny_model_dir
    out = tmp_path / "out"
    code = main(["run", "--model", str(model_dir), "--methods", "dense,sparse,lowrank,rsparse",
                 "--calib-corpus", str(text_file), "--ppl-corpus", str(text_file), "--seq-len", "64",
                 "--calib-samples", "4", "--ppl-windows", "4", "--ratio", "0.8", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(model_dir)
    assert [r["method"] for r in results["rows"]] == ["dense", "sparse", "lowrank", "rsparse"]
    for row in results["rows"]:
        assert {"method", "target_sparsity", "achieved_sparsity", "ppl"} <= set(row)
        assert math.isfinite(row["ppl"])
    assert results["rows"][0]["achieved_sparsity"] == 0.0
    assert all(abs(r["achieved_sparsity"] - 0.5) < 0.1 for r in results["rows"][1:])
    assert "| rsparse |" in (out / "results.md").read_text()
    assert len(json.loads((out / "layers_rsparse.json").read_text())) == 14


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "sparsity must be in"),
    (["--ratio", "-1"], "ratio"),
    (["--methods", "dense,foo"], "unknown method"),
    (["--recipe", "/nonexistent/recipe.json"], "recipe file not found"),
])
def test_cli_rejects_bad_input_before_loading(args, message, capsys):
    cli_error(capsys, ["run", "--model", "/nonexistent/model", *args], message)
