
import pytest
import torch

from conftest import tiny_model
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


@pytest.mark.parametrize("quantizer,rounding", [("rtn", "rtn"), ("hqq-int4", "hqq")])
def test_rtn_is_the_4bit_checkpoint_format(tokenizer, windows, quantizer, rounding):
    """--quantizer rtn / hqq-int4 round exactly as rsparse compress --weights int4 --rounding rtn /
    hqq stores: the evaluated weights are the checkpoint's dequantized codes, group size per layer
    width included."""
    from rsparse.cli.eval import weight_formats
    from rsparse.core.data import calibration_windows
    from rsparse.core.int4_layer import int4_layers

    model = tiny_model()
    quantize_weights_(model, weight_formats("int4", 128, quantizer)["int4"], progress=False)
    packed = tiny_model()
    sparsify_(packed, RSparseConfig(sparsity=0.5, seq_len=64, calibration_samples=4, weight_bits=4, rounding=rounding),
              calibration_windows(windows, 64, 4))
    for lin, layer in zip(decoder_linears(model), int4_layers(packed)):
        assert torch.equal(lin.module.weight, layer.weight)


@pytest.mark.parametrize("kwargs,message", [({"bits": 5}, "bits must be one of"), ({"group_size": 12}, "multiple of 8"),
                                            ({"bits": 8, "quantizer": "rtn"}, "bits must be 4"),
                                            ({"bits": 3, "quantizer": "hqq-int4"}, "bits must be 4"),
                                            ({"quantizer": "gptq"}, "quantizer must be one of")])
def test_bad_quant_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)
