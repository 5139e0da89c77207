"""`rsparse compress`: a transformers directory that loads, and bad input refused."""

import json

import pytest

from conftest import cli_error
from rsparse.cli import main
from rsparse.core.layer import rsparse_layers
from rsparse.io.checkpoint import load_any

pytestmark = pytest.mark.cli


def test_cli_compress(model, tokenizer, text_file, tmp_path, capsys):
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    out = tmp_path / "ck"
    argv = ["compress", "--model", str(hf), "--out", str(out), "--sparsity", "0.4", "--ratio", "0.9",
            "--calib-corpus", str(text_file), "--calib-samples", "2", "--seq-len", "32", "--seed", "1"]
    assert main(argv) == 0
    assert f"saved {out}: 14 layers (rsparse), target sparsity 40%" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]  # a transformers directory
    assert qc["quant_method"] == "rsparse" and qc["rsparse_config"]["tokens"] == "decode" and qc["rsparse_config"]["seed"] == 1
    loaded, _ = load_any(out)
    assert {l.tokens for l in rsparse_layers(loaded)} == {"decode"}
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    cli_error(capsys, argv[:3] + ["--out", str(tmp_path / "busy")] + argv[5:], "overwrite")
    cli_error(capsys, argv[:5] + ["--sparsity", "1.5"], "sparsity")
