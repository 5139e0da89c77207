"""R-Sparse on one fused projection (q/k/v or gate/up stored as one layer) over a batch whose rows
mix prompt (prefill) and decode tokens: what the vLLM plugin runs, in plain torch (no vLLM here).

A fused layer of parts p = 0..P-1 holds, on one tensor-parallel rank:

    weight       (sum out_p, in)  column-major (weight.t() contiguous: a kept channel is one row)
    threshold    (P,)             float32, one calibrated threshold per part
    score_scale  (P, in)          float32, one score scale per part
    lr_down      (in, sum r_p)    the parts' B^T side by side
    lr_up        (sum r_p*out_p,) the parts' A^T (r_p, out_p), each stored contiguous, end to end

Each part is exactly one RSparseLinear (rsparse.core.layer): its own mask |x| * s_p > t_p on the
shared input, its own low-rank path. The per-part math is rsparse's own kernel op
(rsparse.runtime.ops.decode_linear_multi: the Triton kernel on CUDA, its torch reference on the
CPU), and the dense rows are one F.linear over the fused weight.

Which rows are sparse: R-Sparse sparsifies decode steps (`tokens="decode"`, what `rsparse
compress` writes), and RSparseLinear recognises one as a forward call with one token per
sequence. The same rule here: the rows of the requests that run exactly one token in this step
are sparse, every other row (a prompt, a chunk of one, a speculative-decoding verify) is dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsparse.runtime import ops
from rsparse.runtime.kernels import MAX_BATCH_ROWS, rsparse_decode_linear_multi_reference


def one_token_rows(query_start_loc: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows,) bool: rows that belong to a request scheduled for exactly one token.

    query_start_loc (num_reqs + 1,) is the batch's cumulative query lengths, as vLLM's attention
    metadata holds it. Rows past the last request (padding up to a captured batch size) are False.
    No host synchronisation: it runs on the tensor's own device."""
    starts = query_start_loc.to(torch.long)
    single = torch.cat([starts[1:] - starts[:-1] == 1, single_false(starts.device)])
    rows = torch.arange(num_rows, device=starts.device)
    request = torch.searchsorted(starts[1:], rows, right=True)  # num_reqs for padding rows
    return single[request]


def single_false(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.bool, device=device)


def part_views(weight, threshold, score_scale, lr_down, lr_up, out_sizes, ranks) -> list[tuple]:
    """Each part as the kernel op takes it: (w_t, threshold, score_scale, lr_down, lr_up) views."""
    w_t = weight.t()
    parts, out0, r0, up0 = [], 0, 0, 0
    for p, (n, r) in enumerate(zip(out_sizes, ranks)):
        down = lr_down[:, r0:r0 + r] if r else None
        up = lr_up[up0:up0 + r * n].view(r, n) if r else None
        parts.append((w_t[:, out0:out0 + n], threshold[p], score_scale[p], down, up))
        out0, r0, up0 = out0 + n, r0 + r, up0 + r * n
    return parts


def sparse_product(x, parts, bias, out_sizes) -> torch.Tensor:
    """R-Sparse of every part on every row of x (n, in), concatenated: (n, sum out_p)."""
    biases = [None] * len(parts) if bias is None else list(bias.split(list(out_sizes)))
    args = [list(a) for a in zip(*parts)] + [biases]
    if x.shape[0] <= MAX_BATCH_ROWS or not ops.kernel_runs_on(x.device):
        ys = ops.decode_linear_multi(x, *args)  # the Triton kernel where it runs, else its reference
    else:  # above the kernel's row limit: the same function in masked dense math, never dense
        ys = rsparse_decode_linear_multi_reference(x, [tuple(p) + (b,) for p, b in zip(parts, biases)])
    return torch.cat(list(ys), dim=-1)


def fused_linear(x, weight, threshold, score_scale, lr_down, lr_up, bias, out_sizes, ranks,
                 sparse_rows: torch.Tensor | None) -> torch.Tensor:
    """y (n, sum out_p) for x (n, in): R-Sparse on `sparse_rows` (bool (n,); None: every row),
    the dense product on the others."""
    parts = part_views(weight, threshold, score_scale, lr_down, lr_up, out_sizes, ranks)
    if sparse_rows is None:
        return sparse_product(x, parts, bias, out_sizes)
    if x.is_cuda:  # no host synchronisation (CUDA graphs): both products, then a select per row
        return torch.where(sparse_rows[:, None], sparse_product(x, parts, bias, out_sizes), F.linear(x, weight, bias))
    at = sparse_rows.nonzero()[:, 0]  # CPU: each row computed once, the sparse rows gathered
    if at.numel() == 0:
        return F.linear(x, weight, bias)
    if at.numel() == x.shape[0]:
        return sparse_product(x, parts, bias, out_sizes)
    y = F.linear(x, weight, bias)
    return y.index_copy_(0, at, sparse_product(x.index_select(0, at), parts, bias, out_sizes))


def shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of `size` along `dim` (tensor-parallel sharding of a loaded tensor)."""
    return t.narrow(dim, rank * size, size)
