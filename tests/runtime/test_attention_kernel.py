"""The split-KV decode attention kernel (rsparse/runtime/kernels/triton_attention.py) against SDPA
with a mask (CPU: Triton's interpreter; CUDA: native), through its torch.library op, and inside the
decode engine against transformers' greedy tokens."""

import pytest
import torch

from conftest import tiny_model
from rsparse.runtime import ops
from rsparse.runtime.engine import Engine, EngineError
from rsparse.runtime.kernels import decode_attention, decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _case(b, h, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)  # (b, h, 1, d), strided as in the engine
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hkv,s,d", [(3, 8, 2, 100, 32), (1, 4, 4, 37, 24), (2, 6, 1, 300, 64)])
def test_matches_sdpa_with_mask(dtype, b, h, hkv, s, d):
    q, k, v = _case(b, h, hkv, s, d, dtype, seed=s)
    # rows start at different slots (left padding, a sliding window); hi inside and at the end
    for hi in (s // 2, s - 1):
        lo = torch.tensor([0, 5, 17][:b], device=DEVICE)
        hi_t = torch.tensor([hi], device=DEVICE)
        got = decode_attention(q, k, v, lo, hi_t, 0.3)
        ref = decode_attention_reference(q.float(), k.float(), v.float(), lo, hi_t, 0.3)
        assert got.shape == (b, h, 1, d) and got.dtype == dtype and got.is_contiguous()
        err = ((got.float() - ref).norm() / ref.norm()).item()
        assert err < TOL[dtype], (hi, err)


def test_reads_only_the_visible_slots_and_empty_rows_are_zero():
    q, k, v = _case(2, 4, 2, 64, 16, torch.float32, seed=1)
    lo, hi = torch.tensor([10, 40], device=DEVICE), torch.tensor([30], device=DEVICE)
    out = decode_attention(q, k, v, lo, hi, 0.25)
    k2, v2 = k.clone(), v.clone()
    for t in (k2, v2):  # slots nobody sees: poisoned, the result must not change
        t[:, :, :10] = float("nan")
        t[:, :, 31:] = float("nan")
        t[0, :, 31:] = float("nan")
    out2 = decode_attention(q, k2, v2, torch.tensor([10, 31], device=DEVICE), hi, 0.25)
    assert torch.equal(out[0], out2[0])
    assert torch.equal(out2[1], torch.zeros_like(out2[1]))  # lo > hi: nothing visible
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(q, k[:, :, :, :8], v, lo, hi, 0.25)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, v, lo, hi, 0.25, split=24)
    # any valid split gives the same result (up to the order of the partial sums)
    for split in (16, 64):
        torch.testing.assert_close(decode_attention(q, k, v, lo, hi, 0.25, split=split), out)


def test_op_fake_and_schema():
    q, k, v = _case(2, 4, 2, 40, 16, torch.float32, seed=2)
    args = (q, k, v, torch.tensor([0, 3], device=DEVICE), torch.tensor([20], device=DEVICE), 0.25)
    torch.library.opcheck(torch.ops.rsparse.decode_attention.default, args)
    ref = decode_attention_reference(*args)
    assert torch.allclose(ops.decode_attention(*args), ref, atol=1e-5)


def _hf_greedy(model, rows, n):
    from test_engine import hf_greedy

    return hf_greedy(model, rows, n)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_engine_with_the_kernel_gives_transformers_tokens(arch, monkeypatch):
    # grouped KV heads, left-padded batch of 3; Mistral: a sliding window shorter than the text
    model = tiny_model(arch).to(DEVICE)
    if arch == "mistral":
        model.config.sliding_window = 16
    rows = [[5 + i for i in range(n)] for n in (14, 6, 10)]
    expected = _hf_greedy(model, rows, 10)
    calls = []
    real = ops.decode_attention
    monkeypatch.setattr("rsparse.runtime.engine.decode_attention", lambda *a: calls.append(1) or real(*a))
    if DEVICE == "cpu":  # the interpreter runs the kernel behind the op on the CPU
        monkeypatch.setattr("rsparse.runtime.engine.kernel_runs_on", lambda device: True)
    # eager steps, so that every call reaches the counter (on CUDA the compiled, graph-captured
    # engine runs the kernel by default: test_engine's greedy tests check its tokens there)
    engine = Engine(model, batch_size=3, max_seq_len=40, attention="kernel", compile=False, cuda_graph=False)
    assert engine.generate(rows, 10).tokens == expected
    assert len(calls) >= 9 * len(model.model.layers)  # every decode step of every block


def test_engine_refuses_an_unknown_attention():
    with pytest.raises(EngineError, match="attention must be"):
        Engine(tiny_model(), attention="flash")


def test_split_size_follows_the_measured_rule():
    # the default split sizes measured best (within 6%) on the H200: 64 slots per program until
    # the grid over the whole cache would pass ~1024 programs, at most 256
    from rsparse.runtime.kernels.triton_attention import _split_size

    assert _split_size(32, 640) == 64  # Llama-2-7B heads, batch 1, prompt 512 + 128
    assert _split_size(32, 2048) == 64
    assert _split_size(128, 640) == 128  # batch 4
    assert _split_size(128, 2048) == 256
    assert _split_size(8, 2048) == 64  # Llama-3-8B kv heads
    assert _split_size(1, 16) == 64 and _split_size(64, 1 << 16) == 256
