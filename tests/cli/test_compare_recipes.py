"""`rsparse compare-recipes` and `rsparse run --recipe` with its recipe, on a tiny model."""

import json

import pytest

from conftest import cli_error

pytestmark = pytest.mark.cli


def test_cli_compare_recipes_table4(tmp_path, tokenizer, text_file, tiny_model_dir):
    from rsparse.cli import main

    model_dir = tiny_model_dir
    out = tmp_path / "out"
    argv = ["compare-recipes", "--model", str(model_dir), "--sparsities", "0.4,0.6", "--grid", "0.7,0.9,1.0",
            "--population", "4", "--generations", "1", "--group-size", "7", "--calib-corpus", str(text_file),
            "--calib-samples", "4", "--seq-len", "32", "--ppl-corpus", str(text_file), "--ppl-windows", "2",
            "--ppl-seq-len", "64", "--tasks", "piqa", "--limit", "2", "--batch-size", "4",
            "--factors", "whitened", "--rho-step", "0.1", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [b["sparsity"] for b in res["sparsities"]] == [0.4, 0.6]
    for block in res["sparsities"]:
        assert [g["rho"] for g in block["uniform_grid"]] == [0.7, 0.9, 1.0]
        best = min(block["uniform_grid"], key=lambda g: g["fitness"])
        assert block["best_uniform_rho"] == best["rho"]
        labels = [r["recipe"] for r in block["rows"]]
        assert labels == ["sparse-only", f"uniform rho={best['rho']:g}", "searched"]
        assert block["rows"][0]["calibration_fitness"] == block["uniform_grid"][-1]["fitness"]  # rho 1 = sparse-only
        searched = block["rows"][2]
        assert searched["calibration_fitness"] <= best["fitness"] + 1e-9  # elitist, started at the uniform optimum
        for r in block["rows"]:
            assert abs(r["achieved_sparsity"] - block["sparsity"]) < 0.1 and "piqa" in r["tasks"]
        tag = f"s{round(100 * block['sparsity']):02d}"
        recipe = json.loads((out / f"recipe_{tag}.json").read_text())
        assert len(recipe["layers"]) == 14 and recipe["uniform_grid"] == block["uniform_grid"]
        assert (out / f"recipe_{tag}.png").stat().st_size > 5000
    md = (out / "results.md").read_text()
    assert "| 40 | searched |" in md and "| 60 | sparse-only |" in md
    # rows keep each example's outcome: `eval --paired` compares two of them, labelled "RECIPE S%"
    assert set(res["sparsities"][0]["rows"][0]["tasks"]["piqa"]["correct"]) <= {"0", "1"}
    assert main(["eval", "--paired", f"{out / 'results.json'}::searched 60%", f"{out / 'results.json'}::sparse-only 40%",
                 "--out", str(tmp_path / "paired")]) == 0
    paired = json.loads((tmp_path / "paired" / "paired.json").read_text())
    assert paired["a"] == "searched 60%" and paired["tasks"]["piqa"]["n"] == 2
    # the searched recipe is a normal recipe file: `rsparse run --recipe` validates and uses it
    run_out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--methods", "rsparse", "--sparsity", "0.4", "--recipe",
                 str(out / "recipe_s40.json"), "--calib-corpus", str(text_file), "--calib-samples", "4",
                 "--ppl-corpus", str(text_file), "--ppl-windows", "2", "--seq-len", "32", "--out", str(run_out)]) == 0
    assert json.loads((run_out / "results.json").read_text())["rows"][0]["method"] == "rsparse"


def test_cli_compare_recipes_rejects_bad_input(capsys):
    cli_error(capsys, ["compare-recipes", "--sparsities", "0.5,1.5"], "sparsities")
    cli_error(capsys, ["compare-recipes", "--grid", "0.5,2"], "grid")
    cli_error(capsys, ["compare-recipes", "--grid", "0.9,0.95", "--rho-step", "0.1"], "rho-step")
    cli_error(capsys, ["compare-recipes", "--search-batch-size", "0"], "search-batch-size")


