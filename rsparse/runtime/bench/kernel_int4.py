"""4-bit decode-kernel benchmark (issue #26): cuBLAS bf16 vs the dense 4-bit product (tinygemm)
vs the 4-bit sparse-only and R-Sparse kernels (rsparse/runtime/kernels/triton_int4.py).

    python -m rsparse.runtime.bench.kernel_int4 --out DIR [--tune] [--dtypes bf16,fp16]
    python -m rsparse.runtime.bench.kernel_int4 --smoke --out DIR      (CPU, interpreter)

Per layer shape (out x in: Llama-2/3 q/k/v/o, gate/up, down), dtype and batch: cuBLAS with the
16-bit weight, tinygemm on the same layer in 4 bits, the kernel sparse-only (keeps 1 - s of the
channels) and R-Sparse (keeps (1 - s) rho plus the rank floor((1-s)(1-rho) out in / (out+in))
low-rank term, 16-bit factors); at batch > 1 also the "dense" path (split x, tinygemm, low-rank
products). Random 4-bit layers (uniform codes, random scales/zeros), Laplace inputs, thresholds
at the actual quantiles. Timing and checks as `rsparse bench kernel` (kernel_harness.py): calls
captured in CUDA graphs, cycling over weight sets of >= --min-set-mb (several times the L2),
median of the replays; every op checked against the dequantized torch reference before and after
its replays. --tune first sweeps the tile variants (batch 1) and the batch paths (2/4/8) and
uses the winners; at batch 1 it also times the stages left out (nothing kept, everything kept,
no low-rank term) to show where the time goes. Output: DIR/int4_bench.json, DIR/int4_bench.txt.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
BATCH_SHAPES = [(11008, 4096), (4096, 11008)]
SMOKE_SHAPES = [(64, 256), (48, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# batch-1 sparse-tile variants (triton_int4.py / int4_configs.py name the knobs)
VARIANTS_M1 = {
    "rows1024-g32": dict(BLOCK_N=1024, CH=128, G=32, num_warps=4),
    "rows1024-w1-ch32": dict(BLOCK_N=1024, CH=32, G=16, num_warps=1, LR_BN=128),
    "rows1024-w1-ch64": dict(BLOCK_N=1024, CH=64, G=16, num_warps=1, LR_BN=128),
    "rows2048-w2-ch32": dict(BLOCK_N=2048, CH=32, G=16, num_warps=2, LR_BN=256),
    "rows4096-w4-ch32": dict(BLOCK_N=4096, CH=32, G=16, num_warps=4),
    "rows4096-w4-ch64": dict(BLOCK_N=4096, CH=64, G=16, num_warps=4),
    "dot256-g32": dict(M1_DOT=True, BLOCK_N=256, CH=128, G=32, COMPACT=True, num_warps=4),
}
# measured in run 1 and dropped (docs/int4-kernel.md): the rows read as bytes (now gone from
# the kernel), codes by shift and mask (MANT 0), (G, BLOCK_N) tiles summed at the end (ROWS1D
# False), BLOCK_N 2048 with 4 warps, the masked in-order tensor-core walk (COMPACT False) and
# BLOCK_N 128 at batch 2-8
LR_VARIANTS = {  # on top of the best batch-1 variant (R-Sparse only)
    "lrdot": dict(LR_DOT=True, BLOCK_KR=32),
    "lrdot-bn256": dict(LR_DOT=True, BLOCK_KR=32, LR_BN=256),
    "kr16": dict(BLOCK_KR=16, LR_G=8),
    "kr32-last": dict(BLOCK_KR=32, LR_G=8, LR_LAST=True),
}
VARIANTS_MM = {
    "dot256-g32-compact": dict(BLOCK_N=256, G=32, COMPACT=True),
    "dense": dict(PATH="dense"),
}


def _modules():
    """Imported after --smoke has set TRITON_INTERPRET (triton reads it when kernels are
    defined)."""
    from rsparse.core import int4
    from rsparse.runtime.bench import kernel_harness as H
    from rsparse.runtime.kernels import int4_configs, int4_dense, triton_int4
    return int4, H, int4_configs, int4_dense, triton_int4


class Layer4:
    """Rotating 4-bit layers of one shape: per set the Int4Weight, its tinygemm packing, a score
    scale and the R-Sparse factors; 16-bit weights for cuBLAS in their own sets."""

    def __init__(self, M4, out_f, in_f, dtype, dev, rank, min_bytes, max_sets, seed):
        int4 = M4
        g = torch.Generator(device=dev).manual_seed(seed)
        per = out_f * in_f // 2 + out_f * in_f // 128 * 4
        self.n = max(2, min(max_sets, math.ceil(min_bytes / per)))
        self.p, self.packed, self.scale, self.fac = [], [], [], []
        for _ in range(self.n):
            qw = torch.randint(0, 256, (in_f, out_f // 2), device=dev, generator=g,
                               dtype=torch.int32).to(torch.uint8)
            s = torch.rand(in_f // 128, out_f, device=dev, generator=g) * 0.004 + 0.001
            z = torch.randn(in_f // 128, out_f, device=dev, generator=g) * 0.005
            p = int4.Int4Weight(qw, torch.stack([s, z], -1).to(torch.bfloat16).contiguous())
            self.p.append(p)
            self.packed.append(self.pack(p))
            self.scale.append(torch.rand(in_f, device=dev, generator=g) + 0.5)
            d = (torch.randn(in_f, rank, device=dev, generator=g) / in_f ** 0.5).to(dtype)
            u = (torch.randn(rank, out_f, device=dev, generator=g) / rank ** 0.5).to(dtype)
            self.fac.append((d, u))
        n16 = max(2, min(max_sets, math.ceil(min_bytes / (out_f * in_f * 2))))
        self.W16 = [(torch.randn(out_f, in_f, device=dev, generator=g) / in_f ** 0.5).to(dtype)
                    for _ in range(n16)]
        self.dev, self.g, self.in_f, self.out_f, self.rank = dev, g, in_f, out_f, rank

    pack = None  # set by main: int4_dense.tinygemm_pack

    def inputs(self, M, dtype):
        e = torch.empty(self.n, M, self.in_f, device=self.dev).exponential_(1.0, generator=self.g)
        sign = torch.randint(0, 2, e.shape, device=self.dev, generator=self.g) * 2 - 1
        return list((e * sign).to(dtype))


def _quantile(x, scale, keep):
    score = x.float().abs() * (1 if scale is None else scale)
    return torch.quantile(score.flatten(), 1.0 - keep).reshape(1).float()


class Ops:
    """Per-set call closures and references of one (layer, batch)."""

    def __init__(self, mods, L, xs, s, rho):
        self.int4, self.H, self.cfgs, self.dense, self.T = mods
        self.L, self.xs, self.s, self.rho = L, xs, s, rho

    def args(self, i, op, keep=None):
        """The kernel's arguments for set i: op sparse (no scale, no factors) | rsparse."""
        L, x = self.L, self.xs[i]
        p = L.p[i]
        if op == "sparse":
            k = 1 - self.s if keep is None else keep
            thr = _quantile(x, None, k) if 0 < k < 1 else torch.full((1,), math.inf if k == 0
                                                                    else -math.inf, device=x.device)
            return (p.qweight, p.scales_zeros, thr, None, None, None, None, L.packed[i])
        k = (1 - self.s) * self.rho if keep is None else keep
        thr = _quantile(x, L.scale[i], k) if 0 < k < 1 else torch.full(
            (1,), math.inf if k == 0 else -math.inf, device=x.device)
        d, u = L.fac[i]
        return (p.qweight, p.scales_zeros, thr, L.scale[i], d, u, None, L.packed[i])

    def build(self, op, cfg=None, keep=None, lr=True):
        """(fns, ref): op cublas | tinygemm | sparse | rsparse (lr False: no factors)."""
        L, xs, T = self.L, self.xs, self.T
        if op == "cublas":
            return [lambda i=i: F.linear(xs[i], L.W16[i % len(L.W16)]) for i in range(L.n)], None
        if op == "tinygemm":
            fns = [lambda i=i: self.dense.int4_linear(xs[i], L.p[i].qweight, L.p[i].scales_zeros,
                                                      L.packed[i]) for i in range(L.n)]
            ref = xs[0].float() @ self.int4.dequantize(L.p[0]).t()
            return fns, ref
        args = [self.args(i, op, keep) for i in range(L.n)]
        if not lr:
            args = [a[:4] + (None, None) + a[6:] for a in args]
        fns = [lambda i=i: T.int4_decode_linear(xs[i], *args[i], _config=cfg) for i in range(L.n)]
        return fns, T.int4_decode_linear_reference(xs[0], *args[0][:7])

    def nbytes(self, op, keep=None):
        """Bytes the op must read (kept rows' 4-bit weights, union over the batch rows, the
        scales, both factors, x, y)."""
        L, x = self.L, self.xs[0]
        io = (x.numel() + x.shape[0] * L.out_f) * x.element_size()
        if op == "cublas":
            return L.out_f * L.in_f * 2 + io
        sz = L.out_f * L.in_f // 128 * 4
        if op == "tinygemm":
            return L.out_f * L.in_f // 2 + sz + io
        thr = self.args(0, op, keep)[2]
        sc = L.scale[0] if op == "rsparse" else None
        uni = ((x.float().abs() * (1 if sc is None else sc)) > thr).any(0).float().mean().item()
        b = uni * L.out_f * L.in_f / 2 + sz + io
        if op == "rsparse":
            b += (L.in_f + L.out_f) * L.rank * x.element_size()
        return b


