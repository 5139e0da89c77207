"""Kernel configurations of the R-Sparse decode kernels (triton_rsparse.py): base tile configs,
mode defaults, the per-shape table measured on the H200, and the choice of one config per call
(``_pick_config``). Plain Python.
"""

from __future__ import annotations

from typing import Optional


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

def _batch_class(M: int) -> str:
    """Config classes by rows: the union of kept rows (and so the best path) grows with M."""
    return "m1" if M == 1 else "m2" if M == 2 else "m4" if M <= 4 else "m8"


# Base tile configs: one row (FMA) and several rows (tl.dot, batch padded to 16).
_DEFAULT_CONFIGS = {
    "m1": dict(BLOCK_N=256, BLOCK_K=64, K_ITERS=1, num_warps=4, num_stages=1),
    "mm": dict(BLOCK_N=128, BLOCK_K=64, K_ITERS=1, num_warps=4, num_stages=1),
}
# z kernel (lr_down) and low-rank tile (lr_up rows) shapes, epilogue block. LR_G (batch 1):
# factor rows per FMA step of a low-rank tile (0: the whole BLOCK_KR x BLOCK_N tile at once).
# LR_LAST: the main grid puts the low-rank tiles after the sparse tiles, not before them.
_LR_DEFAULTS = dict(BLOCK_KP=32, BLOCK_R=128, BLOCK_KR=0, LR_G=0, LR_LAST=False, Z_WARPS=4,
                    BLOCK_E=512)  # KR 0: = BLOCK_K
# LR_FUSED: no z kernel; low-rank programs (r-tile, K-slice of LR_KS channels, one of LR_NG
# column groups) multiply their partial z straight into lr_up, BLOCK_NL columns at a time.
_LR_FUSED_DEFAULTS = dict(LR_FUSED=False, LR_KS=512, LR_NG=4, BLOCK_NL=128)
# COMPACT: each sparse program compacts its chunk's kept channels (CH per chunk) and walks them
# G at a time (batch 1: the next group's loads issued before the current group's FMAs; DYN:
# a run-time loop over the groups instead of an unrolled one). M1_DOT: batch-1 also uses the
# tensor-core (tl.dot) path. PDL: programmatic dependent launch between the kernels of a call
# (GPU only). PATH "cublas": split x, then cuBLAS.
# DET: deterministic sums (set when torch.use_deterministic_algorithms(True) is on): every
# program stores its partial sums in its own slot and the epilogue (and, for z, the low-rank
# programs) adds the slots in a fixed order, so a call gives the same bits every time (LR_FUSED
# is then off).
_MODE_DEFAULTS = dict(COMPACT=False, CH=128, G=16, DYN=False, M1_DOT=False, PDL=True,
                      PATH="triton", DET=False)

