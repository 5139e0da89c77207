"""The decode engine gives transformers' greedy tokens (CPU: eager steps; CUDA: compiled + graph),
samples reproducibly on the device, stops rows at EOS, refuses what does not fit; the kernel op
traces under torch.compile(fullgraph=True)."""

import pytest
import torch

from conftest import tiny_config, tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.core.layer import rsparse_layers
from rsparse.core.models import decoder_blocks
from rsparse.core.data import calibration_windows
from rsparse.runtime import ops
from rsparse.runtime.engine import Engine, EngineError, Sampling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, rows, n):
    """transformers' greedy continuation of left-padded prompts (pad id 0, masked)."""
    t = max(map(len, rows))
    dev = next(model.parameters()).device
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows], device=dev)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # no EOS: n tokens
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = eos
    return out[:, t:].tolist()


def sparse_tiny(windows, arch="llama", **config):
    model = tiny_model(arch) if not config else config.pop("model")
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8, tokens="decode"), calibration_windows(windows, 64, 4))
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_transformers_dense_and_sparse(batch, windows):
    rows = prompts([12, 7, 10][:batch])
    model = tiny_model().to(DEVICE)  # grouped KV heads: 4 query heads, 2 KV heads
    assert Engine(model, batch_size=batch, max_seq_len=48).generate(rows, 12).tokens == hf_greedy(model, rows, 12)
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8, tokens="decode"),
              calibration_windows(windows, 64, 4).to(DEVICE))
    expected = hf_greedy(model, rows, 12)
    dense = Engine(tiny_model().to(DEVICE), batch_size=batch, max_seq_len=48).generate(rows, 12).tokens
    assert expected != dense  # the sparse decode steps change the continuation
    assert Engine(model, batch_size=batch, max_seq_len=48).generate(rows, 12).tokens == expected


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "tied"])
def test_architectures(arch):
    from transformers import AutoModelForCausalLM, Qwen3Config

    if arch == "qwen3":  # q/k norms, head_dim given
        cfg = Qwen3Config(**{k: v for k, v in tiny_config().to_dict().items() if k in Qwen3Config().to_dict()})
        cfg.head_dim = 16
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    elif arch == "tied":
        cfg = tiny_config()
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model = tiny_model(arch)
    rows = prompts([9, 5])
    assert Engine(model, batch_size=2, max_seq_len=32).generate(rows, 8).tokens == hf_greedy(model, rows, 8)


def test_one_engine_serves_many_calls_and_fewer_prompts_than_rows():
    model = tiny_model()
    engine = Engine(model, batch_size=3, max_seq_len=40)
    a, b = prompts([10, 6], seed=1), prompts([15], seed=2)
    assert engine.generate(a, 6).tokens == hf_greedy(model, a, 6)
    assert engine.generate(b, 9).tokens == hf_greedy(model, b, 9)
    assert engine.generate(a, 6).tokens == hf_greedy(model, a, 6)


