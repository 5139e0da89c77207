"""End-to-end decode benchmark: tokens/s of the decode engine, dense vs sparse-only vs R-Sparse,
all in ONE run (absolute speeds move 10-15% between GPU leases; ratios within a run do not).

    rsparse bench decode [--models llama2-7b,llama3-8b] [--sparsities 0.4,0.5,0.6,0.7] [--ratio 0.9]
                         [--prompt 512] [--gen 128] [--compile on|off|on,off] [--weights fp,int4] [--out DIR]
    rsparse bench decode --model CHECKPOINT_OR_MODEL ...   a real model: its dense and saved layers
    rsparse bench decode ... --recipes R1.json,R2.json      one row per per-layer recipe

Shapes: Llama-2-7B- and Llama-3-8B-shaped LlamaForCausalLM with random weights (bf16 by default):
speed depends on shapes and on the kept fraction, not on trained values. Sparse layers are built
as sparsify_ builds them (true-shape budgets at each sparsity, uniform `--ratio` for R-Sparse,
rho 1 for sparse-only; thresholds calibrated on the model's own activations over random-token
windows and refined once on the sparsified model, so decoding keeps the target fraction), except that the rank-r factors are random
matrices of the right shape instead of SVDs of random weights (same bytes, no float64 SVDs).

Rows per model: transformers' eager `generate` (the loop a user has, a few tokens) on the dense
model and on the R-Sparse model at the middle sparsity (as it runs there, and with the kernel
forced into the eager loop), the engine dense (the original nn.Linear layers), the engine
sparse-only and the engine R-Sparse at each sparsity. Each engine row is built, compiled and
captured (warm-up, reported), then timed over `--repeats` generate calls (median): decode
tokens/s excludes prefill. Columns: tokens/s, ms per
token, speed-up over the engine dense, achieved sparsity (measured in an untimed eager pass) and
the weight-bandwidth bound: bytes read per token over the device-to-device copy bandwidth
measured in the same run. `--compile on,off` adds engine rows whose step is only captured as a
CUDA graph, not compiled (what `rsparse generate` runs unless told --compile on), each with its
speed-up over the engine dense of its own kind. `--weights fp,int4` adds 4-bit rows (dense, sparse-
only, R-Sparse: every projection an Int4RSparseLinear made from the row's 16-bit layers, RTN with
groups of 128, factors 16-bit), each with its speed-up over the 4-bit engine dense row.
`--recipes R1,R2`: a row per per-layer recipe, on a `--model` as `compress --recipe` applies it, on
a random shape spread by kind and relative depth at its budget (search.allocate.recipe_on_shape).
Raw numbers: DIR/decode_bench.json (rewritten after every row); a markdown table: DIR/decode_bench.md.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from rsparse.runtime.bench import flags
from rsparse.runtime.bench.step_profile import GROUP_NAMES, profile_step

MODELS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def build_model(name: str, dtype: torch.dtype, layers: int | None = None, device: str = "cuda"):
    """A randomly initialised LlamaForCausalLM of a named shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(MODELS[name])
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _random_windows(model, calib_tokens: int = 256) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, calib_tokens), generator=torch.Generator().manual_seed(1))


def calibration_scores(model, calib_tokens: int = 256) -> dict:
    """Input rows of every decoder projection on random-token windows (for thresholds)."""
    from rsparse.core.calibrate import collect_activations

    return collect_activations(model, _random_windows(model, calib_tokens), max_rows_per_layer=2 * calib_tokens).rows