def timed(bench, ops, what, op, cfg=None, keep=None, lr=True, record=None):
    """Time one op (checked before and after); returns us or None."""
    try:
        fns, ref = ops.build(op, cfg, keep, lr)
        err = _check(bench, fns, ref, what)
        t, raw = bench["timer"](fns)
        err2 = _check(bench, fns, ref, what + " (after replays)")
    except Exception as e:  # one failure must not lose the run
        bench["log"](f"ERROR {what}: {type(e).__name__}: {str(e)[:400]}")
        return None
    nb = ops.nbytes(op, keep) if lr else None
    bench["records"].append(dict(record or {}, what=what, op=op, us=t, bytes=nb,
                                 floor_us=None if nb is None else nb / bench["bw"] * 1e6,
                                 rel_err=err, rel_err_after=err2, cfg=cfg, raw_us=raw))
    return t


def _check(bench, fns, ref, what):
    if ref is None:
        return None
    y = fns[0]()
    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    if not err < (1e-4 if y.dtype == torch.float32 else 2e-2) or not torch.isfinite(y).all():
        bench["log"](f"CHECK FAILED {what}: rel err {err}")
    return err


def run(args, mods, bench, dev):
    int4, H, cfgs, dense, T = mods
    log = bench["log"]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    bshapes = SMOKE_SHAPES if args.smoke else BATCH_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if f"{s[0]}x{s[1]}" in args.shapes.split(",")]
        bshapes = [s for s in bshapes if f"{s[0]}x{s[1]}" in args.shapes.split(",")]
    dtypes = args.dtypes.split(",")
    summary = {}
    for di, dn in enumerate(dtypes):
        dtype = DTYPES[dn]
        for out_f, in_f in shapes:
            rank = H.rank_for(args.s, args.rho, out_f, in_f)
            L = Layer4(int4, out_f, in_f, dtype, dev, rank, args.min_set_mb * 2**20, args.calls,
                       args.seed)
            batches = [1] + ([int(b) for b in args.batches.split(",") if b]
                             if (out_f, in_f) in bshapes and dn in args.batch_dtypes.split(",")
                             else [])
            for M in batches:
                ops = Ops(mods, L, L.inputs(M, dtype), args.s, args.rho)
                rec = dict(shape=f"{out_f}x{in_f}", dtype=dn, batch=M, rank=rank, nsets=L.n)
                tag = f"{dn} M={M} {out_f}x{in_f}"
                res = {op: timed(bench, ops, f"{op} {tag}", op, record=rec)
                       for op in ("cublas", "tinygemm")}
                cls = cfgs.batch_class(M)
                if args.tune and di == 0:  # sweep on the first dtype, the table for all
                    tune(bench, ops, tag, rec, M, cls, in_f, out_f, cfgs)
                for op in ("sparse", "rsparse"):
                    res[op] = timed(bench, ops, f"{op} {tag}", op, record=rec)
                if M == 1 and args.tune and di == 0:  # where the time goes
                    for name, op, keep, lr in (("sparse keep-none", "sparse", 0.0, True),
                                               ("sparse keep-all", "sparse", 1.0, True),
                                               ("rsparse keep-none", "rsparse", 0.0, True),
                                               ("rsparse no-lowrank", "rsparse", None, False)):
                        res[name] = timed(bench, ops, f"{name} {tag}", op, keep=keep, lr=lr,
                                          record=dict(rec, diag=name))
                    res["rsparse no-pdl"] = timed(bench, ops, f"rsparse no-pdl {tag}", "rsparse",
                                                  cfg=_cfg_of(cfgs, M, in_f, out_f, True,
                                                              PDL=False), record=rec)
                summary[tag] = res
                log(f"{tag}: " + "  ".join(f"{k} {v:.1f}" for k, v in res.items()
                                            if v is not None))
            del L
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return summary


