"""rsparse.serving.fused: a fused vLLM layer computes what its parts' RSparseLinear layers compute,
row by row (decode rows sparse, prompt rows dense), and shards exactly under tensor parallelism."""

import math

import pytest
import torch
import torch.nn.functional as F

from rsparse.core.layer import RSparseLinear
from rsparse.serving.fused import fused_linear, one_token_rows, shard

pytestmark = pytest.mark.vllm

IN = 48


def rsparse_part(out: int, rank: int, seed: int) -> RSparseLinear:
    g = torch.Generator().manual_seed(seed)
    dense = torch.nn.Linear(IN, out, bias=False)
    dense.weight.data = torch.randn(out, IN, generator=g) * 0.1
    layer = RSparseLinear.from_linear(dense)
    lr = (torch.randn(IN, rank, generator=g) * 0.1, torch.randn(rank, out, generator=g) * 0.1) if rank else (None, None)
    layer.configure("rsparse" if rank else "sparse", threshold=0.05 + 0.02 * seed, keep_fraction=0.5,
                    score_scale=dense.weight.norm(dim=0), lr_down=lr[0], lr_up=lr[1])
    return layer


def fuse(layers: list[RSparseLinear]) -> dict:
    """The tensors of one fused vLLM layer, laid out as RSparseLinearMethod stores them."""
    return dict(weight=torch.cat([m.weight for m in layers]).t().contiguous().t(),
                threshold=torch.stack([m.threshold for m in layers]),
                score_scale=torch.stack([m.score_scale for m in layers]),
                lr_down=torch.cat([m.lr_down for m in layers], dim=1),
                lr_up=torch.cat([m.lr_up.reshape(-1) for m in layers]),
                bias=None, out_sizes=[m.out_features for m in layers], ranks=[m.rank for m in layers])


@pytest.fixture()
def qkv():
    return [rsparse_part(32, 6, 0), rsparse_part(16, 4, 1), rsparse_part(16, 0, 2)]  # q, k, v (v: sparse only)


def test_one_token_rows_marks_the_requests_of_one_token():
    # requests of 3 (prompt), 1 (decode), 4 (prompt chunk), 1 (decode) tokens, then 2 padding rows
    starts = torch.tensor([0, 3, 4, 8, 9], dtype=torch.int32)
    rows = one_token_rows(starts, 11)
    assert rows.tolist() == [False] * 3 + [True] + [False] * 4 + [True] + [False] * 2


def test_decode_rows_equal_each_parts_rsparse_layer_and_prompt_rows_stay_dense(qkv):
    x = torch.randn(7, IN)
    sparse = torch.tensor([True, False, False, True, False, True, True])
    y = fused_linear(x, **fuse(qkv), sparse_rows=sparse)
    expect_sparse = torch.cat([m._sparse(x) for m in qkv], dim=-1)
    expect_dense = torch.cat([F.linear(x, m.weight) for m in qkv], dim=-1)
    torch.testing.assert_close(y[sparse], expect_sparse[sparse], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[~sparse], expect_dense[~sparse], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expect_sparse, expect_dense, atol=1e-3)  # the masks do drop channels


def test_each_part_uses_its_own_threshold(qkv):
    x = torch.randn(1, IN)
    base = fused_linear(x, **fuse(qkv), sparse_rows=None)
    qkv[1].threshold = torch.tensor(-math.inf)  # k keeps every channel: only k's outputs change
    changed = fused_linear(x, **fuse(qkv), sparse_rows=None)
    assert torch.equal(base[:, :32], changed[:, :32]) and torch.equal(base[:, 48:], changed[:, 48:])
    torch.testing.assert_close(changed[:, 32:48], F.linear(x, qkv[1].weight), rtol=1e-5, atol=1e-6)


def test_bias_is_added_on_both_kinds_of_rows(qkv):
    x = torch.randn(4, IN)
    bias = torch.randn(64)
    fused = fuse(qkv)
    rows = torch.tensor([True, False, True, False])
    without = fused_linear(x, **fused, sparse_rows=rows)
    fused["bias"] = bias
    torch.testing.assert_close(fused_linear(x, **fused, sparse_rows=rows), without + bias, rtol=1e-5, atol=1e-6)


def test_column_parallel_shards_concatenate_to_the_unsharded_layer():
    gate, up = rsparse_part(40, 6, 3), rsparse_part(40, 6, 4)
    x = torch.randn(3, IN)
    full = fused_linear(x, **fuse([gate, up]), sparse_rows=None)
    tp = 2
    outs = []
    for rank in range(tp):  # each rank: its outputs of each part; masks and lr_down replicated
        parts = []
        for m in (gate, up):
            part = RSparseLinear(IN, 20, rank=m.rank)
            part.weight.data = shard(m.weight, 0, rank, 20)
            part.configure("rsparse", float(m.threshold), 0.5, m.score_scale, m.lr_down, shard(m.lr_up, 1, rank, 20))
            parts.append(part)
        outs.append(fused_linear(x, **fuse(parts), sparse_rows=None))
    # vLLM's rank r holds [gate_r, up_r]: reassemble to [gate, up]
    halves = [torch.cat([o[:, :20] for o in outs], 1), torch.cat([o[:, 20:] for o in outs], 1)]
    torch.testing.assert_close(torch.cat(halves, 1), full, rtol=1e-5, atol=1e-6)


def test_row_parallel_partial_outputs_sum_to_the_unsharded_layer():
    down = rsparse_part(24, 8, 5)
    x = torch.randn(3, IN)
    full = fused_linear(x, **fuse([down]), sparse_rows=None)
    tp, width = 3, IN // 3
    partial = torch.zeros_like(full)
    for rank in range(tp):  # each rank: its input channels, its score scale and lr_down rows; one threshold
        part = RSparseLinear(width, 24, rank=8)
        part.weight.data = shard(down.weight, 1, rank, width)
        part.configure("rsparse", float(down.threshold), 0.5, shard(down.score_scale, 0, rank, width),
                       shard(down.lr_down, 0, rank, width), down.lr_up)
        partial += fused_linear(shard(x, 1, rank, width), **fuse([part]), sparse_rows=None)  # the all-reduce
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
