"""The measuring harness of `rsparse bench kernel`: timing inside captured CUDA graphs over
weight sets larger than L2, the copy-bandwidth ceiling, the PDL self-test, random layers and
inputs with exact kept fractions, and the ops under test (cuBLAS, the kernels, fused groups),
each checked against the torch reference. Plain torch: importable without the rest of rsparse,
so `python rsparse/runtime/bench/kernel.py` runs as a script too."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F


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


def copy_bandwidth(dev) -> float:
    """Device-to-device copy rate in bytes/s (read + written): the faster of a memcpy and an
    elementwise copy kernel, median of 10 graph replays each."""
    if dev.type != "cuda":
        return 1e12
    n = 1 << 29  # 1 GiB each way, as bf16
    a = torch.randn(n, device=dev).to(torch.bfloat16)
    b = torch.empty_like(a)
    timer = Timer(4, 10, 2, True)
    t_memcpy, _ = timer([lambda: b.copy_(a)])
    t_kernel, _ = timer([lambda: torch.mul(a, 1, out=b)])
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * n / (min(t_memcpy, t_kernel) * 1e-6)


def pdl_selftest(K, dev, log) -> bool:
    """Run one R-Sparse and one sparse-only call eagerly and inside a CUDA graph (PDL-chained
    launches) and compare with the reference; on any failure switch PDL off for this run."""
    if dev.type != "cuda":
        return False
    try:
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(1, 4096, device=dev, generator=g).to(torch.bfloat16)
        w_t = (torch.randn(4096, 1024, device=dev, generator=g) / 64).to(torch.bfloat16)
        d = (torch.randn(4096, 40, device=dev, generator=g) / 64).to(torch.bfloat16)
        u = (torch.randn(40, 1024, device=dev, generator=g) / 7).to(torch.bfloat16)
        thr = torch.full((1,), 0.7, device=dev)
        cases = [(x, w_t, thr, None, d, u), (x, w_t, thr)]
        refs = [K.rsparse_decode_linear_reference(*c) for c in cases]
        outs = [K.rsparse_decode_linear(*c) for c in cases]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gouts = [K.rsparse_decode_linear(*c) for c in cases for _ in range(3)][::3]
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        errs = [_relerr(o, r) for o, r in zip(outs + gouts, refs + refs)]
        if not all(e < 2e-2 for e in errs):
            raise RuntimeError(f"wrong results, rel errs {errs}")
        log(f"PDL self-test passed (rel errs {', '.join(f'{e:.1e}' for e in errs)})")
        return True
    except Exception as e:
        K._MODE_DEFAULTS["PDL"] = False
        log(f"PDL self-test FAILED, PDL switched off: {type(e).__name__}: {str(e)[:300]}")
        return False


def _relerr(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


class LayerSets:
    """Rotating weight sets for one group of projections sharing an input (one part = a layer):
    per set and part, the dense W (out, in), w_t (in, out), a score scale and, per rank, factors."""

    def __init__(self, in_f, outs, dtype, dev, min_bytes, max_sets, seed):
        elt = torch.empty((), dtype=dtype).element_size()
        per = sum(outs) * in_f * elt
        self.n = max(2, min(max_sets, math.ceil(min_bytes / per)))
        g = torch.Generator(device=dev).manual_seed(seed)
        self.W, self.w_t, self.scale = [], [], []
        for _ in range(self.n):
            Ws, wts, scs = [], [], []
            for out_f in outs:
                w = torch.randn(out_f, in_f, device=dev, dtype=torch.float32, generator=g)
                w = w / in_f ** 0.5
                Ws.append(w.to(dtype).contiguous())
                wts.append(w.t().contiguous().to(dtype))
                del w
                scs.append(torch.rand(in_f, device=dev, generator=g) + 0.5)
            self.W.append(Ws)
            self.w_t.append(wts)
            self.scale.append(scs)
        self.in_f, self.outs, self.dtype, self.dev, self.g, self.elt = in_f, outs, dtype, dev, g, elt
        self._factors = {}

    def factors(self, ranks):
        """[set][part] -> (lr_down, lr_up) or (None, None)."""
        key = tuple(ranks)
        if key not in self._factors:
            fs = []
            for _ in range(self.n):
                per = []
                for out_f, r in zip(self.outs, ranks):
                    if r <= 0:
                        per.append((None, None))
                        continue
                    d = (torch.randn(self.in_f, r, device=self.dev, generator=self.g)
                         / self.in_f ** 0.5).to(self.dtype)
                    u = (torch.randn(r, out_f, device=self.dev, generator=self.g)
                         / r ** 0.5).to(self.dtype)
                    per.append((d, u))
                fs.append(per)
            self._factors[key] = fs
        return self._factors[key]

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


class OpFactory:
    """Builds, per op kind, the per-set call closures, the reference and the byte count."""

    def __init__(self, K, sets, xs, s, rho):
        self.K, self.sets, self.xs, self.s, self.rho = K, sets, xs, s, rho
        in_f = sets.in_f
        self.ranks = [rank_for(s, rho, o, in_f) for o in sets.outs]
        self.fac = sets.factors(self.ranks)
        M = xs[0].shape[0]
        self.io = (M * in_f + M * sum(sets.outs)) * sets.elt

    def parts(self, i, op):
        """(w_t, thr, scale, lr_down, lr_up, bias) per part of set i for op sparse|rsparse."""
        S = self.sets
        out = []
        for p in range(len(S.outs)):
            if op == "rsparse":
                keep, sc = (1 - self.s) * self.rho, S.scale[i][p]
                d, u = self.fac[i][p]
            else:
                keep, sc, d, u = 1 - self.s, None, None, None
            out.append((S.w_t[i][p], _threshold(self.xs[i], sc, keep), sc, d, u, None))
        return out

    def build(self, op, fused, cfg=None):
        """(fns, check) for op in dense|sparse|rsparse; fused: one multi call for all parts."""
        S, K, xs = self.sets, self.K, self.xs
        if op == "dense":
            def mk(i):
                def f():
                    return [F.linear(xs[i], W) for W in S.W[i]]
                return f
            return [mk(i) for i in range(S.n)], None
        parts = [self.parts(i, op) for i in range(S.n)]

        def mk(i):
            if fused:
                return lambda: list(K.rsparse_decode_linear_multi(xs[i], parts[i], _config=cfg))
            return lambda: [K.rsparse_decode_linear(xs[i], *p, _config=cfg) for p in parts[i]]
        refs = [K.rsparse_decode_linear_reference(xs[0], *p) for p in parts[0]]
        return [mk(i) for i in range(S.n)], refs

    def nbytes(self, op):
        S = self.sets
        if op == "dense":
            return sum(S.outs) * S.in_f * S.elt + self.io
        tot = self.io
        for i in range(S.n):
            for p, out_f in enumerate(S.outs):
                keep = (1 - self.s) * self.rho if op == "rsparse" else 1 - self.s
                sc = S.scale[i][p] if op == "rsparse" else None
                uni = _union_frac(self.xs[i], sc, _threshold(self.xs[i], sc, keep))
                b = uni * S.in_f * out_f * S.elt
                if op == "rsparse" and self.ranks[p] > 0:
                    b += (S.in_f + out_f) * self.ranks[p] * S.elt
                tot += b / S.n
        return tot


def _check(fns, refs, dtype, log, what):
    if refs is None:
        return None
    ys = fns[0]()
    err = max(_relerr(y, r) for y, r in zip(ys, refs))
    finite = all(bool(torch.isfinite(y).all()) for y in ys)
    if not (err < _tol(dtype)) or not finite:
        log(f"CHECK FAILED {what}: rel err {err} finite {finite}")
    return err


def time_op(fac, timer, op, fused, cfg, log, what, dtype, no_check):
    """(us, raw, err_before, err_after) of one op, checked before and after the timed replays."""
    fns, refs = fac.build(op, fused, cfg)
    err0 = None if no_check else _check(fns, refs, dtype, log, what)
    t, raw = timer(fns)
    err1 = None if no_check else _check(fns, refs, dtype, log, what + " (after replays)")
    return t, raw, err0, err1