def _cfg_of(cfgs, M, K, N, has_lr, **extra):
    """The config the table gives this call, with extra keys on top (as an override)."""
    cfg = cfgs.pick_config(M, K, N, 128, None, has_lr)
    cfg.update(extra)
    return cfg


def tune(bench, ops, tag, rec, M, cls, in_f, out_f, cfgs):
    """Sweep the variants of the batch class; the winners go to int4_configs._TABLE."""
    log = bench["log"]
    variants = VARIANTS_M1 if M == 1 else VARIANTS_MM
    res = {}
    for name, cfg in variants.items():
        res[name] = (cfg, {op: timed(bench, ops, f"tune {name} {op} {tag}", op, cfg=cfg,
                                     record=dict(rec, variant=name))
                           for op in ("sparse", "rsparse")})
    best = {op: min(((r[op], n) for n, (c, r) in res.items() if r[op] is not None),
                    default=None) for op in ("sparse", "rsparse")}
    if best["sparse"] is None or best["rsparse"] is None:
        log(f"tune {tag}: no variant ran")
        return
    if M == 1:  # low-rank tile variants on top of the best R-Sparse variant
        base = res[best["rsparse"][1]][0]
        for name, lcfg in LR_VARIANTS.items():
            cfg = dict(base, **lcfg)
            t = timed(bench, ops, f"tune {best['rsparse'][1]}+{name} rsparse {tag}", "rsparse",
                      cfg=cfg, record=dict(rec, variant=name))
            if t is not None and t < best["rsparse"][0]:
                best["rsparse"] = (t, f"{best['rsparse'][1]}+{name}")
                res[best["rsparse"][1]] = (cfg, {"rsparse": t})
    cfgs._TABLE[(cls, in_f, out_f)] = dict(res[best["sparse"][1]][0])
    cfgs._TABLE[(cls + "+lr", in_f, out_f)] = dict(res[best["rsparse"][1]][0])
    bench["table"][str((cls, in_f, out_f))] = best["sparse"][1]
    bench["table"][str((cls + "+lr", in_f, out_f))] = best["rsparse"][1]
    log(f"tune {tag}: " + " | ".join(
        f"{n} {r.get('sparse') or float('nan'):.1f}/{r.get('rsparse') or float('nan'):.1f}"
        for n, (c, r) in res.items()) + f"  -> sparse {best['sparse'][1]} "
        f"{best['sparse'][0]:.1f}, R-Sparse {best['rsparse'][1]} {best['rsparse'][0]:.1f} us")