def test_sampling_is_seeded_and_filters():
    model = tiny_model()
    engine = Engine(model, batch_size=2, max_seq_len=40)
    rows = prompts([8, 8])
    hot = Sampling(temperature=1.5, seed=7)
    first, again = engine.generate(rows, 16, hot).tokens, engine.generate(rows, 16, hot).tokens
    assert first == again
    assert engine.generate(rows, 16, Sampling(temperature=1.5, seed=8)).tokens != first
    assert first != engine.generate(rows, 16).tokens  # it does sample
    # top-k 1 and a tiny top-p keep only the most likely token: greedy, whatever the seed
    greedy = engine.generate(rows, 16).tokens
    assert engine.generate(rows, 16, Sampling(temperature=1.0, top_k=1, seed=3)).tokens == greedy
    assert engine.generate(rows, 16, Sampling(temperature=1.0, top_p=1e-6, seed=4)).tokens == greedy
    # top-k 2: every sampled token is one of the two most likely at its step (checked by replaying)
    sampled = engine.generate(rows[:1], 10, Sampling(temperature=5.0, top_k=2, seed=5)).tokens[0]
    ids = torch.tensor([rows[0] + sampled])
    with torch.no_grad():
        logits = model(ids).logits[0, len(rows[0]) - 1:-1]
    top2 = logits.topk(2, dim=-1).indices
    assert all(tok in top2[i].tolist() for i, tok in enumerate(sampled))
    with pytest.raises(EngineError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_eos_finishes_a_row_and_all_rows_stop():
    model = tiny_model()
    rows = prompts([10, 10])
    free = Engine(model, batch_size=2, max_seq_len=48).generate(rows, 20)
    eos = free.tokens[0][3]
    stop_at = free.tokens[0].index(eos)
    got = Engine(model, batch_size=2, max_seq_len=48).generate(rows, 20, eos_token_id=[eos])
    assert got.tokens[0] == free.tokens[0][: stop_at + 1] and got.finished[0]
    other = free.tokens[1]
    expected = other[: other.index(eos) + 1] if eos in other else other
    assert got.tokens[1] == expected
    # a single row ends the whole call at its EOS: far fewer steps than asked for
    one = Engine(model, max_seq_len=48).generate(rows[:1], 20, eos_token_id=eos)
    assert one.tokens[0][-1] == eos and one.decode_steps <= stop_at + 1


def test_streaming_callback_sees_every_token_and_can_stop():
    model = tiny_model()
    rows = prompts([6, 9])
    seen = []
    result = Engine(model, batch_size=2, max_seq_len=40).generate(rows, 10, on_tokens=seen.append)
    assert [list(col) for col in zip(*seen)] == result.tokens
    steps = []
    short = Engine(model, max_seq_len=40).generate(rows[:1], 10, on_tokens=lambda s: steps.append(s) or len(steps) == 4)
    assert len(short.tokens[0]) == 4 == len(steps)


def test_requests_that_do_not_fit_are_refused():
    model = tiny_model()
    engine = Engine(model, batch_size=2, max_seq_len=32)
    with pytest.raises(EngineError, match="does not fit the engine's cache of 32 tokens"):
        engine.generate(prompts([30]), 4)
    engine.generate(prompts([30]), 3)  # exactly fits: the last token is never written to the cache
    with pytest.raises(EngineError, match="1-2 prompts"):
        engine.generate(prompts([4, 4, 4]), 2)
    with pytest.raises(EngineError, match="empty"):
        engine.generate([[]], 2)
    with pytest.raises(EngineError, match="vocabulary of 300"):
        engine.generate([[5, 300]], 2)
    with pytest.raises(EngineError, match="exceeds the model's context"):
        Engine(model, max_seq_len=10_000)
    with pytest.raises(EngineError, match="batch_size"):
        Engine(model, batch_size=9)


def test_compiled_step_traces_through_the_kernel_op(windows, monkeypatch):
    """fullgraph=True: RSparseLinear's kernel call is a torch.library op, no graph break; the
    projections sharing an input are one call, and SiLU x up and the residual add + next norm
    run in the kernel calls' epilogues."""
    model = sparse_tiny(windows).to(DEVICE)
    for layer in rsparse_layers(model):
        layer.kernel = "always"  # the Triton kernel (interpreted on CPU) behind the op
    rows = prompts([11, 6])
    expected = hf_greedy(model, rows, 4)  # transformers runs each layer on its own (no fusion)
    torch._dynamo.reset()
    calls = []
    for name in ("decode_linear_multi", "decode_linear_silu_mul", "decode_linear_add_rmsnorm"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    for layer in rsparse_layers(model):  # re-configured modules: dynamo treats them as unspecialized
        layer.threshold = layer.threshold.clone()
    got = Engine(model, batch_size=2, max_seq_len=24, compile="aot_eager").generate(rows, 4)
    assert got.tokens == expected
    steps = calls.count("decode_linear_multi") // 2  # q/k/v of both blocks per decode step
    assert steps >= 1
    assert calls.count("decode_linear_silu_mul") == 2 * steps  # gate/up with SiLU x up
    assert calls.count("decode_linear_add_rmsnorm") == 4 * steps  # o_proj and down_proj


def test_auto_layers_run_the_kernel_only_where_its_launches_are_free():
    """kernel="auto": eager calls take the torch reference (the kernel's launch path costs more
    host time than it saves an eager loop); calls traced by torch.compile, captured, or inside
    eager_kernels() (the engine's warm-up before a capture) take the kernel."""
    x = torch.zeros(3)
    assert not ops.kernel_pays(x)
    with ops.eager_kernels():
        assert ops.kernel_pays(x)
        with ops.eager_kernels(False):
            assert not ops.kernel_pays(x)
    assert not ops.kernel_pays(x)
    torch._dynamo.reset()
    traced = torch.compile(lambda t: t + 1 if ops.kernel_pays(t) else t - 1, fullgraph=True, backend="eager")
    assert traced(x).tolist() == [1.0, 1.0, 1.0]


def test_kernel_op_fake_and_schema():
    from rsparse.runtime import ops  # noqa: F401  (registers torch.ops.rsparse)
    from rsparse.runtime.kernels import rsparse_decode_linear_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, generator=g)
    w_t = torch.randn(64, 48, generator=g)
    args = (x, w_t, torch.tensor(0.7), torch.rand(64, generator=g) + 0.5, torch.randn(64, 8, generator=g),
            torch.randn(8, 48, generator=g), torch.randn(48, generator=g))
    torch.library.opcheck(torch.ops.rsparse.decode_linear.default, args)
    torch.library.opcheck(torch.ops.rsparse.decode_linear.default, args[:4] + (None, None, None))
    # q/k/v-like parts of different widths sharing x, one with factors and bias, one sparse-only
    w2 = torch.randn(64, 16, generator=g)
    multi = (x, [w_t, w2], [args[2], torch.tensor(0.3)], [args[3], None], [args[4], None], [args[5], None],
             [args[6], None])
    torch.library.opcheck(torch.ops.rsparse.decode_linear_multi.default, multi)
    y1, y2 = torch.ops.rsparse.decode_linear_multi(*multi)
    assert torch.allclose(y2, rsparse_decode_linear_reference(x, w2, 0.3), atol=1e-5)
    y = torch.ops.rsparse.decode_linear(*args)
    assert torch.allclose(y1, y)
    assert torch.allclose(y, rsparse_decode_linear_reference(*args), atol=1e-5)
    # the fused epilogues: SiLU x up of two equal-width parts; residual add + RMSNorm of one
    gated = (x, [w_t, w_t.flip(1)], [args[2], torch.tensor(0.3)], [args[3], None], [args[4], None],
             [args[5], None], [args[6], None])
    torch.library.opcheck(torch.ops.rsparse.decode_linear_silu_mul.default, gated)
    ya, yb = torch.ops.rsparse.decode_linear_multi(*gated)
    assert torch.allclose(torch.ops.rsparse.decode_linear_silu_mul(*gated), torch.nn.functional.silu(ya) * yb)
    residual, weight = torch.randn(2, 1, 48, generator=g), torch.rand(48, generator=g) + 0.5
    torch.library.opcheck(torch.ops.rsparse.decode_linear_add_rmsnorm.default, args + (residual, weight, 1e-6))
    h, xn = torch.ops.rsparse.decode_linear_add_rmsnorm(*args, residual, weight, 1e-6)
    assert torch.allclose(h, residual + y)
    assert torch.allclose(xn, weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-5)


def test_bench_conversion_hits_the_budget():
    from rsparse.runtime.bench.decode import make_rsparse, measure_sparsity

    model = tiny_model()
    make_rsparse(model, 0.5, 0.9)
    layers = rsparse_layers(model)
    assert len(layers) == 14 and {l.method for l in layers} == {"rsparse"} and {l.tokens for l in layers} == {"decode"}
    assert abs(measure_sparsity(model, prompts([16])[0], n=16) - 0.5) < 0.1
    make_rsparse(model, 0.7, 1.0)  # re-configured in place: sparse-only now
    assert {l.method for l in rsparse_layers(model)} == {"sparse"} and all(l.rank == 0 for l in rsparse_layers(model))
    assert abs(measure_sparsity(model, prompts([16])[0], n=16) - 0.7) < 0.1


def test_bench_int4_rows_swap_every_layer_and_back():
    from rsparse.core.int4_layer import int4_layers
    from rsparse.runtime.bench.decode import int4_swapped, make_rsparse, measure_sparsity, weight_bytes

    model = tiny_model()
    head = model.lm_head.weight.numel() * 4
    projections = sum(l.weight.numel() for n, l in model.named_modules() if n.endswith("_proj"))
    originals = [l.weight for n, l in model.named_modules() if n.endswith("_proj")]
    with int4_swapped(model):  # the dense 4-bit row: codes (half a byte per weight) and bf16 scales
        layers = int4_layers(model)
        assert len(layers) == 14 and {l.method for l in layers} == {"dense"}
        scales = sum(l.scales_zeros.numel() * 2 for l in layers)
        assert weight_bytes(model, 0.0) == head + projections / 2 + scales
    assert [l.weight for n, l in model.named_modules() if n.endswith("_proj")] == originals  # the same objects back
    make_rsparse(model, 0.5, 0.9)
    sparse = rsparse_layers(model)
    with int4_swapped(model):
        layers = int4_layers(model)
        assert [(l.threshold, l.rank) for l in layers] == [(s.threshold, s.rank) for s in sparse]
        achieved = measure_sparsity(model, prompts([16])[0], n=16)
        assert abs(achieved - 0.5) < 0.1
        read = weight_bytes(model, achieved) - head
        factors = sum((l.lr_down.numel() + l.lr_up.numel()) * 4 for l in layers)  # fp32 factors, read whole
        assert factors > 0 and factors + 0.3 * (projections / 2 + scales) < read < factors + 0.75 * (projections / 2 + scales)
    assert rsparse_layers(model) == sparse


def test_forced_choices_follow_the_given_tokens(windows):
    """Teacher forcing: the engine's choice after each forced token equals the argmax of
    transformers' logits over the same sequence (dense: one full forward pass); forcing the
    engine's own greedy tokens gives them back (R-Sparse too)."""
    model = tiny_model()
    prompt, forced = prompts([9, 12], seed=5)
    engine = Engine(model, max_seq_len=32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + forced])).logits[0]
    expected = logits[len(prompt) - 1:].argmax(-1).tolist()
    got = engine.forced_choices(prompt, forced)
    assert got == expected and got[1:] != forced  # the engine chose, not echoed
    sparse = sparse_tiny(windows)
    engine = Engine(sparse, max_seq_len=32)
    free = engine.generate([prompt], 10).tokens[0]
    assert engine.forced_choices(prompt, free[:-1]) == free


