"""The flags of the benchmarks (`rsparse bench kernel|kernel-int4|attention|decode|agreement`), one parser
each. Here, apart from the benchmarks, because this module imports no torch: `rsparse bench NAME
--help`, and a bad flag, are answered before a benchmark module (and torch) loads."""

from __future__ import annotations

import argparse


def kernel() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsparse bench kernel",
                                description="Decode-kernel benchmark: cuBLAS vs the R-Sparse kernels (single layers and fused q/k/v, "
                                            "gate/up).")
    p.add_argument("--out", default="out/kernel-bench", help="output directory")
    p.add_argument("--shapes", default="", help="comma list of labels or OUTSxIN (default: all)")
    p.add_argument("--s", type=float, default=0.5, help="model-level sparsity budget")
    p.add_argument("--rho", type=float, default=0.9, help="sparse share of the layer budget")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--quick", action="store_true", help="batch 1 only")
    p.add_argument("--no-groups", action="store_true", help="skip the fused q/k/v, gate/up groups")
    p.add_argument("--calls", type=int, default=40, help="calls captured per CUDA graph")
    p.add_argument("--replays", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-set-mb", type=float, default=300.0,
                   help="rotating sets hold at least this many MB of weights per op")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--tune", action="store_true", help="variant sweep first (prints a table)")
    p.add_argument("--tune-batches", default="2,4,8", help="batches swept by --tune besides 1")
    p.add_argument("--no-bench", action="store_true", help="only --tune")
    p.add_argument("--variants", default="",
                   help="--tune: comma list of the sparse-tile variants to sweep (default: all)")
    p.add_argument("--table-json", default="",
                   help="use this tuned table (OUT/tuned_table.json of a --tune run)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test (TRITON_INTERPRET, tiny shapes, eager timing)")
    return p


def kernel_int4() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsparse bench kernel-int4",
                                description="4-bit decode-kernel benchmark: cuBLAS (16-bit) vs tinygemm (dense 4-bit) "
                                            "vs the 4-bit sparse-only and R-Sparse kernels, CUDA graphs over weight "
                                            "sets larger than L2 (docs/int4-kernel.md)")
    p.add_argument("--out", default="out/int4-bench")
    p.add_argument("--shapes", default="", help="comma list of OUTxIN (default: all)")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--batches", default="2,4,8", help="batches > 1, at 11008x4096 and 4096x11008")
    p.add_argument("--batch-dtypes", default="bf16", help="dtypes measured at batch > 1")
    p.add_argument("--s", type=float, default=0.5)
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--replays", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-set-mb", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action="store_true", help="sweep variants first, then use the best")
    p.add_argument("--smoke", action="store_true", help="CPU: interpreter, tiny shapes")
    return p


def attention() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsparse bench attention",
                                description="Decode-attention benchmark: the engine's split-KV kernel against SDPA with a mask over "
                                            "the cache.")
    p.add_argument("--models", default="llama2-7b,llama3-8b", help="shapes: llama2-7b, llama3-8b")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tune", action="store_true", help="also time every split size")
    p.add_argument("--calls", type=int, default=32, help="calls captured per CUDA graph")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--min-set-mb", type=float, default=300.0, help="caches cycled per op hold at least this")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test (TRITON_INTERPRET=1, tiny shapes)")
    p.add_argument("--out", default="out/attention-bench")
    return p


def decode() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsparse bench decode",
                                description="End-to-end decode benchmark: tokens/s of the decode engine, dense vs sparse-only vs "
                                            "R-Sparse, in one run.")
    p.add_argument("--models", default="llama2-7b,llama3-8b", help="random-weight shapes: llama2-7b, llama3-8b")
    p.add_argument("--model", default=None, help="a real model or rsparse checkpoint instead of random shapes")
    p.add_argument("--sparsities", default="0.4,0.5,0.6,0.7")
    p.add_argument("--methods", default="sparse-only,R-Sparse", help="sparse rows: sparse-only, R-Sparse or both")
    p.add_argument("--ratio", type=float, default=0.9, help="rho of the R-Sparse rows")
    p.add_argument("--recipes", default="",
                   help="comma list of per-layer recipes, one row each: on a --model applied as compress --recipe "
                        "applies them; on a random shape spread by projection kind and relative depth at the "
                        "recipe's model-level sparsity")
    p.add_argument("--weights", default="fp", help="weight widths of the rows: fp (the model's dtype) and/or int4")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--gen", type=int, default=128, help="new tokens")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-tokens", type=int, default=16, help="tokens for the transformers eager row (0: skip)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick checks)")
    p.add_argument("--profile", action="store_true", help="also profile each engine row's decode step by kernel group")
    p.add_argument("--attention", default="auto",
                   help="decode attention of the engine rows: auto, kernel, sdpa, or a comma list to compare")
    p.add_argument("--compile", default="on",
                   help="engine rows with the decode step compiled (on) or only captured as a CUDA graph (off), "
                        "or on,off to compare")
    p.add_argument("--out", default="out/bench-decode")
    return p


def agreement() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsparse bench agreement",
                                description="Engine vs transformers on a real model: identical greedy tokens, and both speeds.")
    p.add_argument("--model", default=None, help="rsparse checkpoint or model (default: the embedded SmolLM2)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32: in 16 bits the last-bit differences that flip a "
                        "greedy choice are ~65000x larger)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=None, help="the first N of the benchmark's prompts (default: all)")
    p.add_argument("--kernel", default="auto", choices=["auto", "always", "never"],
                   help="auto: R-Sparse layers run the kernel in the engine's compiled step and the torch reference "
                        "in transformers' eager loop; always: the kernel on both sides; never: the torch reference on "
                        "both sides (no fp32 atomics: run to run deterministic), to tell the kernel's summation order "
                        "from the engine's numerics")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): the kernel adds its partial sums in a fixed order, "
                        "so each side repeats itself bit for bit")
    p.add_argument("--out", default="out/agreement")
    return p
