"""Decode-attention benchmark: the engine's split-KV kernel against SDPA with a mask over the cache.

    rsparse bench attention --out DIR [--tune] [--dtype bf16] [--batches 1,4]
    TRITON_INTERPRET=1 rsparse bench attention --smoke --out DIR     (CPU: tiny shapes, eager timing)

Per model shape (Llama-2-7B: 32 KV heads; Llama-3-8B: 8 KV heads of 4 query heads; head dim
128), batch, cache size and visible length: SDPA as the engine's `attention="sdpa"` path runs it
(boolean mask, every slot read), and the kernel (`rsparse.runtime.kernels.decode_attention`) with
its default split size, plus, with --tune, every split size from 16 to 256 slots. Timing as
`rsparse bench kernel`: calls captured in one CUDA graph, cycling over as many layers' caches as
exceed --min-set-mb (several times the L2), median of the replays; every op checked against the
reference first. "GB/s" counts the visible K/V bytes only (what the kernel must read).
Output: DIR/attention_bench.json and a table on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rsparse.runtime.bench import flags

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # heads, KV heads, head dim
SMOKE_SHAPES = {"smoke": (4, 2, 16)}
# (cache slots, visible slots): the bench's decode (prompt 512 + 128 in 640 slots, late in the
# answer), and a chat-size cache early in the conversation
CASES = [(640, 600), (2048, 600), (2048, 2000)]
SMOKE_CASES = [(64, 40)]
SPLITS = (16, 32, 64, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ops(q, caches, lo, hi, scale, tune, K):
    """name -> list of closures (one per cache set) for SDPA, the kernel, and the tuned splits."""
    slots = torch.arange(caches[0][0].shape[2], device=q.device)
    visible = ((slots[None] >= lo[:, None]) & (slots[None] <= hi))[:, None, None]
    gqa = caches[0][0].shape[1] != q.shape[1]
    ops = {"sdpa": [lambda k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa) for k, v in caches]}
    ops["kernel"] = [lambda k=k, v=v: K.decode_attention(q, k, v, lo, hi, scale) for k, v in caches]
    for split in SPLITS if tune else ():
        ops[f"kernel split {split}"] = [lambda k=k, v=v, s=split: K.decode_attention(q, k, v, lo, hi, scale, split=s)
                                        for k, v in caches]
    return ops


def run(args, K, timer, dev, log) -> list[dict]:
    dtype = DTYPES[args.dtype]
    records = []
    shapes = SMOKE_SHAPES if args.smoke else {m: SHAPES[m] for m in args.models.split(",")}
    for model, (heads, kv_heads, dim) in shapes.items():
        for batch in (int(b) for b in args.batches.split(",")):
            for slots, seen in SMOKE_CASES if args.smoke else CASES:
                layer_bytes = 2 * batch * kv_heads * slots * dim * dtype.itemsize
                n = max(1, min(64, int(args.min_set_mb * 2**20 // layer_bytes)))
                g = torch.Generator(device=dev).manual_seed(0)
                caches = [(torch.randn(batch, kv_heads, slots, dim, device=dev, generator=g, dtype=dtype),
                           torch.randn(batch, kv_heads, slots, dim, device=dev, generator=g, dtype=dtype))
                          for _ in range(n)]
                q = torch.randn(batch, heads, 1, dim, device=dev, generator=g, dtype=dtype)
                hi = torch.tensor([seen - 1], device=dev)
                lo = torch.zeros(batch, dtype=torch.long, device=dev)
                lo[1::2] = seen // 8  # odd rows left-padded
                ref = K.decode_attention_reference(q.float(), caches[0][0].float(), caches[0][1].float(), lo, hi,
                                                   dim ** -0.5)
                visible_bytes = sum(2 * kv_heads * (seen - int(l)) * dim * dtype.itemsize for l in lo.tolist())
                base = dict(model=model, batch=batch, slots=slots, visible=seen, dtype=args.dtype, sets=n)
                res = {}
                for name, fns in _ops(q, caches, lo, hi, dim ** -0.5, args.tune, K).items():
                    out = fns[0]().float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    if not err < (1e-5 if dtype == torch.float32 else 2e-2):
                        log(f"CHECK FAILED {name} {base}: relative error {err:.2e}")
                        continue
                    us, raw = timer(fns)
                    res[name] = us
                    records.append(dict(base, op=name, us=us, raw_us=raw, rel_err=err,
                                        gbps=visible_bytes / us / 1e3))
                log(f"{model} B={batch} slots {slots} visible {seen}: " + ", ".join(
                    f"{k} {v:.1f} us ({res['sdpa'] / v:.2f}x)" for k, v in res.items() if "sdpa" in res))
                del caches
    return records


def table(records: list[dict]) -> str:
    """One line per case: SDPA, the kernel (default split), and with --tune the fastest split."""
    cases = {}
    for r in records:
        cases.setdefault((r["model"], r["batch"], r["slots"], r["visible"]), {})[r["op"]] = r["us"]
    lines = ["| model | batch | cache slots | visible | SDPA us | kernel us | speed-up | best split (us) |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, batch, slots, seen), ops in cases.items():
        tuned = {k: v for k, v in ops.items() if k.startswith("kernel split")}
        best = min(tuned, key=tuned.get) if tuned else None
        sdpa, kern = ops.get("sdpa"), ops.get("kernel")
        lines.append(f"| {model} | {batch} | {slots} | {seen} | {sdpa or float('nan'):.1f} | {kern or float('nan'):.1f} | "
                     f"{(sdpa / kern) if sdpa and kern else float('nan'):.2f}x | "
                     + (f"{best.split()[-1]} ({tuned[best]:.1f})" if best else "-") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = flags.attention().parse_args(argv)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        raise SystemExit(f"error: unknown --models {','.join(sorted(unknown))} (known: {','.join(SHAPES)})")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or not all(1 <= b <= 64 for b in batches):
        raise SystemExit(f"error: --batches takes a comma list of batch sizes 1-64, got {args.batches!r}")
    from rsparse.runtime.bench.kernel_harness import Timer
    from rsparse.runtime import kernels as K

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: rsparse bench attention needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    if args.smoke:
        if not K.triton_available():
            raise SystemExit("error: --smoke needs triton and TRITON_INTERPRET=1 set before it is imported")
        args.calls, args.replays, args.min_set_mb, args.batches = 2, 1, 0.0, "2"
    dev = torch.device("cpu" if args.smoke else "cuda")
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    timer = Timer(args.calls, args.replays, 3, graphs=dev.type == "cuda")
    records = run(args, K, timer, dev, log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                args=vars(args))
    (out / "attention_bench.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    print("\n" + table(records))
    return 1 if any(ln.startswith("CHECK FAILED") for ln in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