def test_compiled_engine_compiles_one_block_for_all_blocks(windows):
    """The warm-up compiles one block's step, which every block reuses (dynamo takes the blocks'
    parameters and caches as inputs), not the whole model: a graph for the block, run once per
    block per step, and one for the state update, run once per step."""
    model = sparse_tiny(windows).to(DEVICE)
    n_blocks = len(decoder_blocks(model))
    assert n_blocks >= 2
    calls = []

    def counting(gm, example_inputs):
        calls.append(0)
        index = len(calls) - 1

        def run(*args):
            calls[index] += 1
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    rows = prompts([9])
    got = Engine(model, max_seq_len=24, compile=counting).generate(rows, 5)
    assert got.tokens == hf_greedy(model, rows, 5)
    assert got.decode_steps == 4 and sorted(calls) == [4, 4 * n_blocks]


def _greedy_like_recipe(model, target: float) -> dict:
    """A per-layer recipe of `model` on the budget: sparsity rising with depth and along the
    projections of a block, rank on the attention projections only."""
    from rsparse.core.models import decoder_linears
    from rsparse.search.allocate import layer_sizes, project_budget

    linears = decoder_linears(model)
    raw = [0.3 + 0.1 * lin.block + 0.02 * i for i, lin in enumerate(linears)]
    s = project_budget(raw, layer_sizes(linears), target, 0.95)
    return {"sparsity": target, "layers": [
        {"name": lin.name, "shape": [lin.module.out_features, lin.module.in_features], "sparsity": float(sp),
         "rho": 0.9 if "self_attn" in lin.name else 1.0} for lin, sp in zip(linears, s)]}


