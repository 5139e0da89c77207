"""Outputs that never lose what a user had (issue 15): earlier results refused unless --overwrite,
no stale file of an earlier run beside new results, stale temporary folders removed, normal
permissions, the model's own dtype kept by compress, peak memory in the summaries."""

import json
import os
import stat

import pytest

from conftest import cli_error
from rsparse.cli import main

pytestmark = pytest.mark.cli


@pytest.fixture()
def run_argv(tiny_model_dir, text_file, tmp_path):
    return ["run", "--model", str(tiny_model_dir), "--calib-corpus", str(text_file), "--ppl-corpus", str(text_file),
            "--seq-len", "32", "--calib-samples", "2", "--ppl-windows", "2", "--out", str(tmp_path / "r")]


def test_run_refuses_earlier_results_and_overwrite_leaves_no_stale_file(run_argv, tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*run_argv, "--methods", "dense,sparse"]) == 0
    assert (out / "layers_sparse.json").is_file()
    assert "peak memory" in capsys.readouterr().out
    cli_error(capsys, [*run_argv, "--methods", "dense"], "already holds results")
    (out / "notes.txt").write_text("mine")  # not ours: kept
    stale = tmp_path / ".r.tmp-deadbeef"  # what a killed run leaves
    stale.mkdir()
    (stale / "x").write_text("x")
    assert main([*run_argv, "--methods", "dense", "--overwrite"]) == 0
    assert "removed 1 temporary folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "results.md"]
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["dense"]
    assert not stale.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert json.loads((out / "results.json").read_text())["peak_memory_mb"] > 0


def test_compress_refuses_a_model_keeps_its_dtype_and_writes_normal_permissions(tiny_model_dir, text_file,
                                                                                 tmp_path, capsys):
    from rsparse.io.checkpoint import load_any

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"  # a model published in bfloat16
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "ck"
    argv = ["compress", "--model", str(tiny_model_dir), "--out", str(out), "--calib-corpus", str(text_file),
            "--calib-samples", "2", "--seq-len", "32"]
    old = os.umask(0o022)
    try:
        assert main(argv) == 0
    finally:
        os.umask(old)
    summary = capsys.readouterr().out
    assert "(bfloat16)" in summary and "peak memory" in summary
    model, _ = load_any(out)
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.bfloat16"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cli_error(capsys, argv, "already exists.*--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*argv, "--overwrite", "--save-dtype", "float32"]) == 0
    assert "(float32)" in capsys.readouterr().out


def test_eval_outside_a_git_checkout_prints_no_git_error(tmp_path, monkeypatch, capfd):
    from rsparse.eval.harness import _quiet_git_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert _quiet_git_hash() is None
    assert "fatal" not in capfd.readouterr().err


def test_a_saved_directory_refuses_an_edited_config_or_tokenizer(model, tokenizer, windows, tmp_path):
    import shutil

    from rsparse import RSparseConfig, sparsify_
    from rsparse.core.data import calibration_windows
    from rsparse.errors import CheckpointError
    from rsparse.io.checkpoint import load, save_pretrained

    sparsify_(model, RSparseConfig(sparsity=0.5, seq_len=64, calibration_samples=2, max_rows_per_layer=128),
              calibration_windows(windows, 64, 2, seed=0))
    ck = save_pretrained(model, tokenizer, tmp_path / "ck")
    for name, old, new in (("config.json", '"rms_norm_eps"', '"x": 1, "rms_norm_eps"'),
                           ("tokenizer_config.json", "{", "{ ")):
        copy = tmp_path / f"edit-{name}"
        shutil.copytree(ck, copy)
        text = (copy / name).read_text()
        (copy / name).write_text(text.replace(old, new, 1))
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load(copy)
    load(ck)  # the original still loads
