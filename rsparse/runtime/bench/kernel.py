"""Decode-kernel benchmark: dense cuBLAS vs the fused R-Sparse kernel vs the sparse-only kernel.

    python -m rsparse.runtime.bench.kernel --out DIR [--dtypes bf16,fp16,fp32] [--batches 1,2,4,8] ...
    python rsparse/runtime/bench/kernel.py --out DIR ...      (same, without importing the rest of rsparse)

At Llama-2-7B and Llama-3-8B layer shapes and model-level budgets s, the R-Sparse layer keeps a
fraction k = (1-s)*rho of the input channels and has rank r = floor((1-s)*(1-rho)*out*in/(out+in));
the sparse-only kernel (r = 0) keeps 1-s. Thresholds are the actual quantiles of the random
heavy-tailed (Laplace) input's scores, so the kept fraction is right per row.

Timing: each op is captured `--calls` times in one CUDA graph, cycling over input/weight sets
that together exceed the L2 cache several times, warmed up, then the graph is replayed
`--replays` times between CUDA events; the median microseconds per call are reported, with the
achieved bandwidth over the bytes the op must read (kept rows of w_t, both factors, x, y) and
the speed-up over the dense F.linear with a normal (out, in) weight. Every op is checked against
the torch reference on the GPU in the same run. Raw numbers go to DIR/kernel_bench.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _load_kernels():
    """The kernel module, without needing the rest of the package to import."""
    if __package__:
        try:
            from ..kernels import triton_rsparse  # type: ignore

            return triton_rsparse
        except Exception:  # pragma: no cover - fall back to the file
            pass
    path = Path(__file__).resolve().parents[1] / "kernels" / "triton_rsparse.py"
    spec = importlib.util.spec_from_file_location("_rsparse_triton_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# (label, out, in)
SHAPES = [
    ("L2 q/k/v/o", 4096, 4096),
    ("L2 gate/up", 11008, 4096),
    ("L2 down", 4096, 11008),
    ("L3 gate/up", 14336, 4096),
    ("L3 down", 4096, 14336),
    ("L3 k/v", 1024, 4096),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# candidate kernel configs for --tune (16-bit; the best per shape and batch class is used by
# the bench that follows and printed as a table for rsparse/runtime/kernels/triton_rsparse.py)
VARIANTS_M1 = {
    "fma512x16": dict(BLOCK_N=512, BLOCK_K=16, K_ITERS=1, num_warps=4),
    "fma128x64": dict(BLOCK_N=128, BLOCK_K=64, K_ITERS=1, num_warps=4),
    "dot128x64": dict(M1_DOT=True, BLOCK_N=128, BLOCK_K=64, num_warps=4),
    "cmp512-128-8": dict(COMPACT=True, BLOCK_N=512, CH=128, G=8, BLOCK_KR=16, num_warps=4),
    "cmp256-256-16": dict(COMPACT=True, BLOCK_N=256, CH=256, G=16, BLOCK_KR=32, num_warps=4),
    "cmp1024-128-8": dict(COMPACT=True, BLOCK_N=1024, CH=128, G=8, BLOCK_KR=16, num_warps=8),
    "cmp256-128-32": dict(COMPACT=True, BLOCK_N=256, CH=128, G=32, BLOCK_KR=32, num_warps=8),
    "cmp128-64-16": dict(COMPACT=True, BLOCK_N=128, CH=64, G=16, BLOCK_KR=64, num_warps=4),
    "cmpdot128-128-32": dict(COMPACT=True, M1_DOT=True, BLOCK_N=128, CH=128, G=32,
                             BLOCK_KR=64, num_warps=4),
}
VARIANTS_MM = {
    "mm128x64": dict(BLOCK_N=128, BLOCK_K=64, num_warps=4),
    "cmpdot128-128-32": dict(COMPACT=True, BLOCK_N=128, CH=128, G=32, BLOCK_KR=64, num_warps=4),
    "cmpdot256-256-32": dict(COMPACT=True, BLOCK_N=256, CH=256, G=32, BLOCK_KR=32, num_warps=8),
}


def rank_for(s: float, rho: float, out_f: int, in_f: int) -> int:
    return int(math.floor((1 - s) * (1 - rho) * out_f * in_f / (out_f + in_f)))


class Timer:
    """Median microseconds per call of a list of call closures (cycled), CUDA graph replays."""

    def __init__(self, calls: int, replays: int, warmup: int, graphs: bool):
        self.calls, self.replays, self.warmup, self.graphs = calls, replays, warmup, graphs

    def __call__(self, fns):
        if not self.graphs:  # CPU smoke mode: eager wall clock
            for f in fns:
                f()
            t = []
            for _ in range(self.replays):
                t0 = time.perf_counter()
                for i in range(self.calls):
                    fns[i % len(fns)]()
                t.append((time.perf_counter() - t0) / self.calls * 1e6)
            return statistics.median(t), t
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles, allocates scratch, outside capture
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(self.calls):
                fns[i % len(fns)]()
        for _ in range(self.warmup):
            g.replay()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(self.replays)]
        for e0, e1 in ev:
            e0.record()
            g.replay()
            e1.record()
        torch.cuda.synchronize()
        t = [e0.elapsed_time(e1) * 1e3 / self.calls for e0, e1 in ev]
        del g
        return statistics.median(t), t


def _relerr(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


def _check(fn, ref, dtype, log, what):
    y = fn()
    err = _relerr(y, ref)
    if not (err < _tol(dtype)) or not bool(torch.isfinite(y).all()):
        log(f"CHECK FAILED {what}: rel err {err}")
    return err


class ShapeSets:
    """Rotating weight sets for one (shape, dtype): dense W (out, in) and w_t (in, out)."""

    def __init__(self, out_f, in_f, dtype, dev, min_bytes, max_sets, seed):
        elt = torch.empty((), dtype=dtype).element_size()
        per = out_f * in_f * elt
        self.n = max(2, min(max_sets, math.ceil(min_bytes / per)))
        g = torch.Generator(device=dev).manual_seed(seed)
        self.W, self.w_t, self.scale = [], [], []
        for _ in range(self.n):
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.float32, generator=g)
            w = (w / in_f ** 0.5)
            self.W.append(w.to(dtype).contiguous())
            self.w_t.append(w.t().contiguous().to(dtype))
            del w
            self.scale.append(torch.rand(in_f, device=dev, generator=g) + 0.5)
        self.out_f, self.in_f, self.dtype, self.dev, self.g = out_f, in_f, dtype, dev, g

    def factors(self, r):
        if r <= 0:
            return [None] * self.n, [None] * self.n
        d = [(torch.randn(self.in_f, r, device=self.dev, generator=self.g) / self.in_f ** 0.5)
             .to(self.dtype) for _ in range(self.n)]
        u = [(torch.randn(r, self.out_f, device=self.dev, generator=self.g) / r ** 0.5)
             .to(self.dtype) for _ in range(self.n)]
        return d, u

    def inputs(self, M):
        lap = torch.distributions.Laplace(torch.tensor(0.0, device=self.dev),
                                          torch.tensor(1.0, device=self.dev))
        return [lap.sample((M, self.in_f)).to(self.dtype) for _ in range(self.n)]


def _threshold(x, scale, keep_frac):
    score = x.float().abs()
    if scale is not None:
        score = score * scale
    q = torch.quantile(score.flatten(), 1.0 - keep_frac)
    return q.reshape(1).float()


def _union_frac(x, scale, thr):
    score = x.float().abs()
    if scale is not None:
        score = score * scale
    return (score > thr).any(0).float().mean().item()


def run_bench(args, K, timer, dev, records, log, tuned=None):
    shapes = _select_shapes(args)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    budgets = [float(s) for s in args.budgets.split(",")]
    for dname, dtype in zip(args.dtypes.split(","), dtypes):
        elt = torch.empty((), dtype=dtype).element_size()
        for label, out_f, in_f in shapes:
            sets = ShapeSets(out_f, in_f, dtype, dev, args.min_set_mb * 2**20, args.calls,
                             args.seed)
            facs = {s: sets.factors(rank_for(s, args.rho, out_f, in_f)) for s in budgets}
            for M in batches:
                xs = sets.inputs(M)
                io = (M * in_f + M * out_f) * elt
                t_dense, raw = timer([(lambda i=i: F.linear(xs[i], sets.W[i]))
                                      for i in range(sets.n)])
                base = dict(shape=f"{out_f}x{in_f}", label=label, out=out_f, **{"in": in_f},
                            dtype=dname, batch=M, nsets=sets.n, calls=args.calls)
                bytes_dense = out_f * in_f * elt + io
                records.append(dict(base, op="dense", s=None, us=t_dense, bytes=bytes_dense,
                                    gbps=bytes_dense / t_dense / 1e3, speedup=1.0, raw_us=raw))
                for s in budgets:
                    r = rank_for(s, args.rho, out_f, in_f)
                    d, u = facs[s]
                    for op in ("rsparse", "sparse"):
                        keep = (1 - s) * args.rho if op == "rsparse" else (1 - s)
                        use_lr = op == "rsparse" and r > 0
                        sc = sets.scale if op == "rsparse" else [None] * sets.n
                        thr = [_threshold(xs[i], sc[i], keep) for i in range(sets.n)]
                        cls = "m1" if M == 1 else "mm"
                        cfg = (tuned or {}).get((cls, out_f, in_f)) if elt == 2 else None
                        fns = [(lambda i=i: K.rsparse_decode_linear(
                            xs[i], sets.w_t[i], thr[i], sc[i],
                            d[i] if use_lr else None, u[i] if use_lr else None, _config=cfg))
                            for i in range(sets.n)]
                        err = err_after = None
                        if not args.no_check:
                            ref = K.rsparse_decode_linear_reference(
                                xs[0], sets.w_t[0], thr[0], sc[0],
                                d[0] if use_lr else None, u[0] if use_lr else None)
                            err = _check(fns[0], ref, dtype, log,
                                         f"{op} {out_f}x{in_f} {dname} M={M} s={s}")
                        t, raw = timer(fns)
                        if not args.no_check:  # scratch still clean after many graph replays?
                            err_after = _check(fns[0], ref, dtype, log,
                                               f"{op} {out_f}x{in_f} {dname} M={M} s={s} (after)")
                        uni = statistics.mean(_union_frac(xs[i], sc[i], thr[i])
                                              for i in range(sets.n))
                        nbytes = uni * in_f * out_f * elt + io
                        if use_lr:
                            nbytes += (in_f * r + r * out_f) * elt
                        records.append(dict(base, op=op, s=s, rank=r if use_lr else 0,
                                            keep=keep, union_keep=uni, us=t, bytes=nbytes,
                                            gbps=nbytes / t / 1e3, speedup=t_dense / t,
                                            rel_err=err, rel_err_after=err_after,
                                            config=cfg, raw_us=raw))
                    log(f"{dname} M={M} {out_f}x{in_f} s={s}: dense {t_dense:.1f}us "
                        f"rsparse {records[-2]['us']:.1f}us ({records[-2]['speedup']:.2f}x) "
                        f"sparse {records[-1]['us']:.1f}us ({records[-1]['speedup']:.2f}x)")
            del sets, facs
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def run_tune(args, K, timer, dev, records, log):
    """Kernel-variant sweep at s=0.5 (16-bit), batch 1 and batch 4, with diagnostics.

    Returns {("m1"|"mm", out, in): best config by R-Sparse time}."""
    dname = next((d for d in args.dtypes.split(",") if d != "fp32"), "bf16")
    dtype = DTYPES[dname]
    s = 0.5
    tuned = {}
    for label, out_f, in_f in _select_shapes(args):
        sets = ShapeSets(out_f, in_f, dtype, dev, args.min_set_mb * 2**20, args.calls, args.seed)
        r = rank_for(s, args.rho, out_f, in_f)
        d, u = sets.factors(r)
        for M, variants, cls in ((1, VARIANTS_M1, "m1"), (4, VARIANTS_MM, "mm")):
            xs = sets.inputs(M)
            t_dense, _ = timer([(lambda i=i: F.linear(xs[i], sets.W[i]))
                                for i in range(sets.n)])
            thr_r = [_threshold(xs[i], sets.scale[i], (1 - s) * args.rho)
                     for i in range(sets.n)]
            thr_s = [_threshold(xs[i], None, 1 - s) for i in range(sets.n)]

            def t_op(cfg, lr=True, thr=None):
                th = thr if thr is not None else (thr_r if lr else thr_s)
                fns = [(lambda i=i: K.rsparse_decode_linear(
                    xs[i], sets.w_t[i], th[i], sets.scale[i] if lr else None,
                    d[i] if lr else None, u[i] if lr else None, _config=cfg))
                    for i in range(sets.n)]
                return timer(fns)[0]

            res = []
            for name, cfg in variants.items():
                try:
                    ref = K.rsparse_decode_linear_reference(xs[0], sets.w_t[0], thr_r[0],
                                                            sets.scale[0], d[0], u[0])
                    y = K.rsparse_decode_linear(xs[0], sets.w_t[0], thr_r[0], sets.scale[0],
                                                d[0], u[0], _config=cfg)
                    err = _relerr(y, ref)
                    if not err < _tol(dtype):
                        raise RuntimeError(f"wrong result, rel err {err}")
                    tr, ts = t_op(cfg, lr=True), t_op(cfg, lr=False)
                except Exception as e:  # a variant that fails to build or is wrong is skipped
                    log(f"    variant {name} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                res.append((tr, ts, name, cfg))
                records.append(dict(kind="tune", shape=f"{out_f}x{in_f}", batch=M,
                                    dtype=dname, variant=name, cfg=cfg, sparse_us=ts,
                                    rsparse_us=tr, dense_us=t_dense))
            if not res:
                continue
            res.sort(key=lambda z: z[0])
            tuned[(cls, out_f, in_f)] = res[0][3]
            best_s = min(res, key=lambda z: z[1])
            log(f"tune {out_f}x{in_f} M={M}: dense {t_dense:.1f} | " + " ".join(
                f"{n}={tr:.1f}/{ts:.1f}" for tr, ts, n, _ in res) + "  (R-Sparse/sparse-only us)")
            log(f"    best R-Sparse {res[0][2]} {res[0][0]:.1f}us ({t_dense / res[0][0]:.2f}x), "
                f"best sparse-only {best_s[2]} {best_s[1]:.1f}us ({t_dense / best_s[1]:.2f}x)")
            if M == 1:
                best = res[0][3]
                inf = torch.full((1,), float("inf"), device=dev)
                ninf = torch.full((1,), float("-inf"), device=dev)
                diag = dict(
                    sparse_keep_all=t_op(best, lr=False, thr=[ninf] * sets.n),
                    sparse_keep_none=t_op(best, lr=False, thr=[inf] * sets.n),
                    rsparse_keep_none=t_op(best, lr=True, thr=[inf] * sets.n),
                )
                records.append(dict(kind="diag", shape=f"{out_f}x{in_f}", batch=1, dtype=dname,
                                    variant=res[0][2], cfg=best, dense_us=t_dense, rank=r,
                                    **diag))
                log("    diag " + " ".join(f"{k}={v:.1f}us" for k, v in diag.items()))
        del sets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    log("_CONFIG_TABLE = {  # (class, in, out) -> config, 16-bit")
    for (cls, out_f, in_f), cfg in tuned.items():
        log(f"    (\"{cls}\", {in_f}, {out_f}): {cfg},")
    log("}")
    return tuned


def _select_shapes(args):
    if args.smoke:
        return [("smoke a", 96, 64), ("smoke b", 40, 150)]
    if not args.shapes:
        return SHAPES
    want = set(args.shapes.split(","))
    return [s for s in SHAPES if f"{s[1]}x{s[2]}" in want]


def print_table(records, budgets, log):
    dense = {(r["dtype"], r["batch"], r["shape"]): r for r in records if r.get("op") == "dense"}
    ops = {(r["dtype"], r["batch"], r["shape"], r["op"], r["s"]): r for r in records
           if r.get("op") in ("rsparse", "sparse")}
    hdr_s = " ".join(f"{s:>5.1f}" for s in budgets)
    log("")
    log("speed-up over dense cuBLAS (median us per call; CUDA graphs, rotating sets > L2)")
    log(f"{'dtype':5} {'M':>2} {'out x in':>11} {'dense':>7} | R-Sparse s={hdr_s} |"
        f" sparse-only s={hdr_s} | GB/s@.5 dense/rs/sp")
    for (dn, M, shape), dr in dense.items():
        rs = [ops.get((dn, M, shape, "rsparse", s)) for s in budgets]
        sp = [ops.get((dn, M, shape, "sparse", s)) for s in budgets]
        f = lambda r: f"{r['speedup']:5.2f}" if r else "    -"  # noqa: E731
        half_r = ops.get((dn, M, shape, "rsparse", 0.5))
        half_s = ops.get((dn, M, shape, "sparse", 0.5))
        bw = f"{dr['gbps']:.0f}/" + (f"{half_r['gbps']:.0f}" if half_r else "-") + "/" + \
            (f"{half_s['gbps']:.0f}" if half_s else "-")
        log(f"{dn:5} {M:>2} {shape:>11} {dr['us']:7.1f} |          {' '.join(f(r) for r in rs)} |"
            f"             {' '.join(f(r) for r in sp)} | {bw}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/kernel-bench", help="output directory")
    p.add_argument("--shapes", default="", help="comma list of OUTxIN (default: all six)")
    p.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--rho", type=float, default=0.9, help="sparse share of the layer budget")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    p.add_argument("--replays", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-set-mb", type=float, default=160.0,
                   help="rotating sets hold at least this many MB of weights per op")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--tune", action="store_true",
                   help="sweep batch-1 tile configs first and use the best per shape (16-bit)")
    p.add_argument("--no-bench", action="store_true", help="only --tune")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test (TRITON_INTERPRET, tiny shapes, eager timing)")
    args = p.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.calls, args.replays, args.min_set_mb = 2, 1, 0.0
    K = _load_kernels()
    if not K.triton_available():
        print("triton / CUDA not available", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    import triton

    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, argv=sys.argv if argv is None else list(argv),
                args=vars(args), configs=dict(K._DEFAULT_CONFIGS), lr_defaults=K._LR_DEFAULTS,
                config_table={str(k): v for k, v in K._CONFIG_TABLE.items()})
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        meta.update(sm_count=prop.multi_processor_count,
                    l2_bytes=getattr(prop, "L2_cache_size", None))
    log(f"device {meta['device']} torch {meta['torch']} triton {meta['triton']}")
    timer = Timer(args.calls, args.replays, args.warmup, graphs=dev.type == "cuda")
    records = []
    t0 = time.time()

    def _term(signum, frame):  # `timeout` sends SIGTERM: still write what we have
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    try:
        tuned = run_tune(args, K, timer, dev, records, log) if args.tune else None
        if tuned:
            meta["tuned"] = {f"{c}:{o}x{i}": v for (c, o, i), v in tuned.items()}
        if not args.no_bench:
            run_bench(args, K, timer, dev, records, log, tuned)
    finally:
        meta["wall_s"] = time.time() - t0
        (out / "kernel_bench.json").write_text(json.dumps(dict(meta=meta, records=records),
                                                          indent=1))
        if not args.no_bench:
            print_table(records, [float(s) for s in args.budgets.split(",")], log)
        (out / "kernel_bench.txt").write_text("\n".join(lines) + "\n")
    failed = [ln for ln in lines if ln.startswith("CHECK FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