@torch.no_grad()
def make_rsparse(model, sparsity: float, ratio: float, rows: dict | None = None, calib_tokens: int = 256,
                 per_layer: list[tuple[float, float]] | None = None) -> dict:
    """Make every decoder projection an RSparseLinear at (sparsity, ratio) in place, or at its own
    (sparsity, rho) from `per_layer` (one per decoder projection, e.g. recipe_on_shape's), planned as
    sparsify_ plans it (LayerPlanner: method, score scale, threshold from `rows`, the calibration
    inputs, collected if None), except for random factors of the budgeted rank; then thresholds
    refined on the sparsified model. Layers that are already RSparseLinear are re-configured."""
    from rsparse.core.budget import layer_budget
    from rsparse.core.calibrate import LayerPlanner
    from rsparse.core.config import RSparseConfig
    from rsparse.core.layer import RSparseLinear
    from rsparse.core.models import decoder_linears, replace_module
    from rsparse.methods.rsparse import refine_thresholds_

    rows = calibration_scores(model, calib_tokens) if rows is None else rows
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(2)
    linears = decoder_linears(model)
    per_layer = per_layer or [(sparsity, ratio)] * len(linears)
    for lin, (s, rho) in zip(linears, per_layer, strict=True):
        m = lin.module
        layer = m if isinstance(m, RSparseLinear) else RSparseLinear.from_linear(m, name=lin.name)
        budget = layer_budget(m.out_features, m.in_features, s, rho)
        plan = LayerPlanner(layer.weight, rows[lin.name]).plan(budget, fit_factors=False)
        if budget.rank:  # the bytes matter here, not the values: no SVDs of random weights
            shape, dtype = (m.in_features, budget.rank, m.out_features), layer.weight.dtype
            plan.lr_down = torch.randn(shape[:2], device=device, generator=gen, dtype=dtype) * 0.02
            plan.lr_up = torch.randn(shape[1:], device=device, generator=gen, dtype=dtype) * 0.02
        plan.apply(layer).tokens = "decode"
        if layer is not m:
            replace_module(model, lin.name, layer)
    config = RSparseConfig(sparsity=sparsity, ratio=ratio, max_rows_per_layer=2 * calib_tokens)
    refine_thresholds_(model, config, _random_windows(model, calib_tokens), [{"name": l.name} for l in linears])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"sparsity": sparsity, "ratio": ratio}


@torch.no_grad()
def measure_sparsity(model, prompt: list[int], n: int = 8) -> float:
    """Model-level achieved sparsity over n eager decode steps (untimed; the counters sync)."""
    from rsparse.core.layer import rsparse_layers
    from rsparse.eval.perplexity import measured_read
    from rsparse.runtime.engine import Engine

    layers = rsparse_layers(model)
    if not layers:
        return 0.0
    for layer in layers:
        layer.reset_stats()
        layer.track_stats = True
    try:
        Engine(model, max_seq_len=len(prompt) + n, compile=False, cuda_graph=False).generate([prompt], n)
    finally:
        for layer in layers:
            layer.track_stats = False
    return measured_read(model)["achieved_sparsity"]


def weight_bytes(model, achieved_sparsity: float) -> float:
    """Bytes of weights read per decoded token: decoder projections at the achieved read
    fraction, the lm_head in full (one embedding row is negligible). 4-bit layers: the kept
    fraction of their codes and scales (from the last measure_sparsity) plus their 16-bit factors."""
    from rsparse.core.int4_layer import Int4RSparseLinear
    from rsparse.core.models import decoder_linears

    linears = read4 = 0.0
    for lin in decoder_linears(model):
        m = lin.module
        if isinstance(m, Int4RSparseLinear):
            codes = m.qweight.numel() + m.scales_zeros.numel() * m.scales_zeros.element_size()
            kept = 1.0 if m.method == "dense" or not m.stat_tokens else \
                float(m.stat_kept) / (float(m.stat_tokens) * m.in_features)
            read4 += kept * codes + (m.lr_down.numel() + m.lr_up.numel()) * m.lr_down.element_size()
        else:
            linears += m.weight.numel() * m.weight.element_size()
    head = model.get_output_embeddings().weight
    return (1.0 - achieved_sparsity) * linears + read4 + head.numel() * head.element_size()


@contextlib.contextmanager
def int4_swapped(model):
    """Within: every decoder projection as a 4-bit layer (RTN, groups of 128: Int4RSparseLinear),
    made from the current layers (a plain nn.Linear becomes a dense 4-bit layer); then the
    original layers back. The 4-bit layers of a sparse row keep its thresholds and factors."""
    from rsparse.core.int4_layer import Int4RSparseLinear, layer_group_size
    from rsparse.core.layer import RSparseLinear
    from rsparse.core.models import decoder_linears, replace_module

    originals = {}
    for lin in decoder_linears(model):
        m = lin.module
        layer = m if isinstance(m, RSparseLinear) else RSparseLinear.from_linear(m, name=lin.name)
        replace_module(model, lin.name, Int4RSparseLinear.from_rsparse(layer, layer_group_size(m.in_features)))
        originals[lin.name] = m
        del layer
    try:
        yield model
    finally:
        for name, m in originals.items():
            replace_module(model, name, m)
        torch.cuda.empty_cache()