@pytest.mark.parametrize("allocate", ["greedy", "evolve"])
def test_cli_search_allocates_per_layer_sparsity(tmp_path, text_file, tiny_model_dir, allocate):
    """`rsparse search --allocate` writes a recipe with a per-layer sparsity on the budget, which
    `rsparse run --recipe` and `rsparse compress --recipe` take."""
    from rsparse.cli import main

    out = tmp_path / "s"
    common = ["--calib-corpus", str(text_file), "--calib-samples", "4", "--seq-len", "32"]
    assert main(["search", "--model", str(tiny_model_dir), "--sparsity", "0.6", "--allocate", allocate,
                 "--population", "4", "--generations", "1", "--group-size", "7", "--alloc-step", "0.1",
                 "--ppl-corpus", str(text_file), "--ppl-windows", "2", "--ppl-seq-len", "32", *common,
                 "--out", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    s = [l["sparsity"] for l in recipe["layers"]]
    sizes = [l["shape"][0] * l["shape"][1] for l in recipe["layers"]]
    assert abs(sum(a * b for a, b in zip(s, sizes)) / sum(sizes) - 0.6) < 1e-6 and len(set(s)) > 1
    rows = json.loads((out / "search_eval.json").read_text())["rows"]
    assert ("sparse-only greedy" in [r["recipe"] for r in rows]) == (allocate == "greedy")
    assert main(["run", "--model", str(tiny_model_dir), "--methods", "rsparse", "--sparsity", "0.6", "--recipe",
                 str(out / "recipe.json"), "--ppl-corpus", str(text_file), "--ppl-windows", "2", *common,
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["compress", "--model", str(tiny_model_dir), "--sparsity", "0.6", "--recipe", str(out / "recipe.json"),
                 *common, "--out", str(tmp_path / "c")]) == 0
    from rsparse import load_checkpoint
    from rsparse.core.layer import rsparse_layers

    model, _ = load_checkpoint(tmp_path / "c")
    kept = {l.name: l.keep_fraction for l in rsparse_layers(model)}
    for entry in recipe["layers"]:
        assert abs(kept[entry["name"]] - (1 - entry["sparsity"]) * entry["rho"]) < 1e-6


def test_cli_search_on_a_given_allocation(tmp_path, capsys, text_file, tiny_model_dir):
    """`rsparse search --allocation-from RECIPE` runs the rho search on the recipe's per-layer
    sparsity (no greedy walk again) and writes it back unchanged; a recipe without one, or with
    --allocate evolve, is refused in one line."""
    from rsparse.cli import main

    common = ["--model", str(tiny_model_dir), "--sparsity", "0.6", "--population", "4", "--generations", "1",
              "--group-size", "7", "--calib-corpus", str(text_file), "--calib-samples", "4", "--seq-len", "32",
              "--ppl-windows", "0"]
    assert main(["search", *common, "--allocate", "greedy", "--alloc-step", "0.1", "--out", str(tmp_path / "g")]) == 0
    greedy = json.loads((tmp_path / "g" / "recipe.json").read_text())
    assert main(["search", *common, "--allocation-from", str(tmp_path / "g" / "recipe.json"), "--seed", "1",
                 "--out", str(tmp_path / "r")]) == 0
    recipe = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert [l["sparsity"] for l in recipe["layers"]] == [l["sparsity"] for l in greedy["layers"]]
    assert recipe["allocation"]["from"].endswith("recipe.json") and recipe["search"]["settings"]["seed"] == 1

    # rho by block output error instead of the search: same allocation, rho from the grid, no search state
    assert main(["search", *common, "--allocation-from", str(tmp_path / "g" / "recipe.json"), "--rho-by", "block",
                 "--rho-grid", "0.9,0.8", "--min-gain", "0", "--out", str(tmp_path / "b")]) == 0
    block = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert [l["sparsity"] for l in block["layers"]] == [l["sparsity"] for l in greedy["layers"]]
    assert {l["rho"] for l in block["layers"]} <= {1.0, 0.9, 0.8} and any(l["rank"] for l in block["layers"])
    settings = block["search"]["settings"]
    assert settings["rho_by"] == "block" and settings["grid"] == [1.0, 0.9, 0.8] and block["search"]["best_fitness"] is None
    assert not (tmp_path / "b" / "search_state.json").exists()
    assert main(["run", "--model", str(tiny_model_dir), "--methods", "rsparse", "--sparsity", "0.6", "--recipe",
                 str(tmp_path / "b" / "recipe.json"), "--ppl-corpus", str(text_file), "--ppl-windows", "1",
                 "--calib-corpus", str(text_file), "--calib-samples", "4", "--seq-len", "32",
                 "--out", str(tmp_path / "br")]) == 0
    for flags, what in ((["--rho-by", "block", "--holdout", "0.25"], "apply to --rho-by search"),
                        (["--rho-by", "block", "--rho-grid", "0.9,x"], "comma list of numbers"),
                        (["--rho-by", "block", "--rho-grid", "1.5"], "rho grid values")):
        cli_error(capsys, ["search", *common, "--allocation-from", str(tmp_path / "g" / "recipe.json"), *flags,
                           "--out", str(tmp_path / "x")], what)

    uniform = tmp_path / "u.json"
    uniform.write_text(json.dumps({"layers": [{"name": l["name"], "rho": 1.0} for l in greedy["layers"]]}))
    cli_error(capsys, ["search", *common, "--allocation-from", str(uniform), "--out", str(tmp_path / "x")], "no 'sparsity'")
    cli_error(capsys, ["search", *common, "--allocation-from", str(tmp_path / "g" / "recipe.json"), "--allocate",
                       "evolve", "--out", str(tmp_path / "x")], "--allocate evolve")
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"layers": [{**l, "name": "x" + l["name"]} for l in greedy["layers"]]}))
    cli_error(capsys, ["search", *common, "--allocation-from", str(other), "--out", str(tmp_path / "x")], "other layers")
    off = tmp_path / "off.json"
    off.write_text(json.dumps({"layers": [{**l, "sparsity": 0.3} for l in greedy["layers"]]}))
    cli_error(capsys, ["search", *common, "--allocation-from", str(off), "--out", str(tmp_path / "x")], "budget")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [{**l, "sparsity": "lots"} for l in greedy["layers"]]}))
    cli_error(capsys, ["search", *common, "--allocation-from", str(bad), "--out", str(tmp_path / "x")], "sparsity of layer 0")