def test_recipe_on_shape_keeps_the_recipe_on_its_own_model_and_the_budget_on_another():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsparse.core.models import decoder_linears
    from rsparse.search.allocate import recipe_on_shape
    from rsparse.search.allocate import layer_sizes, model_sparsity

    small = tiny_model()
    recipe = _greedy_like_recipe(small, 0.6)
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    same = recipe_on_shape(recipe, decoder_linears(small))  # its own model: the recipe as written
    assert flat(same) == pytest.approx(flat((e["sparsity"], e["rho"]) for e in recipe["layers"]), abs=1e-9)

    # 4 blocks and a wider MLP: blocks 0-1 take block 0's entries, 2-3 block 1's, kind by kind,
    # shifted by one constant onto 60% of the new shapes' bytes
    big = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False))
    linears = decoder_linears(big)
    mapped = recipe_on_shape(recipe, linears)
    source = {(int(e["name"].split(".")[2]), e["name"].rsplit(".", 1)[-1]): e for e in recipe["layers"]}
    assert model_sparsity([s for s, _ in mapped], layer_sizes(linears)) == pytest.approx(0.6, abs=1e-9)
    shifts = {round(s - source[lin.block // 2, lin.kind]["sparsity"], 9) for lin, (s, _) in zip(linears, mapped)}
    assert len(shifts) == 1 and shifts != {0.0}  # one constant, and the new shapes needed one
    assert [rho for _, rho in mapped] == [source[lin.block // 2, lin.kind]["rho"] for lin in linears]

    # a recipe without a model-level sparsity: its own byte-weighted mean is the budget
    no_target = {"layers": recipe["layers"]}
    assert flat(recipe_on_shape(no_target, linears)) == pytest.approx(flat(mapped), abs=1e-9)


def test_recipe_on_shape_refuses_what_it_cannot_map():
    from rsparse.core.models import decoder_linears
    from rsparse.errors import RecipeError
    from rsparse.search.allocate import recipe_on_shape

    model = tiny_model()
    recipe = _greedy_like_recipe(model, 0.5)
    linears = decoder_linears(model)
    no_down = {"sparsity": 0.5, "layers": [e for e in recipe["layers"] if not e["name"].endswith("down_proj")]}
    with pytest.raises(RecipeError, match="no down_proj in block 0"):
        recipe_on_shape(no_down, linears)
    with pytest.raises(RecipeError, match="neither a model-level 'sparsity' nor"):
        recipe_on_shape({"layers": [{k: v for k, v in e.items() if k != "shape"} for e in recipe["layers"]]}, linears)
    with pytest.raises(RecipeError, match="block number, a rho"):
        recipe_on_shape({"sparsity": 0.5, "layers": [{"name": "lm_head", "rho": 1.0}]}, linears)


def test_bench_conversion_takes_per_layer_budgets():
    from rsparse.core.budget import layer_budget
    from rsparse.core.models import decoder_linears
    from rsparse.runtime.bench.decode import make_rsparse, measure_sparsity
    from rsparse.search.allocate import recipe_on_shape

    model = tiny_model()
    per_layer = recipe_on_shape(_greedy_like_recipe(model, 0.6), decoder_linears(model))
    make_rsparse(model, 0.6, 1.0, per_layer=per_layer)
    layers = rsparse_layers(model)
    for layer, lin, (s, rho) in zip(layers, decoder_linears(model), per_layer):
        budget = layer_budget(layer.out_features, layer.in_features, s, rho)
        assert layer.rank == budget.rank and layer.keep_fraction == pytest.approx(budget.keep_fraction)
        assert layer.method == ("rsparse" if budget.rank else "sparse") and (budget.rank == 0 or rho < 1)
    assert sum(layer.rank > 0 for layer in layers) >= 4  # the attention projections that can afford a rank
    assert abs(measure_sparsity(model, prompts([16])[0], n=16) - 0.6) < 0.1


def test_bench_decode_refuses_a_missing_recipe_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "rsparse.cli", "bench", "decode", "--recipes",
                        str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: recipe file not found: {tmp_path / 'missing.json'}"]
    assert not (tmp_path / "out").exists()


def test_bench_model_times_each_recipe_as_compress_applies_it(tiny_model_dir, monkeypatch, tmp_path):
    """bench_model's rows on a real model directory, the CUDA-only pieces replaced (load on the
    CPU, a fixed timing, short calibration windows): the dense row first, then one row per recipe
    whose layers are the recipe's budgets, yielded as they are measured."""
    import json
    import types

    import rsparse.core.data as data
    import rsparse.io.checkpoint as checkpoint
    import rsparse.runtime.bench.decode as bench
    from rsparse.core.budget import layer_budget

    load_any, load_windows = checkpoint.load_any, data.load_windows
    monkeypatch.setattr(checkpoint, "load_any", lambda path, device, dtype: load_any(path, device="cpu", dtype="float32"))
    monkeypatch.setattr(data, "load_windows", lambda tok, corpus, seq_len, n, split: load_windows(tok, corpus, 64, 2, split))
    timed = []

    def fake_time(model, prompt, gen, repeats, profile, variant):
        timed.append([(l.rank, l.keep_fraction) for l in rsparse_layers(model)])
        return {"tokens_per_s": 100.0 + len(timed), "ms_per_token": 1.0, "warmup_s": 0.0}

    monkeypatch.setattr(bench, "time_engine", fake_time)
    recipe = _greedy_like_recipe(tiny_model(), 0.6)
    path = tmp_path / "r60.json"
    path.write_text(json.dumps(recipe))
    args = types.SimpleNamespace(methods=["sparse-only"], ratio=0.95, sparsities=[], recipes=[str(path)], prompt=16,
                                 gen=4, repeats=1, profile=False, attention=["auto"], compile=[False], dtype="float32")
    rows = bench.bench_model(str(tiny_model_dir), args, 1e12)
    assert isinstance(rows, types.GeneratorType)  # rows come as they are measured
    rows = list(rows)
    assert [r["row"] for r in rows] == ["engine dense", "engine recipe r60"]
    assert rows[1]["sparsity"] == 0.6 and rows[1]["speedup"] == pytest.approx(102.0 / 101.0)
    assert 0.45 < rows[1]["achieved_sparsity"] < 0.75
    assert timed[0] == []  # dense: no sparse layer
    budgets = [layer_budget(*e["shape"], e["sparsity"], e["rho"]) for e in recipe["layers"]]
    assert [r for r, _ in timed[1]] == [b.rank for b in budgets] and any(r for r, _ in timed[1])
    assert [k for _, k in timed[1]] == pytest.approx([b.keep_fraction for b in budgets])
