"""The static-cache decode loop gives Hugging Face generate's greedy tokens (CPU, eager steps)."""

import pytest
import torch

from conftest import tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.data import calibration_windows
from rsparse.decode import StaticDecoder


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
