"""The static-cache decode loop gives Hugging Face generate's greedy tokens (CPU, eager steps)."""

import pytest
import torch

from conftest import tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.data import calibration_windows
from rsparse.runtime.decode import StaticDecoder


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_decoder_matches_hf_generate_dense(arch, windows):
    model = tiny_model(arch)
    prompt = windows[:24].view(2, 12)
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    got = StaticDecoder(model, max_seq_len=40, batch_size=2).generate(prompt, 10)
    assert torch.equal(got, expected)


def test_static_decoder_matches_hf_generate_sparse(windows):
    model = tiny_model()
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8, tokens="decode"), calibration_windows(windows, 64, 4))
    prompt = windows[100:116].view(1, 16)
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    decoder = StaticDecoder(model, max_seq_len=32)
    assert torch.equal(decoder.generate(prompt, 12), expected)
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder.decode(20)
    with pytest.raises(ValueError, match="batch"):
        decoder.prefill(windows[:32].view(2, 16))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_decoder_on_this_device_graph_or_eager_matches_hf(windows):
    """On a GPU: the CUDA-graph loop with the Triton kernel; on CPU: eager steps, reference path."""
    model = tiny_model().to(DEVICE)
    prompt = windows[:16].view(1, 16).to(DEVICE)
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(StaticDecoder(model, 32).generate(prompt, 10), expected)
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8), calibration_windows(windows, 64, 4))
    eager = StaticDecoder(model, 32, use_graph=False).generate(prompt, 10)
    assert torch.equal(StaticDecoder(model, 32).generate(prompt, 10), eager)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10), eager)


def test_bench_model_conversion_hits_budget():
    from rsparse.runtime.bench.decode import make_rsparse, measure_kept
    from rsparse.layer import rsparse_layers

    model = tiny_model()
    make_rsparse(model, 0.5, 0.9, calib_tokens=64)
    layers = rsparse_layers(model)
    assert len(layers) == 14 and all(l.tokens == "decode" for l in layers)
    assert {l.method for l in layers} == {"rsparse"}
    prompt = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    assert abs(measure_kept(model, prompt, n=16) - 0.5) < 0.1