def time_engine(model, prompt: list[int], gen: int, repeats: int, profile: bool = False,
                variant: tuple[str, bool] = ("auto", True)) -> dict:
    """Build the engine (compile + capture: warm-up), then the median decode speed of `repeats`
    runs (and, with profile, where a step's device time goes). variant: (decode attention,
    whether the step is compiled; either way it is captured as a CUDA graph)."""
    from rsparse.runtime.engine import Engine

    attention, compiled = variant
    t0 = time.perf_counter()
    engine = Engine(model, max_seq_len=-(-(len(prompt) + gen) // 128) * 128, attention=attention, compile=compiled)
    first = engine.generate([prompt], gen)
    warmup = time.perf_counter() - t0
    runs = [engine.generate([prompt], gen) for _ in range(repeats)]
    speeds = [r.decode_tokens_per_s for r in runs]
    med = statistics.median(speeds)
    out = {"tokens_per_s": med, "ms_per_token": 1e3 / med, "all_tokens_per_s": speeds,
           "prefill_ms": 1e3 * statistics.median(r.prefill_seconds for r in runs), "warmup_s": warmup,
           "compile_capture_s": first.warmup_seconds, "first_tokens": runs[0].tokens[0][:8]}
    if profile:
        out["profile"] = profile_step(engine, prompt, steps=min(16, engine.max_seq_len - len(prompt)))
    del engine
    return out


def time_hf_generate(model, prompt: list[int], gen: int) -> dict:
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"tokens_per_s": gen / sec, "ms_per_token": 1e3 * sec / gen, "first_tokens": out[0, len(prompt):][:8].tolist()}


def hf_sparse_rows(model, prompt: list[int], gen: int, name: str, sparsity: float, achieved: float,
                   bandwidth: float) -> list[dict]:
    """transformers' eager `generate` on a sparse model, as RSparseLinear runs it there (kernel
    "auto": the torch reference in eager calls) and with the kernel forced: what the eager rule
    of rsparse.runtime.ops.kernel_pays is worth."""
    from rsparse.core.layer import rsparse_layers

    rows, layers = [], rsparse_layers(model)
    try:
        for kernel, label in (("auto", ""), ("always", ", kernel forced")):
            for layer in layers:
                layer.kernel = kernel
            hf = time_hf_generate(model, prompt, gen)
            rows.append(_row(f"transformers eager {name}{label}", "R-Sparse", sparsity, hf, achieved,
                             weight_bytes(model, achieved), bandwidth))
            print(f"{rows[-1]['row']}: {hf['tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        for layer in layers:
            layer.kernel = "auto"
    return rows


def _variants(args) -> list[tuple[str, bool]]:
    """(decode attention, compiled) of the engine rows asked for."""
    return [(attn, compiled) for attn in args.attention for compiled in args.compile]


def _suffix(args, variant: tuple[str, bool]) -> str:
    """Row label suffix when several engine variants are compared."""
    attention, compiled = variant
    parts = ([f"{attention} attention"] if len(args.attention) > 1 else []) + \
        (["compiled" if compiled else "graph only, not compiled"] if len(args.compile) > 1 else [])
    return f" ({', '.join(parts)})" if parts else ""


def _methods(args) -> list[tuple[float, str]]:
    """(rho, row name) of the sparse rows asked for."""
    return [(rho, name) for rho, name in ((1.0, "sparse-only"), (args.ratio, "R-Sparse")) if name in args.methods]


def _sparse_rows(args, linears) -> list[tuple[str, str, float, float, list | None]]:
    """(label, method, model-level sparsity, uniform rho, per-layer (sparsity, rho) or None) of
    each sparse row: the uniform rows of --methods x --sparsities, then one row per --recipes entry
    (recipe_on_shape: on a random shape, the recipe's budget spread by kind and relative depth)."""
    from rsparse.search.allocate import layer_sizes, model_sparsity, recipe_on_shape

    rows = [(f"{method} {100 * s:.0f}%", method, s, ratio, None)
            for ratio, method in _methods(args) for s in args.sparsities]
    for path in args.recipes:
        per_layer = recipe_on_shape(path, linears)
        budget = model_sparsity([s for s, _ in per_layer], layer_sizes(linears))
        rows.append((f"recipe {Path(path).stem}", "recipe", budget, 1.0, per_layer))
    return rows


_WIDTH = {"fp": "", "int4": "4-bit "}  # row label prefix per --weights entry


def _row(label, method, sparsity, timing, achieved, nbytes, bandwidth, dense_tps=None, weights="fp") -> dict:
    return {"row": label, "method": method, "weights": weights, "sparsity": sparsity, **timing,
            "achieved_sparsity": achieved,
            "bytes_per_token": nbytes, "bound_tokens_per_s": bandwidth / nbytes,
            "speedup": timing["tokens_per_s"] / dense_tps if dense_tps else None}


def _report(model: str, row: dict) -> dict:
    speed = f", x{row['speedup']:.2f}" if row["speedup"] and row["method"] != "dense" else ""
    warm = f" (warm-up {row['warmup_s']:.0f} s)" if "warmup_s" in row else ""
    print(f"{model} {row['row']}: {row['tokens_per_s']:.1f} tok/s{speed}{warm}", flush=True)
    return row


def bench_random(name: str, args, bandwidth: float):
    """The rows of one random-weight shape, yielded as they are measured."""
    from rsparse.core.layer import rsparse_layers
    from rsparse.core.models import decoder_linears

    model = build_model(name, getattr(torch, args.dtype), args.layers)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(3)).tolist()
    if args.hf_tokens:
        hf = time_hf_generate(model, prompt, args.hf_tokens)
        yield _report(name, _row("transformers eager", "dense", 0.0, hf, 0.0, weight_bytes(model, 0.0), bandwidth))
    dense_tps = {}  # (weight width, variant) -> the engine dense row's tok/s
    for width in args.weights:
        with int4_swapped(model) if width == "int4" else contextlib.nullcontext():
            for variant in _variants(args):
                dense = time_engine(model, prompt, args.gen, args.repeats, args.profile, variant)
                dense_tps[width, variant] = dense["tokens_per_s"]
                yield _report(name, _row(f"engine {_WIDTH[width]}dense" + _suffix(args, variant), "dense", 0.0, dense,
                                         0.0, weight_bytes(model, 0.0), bandwidth, dense["tokens_per_s"], width))
    scores = calibration_scores(model)
    hf_sparsity = sorted(args.sparsities)[(len(args.sparsities) - 1) // 2] if args.sparsities else None
    for label, method, s, ratio, per_layer in _sparse_rows(args, decoder_linears(model)):
        make_rsparse(model, s, ratio, scores, per_layer=per_layer)
        for width in args.weights:
            with int4_swapped(model) if width == "int4" else contextlib.nullcontext():
                achieved = measure_sparsity(model, prompt)
                if args.hf_tokens and method == "R-Sparse" and s == hf_sparsity and width == "fp":
                    for row in hf_sparse_rows(model, prompt, args.hf_tokens, label, s, achieved, bandwidth):
                        yield _report(name, row)
                for variant in _variants(args):  # speed-up over the engine dense of the same width and variant
                    t = time_engine(model, prompt, args.gen, args.repeats, args.profile, variant)
                    yield _report(name, _row(f"engine {_WIDTH[width]}{label}" + _suffix(args, variant), method, s, t,
                                             achieved, weight_bytes(model, achieved), bandwidth,
                                             dense_tps[width, variant], width))
    assert rsparse_layers(model)
    del model
    torch.cuda.empty_cache()


def bench_model(path: str, args, bandwidth: float):
    """A real model or rsparse checkpoint, its rows yielded as they are measured: the engine on its
    dense layers, then as saved (a checkpoint) or sparsified by sparsify_ at each --sparsities
    (sparse-only and R-Sparse), then each --recipes entry."""
    from rsparse.core.config import RSparseConfig, load_recipe
    from rsparse.core.data import load_windows
    from rsparse.io.checkpoint import load_any
    from rsparse.methods import restore_, sparsify_
    from rsparse.core.layer import rsparse_layers

    model, tokenizer = load_any(path, device="cuda", dtype=args.dtype)
    text = "The history of the city begins with a small settlement on the river. " * 64
    prompt = tokenizer(text).input_ids[: args.prompt] if tokenizer is not None else list(range(args.prompt))
    variants = _variants(args)
    saved = {}
    if rsparse_layers(model):  # a checkpoint: time it as saved, then its dense layers
        achieved = measure_sparsity(model, prompt)
        saved = {v: time_engine(model, prompt, args.gen, args.repeats, args.profile, v) for v in variants}
        restore_(model)
    dense = {v: time_engine(model, prompt, args.gen, args.repeats, args.profile, v) for v in variants}
    for v, t in dense.items():
        yield _report(path, _row("engine dense" + _suffix(args, v), "dense", 0.0, t, 0.0, weight_bytes(model, 0.0),
                                 bandwidth, t["tokens_per_s"]))
    for v, t in saved.items():
        yield _report(path, _row("engine checkpoint" + _suffix(args, v), "checkpoint", None, t, achieved,
                                 weight_bytes(model, achieved), bandwidth, dense[v]["tokens_per_s"]))
    # a checkpoint: its own rows and the --recipes rows; a model: the uniform rows too
    configs = [] if saved else [(f"{method} {100 * s:.0f}%", method, RSparseConfig(sparsity=s, ratio=ratio))
                                for ratio, method in _methods(args) for s in args.sparsities]
    for recipe_path in args.recipes:  # a recipe of this model, applied as `rsparse compress --recipe` applies it
        recipe = load_recipe(recipe_path)
        configs.append((f"recipe {Path(recipe_path).stem}", "recipe",
                        RSparseConfig(sparsity=recipe.get("sparsity", RSparseConfig.sparsity), recipe=recipe)))
    calib = load_windows(tokenizer, "coqa", 512, 16, "calibration") if configs else None
    for label, method, config in configs:
        restore_(model)
        sparsify_(model, config, calib)
        achieved = measure_sparsity(model, prompt)
        for v in variants:
            t = time_engine(model, prompt, args.gen, args.repeats, args.profile, v)
            yield _report(path, _row(f"engine {label}" + _suffix(args, v), method, config.sparsity, t, achieved,
                                     weight_bytes(model, achieved), bandwidth, dense[v]["tokens_per_s"]))


def table(results: dict) -> str:
    lines = [f"device: {results['device']}, {results['settings']['dtype']}, batch 1, prompt {results['settings']['prompt']}, "
             f"{results['settings']['gen']} new tokens, copy bandwidth {results['copy_bandwidth'] / 1e12:.2f} TB/s",
             "", "Speed-up: over the engine dense row of the same weight width and engine kind.",
             "", "| model | row | tok/s | ms/token | speed-up | achieved sparsity % | bound tok/s | warm-up s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        warm = f"{r['warmup_s']:.0f}" if "warmup_s" in r else "-"
        lines.append(f"| {r['model']} | {r['row']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {sp} | "
                     f"{100 * r['achieved_sparsity']:.1f} | {r['bound_tokens_per_s']:.0f} | {warm} |")
    profiled = [r for r in results["rows"] if "profile" in r]
    if profiled:
        lines += ["", "Where a decode step's time goes (us per token; gaps: no kernel running):", "",
                  "| model | row | step | " + " | ".join(GROUP_NAMES) + " | gaps | kernels/step |",
                  "|---|---|---|" + "---|" * len(GROUP_NAMES) + "---|---|"]
        for r in profiled:
            pr = r["profile"]
            lines.append(f"| {r['model']} | {r['row']} | {pr['step_us']:.0f} | "
                         + " | ".join(f"{pr['groups_us'][g]:.0f}" for g in GROUP_NAMES)
                         + f" | {'-' if pr['gaps_us'] is None else round(pr['gaps_us'])} | {pr['kernels_per_step']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = flags.decode().parse_args(argv)
    args.attention = [a for a in args.attention.split(",") if a]
    if not args.attention or not set(args.attention) <= {"auto", "kernel", "sdpa"}:
        raise SystemExit("error: --attention takes auto, kernel and/or sdpa")
    compile_modes = [c for c in args.compile.split(",") if c]
    if not compile_modes or not set(compile_modes) <= {"on", "off"}:
        raise SystemExit("error: --compile takes on and/or off")
    args.compile = [c == "on" for c in compile_modes]
    args.weights = [w for w in args.weights.split(",") if w]
    if not args.weights or not set(args.weights) <= set(_WIDTH):
        raise SystemExit("error: --weights takes fp and/or int4")
    if args.model and args.weights != ["fp"]:
        raise SystemExit("error: --weights applies to the random shapes (--models); a --model is timed as saved: "
                         "compress it with --weights int4 for 4-bit rows")
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    if not set(args.methods) <= {"sparse-only", "R-Sparse"}:
        raise SystemExit("error: --methods takes sparse-only and/or R-Sparse")
    args.recipes = [r for r in args.recipes.split(",") if r]
    from rsparse.core.config import load_recipe

    for r in args.recipes:  # unreadable recipes fail here, before any model is built
        load_recipe(r)
    if not torch.cuda.is_available():
        raise SystemExit("error: rsparse bench decode needs a CUDA GPU")
    from rsparse.io.results import versions, write_json

    from rsparse.runtime.bench.kernel_harness import copy_bandwidth

    bandwidth = copy_bandwidth(torch.device("cuda"))
    results = {"device": torch.cuda.get_device_name(), "versions": versions(), "settings": vars(args),
               "copy_bandwidth": bandwidth, "rows": []}
    targets = [args.model] if args.model else args.models.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in targets:
        for row in bench_model(name, args, bandwidth) if args.model else bench_random(name, args, bandwidth):
            results["rows"].append({"model": name, **row})
            write_json(out / "decode_bench.json", results)  # after each row: a run cut off keeps what it measured
    (out / "decode_bench.md").write_text(table(results) + "\n")
    print("\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
