"""4-bit R-Sparse models in the decode engine (issue #26): transformers' greedy tokens, and under
torch.compile(fullgraph=True) the 4-bit kernel ops fused as the 16-bit ones are (q/k/v and gate/up
in one call each, SiLU x up and the residual add + next norm in the epilogues)."""

import torch

from conftest import tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.core.data import calibration_windows
from rsparse.core.int4_layer import int4_layers
from rsparse.runtime import int4_ops
from rsparse.runtime.engine import Engine
from test_engine import DEVICE, hf_greedy, prompts


def int4_tiny(windows, method="rsparse"):
    model = tiny_model()
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8, method=method, weight_bits=4),
              calibration_windows(windows, 64, 4))
    assert len(int4_layers(model)) == 14
    return model.to(DEVICE)


def test_greedy_tokens_equal_transformers(windows):
    rows = prompts([12, 7, 10])
    for method in ("rsparse", "sparse", "dense"):
        model = int4_tiny(windows, method)
        assert Engine(model, batch_size=3, max_seq_len=40).generate(rows, 10).tokens == hf_greedy(model, rows, 10)


def test_compiled_step_fuses_the_4bit_kernel_ops(windows, monkeypatch):
    model = int4_tiny(windows)
    for layer in int4_layers(model):
        layer.kernel = "always"  # the Triton kernel (interpreted on CPU) behind the ops
        layer.threshold = layer.threshold.clone()  # fresh modules for dynamo
    rows = prompts([11, 6])
    expected = hf_greedy(model, rows, 3)  # transformers runs each layer on its own (no fusion)
    torch._dynamo.reset()
    calls = []
    for name in ("int4_decode_linear_multi", "int4_decode_linear_silu_mul", "int4_decode_linear_add_rmsnorm"):
        real = getattr(int4_ops, name)
        monkeypatch.setattr(int4_ops, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    got = Engine(model, batch_size=2, max_seq_len=24, compile="aot_eager").generate(rows, 3)
    assert got.tokens == expected
    steps = calls.count("int4_decode_linear_multi") // 2  # q/k/v of both blocks per decode step
    assert steps >= 1
    assert calls.count("int4_decode_linear_silu_mul") == 2 * steps
    assert calls.count("int4_decode_linear_add_rmsnorm") == 4 * steps