_CMP_FMA = dict(COMPACT=True, BLOCK_N=512, CH=128, G=8, BLOCK_KR=64, num_warps=4)
_CMP_FMA_DYN = dict(_CMP_FMA, DYN=True)
_PLAIN_DOT = dict(M1_DOT=True, BLOCK_N=128, BLOCK_K=64, num_warps=4)
_MM_128 = dict(BLOCK_N=128, BLOCK_K=64, num_warps=4)
_MM_256X2 = dict(BLOCK_N=256, BLOCK_K=64, K_ITERS=2, num_warps=8)
_CUBLAS = dict(PATH="cublas")
# Per-shape choices for 16-bit dtypes: (class, in, out) -> config, where out is the sum over the
# parts of a multi call and class is m1 / m2 / m4 / m8 (batch 1, 2, 3-4, 5-8: the union of the
# rows' masks grows with the batch and decides whether the sparse kernel still pays), with a
# "+lr" suffix for calls with a low-rank term (R-Sparse) where those measured best with another
# config. PATH "cublas" marks the shape/batch classes where every sparse-kernel variant measured
# slower than the cuBLAS path (split x, then cuBLAS). Entries are the per-op winners of
# `rsparse bench kernel --tune` on the H200, 2026-11-30 (torch 2.11, triton 3.6, bf16,
# s = 0.5, rho = 0.9, i.i.d. Laplace inputs: union of kept rows 75% / 94% / 99.6% at batch
# 2 / 4 / 8); docs/kernel-notes.md, run 2. The batch-1 entries are from the v7 sweep of
# 2026-12-01 (same settings; docs/kernel-notes.md, v7). Unlisted shapes use _default_16bit.
_CONFIG_TABLE: dict = {
    # Llama-2-7B q/k/v/o
    ("m1", 4096, 4096): _CMP_FMA,
    ("m1+lr", 4096, 4096): dict(_CMP_FMA, BLOCK_KR=32, LR_G=8, LR_LAST=True),
    ("m2", 4096, 4096): _MM_256X2,
    ("m2+lr", 4096, 4096): _MM_128,
    ("m4", 4096, 4096): _CUBLAS,
    ("m4+lr", 4096, 4096): _MM_128,
    ("m8", 4096, 4096): _CUBLAS,
    ("m8+lr", 4096, 4096): _MM_128,
    # Llama-2-7B gate/up, down
    ("m1", 4096, 11008): _CMP_FMA_DYN,
    ("m1+lr", 4096, 11008): dict(_CMP_FMA_DYN, BLOCK_KR=32, LR_G=8),
    ("m2", 4096, 11008): _CUBLAS,
    ("m2+lr", 4096, 11008): _MM_128,
    ("m4", 4096, 11008): _CUBLAS,
    ("m4+lr", 4096, 11008): _MM_256X2,
    ("m8", 4096, 11008): _CUBLAS,
    ("m8+lr", 4096, 11008): _MM_256X2,
    ("m1", 11008, 4096): _CMP_FMA_DYN,
    ("m1+lr", 11008, 4096): dict(_CMP_FMA_DYN, BLOCK_KR=16, LR_LAST=True),
    ("m2", 11008, 4096): _CUBLAS,
    ("m2+lr", 11008, 4096): _MM_256X2,
    ("m4", 11008, 4096): _CUBLAS,
    ("m4+lr", 11008, 4096): _MM_256X2,
    ("m8", 11008, 4096): _CUBLAS,
    ("m8+lr", 11008, 4096): _MM_256X2,
    # Llama-3-8B gate/up, down, k/v
    ("m1", 4096, 14336): _CMP_FMA_DYN,
    ("m1+lr", 4096, 14336): dict(_CMP_FMA_DYN, BLOCK_KR=16, LR_LAST=True),
    ("m2", 4096, 14336): _CUBLAS,
    ("m2+lr", 4096, 14336): _MM_256X2,
    ("m4", 4096, 14336): _CUBLAS,
    ("m4+lr", 4096, 14336): _MM_256X2,
    ("m8", 4096, 14336): _CUBLAS,
    ("m8+lr", 4096, 14336): _MM_256X2,
    ("m1", 14336, 4096): _CMP_FMA_DYN,
    ("m1+lr", 14336, 4096): dict(_CMP_FMA_DYN, BLOCK_KR=16, LR_LAST=True),
    ("m2", 14336, 4096): _CUBLAS,
    ("m2+lr", 14336, 4096): _MM_256X2,
    ("m4", 14336, 4096): _CUBLAS,
    ("m4+lr", 14336, 4096): _MM_256X2,
    ("m8", 14336, 4096): _CUBLAS,
    ("m8+lr", 14336, 4096): _MM_256X2,
    ("m1", 4096, 1024): _PLAIN_DOT,
    ("m1+lr", 4096, 1024): dict(_PLAIN_DOT, BLOCK_KR=64),
    ("m2", 4096, 1024): _MM_128,
    ("m4", 4096, 1024): _MM_128,
    ("m8", 4096, 1024): _MM_128,
    # fused groups (rsparse_decode_linear_multi): Llama-2 q/k/v 3 x 4096, gate+up 2 x 11008;
    # Llama-3 q/k/v 4096 + 2 x 1024, gate+up 2 x 14336. Batch 1 from the sweep; at batch 2-8
    # the q/k/v groups measured best on the default masked-tile kernel (R-Sparse and
    # sparse-only), and so did the gate+up groups with R-Sparse; sparse-only gate+up groups take
    # the cuBLAS path, as their parts do (the fused kernel measured 0.7x of cuBLAS there, the
    # separate cuBLAS-path calls 0.92-0.96x; the fused cuBLAS path saves one split launch).
    ("m1", 4096, 12288): _CMP_FMA_DYN,
    ("m1+lr", 4096, 12288): dict(_CMP_FMA_DYN, BLOCK_KR=32, LR_G=8, LR_LAST=True),
    ("m1", 4096, 22016): _CMP_FMA_DYN,
    ("m1+lr", 4096, 22016): dict(_CMP_FMA_DYN, BLOCK_KR=16),
    ("m2", 4096, 22016): _CUBLAS,
    ("m4", 4096, 22016): _CUBLAS,
    ("m8", 4096, 22016): _CUBLAS,
    ("m1", 4096, 6144): _CMP_FMA,
    ("m1+lr", 4096, 6144): dict(_CMP_FMA, BLOCK_KR=32, LR_G=8, LR_LAST=True),
    ("m1", 4096, 28672): _CMP_FMA_DYN,
    ("m1+lr", 4096, 28672): dict(_CMP_FMA_DYN, BLOCK_KR=16),
    ("m2", 4096, 28672): _CUBLAS,
    ("m4", 4096, 28672): _CUBLAS,
    ("m8", 4096, 28672): _CUBLAS,
}


