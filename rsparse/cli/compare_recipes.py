"""`rsparse compare-recipes`: uniform vs searched per-layer ratios (the paper's Table 4).

    rsparse compare-recipes --sparsities 0.4,0.5,0.6,0.7 --out out/recipes

At each model-level sparsity:
  1. uniform: the same rho for every layer, chosen by grid search on the search's own objective
     (calibration perplexity, rsparse.search.objective.uniform_grid);
  2. searched: the evolutionary search (rsparse.search.evolution.search), its initial population centred on
     the best uniform rho, so it starts from the uniform optimum and can only improve on it on
     the calibration data (elitist);
  3. both, and sparse-only (rho = 1) as the reference, sparsified by the standard calibration
     (rsparse.sparsify_) and scored on held-out perplexity and the zero-shot tasks (lm-eval,
     second-half protocol).
With `--allocations uniform,greedy,evolve` (rsparse.search.allocate), per-layer sparsities too:
  greedy: TEAL-style greedy allocation (one walk up to the highest sparsity gives every lower
     one), scored sparse-only ("sparse-only greedy") and with the rho search on top, s_l fixed
     ("greedy + searched rho");
  evolve: the search mutates s_l with rho_l under the same budget ("evolve s+rho").
Writes results.json, results.md (one table row per sparsity and recipe), recipe_sXX.json (the
searched recipe, usable with `--recipe`; recipe_sXX_<allocation>.json for the others) and
recipe_sXX.png (searched rho per layer and type). Each search checkpoints to search_sXX*.json: a
killed run resumes where it stopped. `--refine-corpus` re-sets every row's thresholds on the
calibration windows plus windows of another text (the achieved sparsity on unseen text).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rsparse.cli import common
from rsparse.cli.search import add_search_args, check_batch_size
from rsparse.core.budget import check_ratio, check_sparsity
from rsparse.core.config import SCORED_MODES
from rsparse.search.config import ALLOCATIONS, AllocationConfig, SearchConfig

DEFAULT_GRID = "0.5,0.6,0.7,0.8,0.85,0.9,0.95,1.0"


def register(subparsers) -> None:
    p = subparsers.add_parser("compare-recipes", help="uniform (grid-searched) vs searched per-layer ratios at several "
                                                      "sparsities, on held-out perplexity and zero-shot tasks (Table 4)")
    common.add_model(p)
    p.add_argument("--sparsities", default="0.4,0.5,0.6,0.7", help="model-level target sparsities")
    p.add_argument("--grid", default=DEFAULT_GRID, help="uniform rho values tried at each sparsity")
    add_search_args(p)
    p.add_argument("--init-spread", type=float, default=SearchConfig.init_spread,
                   help="standard deviation of the search's initial population around the best uniform rho")
    p.add_argument("--allocations", default="uniform",
                   help=f"per-layer sparsity allocations compared, from {', '.join(ALLOCATIONS)} (uniform always runs)")
    common.add_allocation(p)
    common.add_refine_mix(p)
    p.add_argument("--tasks", default=None, help="lm-eval tasks (default: the 8 of Table 1; 'none' to skip)")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (default: full sets)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (padding-aware)")
    p.add_argument("--tokens", default=SearchConfig.tokens, choices=list(SCORED_MODES),
                   help="sparse positions in the search objective and every evaluation (second_half: the paper's protocol)")
    common.add_device(p)
    p.add_argument("--out", default="out/recipes")
    p.set_defaults(func=cmd_compare_recipes)


def _floats(text: str, what: str, check) -> list[float]:
    values = common.parse_floats(text, what, check)
    common.require(bool(values), f"no {what} given")
    return values


def cmd_compare_recipes(args: argparse.Namespace) -> int:
    from rsparse.core.calibrate import collect_activations
    from rsparse.core.config import RSparseConfig
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, check_seq_len, load_model
    from rsparse.eval.harness import evaluate_tasks, resolve_tasks
    from rsparse.eval.perplexity import evaluate_perplexity
    from rsparse.eval.tasks import PAPER_TASKS
    from rsparse.io.results import versions, write_json
    from rsparse.io.tables import plot_recipe, recipes_markdown
    from rsparse.methods import restore_, sparsify_
    from rsparse.methods.rsparse import refine_on_mix_
    from rsparse.search.allocate import greedy_allocation
    from rsparse.search.evolution import recipe_from_search, search
    from rsparse.search.objective import uniform_grid

    # Validate everything cheap before loading anything.
    sparsities = _floats(args.sparsities, "sparsities", check_sparsity)
    allocations = common.parse_names(args.allocations, ALLOCATIONS, "allocation")
    alloc = AllocationConfig(method="greedy", step=args.alloc_step, max_sparsity=args.max_sparsity,
                             spread=args.sparsity_spread).validate()
    common.require(max(sparsities) <= alloc.max_sparsity or allocations == ["uniform"],
                   f"a sparsity above --max-sparsity {alloc.max_sparsity}")
    common.check_refine_mix(args)
    grid = _floats(args.grid, "grid", check_ratio)
    tasks = [] if (args.tasks or "").strip().lower() == "none" else (args.tasks or ",".join(PAPER_TASKS))
    specs = resolve_tasks(tasks) if tasks else []
    for s in sparsities:
        checked = SearchConfig(sparsity=s, population=args.population, generations=args.generations,
                               group_size=args.group_size, mutation=args.mutation, crossover=args.crossover,
                               init_spread=args.init_spread, share=args.share, tokens=args.tokens,
                               factors=args.factors, rho_step=args.rho_step).validate()
    check_batch_size(args.search_batch_size)
    steps = checked.steps
    off = [g for g in grid if abs(g * steps - round(g * steps)) > 1e-6]
    # the search starts from the best uniform rho: it must be one of its grid values
    common.require(not off, f"uniform grid values {off} are not multiples of --rho-step {args.rho_step}")
    common.require(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}")
    common.check_corpora(args.calib_corpus, args.ppl_corpus)
    common.check_device(args.device)
    from rsparse.cli.search import check_state

    out = check_state(args.out)
    spec = common.check_model(args.model, args.seq_len)  # the context, before the weights load
    if args.ppl_windows:
        check_seq_len(spec, args.ppl_seq_len, "--ppl-seq-len")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    windows = load_windows(tok, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    heldout = load_windows(tok, args.ppl_corpus, args.ppl_seq_len, args.ppl_windows, "perplexity") \
        if args.ppl_windows else None
    activations = collect_activations(model, windows, seed=args.seed)
    results = {"model": model_name, "versions": versions(), "seed": args.seed,
               "calibration": {"corpus": args.calib_corpus, "windows": args.calib_samples, "seq_len": args.seq_len},
               "perplexity": {"corpus": args.ppl_corpus, "windows": args.ppl_windows, "seq_len": args.ppl_seq_len,
                              "tokens": args.tokens},
               "tasks": [s.name for s in specs], "limit": args.limit, "grid": grid, "allocations": allocations,
               "refine_mix": None if not args.refine_corpus else {"corpus": args.refine_corpus,
                                                                   "windows": args.refine_windows},
               "settings": common.settings(args), "sparsities": []}

    mix = common.refine_mix(tok, args, windows)
    greedy = None
    if "greedy" in allocations:
        t0 = time.time()
        greedy = greedy_allocation(model, windows, sparsities, activations, alloc, tokens=args.tokens,
                                   batch_size=args.search_batch_size)
        greedy["seconds"] = time.time() - t0
        write_json(out / "greedy.json", greedy)
        restore_(model)

    def search_cfg(s, rho, method="uniform"):
        return SearchConfig(sparsity=s, population=args.population, generations=args.generations,
                            group_size=args.group_size, mutation=args.mutation, crossover=args.crossover,
                            init_ratio=rho, init_spread=args.init_spread, share=args.share, tokens=args.tokens,
                            factors=args.factors, rho_step=args.rho_step, seed=args.seed,
                            allocation=AllocationConfig(method, max_sparsity=alloc.max_sparsity, spread=alloc.spread))

    for s in sparsities:
        tag = f"s{round(100 * s):02d}"
        t0 = time.time()
        restore_(model)
        uniform = uniform_grid(model, windows, s, grid, activations, tokens=args.tokens, factors=args.factors,
                               batch_size=args.search_batch_size)
        best_uniform = min(uniform, key=lambda u: u["fitness"])
        print(f"{100 * s:.0f}%: best uniform rho {best_uniform['rho']} (calibration fitness "
              f"{best_uniform['fitness']:.3f})", file=sys.stderr)
        sparse_fitness = next((u["fitness"] for u in uniform if u["rho"] == 1.0), None)  # rho 1 is sparse-only
        variants = [("sparse-only", RSparseConfig(sparsity=s, method="sparse"), sparse_fitness),
                    (f"uniform rho={best_uniform['rho']:g}", RSparseConfig(sparsity=s, ratio=best_uniform["rho"]),
                     best_uniform["fitness"])]
        if greedy is not None:
            layer_s = greedy["sparsity"][s]
            recipe = {"sparsity": s, "allocation": "greedy",
                      "layers": [{"name": n, "rho": 1.0, "sparsity": x} for n, x in zip(greedy["names"], layer_s)]}
            write_json(out / f"recipe_{tag}_greedy-sparse.json", recipe)
            variants.append(("sparse-only greedy", RSparseConfig(sparsity=s, recipe=recipe), None))
        searches = {"searched": ("", "uniform", None)}
        if greedy is not None:
            searches["greedy + searched rho"] = ("_greedy", "uniform", greedy["sparsity"][s])
        if "evolve" in allocations:
            searches["evolve s+rho"] = ("_evolve", "evolve", None)
        search_info = {}
        for label, (suffix, method, fixed) in searches.items():
            restore_(model)
            state = search(model, windows, search_cfg(s, best_uniform["rho"], method),
                           checkpoint=out / f"search_{tag}{suffix}.json", activations=activations,
                           log=lambda m: print(m, file=sys.stderr), batch_size=args.search_batch_size,
                           sparsities=fixed)
            per_layer = state["best"].get("sparsity")
            recipe = {"layers": [{"name": n, "rho": r, **({} if per_layer is None else {"sparsity": per_layer[i]})}
                                 for i, (n, r) in enumerate(zip(state["names"], state["best"]["rho"]))]}
            report = sparsify_(model, RSparseConfig(sparsity=s, recipe=recipe, seq_len=args.seq_len), activations)
            recipe_data = recipe_from_search(state, s, report, model=model_name, calibration=results["calibration"],
                                             uniform_grid=uniform, versions=versions(),
                                             allocation="greedy" if fixed is not None else method)
            write_json(out / f"recipe_{tag}{suffix}.json", recipe_data)
            if not suffix:
                plot_recipe(recipe_data, out / f"recipe_{tag}.png")
            variants.append((label, RSparseConfig(sparsity=s, recipe=recipe), state["best"]["fitness"]))
            search_info[label] = {"evaluations": state["evaluations"], "seconds": state["seconds"],
                                  "best_fitness": state["best"]["fitness"]}

        rows = []
        for label, config, fitness in variants:
            report = sparsify_(model, config, activations)
            if mix is not None:
                refine_on_mix_(model, config, windows, mix, report)
            row = {"recipe": label, "target_sparsity": s, "calibration_fitness": fitness}
            if heldout is not None:
                p = evaluate_perplexity(model, heldout, tokens=args.tokens, desc=f"perplexity ({label}, {tag})")
                row.update(ppl=p["ppl"], achieved_sparsity=p["achieved_sparsity"])
            if specs:
                ev = evaluate_tasks(model, tok, [sp.name for sp in specs], limit=args.limit,
                                    batch_size=args.batch_size, tokens=args.tokens, seed=args.seed)
                row.update(tasks={t: {k: r.get(k) for k in ("acc", "acc_norm", "acc_stderr", "correct", "docs")}
                                  for t, r in ev["tasks"].items()},  # each example's outcome: eval --paired
                           average=ev["average"], task_achieved_sparsity=ev.get("achieved_sparsity"))
            rows.append(row)
            print(f"{tag} {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                 if isinstance(v, float)), file=sys.stderr)
            write_json(out / "results.json", results | {"partial": {"sparsity": s, "rows": rows}})
        restore_(model)
        results["sparsities"].append({"sparsity": s, "uniform_grid": uniform, "best_uniform_rho": best_uniform["rho"],
                                      "search": search_info["searched"], "searches": search_info,
                                      "recipe_file": str(out / f"recipe_{tag}.json"), "rows": rows,
                                      "seconds": time.time() - t0})
        write_json(out / "results.json", results)  # after every sparsity: a long run can be inspected

    results["wall_seconds"] = time.time() - start
    write_json(out / "results.json", results)
    md = recipes_markdown(results)
    (out / "results.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and the recipes ({time.time() - start:.0f} s)")
    return 0