def main(argv=None):
    from rsparse.runtime.bench import flags

    args = flags.kernel_int4().parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            if "triton" in sys.modules:  # triton chose compiled mode when it was imported
                print("--smoke needs TRITON_INTERPRET=1 set before triton is imported",
                      file=sys.stderr)
                return 2
            os.environ["TRITON_INTERPRET"] = "1"
        args.calls, args.replays, args.min_set_mb, args.dtypes = 2, 1, 0.0, "bf16"
    mods = _modules()
    int4, H, cfgs, dense, T = mods
    Layer4.pack = staticmethod(dense.tinygemm_pack)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, records = [], []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    import triton
    bw = H.copy_bandwidth(dev)
    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__, args=vars(args),
                copy_bytes_per_s=bw, base=cfgs._BASE, lr=cfgs._LR)
    log(f"device {meta['device']} torch {meta['torch']} triton {meta['triton']}; "
        f"copy {bw / 1e12:.2f} TB/s")
    bench = dict(timer=H.Timer(args.calls, args.replays, args.warmup, graphs=dev.type == "cuda"),
                 log=log, records=records, bw=bw, table={})
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(128 + s)))
    t0 = time.time()
    summary = {}
    try:
        summary = run(args, mods, bench, dev)
    finally:
        meta.update(wall_s=time.time() - t0, tuned=bench["table"],
                    table=[[list(k), v] for k, v in cfgs._TABLE.items()])
        (out / "int4_bench.json").write_text(json.dumps(dict(meta=meta, records=records,
                                                             summary=summary), indent=1,
                                                        default=str))
        print_table(summary, log)
        log(f"wall {meta['wall_s']:.0f} s")
        (out / "int4_bench.txt").write_text("\n".join(lines) + "\n")
    return 1 if any(ln.startswith(("CHECK FAILED", "ERROR")) for ln in lines) else 0


def print_table(summary, log):
    log("")
    log("median us per call; CUDA graphs over weight sets > L2; s = 0.5, R-Sparse rho = 0.9")
    cols = ["cublas", "tinygemm", "sparse", "rsparse"]
    log(f"{'dtype M shape':24} " + " ".join(f"{c:>9}" for c in cols))
    for tag, res in summary.items():
        log(f"{tag:24} " + " ".join(f"{res[c]:9.1f}" if res.get(c) else f"{'-':>9}"
                                    for c in cols))


if __name__ == "__main__":
    sys.exit(main())