def _default_16bit(cls: str, K: int, N: int) -> dict:
    """16-bit shapes not in the table: the variant that won at the nearest measured shapes."""
    if cls == "m1":
        # large layers: compacted kept rows, FMA product, one group ahead (the run-time loop
        # won at >= 45M weights, the unrolled one at 16-25M); small ones: masked tiles, tl.dot
        if K * N >= 32 * 2**20:
            return _CMP_FMA_DYN
        return _CMP_FMA if K * N >= 8 * 2**20 else _PLAIN_DOT
    return {}  # batch: masked row tiles, tl.dot (the "mm" base config)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def _pick_config(M: int, K: int, N: int, elt: int, override: Optional[dict],
                 has_lr: bool = False) -> dict:
    """Base config of the batch class, then the per-shape table (16-bit), or, if given, the
    override (`_config=`, used by tests and the benchmark's sweep) on top of the base."""
    cls = _batch_class(M)
    cfg = dict(_DEFAULT_CONFIGS["m1" if M == 1 else "mm"])
    cfg.update(_LR_DEFAULTS)
    cfg.update(_LR_FUSED_DEFAULTS)
    cfg.update(_MODE_DEFAULTS)
    if elt == 4 and M > 1:  # fp32 FMA dot: smaller K tiles, else register spills
        cfg.update(BLOCK_K=32)
    if elt == 2 and not override:  # an explicit override applies to the base config
        entry = _CONFIG_TABLE.get((cls + "+lr", K, N)) if has_lr else None
        if entry is None:
            entry = _CONFIG_TABLE.get((cls, K, N))
        cfg.update(entry if entry is not None else _default_16bit(cls, K, N))
    if override:
        unknown = set(override) - set(cfg)
        if unknown:
            raise ValueError(f"unknown kernel config keys {sorted(unknown)}")
        cfg.update(override)
    if cfg["PATH"] not in ("triton", "cublas"):
        raise ValueError(f"PATH must be 'triton' or 'cublas', got {cfg['PATH']!r}")
    return cfg
