"""Decode-kernel benchmark: cuBLAS vs the R-Sparse kernels (single layers and fused q/k/v, gate/up).

    python -m rsparse.runtime.bench.kernel --out DIR [--quick] [--dtypes bf16,fp16] [--batches 1,2,4,8]
    python rsparse/runtime/bench/kernel.py --out DIR ...      (same, as a script from a checkout)
    python -m rsparse.runtime.bench.kernel --tune --out DIR   (variant sweep, prints a _CONFIG_TABLE)

Per layer shape (Llama-2-7B, Llama-3-8B) and per group of projections that share an input
(q/k/v, gate/up), dtype and batch: dense cuBLAS (F.linear with the usual (out, in) weight),
sparse-only (keeps 1-s of the channels), R-Sparse (keeps (1-s)*rho, plus the rank
r = floor((1-s)*(1-rho)*out*in/(out+in)) low-rank term), and for groups the fused call
(`rsparse_decode_linear_multi`) against the separate calls. Thresholds are the actual quantiles of
the random heavy-tailed (Laplace) input's scores, so the kept fraction is right per row.

Timing: each op is captured `--calls` times in one CUDA graph, cycling over weight sets that
together exceed `--min-set-mb` (several times the L2), warmed up, then the graph is replayed
`--replays` times between CUDA events; median microseconds per call. The bytes floor is the
bytes an op must read (kept rows of w_t: the union over the batch rows, both factors, x, y) at
the device-to-device copy bandwidth measured in the same run. Every op is checked against the
torch reference before and after its timed replays (scratch left clean?).
Output: DIR/kernel_bench.json (all records), DIR/kernel_bench.txt (the log and tables).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch



def _load_kernels():
    """The kernel module of the package, imported when main needs it (after the CPU smoke mode
    set TRITON_INTERPRET: triton picks interpreter vs compiled when the kernels are defined).
    As a script, the repository root goes on sys.path first so that the package imports."""
    if not __package__:
        root = str(Path(__file__).resolve().parents[3])
        if root not in sys.path:
            sys.path.insert(0, root)
    return importlib.import_module("rsparse.runtime.kernels.triton_rsparse")


# (label, in, (out of each part)): single layers, then groups that share an input
SHAPES = [
    ("L2 q/k/v/o", 4096, (4096,)),
    ("L2 gate/up", 4096, (11008,)),
    ("L2 down", 11008, (4096,)),
    ("L3 gate/up", 4096, (14336,)),
    ("L3 down", 14336, (4096,)),
    ("L3 k/v", 4096, (1024,)),
]
GROUPS = [
    ("L2 qkv fused", 4096, (4096, 4096, 4096)),
    ("L2 gate+up fused", 4096, (11008, 11008)),
    ("L3 qkv fused", 4096, (4096, 1024, 1024)),
    ("L3 gate+up fused", 4096, (14336, 14336)),
]
SMOKE_SHAPES = [("smoke a", 64, (96,)), ("smoke b", 150, (40,)), ("smoke qkv", 64, (48, 16, 16))]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# --tune candidates (16-bit). Batch 1: sparse-tile variants; then low-rank variants on the best.
# (Measured and dropped from the kernel, docs/kernel-notes.md: LR_FUSED low-rank tiles, 2-4x
# slower, and PDL off, 1-3 us slower (run 1 of v4); FMA over whole masked tiles, 2x slower; the
# compacted tl.dot walk at batch 1 and 2-8; REGIDX and the walk with one group in flight, slower
# than the walk with two at every shape (v7).)
VARIANTS_M1 = {
    "cmp512-128-8": dict(COMPACT=True, BLOCK_N=512, CH=128, G=8, BLOCK_KR=64, num_warps=4),
    "cmp512-128-8-dyn": dict(COMPACT=True, DYN=True, BLOCK_N=512, CH=128, G=8, BLOCK_KR=64,
                             num_warps=4),
    "cmp512-128-16": dict(COMPACT=True, BLOCK_N=512, CH=128, G=16, BLOCK_KR=64, num_warps=8),
    "cmp256-128-8": dict(COMPACT=True, BLOCK_N=256, CH=128, G=8, BLOCK_KR=64, num_warps=4),
    "cmp256-64-8": dict(COMPACT=True, BLOCK_N=256, CH=64, G=8, BLOCK_KR=32, num_warps=4),
    "plaindot128x64": dict(M1_DOT=True, BLOCK_N=128, BLOCK_K=64, num_warps=4),
}
LR_VARIANTS = {  # applied on top of the best batch-1 sparse variant (R-Sparse only)
    "kr16": dict(BLOCK_KR=16),
    "kr32": dict(BLOCK_KR=32),
    "kr64": dict(BLOCK_KR=64),
    "kr32-g8": dict(BLOCK_KR=32, LR_G=8),
    "kr64-g8": dict(BLOCK_KR=64, LR_G=8),
    "kr128-g8": dict(BLOCK_KR=128, LR_G=8),
    "kr16-last": dict(BLOCK_KR=16, LR_LAST=True),
    "kr32-g8-last": dict(BLOCK_KR=32, LR_G=8, LR_LAST=True),
    "kr64-last": dict(BLOCK_KR=64, LR_LAST=True),
}
VARIANTS_MM = {
    "plaindot128x64": dict(BLOCK_N=128, BLOCK_K=64, num_warps=4),
    "plaindot128x64x4": dict(BLOCK_N=128, BLOCK_K=64, K_ITERS=4, num_warps=4),
    "plaindot256x64x2": dict(BLOCK_N=256, BLOCK_K=64, K_ITERS=2, num_warps=8),
    "plaindot128x128": dict(BLOCK_N=128, BLOCK_K=128, num_warps=8),
    "cublas": dict(PATH="cublas"),
}


if __package__:  # as a package module
    from rsparse.runtime.bench import flags
    from rsparse.runtime.bench.kernel_harness import (Timer, copy_bandwidth, pdl_selftest, _tol, LayerSets, OpFactory, time_op)
else:  # as a script: the flags and the harness (plain torch) from its folder, so that nothing imports
    # triton (the rsparse package does) before main sets TRITON_INTERPRET for --smoke
    import flags  # type: ignore
    from kernel_harness import (Timer, copy_bandwidth, pdl_selftest, _tol, LayerSets, OpFactory, time_op)  # type: ignore

def run_bench(args, K, timer, dev, records, log, bw):
    entries = _select(args)
    batches = [int(b) for b in args.batches.split(",")]
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for label, in_f, outs in entries:
            sets = LayerSets(in_f, outs, dtype, dev, args.min_set_mb * 2**20, args.calls,
                             args.seed)
            shape = "+".join(str(o) for o in outs) + f"x{in_f}"
            for M in batches:
                xs = sets.inputs(M)
                fac = OpFactory(K, sets, xs, args.s, args.rho)
                base = dict(label=label, shape=shape, outs=list(outs), **{"in": in_f},
                            dtype=dname, batch=M, nsets=sets.n, calls=args.calls, s=args.s,
                            rho=args.rho, ranks=fac.ranks)
                ops = [("dense", False), ("sparse", False), ("rsparse", False)]
                if len(outs) > 1:
                    ops += [("sparse", True), ("rsparse", True)]
                res = {}
                for op, fused in ops:
                    name = op + ("_fused" if fused else "")
                    what = f"{name} {shape} {dname} M={M}"
                    try:
                        t, raw, e0, e1 = time_op(fac, timer, op, fused, None, log, what, dtype,
                                                 args.no_check)
                    except Exception as e:  # keep going: one failure must not lose the run
                        log(f"ERROR {what}: {type(e).__name__}: {str(e)[:400]}")
                        continue
                    nb = fac.nbytes(op)
                    res[name] = t
                    records.append(dict(base, op=name, us=t, bytes=nb, floor_us=nb / bw * 1e6,
                                        gbps=nb / t / 1e3, rel_err=e0, rel_err_after=e1,
                                        raw_us=raw))
                if "dense" in res:
                    log(f"{dname} M={M} {label:16} {shape:>16}: " + " ".join(
                        f"{k} {v:.1f}us ({res['dense'] / v:.2f}x)" for k, v in res.items()))
            del sets
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def run_tune(args, K, timer, dev, records, log, out_dir):
    """Variant sweep at s = 0.5 (first 16-bit dtype), per shape and group: batch 1 sparse-tile
    variants, then low-rank variants on the best; batches 2/4/8: masked tiles vs cuBLAS path.
    The best config per (class, in, out) for sparse-only and (class+"+lr") for R-Sparse go to
    the returned table (printed, and written to OUT/tuned_table.json after every shape)."""
    dname = next((d for d in args.dtypes.split(",") if d != "fp32"), "bf16")
    dtype = DTYPES[dname]
    table = {}
    tune_batches = [int(b) for b in args.tune_batches.split(",") if b]

    def save():
        (out_dir / "tuned_table.json").write_text(json.dumps(
            [[list(k), v] for k, v in table.items()], indent=1))

    for label, in_f, outs in _select(args):
        fused = len(outs) > 1
        sets = LayerSets(in_f, outs, dtype, dev, args.min_set_mb * 2**20, args.calls, args.seed)
        out_f = sum(outs)
        for M in [1] + ([] if fused else tune_batches):  # groups: batch 1 only (time)
            xs = sets.inputs(M)
            fac = OpFactory(K, sets, xs, args.s, args.rho)
            t_dense = timer(fac.build("dense", False)[0])[0]
            cls = K._batch_class(M)

            def measure(name, cfg, ops=("sparse", "rsparse")):
                out = {}
                for op in ops:
                    what = f"tune {name} {op} {out_f}x{in_f} M={M}"
                    try:
                        t, _, e0, e1 = time_op(fac, timer, op, fused, cfg, log, what, dtype,
                                               args.no_check)
                    except Exception as e:
                        log(f"    variant {name} {op} failed: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    if (e0 is not None and not e0 < _tol(dtype)) or (
                            e1 is not None and not e1 < _tol(dtype)):
                        continue
                    out[op] = t
                records.append(dict(kind="tune", label=label, shape=f"{out_f}x{in_f}", batch=M,
                                    dtype=dname, variant=name, cfg=cfg, dense_us=t_dense,
                                    **{f"{k}_us": v for k, v in out.items()}))
                return out

            variants = VARIANTS_M1 if M == 1 else VARIANTS_MM
            if args.variants:
                variants = {n: c for n, c in variants.items() if n in args.variants.split(",")}
            res = {}  # name -> ({op: us}, cfg)
            for name, cfg in variants.items():
                res[name] = (measure(name, cfg), cfg)
            sp = {n: r["sparse"] for n, (r, _) in res.items() if "sparse" in r}
            if M == 1 and sp:  # low-rank tile variants on top of the best sparse variant
                best_sp = min(sp, key=sp.get)
                for lname, lcfg in LR_VARIANTS.items():
                    cfg = dict(res[best_sp][1], **lcfg)
                    res[f"{best_sp}+{lname}"] = (measure(f"{best_sp}+{lname}", cfg,
                                                         ("rsparse",)), cfg)
            rs = {n: r["rsparse"] for n, (r, _) in res.items() if "rsparse" in r}
            if not sp or not rs:
                continue
            best_s, best_r = min(sp, key=sp.get), min(rs, key=rs.get)
            table[(cls, in_f, out_f)] = res[best_s][1]
            if res[best_r][1] != res[best_s][1]:
                table[(cls + "+lr", in_f, out_f)] = res[best_r][1]
            save()
            log(f"tune {dname} M={M} {label} {out_f}x{in_f}: cuBLAS {t_dense:.1f} | " + " ".join(
                f"{n}={r.get('sparse', float('nan')):.1f}/{r.get('rsparse', float('nan')):.1f}"
                for n, (r, _) in res.items()) + "  (sparse/R-Sparse us)")
            log(f"    best sparse-only {best_s} {sp[best_s]:.1f}us ({t_dense / sp[best_s]:.2f}x), "
                f"R-Sparse {best_r} {rs[best_r]:.1f}us ({t_dense / rs[best_r]:.2f}x)")
            if M == 1 and not fused:  # fixed cost: nothing kept / everything kept
                diag = {}
                for op, best in (("sparse", best_s), ("rsparse", best_r)):
                    cfg = res[best][1]
                    for thr_name, thr in (("keep_none", float("inf")),):
                        fns = []
                        for i in range(sets.n):
                            ps = [(p[0], thr) + tuple(p[2:]) for p in fac.parts(i, op)]
                            fns.append(lambda ps=ps, x=xs[i], cfg=cfg: [
                                K.rsparse_decode_linear(x, *p, _config=cfg) for p in ps])
                        try:
                            diag[f"{op}_{thr_name}"] = timer(fns)[0]
                        except Exception as e:
                            log(f"    diag failed: {type(e).__name__}: {str(e)[:200]}")
                records.append(dict(kind="diag", label=label, shape=f"{out_f}x{in_f}", batch=1,
                                    dtype=dname, dense_us=t_dense, **diag))
                log("    diag " + " ".join(f"{k}={v:.1f}us" for k, v in diag.items()))
        del sets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    log("_CONFIG_TABLE = {  # (class, in, out) -> config, 16-bit")
    for key, cfg in table.items():
        log(f"    {key!r}: {cfg!r},")
    log("}")
    return table


def load_table(path):
    return {tuple(k): v for k, v in json.loads(Path(path).read_text())}


def _select(args, groups=True):
    if args.smoke:
        return SMOKE_SHAPES
    entries = SHAPES + (GROUPS if groups and not args.no_groups else [])
    if args.shapes:
        want = set(args.shapes.split(","))
        entries = [e for e in entries if e[0] in want
                   or "+".join(str(o) for o in e[2]) + f"x{e[1]}" in want]
    return entries


def print_table(records, log):
    """Per dtype and batch: one line per shape, us and speed-up over cuBLAS, floor."""
    rows = {}
    for r in records:
        if "op" not in r:
            continue
        rows.setdefault((r["dtype"], r["batch"], r["label"], r["shape"]), {})[r["op"]] = r
    log("")
    log("median us per call (speed-up over cuBLAS); CUDA graphs over weight sets > L2; "
        "s = 0.5, R-Sparse rho = 0.9; floor = bytes read at the measured copy rate")
    log(f"{'dtype':5} {'M':>2} {'layer':17} {'out x in':>17} {'cuBLAS':>7} {'sparse-only':>14} "
        f"{'R-Sparse':>14} {'floor sp/rs':>11} | {'fused sparse':>14} {'fused R-Sp':>14} "
        f"{'separate sp/rs':>14}")
    for (dn, M, label, shape), ops in rows.items():
        d = ops.get("dense")
        if d is None:
            continue
        f = lambda k: (f"{ops[k]['us']:6.1f} ({d['us'] / ops[k]['us']:4.2f}x)"  # noqa: E731
                       if k in ops else f"{'-':>14}")
        fl = "/".join(f"{ops[k]['floor_us']:.1f}" if k in ops else "-"
                      for k in ("sparse", "rsparse"))
        line = (f"{dn:5} {M:>2} {label:17} {shape:>17} {d['us']:7.1f} {f('sparse')} "
                f"{f('rsparse')} {fl:>11}")
        if "sparse_fused" in ops or "rsparse_fused" in ops:
            sep = "/".join(f"{ops[k]['us']:.1f}" if k in ops else "-"
                           for k in ("sparse", "rsparse"))
            line += f" | {f('sparse_fused')} {f('rsparse_fused')} {sep:>14}"
        log(line)


def main(argv=None):
    args = flags.kernel().parse_args(argv)
    if args.quick:
        args.batches = "1"
        args.tune_batches = ""

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            if "triton" in sys.modules:  # triton fixed compiled mode when it was imported
                print("--smoke needs TRITON_INTERPRET=1 before triton is imported: run "
                      "`TRITON_INTERPRET=1 rsparse bench kernel --smoke ...` or "
                      "`python rsparse/runtime/bench/kernel.py --smoke ...`", file=sys.stderr)
                return 2
            os.environ["TRITON_INTERPRET"] = "1"
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
    timer = Timer(args.calls, args.replays, args.warmup, graphs=dev.type == "cuda")
    records = []
    t0 = time.time()
    bw = copy_bandwidth(dev)
    meta["copy_bytes_per_s"] = bw
    log(f"device {meta['device']} torch {meta['torch']} triton {meta['triton']}; "
        f"copy {bw / 1e12:.2f} TB/s")

    def _term(signum, frame):  # `timeout` sends SIGTERM: still write what we have
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    try:
        meta["pdl"] = pdl_selftest(K, dev, log)
        if args.table_json:
            K._CONFIG_TABLE.update(load_table(args.table_json))
            log(f"config table updated from {args.table_json}")
        if args.tune:
            tuned = run_tune(args, K, timer, dev, records, log, out)
            meta["tuned"] = {str(k): v for k, v in tuned.items()}
            if tuned and not args.no_bench:  # the bench below uses the sweep's choices
                K._CONFIG_TABLE.update(tuned)
        if not args.no_bench:
            run_bench(args, K, timer, dev, records, log, bw)
    finally:
        meta["wall_s"] = time.time() - t0
        (out / "kernel_bench.json").write_text(json.dumps(dict(meta=meta, records=records),
                                                          indent=1, default=str))
        if not args.no_bench:
            print_table(records, log)
        log(f"wall {meta['wall_s']:.0f} s")
        (out / "kernel_bench.txt").write_text("\n".join(lines) + "\n")
    failed = [ln for ln in lines if ln.startswith(("CHECK FAILED", "ERROR"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
