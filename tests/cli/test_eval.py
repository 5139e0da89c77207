"""`rsparse eval` on a tiny model: Table 1 / Figure 5 files, weight formats (Table 2), resume,
merge, and bad input."""

import json
import math

import pytest

from conftest import cli_error
from rsparse.errors import RsparseError

pytestmark = pytest.mark.cli


def _parser():
    from rsparse.cli import build_parser

    return build_parser()


def test_cli_eval_table_and_sweep_plot(tmp_path, tokenizer, text_file, tiny_model_dir):
    model_dir = tiny_model_dir
    out = tmp_path / "out"
    args = _parser().parse_args([
        "eval", "--model", str(model_dir), "--methods", "dense,relu,cats,griffin,rsparse", "--sweep", "0.2,0.3,0.5",
        "--tasks", "piqa,arc_easy", "--limit", "2", "--calib-corpus", str(text_file), "--ppl-corpus", str(text_file),
        "--seq-len", "64", "--calib-samples", "4", "--ppl-windows", "3", "--ratio", "0.8", "--out", str(out)])
    assert args.func(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == str(model_dir) and res["limit"] == 2 and res["seed"] == 0
    assert res["versions"]["lm_eval"] and res["protocol"]["tokens"] == "second_half"
    assert res["tasks"]["piqa"]["split"] == "validation" and res["tasks"]["arc_easy"]["examples"] == 2
    labels = [r["label"] for r in res["rows"]]
    assert labels[:2] == ["Dense", "ReLUfication"] and "CATS 50%" not in labels and "GRIFFIN 50%" in labels
    assert [s["method"] for s in res["skipped"]] == ["cats"]  # 50% > (up+down) share 47.6%
    for r in res["rows"]:
        assert set(r["tasks"]) == {"piqa", "arc_easy"} and {"acc", "acc_norm"} <= set(r["tasks"]["piqa"])
        assert math.isfinite(r["average"]) and math.isfinite(r["ppl"]) and math.isfinite(r["achieved_sparsity"])
        if r["method"] in ("cats", "griffin"):
            assert "module_sparsity" in r and abs(r["achieved_sparsity"] - r["target_sparsity"]) < 0.08
    md = (out / "results.md").read_text()
    assert "| Method | PIQA | Arc-E | Average |" in md and "| R-Sparse 30% |" in md and "Skipped: CATS 50%" in md
    assert (out / "sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["--methods", "dense,foo"], "unknown method"),
    (["--sparsities", "1.2"], "sparsity must be in"),
    (["--sweep", "0.3,abc"], "not a number"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "piqa,not_a_task_xyz"], "unknown task"),
])
def test_cli_rejects_bad_input_before_loading(argv, message):
    args = _parser().parse_args(["eval", "--model", "/nonexistent/model", *argv])
    with pytest.raises(RsparseError, match=message):
        args.func(args)


def test_cli_unreachable_baseline_target(tmp_path, tokenizer, tiny_model_dir):
    model_dir = tiny_model_dir
    args = _parser().parse_args(["eval", "--model", str(model_dir), "--methods", "dense,cats", "--sparsities", "0.5,0.6",
                                 "--mlp-sparsities", "none", "--tasks", "piqa", "--seq-len", "64",
                                 "--out", str(tmp_path / "o")])
    with pytest.raises(RsparseError, match="CATS sparsifies only the MLP.*choose a target below 47.6%"):
        args.func(args)


