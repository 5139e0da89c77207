import json

import pytest
import torch

from conftest import cli_error, tiny_model
from rsparse import RSparseConfig, restore_, sparsify_
from rsparse.core.models import decoder_linears
from rsparse.methods.quantize import QuantConfig, quantize_tensor, quantize_weights_


def test_groups_of_each_row_take_at_most_2_to_the_bits_values_and_a_short_last_group():
    torch.manual_seed(0)
    w = torch.randn(8, 80) * 0.05
    q = quantize_tensor(w, QuantConfig(bits=4, group_size=32))  # 80 = 32 + 32 + 16
    assert q.shape == w.shape and q.dtype == w.dtype
    for row in q:
        for lo, hi in ((0, 32), (32, 64), (64, 80)):
            assert 2 <= row[lo:hi].unique().numel() <= 16
    assert 0 < float((q - w).norm() / w.norm()) < 0.15
    q8 = quantize_tensor(w, QuantConfig(bits=8, group_size=32))
    assert (q8 - w).norm() < (q - w).norm() / 4  # more bits, smaller error


def test_quantize_weights_in_place_then_restore_bit_for_bit():
    model = tiny_model()
    before = {l.name: l.module.weight.detach().clone() for l in decoder_linears(model)}
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    q = quantize_weights_(model, QuantConfig(bits=4, group_size=32), progress=False)
    assert len(q.layers) == 14 and 0 < q.mean_relative_error < 0.2
    for l in decoder_linears(model):
        assert not torch.equal(l.module.weight, before[l.name])
        assert l.module.weight[0, :32].unique().numel() <= 16
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, ref)
    q.restore()
    for l in decoder_linears(model):
        assert torch.equal(l.module.weight, before[l.name])
    with pytest.raises(RuntimeError, match="not kept"):
        q.restore()


def test_rsparse_on_int4_weights_uses_the_quantized_weights(data):
    model = tiny_model()
    q = quantize_weights_(model, QuantConfig(bits=4, group_size=32), progress=False)
    quantized = {l.name: l.module.weight.detach().clone() for l in decoder_linears(model)}
    sparsify_(model, RSparseConfig(sparsity=0.5, tokens="all"), data[0])
    for l in decoder_linears(model):
        assert torch.equal(l.module.weight, quantized[l.name])  # R-Sparse reads the INT4 weights
    assert any(l.module.method == "rsparse" and l.module.rank > 0 for l in decoder_linears(model))
    restore_(model)
    q.restore()


@pytest.mark.parametrize("kwargs,message", [({"bits": 5}, "bits must be one of"), ({"group_size": 12}, "multiple of 8")])
def test_bad_quant_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.cli
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


@pytest.mark.cli
def test_cli_eval_rejects_unknown_weight_format(capsys):
    cli_error(capsys, ["eval", "--weights", "fp,nf4"], "unknown weight format")


@pytest.mark.cli
def test_cli_eval_resume_from_a_corrupt_results_file_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"rows": [', encoding="utf-8")  # a run killed mid-write elsewhere
    cli_error(capsys, ["eval", "--methods", "dense", "--tasks", "piqa", "--limit", "1", "--ppl-corpus", "none",
              "--xsum-samples", "0", "--out", str(out), "--resume"], "--resume: cannot read")
    assert (out / "results.json").read_text(encoding="utf-8") == '{"rows": ['  # left as it was


@pytest.mark.cli
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
