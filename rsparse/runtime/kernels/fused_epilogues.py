"""Fused epilogues of the R-Sparse decode kernel: what a decoder block does right after a
projection, done by the launch that turns the fp32 workspace into the layer's output, so the
block needs no separate kernel for it.

- ``silu_mul`` (gate/up call, two parts of equal width): h = silu(gate) * up. Gate and up are
  rounded to the model dtype first, as the separate projections would return them; the product
  is computed in fp32 and rounded once (what Inductor's fused kernel does).
- ``add_rmsnorm`` (o_proj or down_proj call, one part): h = residual + y (rounded, as the
  separate add), and xn = weight * round(h * rsqrt(mean(h^2) + eps)), transformers' Llama
  RMSNorm (also Mistral's and Qwen2/3's): the next norm's output, ready for the next
  projections. One program per row: the mean needs the whole row.

Both replace ``_epilogue_kernel`` (rsparse_device_kernels.py) in a call and keep its contract:
wait for the main grid (PDL), zero the workspace and z for the next call (DET: slots added in a
fixed order, nothing zeroed). ``apply_epilogue_torch`` is the same function in torch: the
reference, and what the cuBLAS path and CPU runs use.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .optional_triton import _HAS_TRITON, tl, triton

if _HAS_TRITON:  # the device helpers exist only with triton
    from .rsparse_device_common import _pdl_release, _pdl_wait, _round_out, _ws_sum

EPILOGUES = ("silu_mul", "add_rmsnorm")
MAX_NORM_WIDTH = 16384  # add_rmsnorm keeps a whole row in one program


class Epilogue(NamedTuple):
    """A fused epilogue of one call: kind (EPILOGUES); add_rmsnorm's residual (M, N), norm
    weight (N,), eps and the xn output (M, N)."""
    kind: str
    residual: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    eps: float = 0.0
    xn: Optional[torch.Tensor] = None


def add_rmsnorm_epilogue(x: torch.Tensor, N: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                         eps: float) -> Epilogue:
    """The add_rmsnorm Epilogue of a call on x (..., in) whose layer has N outputs: residual
    (..., N) in x's dtype and norm_weight (N,) checked, flattened to rows, the xn output allocated."""
    lead = x.shape[:-1]
    if tuple(residual.shape) != (*lead, N) or residual.dtype != x.dtype:
        raise ValueError(f"residual must be a {x.dtype} tensor of shape {(*lead, N)}, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if norm_weight.numel() != N or norm_weight.device != x.device:
        raise ValueError(f"norm_weight must have {N} elements on {x.device}")
    M = residual.numel() // N
    return Epilogue("add_rmsnorm", residual.reshape(M, N).contiguous(),
                    norm_weight.reshape(N).to(x.dtype).contiguous(), float(eps),
                    torch.empty(M, N, dtype=x.dtype, device=x.device))


def apply_epilogue_torch(epi: Epilogue, ys) -> tuple:
    """The epilogue on finished projection outputs ys (each (M, N_p) in the model dtype):
    silu_mul -> (h,), add_rmsnorm -> (h, xn)."""
    if epi.kind == "silu_mul":
        gate, up = ys
        return ((F.silu(gate.float()) * up.float()).to(gate.dtype),)
    (y,) = ys
    h = epi.residual + y
    hf = h.float()
    xn = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + epi.eps)
    return h, epi.weight * xn.to(h.dtype)