def test_cli_eval_weight_formats_table2_and_resume(tmp_path, tokenizer, text_file, tiny_model_dir, capsys):
    from rsparse.cli import main

    model_dir = tiny_model_dir
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), "--methods", "dense,rsparse", "--sparsities", "0.4",
            "--weights", "fp,int4", "--group-size", "32", "--tasks", "piqa", "--limit", "2",
            "--calib-corpus", str(text_file), "--ppl-corpus", str(text_file), "--seq-len", "64",
            "--calib-samples", "4", "--ppl-windows", "2", "--xsum-samples", "0", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["Dense", "R-Sparse 40%", "INT4 Dense", "INT4 R-Sparse 40%"]
    assert [r["weights"] for r in res["rows"]] == ["fp", "fp", "int4", "int4"]
    assert res["weights"]["group_size"] == 32 and res["weights"]["quantizer"].startswith("hqq")
    assert 0 < res["weights"]["relative_error"]["int4"] < 0.2
    ppl = {r["label"]: r["ppl"] for r in res["rows"]}
    assert ppl["INT4 Dense"] != ppl["Dense"]
    md = (out / "results.md").read_text()
    assert md.index("| Dense |") < md.index("| INT4 Dense |") < md.index("| R-Sparse 40% |") < md.index("| INT4 R-Sparse 40% |")

    # --resume keeps the rows already there and evaluates only the new one
    assert main(argv[:-2] + ["--sparsities", "0.4,0.5", "--weights", "fp", "--out", str(out), "--resume"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    by_label = {r["label"]: r for r in res2["rows"]}
    assert set(by_label) == {"Dense", "R-Sparse 40%", "R-Sparse 50%"}
    assert by_label["R-Sparse 40%"]["seconds"] == {r["label"]: r for r in res["rows"]}["R-Sparse 40%"]["seconds"]
    cli_error(capsys, argv[:-2] + ["--out", str(out), "--resume", "--limit", "3"], "other settings")


def test_cli_eval_rejects_unknown_weight_format(capsys):
    cli_error(capsys, ["eval", "--weights", "fp,nf4"], "unknown weight format")


def test_cli_eval_resume_from_a_corrupt_results_file_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"rows": [', encoding="utf-8")  # a run killed mid-write elsewhere
    cli_error(capsys, ["eval", "--methods", "dense", "--tasks", "piqa", "--limit", "1", "--ppl-corpus", "none",
              "--xsum-samples", "0", "--out", str(out), "--resume"], "--resume: cannot read")
    assert (out / "results.json").read_text(encoding="utf-8") == '{"rows": ['  # left as it was


def test_cli_eval_merge_of_rows_run_apart_equals_one_run(tmp_path, tokenizer, text_file, tiny_model_dir, capsys):
    """Rows evaluated in separate runs (one per GPU, say) and merged give the results and reports
    of the single run that evaluates them all; runs with other settings are refused."""
    from rsparse.cli import main

    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "piqa", "--limit", "2", "--calib-corpus", str(text_file),
            "--ppl-corpus", str(text_file), "--seq-len", "64", "--calib-samples", "4", "--ppl-windows", "2",
            "--xsum-samples", "0"]
    assert main(argv + ["--methods", "dense,rsparse", "--sparsities", "0.3,0.5", "--out", str(tmp_path / "all")]) == 0
    assert main(argv + ["--methods", "dense", "--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--methods", "rsparse", "--sparsities", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert main(argv + ["--methods", "rsparse", "--sparsities", "0.3", "--out", str(tmp_path / "c")]) == 0
    parts = [str(tmp_path / d / "results.json") for d in "abc"]
    assert main(["eval", "--merge", *parts, "--out", str(tmp_path / "merged")]) == 0

    one = json.loads((tmp_path / "all" / "results.json").read_text())
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [r["label"] for r in merged["rows"]] == ["Dense", "R-Sparse 30%", "R-Sparse 50%"]
    assert merged["sweep"] == [0.3, 0.5] and merged["merged_from"] == parts
    assert merged["calibration"] == one["calibration"]  # the dense-only run had none
    for a, b in zip(one["rows"], merged["rows"]):
        assert a["label"] == b["label"] and a["average"] == b["average"] and a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "| R-Sparse 30% |" in md and (tmp_path / "merged" / "sweep.png").stat().st_size > 10_000

    assert main(argv + ["--methods", "dense", "--ratio", "0.8", "--out", str(tmp_path / "d")]) == 0
    cli_error(capsys, ["eval", "--merge", parts[0], str(tmp_path / "d" / "results.json"), "--out", str(tmp_path / "m2")], r"d/results.json was made with other settings .*--ratio")
    cli_error(capsys, ["eval", "--merge", str(tmp_path / "nope.json"), "--out", str(tmp_path / "m3")], "not found")
    (tmp_path / "other.json").write_text('{"results": {}}', encoding="utf-8")  # e.g. lm-eval's own output
    cli_error(capsys, ["eval", "--merge", parts[0], str(tmp_path / "other.json"), "--out", str(tmp_path / "m4")], "other.json is not an rsparse eval results.json")
    (tmp_path / "cut.json").write_text('{"rows": [', encoding="utf-8")
    cli_error(capsys, ["eval", "--merge", str(tmp_path / "cut.json"), "--out", str(tmp_path / "m5")], "cannot read .*cut.json as JSON")
    assert not any((tmp_path / d).exists() for d in ("m2", "m3", "m4", "m5"))


def test_cli_eval_paired_difference_of_two_rows(tmp_path, text_file, tiny_model_dir, capsys):
    """--paired: row A minus row B example by example; its average is the difference of the rows'
    averages; rows are named by file (one row) or file::label; bad names are one-line errors."""
    from rsparse.cli import main

    out = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "piqa,arc_easy", "--limit", "4",
                 "--calib-corpus", str(text_file), "--ppl-corpus", "none", "--seq-len", "64", "--calib-samples", "4",
                 "--xsum-samples", "0", "--methods", "dense,rsparse", "--sparsities", "0.7", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    dense, sparse = res["rows"]
    assert all(len(r["tasks"][t]["correct"]) == 4 for r in res["rows"] for t in ("piqa", "arc_easy"))
    f = str(out / "results.json")
    capsys.readouterr()
    assert main(["eval", "--paired", f"{f}::{sparse['label']}", f"{f}::Dense", "--out", str(tmp_path / "ab")]) == 0
    printed = capsys.readouterr().out
    d = json.loads((tmp_path / "ab" / "paired.json").read_text())
    assert d["a"] == sparse["label"] and d["b"] == "Dense" and d["files"][1] == f"{f}::Dense"
    assert d["average"] == pytest.approx(sparse["average"] - dense["average"])
    for t in ("piqa", "arc_easy"):
        assert d["tasks"][t]["n"] == 4
        assert d["tasks"][t]["diff"] == pytest.approx(sparse["tasks"][t]["acc"] - dense["tasks"][t]["acc"])
    assert (tmp_path / "ab" / "paired.md").read_text() == printed and "| piqa | 4 |" in printed

    assert main(["eval", "--paired", f"{f}::Dense", f"{f}::Dense", "--out", str(tmp_path / "aa")]) == 0
    assert f"{f}::Dense minus {f}::Dense" in capsys.readouterr().out  # same labels: named by file
    assert json.loads((tmp_path / "aa" / "paired.json").read_text())["average"] == 0.0

    cli_error(capsys, ["eval", "--paired", f, f"{f}::Dense", "--out", str(tmp_path / "x")], r"has 2 rows; name one as")
    cli_error(capsys, ["eval", "--paired", f"{f}::Dense", f"{f}::Sparse 70%", "--out", str(tmp_path / "x")],
              r"has 0 rows labelled 'Sparse 70%'; its rows: Dense, R-Sparse 70%")
    cli_error(capsys, ["eval", "--paired", f"{f}::Dense", f"{f}::Dense", "--out", str(tmp_path / "ab")],
              "already holds results")
    assert not (tmp_path / "x").exists()


def test_cli_eval_refine_mix_matches_run(tmp_path, tokenizer, text_file, tiny_model_dir):
    """--refine-corpus re-sets the sparse rows' thresholds as `rsparse run` does: the same held-out
    perplexity from both commands, and a different one without the mix."""
    common = ["--model", str(tiny_model_dir), "--calib-corpus", str(text_file), "--ppl-corpus", str(text_file),
              "--seq-len", "64", "--calib-samples", "3", "--ppl-windows", "3", "--seed", "1"]
    mix = ["--refine-corpus", "squad", "--refine-windows", "2"]

    def ev(out, *extra):
        args = _parser().parse_args(["eval", *common, "--methods", "sparse", "--sparsities", "0.5", "--tasks", "piqa",
                                     "--limit", "2", "--xsum-samples", "0", "--out", str(tmp_path / out), *extra])
        assert args.func(args) == 0
        return json.loads((tmp_path / out / "results.json").read_text())

    refined, plain = ev("mix", *mix), ev("plain")
    assert refined["calibration"]["refine_mix"] == {"corpus": "squad", "windows": 2}
    assert plain["calibration"]["refine_mix"] is None
    args = _parser().parse_args(["run", *common, "--methods", "sparse", "--sparsity", "0.5", *mix,
                                 "--out", str(tmp_path / "run")])
    assert args.func(args) == 0
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    ppl_run = next(r["ppl"] for r in run["rows"] if r["method"] == "sparse")
    assert refined["rows"][0]["ppl"] == pytest.approx(ppl_run, rel=1e-5)
    assert plain["rows"][0]["ppl"] != pytest.approx(ppl_run, rel=1e-5)


def test_cli_eval_rejects_bad_refine_windows():
    args = _parser().parse_args(["eval", "--model", "/nonexistent/model", "--refine-corpus", "squad",
                                 "--refine-windows", "0"])
    with pytest.raises(RsparseError, match="--refine-windows must be >= 1"):
        args.func(args)
