"""`rsparse analyze` on a tiny model: five PNGs and analysis.json; bad input refused before loading."""

import json

import pytest

from rsparse.cli import build_parser
from rsparse.errors import RsparseError

pytestmark = pytest.mark.cli


def test_cli_writes_pngs_and_json(tmp_path, tokenizer, text_file, tiny_model_dir):
    model_dir = tiny_model_dir
    parser = build_parser()
    out = tmp_path / "out"
    args = parser.parse_args(["analyze", "--model", str(model_dir), "--corpus", str(text_file), "--ppl-corpus",
                              str(text_file), "--samples", "4", "--seq-len", "32", "--ppl-windows", "2",
                              "--phase-sparsities", "0.5,0.9", "--phase-sites", "down_input,act",
                              "--bias-tokens", "64", "--ratio", "0.8", "--out", str(out)])
    assert args.func(args) == 0
    for name in ("contributions.png", "contribution_mass.png", "bias_rank.png", "multiphase_relu.png",
                 "kept_channels.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    res = json.loads((out / "analysis.json").read_text())
    assert {"contributions", "bias_rank", "multiphase", "kept", "timings_s", "blocks"} <= set(res)
    assert len(res["contributions"]["layers"]) == 14 and res["bias_rank"]["tokens"] == 64
    assert set(res["multiphase"]["sites"]) == {"down_input", "act"}
    for bad in (["--phase-sparsities", "0.5,1.5"], ["--parts", "heatmap,nope"], ["--phase-sites", "gate"]):
        bad_args = parser.parse_args(["analyze", *bad, "--out", str(tmp_path / "bad")])
        with pytest.raises(RsparseError):  # refused before any model is loaded
            bad_args.func(bad_args)
        assert not (tmp_path / "bad").exists()