if _HAS_TRITON:

    @triton.jit
    def _ws_value(ws_ptr, b, N, offs, ok, n_slots, bias_ptr, HAS_BIAS: tl.constexpr,
                  RTNE_FIX: tl.constexpr, DET: tl.constexpr, OUT_DTYPE: tl.constexpr):
        """Row b of a part's output at offs, fp32 holding the model-dtype value: the workspace
        (DET: its n_slots slots in a fixed order) + bias, rounded to OUT_DTYPE."""
        v = _ws_sum(ws_ptr, b, N, offs, ok, n_slots, bias_ptr, HAS_BIAS, DET)
        return _round_out(v, RTNE_FIX).to(OUT_DTYPE).to(tl.float32)

    @triton.jit
    def _zero_rest(ws_ptr, b, N, offs, ok, z_ptr, ZN, pid, n_prog, BLOCK: tl.constexpr,
                   DET: tl.constexpr):
        """Leave the scratch zero for the next call: this program's workspace block and (row 0
        programs) a share of z."""
        if not DET:
            tl.store(ws_ptr + b * N + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=ok)
        if b == 0:
            for z0 in range(pid * BLOCK, ZN, n_prog * BLOCK):
                zo = z0 + tl.arange(0, BLOCK)
                tl.store(z_ptr + zo, tl.zeros([BLOCK], dtype=tl.float32), mask=zo < ZN)

    @triton.jit
    def _silu_mul_epilogue_kernel(ws_ptr, z_ptr, ZN, y_ptr, stride_ym, b0_ptr, b1_ptr, N, wo1,
                                  ns0, ns1, HB0: tl.constexpr, HB1: tl.constexpr,
                                  BLOCK_E: tl.constexpr, RTNE_FIX: tl.constexpr,
                                  USE_PDL: tl.constexpr, DET: tl.constexpr):
        """grid (cdiv(N, BLOCK_E), M): y = silu(gate) * up from the two parts' workspaces."""
        _pdl_wait(USE_PDL)  # every partial sum of the main grid has landed
        _pdl_release(USE_PDL)
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        ok = offs < N
        dt = y_ptr.dtype.element_ty
        g = _ws_value(ws_ptr, b, N, offs, ok, ns0, b0_ptr, HB0, RTNE_FIX, DET, dt)
        u = _ws_value(ws_ptr + wo1, b, N, offs, ok, ns1, b1_ptr, HB1, RTNE_FIX, DET, dt)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(y_ptr + b * stride_ym + offs, _round_out(h, RTNE_FIX).to(dt), mask=ok)
        _zero_rest(ws_ptr, b, N, offs, ok, z_ptr, ZN, pid, tl.num_programs(0), BLOCK_E, DET)
        _zero_rest(ws_ptr + wo1, b, N, offs, ok, z_ptr, 0, pid, 1, BLOCK_E, DET)

    @triton.jit
    def _add_rmsnorm_epilogue_kernel(ws_ptr, z_ptr, ZN, h_ptr, xn_ptr, res_ptr, bias_ptr,
                                     nw_ptr, N, ns0, eps, HAS_BIAS: tl.constexpr,
                                     BLOCK: tl.constexpr, RTNE_FIX: tl.constexpr,
                                     USE_PDL: tl.constexpr, DET: tl.constexpr):
        """grid (1, M): h = residual + y, xn = weight * rmsnorm(h); row b of (M, N)
        contiguous tensors."""
        _pdl_wait(USE_PDL)
        _pdl_release(USE_PDL)
        b = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        dt = h_ptr.dtype.element_ty
        y = _ws_value(ws_ptr, b, N, offs, ok, ns0, bias_ptr, HAS_BIAS, RTNE_FIX, DET, dt)
        r = tl.load(res_ptr + b * N + offs, mask=ok, other=0.0).to(tl.float32)
        h = _round_out(r + y, RTNE_FIX).to(dt).to(tl.float32)
        tl.store(h_ptr + b * N + offs, h.to(dt), mask=ok)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        xn = _round_out(h * rstd, RTNE_FIX).to(dt).to(tl.float32)
        xn = xn * tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(xn_ptr + b * N + offs, _round_out(xn, RTNE_FIX).to(dt), mask=ok)
        _zero_rest(ws_ptr, b, N, offs, ok, z_ptr, ZN, 0, 1, BLOCK, DET)


def launch_epilogue(epi: Epilogue, ws, zbuf, zn, parts, ys, ws_off, ws_slots, *, rtne_fix,
                    use_pdl, det, block_e, pdl_kw):
    """Launch the fused epilogue of a call on the Triton path (the host side of _run_triton has
    laid out ws / z: ws_off, ws_slots per part); writes ys[0] (and epi.xn)."""
    M = ys[0].shape[0]
    if epi.kind == "silu_mul":
        p0, p1 = parts
        _silu_mul_epilogue_kernel[(triton.cdiv(p0.N, block_e), M)](
            ws, zbuf, zn, ys[0], ys[0].stride(0), p0.bias if p0.bias is not None else ws,
            p1.bias if p1.bias is not None else ws, p0.N, ws_off[1], ws_slots[0], ws_slots[1],
            HB0=p0.bias is not None, HB1=p1.bias is not None, BLOCK_E=block_e,
            RTNE_FIX=rtne_fix, USE_PDL=use_pdl, DET=det, num_warps=4, **pdl_kw)
        return
    (p,) = parts
    block = triton.next_power_of_2(p.N)
    _add_rmsnorm_epilogue_kernel[(1, M)](
        ws, zbuf, zn, ys[0], epi.xn, epi.residual, p.bias if p.bias is not None else ws,
        epi.weight, p.N, ws_slots[0], float(epi.eps), HAS_BIAS=p.bias is not None, BLOCK=block,
        RTNE_FIX=rtne_fix, USE_PDL=use_pdl, DET=det, num_warps=8 if block >= 2048 else 4,
        **pdl_kw)
