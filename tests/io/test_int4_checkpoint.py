"""4-bit R-Sparse models (rsparse.core.int4_layer; issue #26): sparsify_ with weight_bits=4 packs every
projection as 4-bit codes; the layer computes what the 16-bit layer computes on the rounded
weights; a saved directory reloads with bit-identical logits; a damaged 4-bit tensor is refused
with one line; `rsparse compress --weights int4` writes it."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.cli import main
from rsparse.core.data import calibration_windows
from rsparse.core.int4 import quantize as quantize_codes
from rsparse.core.int4_layer import Int4RSparseLinear, int4_layers, layer_group_size, quantize_int4_
from rsparse.core.layer import RSparseLinear, rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import BadInputError, CheckpointError
from rsparse.io.checkpoint import load, save_pretrained

MODES = ("none", "decode", "all", "second_half")


def config(**kw):
    return RSparseConfig(sparsity=0.5, ratio=0.8, seq_len=64, calibration_samples=4, max_rows_per_layer=256, **kw)


@pytest.fixture(scope="module")
def int4(tokenizer, windows, tmp_path_factory):
    """A tiny model sparsified with 4-bit weights, its report, and the directory it saved to."""
    model = tiny_model()
    cfg = config(weight_bits=4)
    report = sparsify_(model, cfg, calibration_windows(windows, 64, 4, seed=0))
    path = save_pretrained(model, tokenizer, tmp_path_factory.mktemp("int4") / "ck", report=report, config=cfg)
    return model, report, path


def logits(model, x, mode):
    set_token_mode(model, mode)
    try:
        return model(x).logits
    finally:
        set_token_mode(model, "decode")


def test_group_size_per_layer_width():
    assert layer_group_size(4096) == 128 and layer_group_size(576) == 64 and layer_group_size(160) == 32
    assert layer_group_size(11008, 64) == 64
    with pytest.raises(BadInputError, match="no 4-bit group size"):
        layer_group_size(100)
    with pytest.raises(BadInputError, match="group size must be one of"):
        layer_group_size(4096, 100)
    with pytest.raises(BadInputError, match="weight_bits"):
        RSparseConfig(weight_bits=8)
    with pytest.raises(BadInputError, match="rounding must be one of"):
        RSparseConfig(weight_bits=4, rounding="gptq")


def test_every_projection_is_packed_and_computes_the_rounded_layer(int4, windows):
    model, report, _ = int4
    layers = rsparse_layers(model)
    assert len(layers) == 14 and all(isinstance(l, Int4RSparseLinear) for l in layers)
    # tiny model: inputs 64 (attention, gate/up) -> groups of 64; down_proj's 160 -> 32
    assert {(l.in_features, l.group_size) for l in layers} == {(64, 64), (160, 32)}
    assert all(e["weight_bits"] == 4 and e["group_size"] in (32, 64) for e in report)
    for l in layers:
        assert l.qweight.dtype == torch.uint8 and l.scales_zeros.dtype == torch.bfloat16
        assert "weight" not in dict(l.named_parameters())
    # the same calibration on the 16-bit layers over the rounded weights gives the same function
    ref = tiny_model()
    quantize_int4_(ref)
    sparsify_(ref, config(), calibration_windows(windows, 64, 4, seed=0))
    for a, b in zip(rsparse_layers(ref), layers):
        assert torch.equal(a.weight, b.weight)  # the codes hold the rounded weight exactly
        assert torch.equal(a.threshold, b.threshold) and torch.equal(a.lr_down, b.lr_down)
    x = windows[:40][None]
    for mode in MODES:
        torch.testing.assert_close(logits(model, x, mode), logits(ref, x, mode), atol=2e-4, rtol=2e-4)


def test_round_trip_is_bit_identical(int4, windows):
    model, _, path = int4
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    entries = qc["layers"].values()
    assert all(e["weight_bits"] == 4 and e["group_size"] in (32, 64) for e in entries)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = next(iter(qc["layers"]))
        assert f.get_tensor(f"{name}.qweight").dtype == torch.uint8 and f"{name}.weight" not in keys
    loaded, _ = load(path)
    assert all(isinstance(l, Int4RSparseLinear) for l in rsparse_layers(loaded)) and len(int4_layers(loaded)) == 14
    x = windows[:48][None]
    for mode in MODES:
        assert torch.equal(logits(loaded, x, mode), logits(model, x, mode)), mode
    loaded.to(torch.bfloat16)  # a cast leaves the scales in bf16 (the kernels' format)
    assert {l.scales_zeros.dtype for l in int4_layers(loaded)} == {torch.bfloat16}
    assert {l.lr_down.dtype for l in int4_layers(loaded)} == {torch.bfloat16}
    assert torch.isfinite(logits(loaded, x, "all").float()).all()


def test_damaged_4bit_tensor_is_refused(int4, tmp_path):
    _, _, path = int4
    ck = shutil.copytree(path, tmp_path / "ck")
    f = ck / "model.safetensors"
    with safe_open(str(f), "pt") as st:
        name = next(k for k in st.keys() if k.endswith("mlp.down_proj.qweight"))
        header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
    start = 8 + int.from_bytes(f.read_bytes()[:8], "little") + header[name]["data_offsets"][0]
    data = bytearray(f.read_bytes())
    data[start] ^= 0x11  # two codes of one byte changed: same size, same header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="down_proj"):
        load(ck)


def test_unpacked_layers_undo_to_the_rounded_dense_model(int4, windows):
    model, _, _ = int4
    layer = int4_layers(model)[0]
    dense = layer.dense_module()
    assert type(dense) is torch.nn.Linear and torch.equal(dense.weight, layer.weight)
    with pytest.raises(RuntimeError, match="packed after calibration"):
        layer.configure("sparse", 0.1, 0.5)
    assert isinstance(layer, RSparseLinear) and layer.weight_bits == 4


@pytest.mark.parametrize("rounding", ["rtn", "hqq"])
def test_cli_compress_int4(model, tokenizer, text_file, tmp_path, capsys, rounding):
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    out = tmp_path / "ck"
    argv = ["compress", "--model", str(hf), "--out", str(out), "--sparsity", "0.5", "--weights", "int4",
            "--calib-corpus", str(text_file), "--calib-samples", "2", "--seq-len", "32", "--rounding", rounding]
    assert main(argv) == 0
    assert "4-bit weights (groups of 32/64)" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["rsparse_config"]["weight_bits"] == 4 and qc["rsparse_config"]["group_size"] == 128
    assert qc["rsparse_config"]["rounding"] == rounding
    loaded, _ = load(out)
    assert len(int4_layers(loaded)) == 14
    # the saved codes are the chosen rounding of the model's own weights
    first = int4_layers(loaded)[0]
    w = model.model.layers[0].self_attn.q_proj.weight
    want = quantize_codes(w, first.group_size, rounding)
    assert torch.equal(first.qweight, want.qweight) and torch.equal(first.scales_zeros, want.scales_zeros)
