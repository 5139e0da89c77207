"""Evolutionary search of per-layer sparse/low-rank ratios rho (paper section 3.5, Algorithm 1).

Each individual is a vector of rho_i, one per decoder projection. Every layer keeps its budget
(1-s) whatever its rho (rsparse.core.budget), so every individual has the same model-level
sparsity; the search only decides how each layer spends its budget. Fitness: rsparse.search.objective.

Differential evolution, as Algorithm 1: for each individual g_i, a mutant m = x1 + F (x2 - x3)
from three other random individuals, a binomial crossover with rate CR (at least one gene from
the mutant), the trial clipped to [0, 1]; the P best of parents and trials survive (elitist).
Group-wise: the genes are split into groups of `group_size` consecutive layers; each group is
optimised for `generations` generations while the other genes are held at the best individual
so far, then the next group. With share="type" (beyond the paper) there is one gene per
projection type (q, k, v, o, gate, up, down), shared by every block: 7 genes to fit instead of
7 x blocks, which the few calibration windows can pin down without over-fitting them.

Per-layer sparsity (cfg.allocation, rsparse.search.allocate): "uniform" keeps s_l = the target;
`sparsities` (e.g. the greedy allocation) fixes another s_l for the rho search; "evolve" adds one
sparsity gene per rho gene, mutated and crossed over with them, and puts every candidate back on
the byte budget (`project_budget`: inside the group being optimised, whose byte share is fixed by
the genes held outside it).

Early stop (cfg.holdout, cfg.patience): the last windows are held out of the fitness; after every
generation the best individual is scored on them and the held-out best is what the search returns.

After every generation the state is written atomically to the checkpoint file, so a killed
search resumes where it stopped, losing at most one generation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsparse.core.budget import layer_budget
from rsparse.core.calibrate import CalibrationActivations, collect_activations
from rsparse.core.config import RSparseConfig
from rsparse.core.models import decoder_linears
from rsparse.errors import BadInputError
from rsparse.io.results import write_json
from rsparse.progress import progress
from rsparse.search.allocate import layer_sizes, project_budget
from rsparse.search.config import SHARES, SearchConfig  # noqa: F401 (re-exported)
from rsparse.search.objective import Candidates, _block_inputs, _fitness


def initial_population(n_genes: int, cfg: SearchConfig, rng: np.random.Generator, gene_bytes=None) -> np.ndarray:
    """Seeded start: sparse-only (rho 1), the uniform init_ratio, and perturbations around it.

    The paper initialises at random in [0, 1]; with a few hundred evaluations a random start in
    [0, 1]^n is dominated by layers with catastrophic low-rank shares, so we start next to the
    best uniform recipes and let evolution move away from them. With allocation "evolve"
    (gene_bytes given), n_genes sparsity genes follow: the uniform allocation for the first two
    individuals, perturbations of it (projected onto the budget) for the others.
    """
    pop = np.clip(cfg.init_ratio + cfg.init_spread * rng.standard_normal((cfg.population, n_genes)), 0.0, 1.0)
    pop[0] = 1.0
    pop[1] = cfg.init_ratio
    pop = np.round(pop * cfg.steps) / cfg.steps
    if gene_bytes is None:
        return pop
    a = cfg.allocation
    sp = cfg.sparsity + a.spread * rng.standard_normal((cfg.population, n_genes))
    sp[:2] = cfg.sparsity
    sp = np.array([project_budget(row, gene_bytes, cfg.sparsity, a.max_sparsity) for row in sp])
    return np.concatenate([pop, sp], axis=1)


def search(model: nn.Module, windows: torch.Tensor, cfg: SearchConfig, checkpoint: str | Path | None = None,
           activations: CalibrationActivations | None = None, log=print, batch_size: int = 4,
           sparsities=None) -> dict:
    """Run (or resume) the search; returns the state with the best recipe and fitness history.
    batch_size: calibration windows per forward pass when scoring a candidate. sparsities: a
    fixed per-layer sparsity (an allocation meeting cfg.sparsity, e.g. the greedy one) for the
    rho search; not with allocation "evolve", which searches it."""
    cfg.validate()
    evolve = cfg.allocation.method == "evolve"
    if evolve and sparsities is not None:
        raise BadInputError("allocation 'evolve' searches the per-layer sparsity: give no fixed sparsities")
    linears = decoder_linears(model)
    names = [l.name for l in linears]
    # The genes: one per projection, or one per projection type shared by every block (7 genes
    # instead of 7 x blocks: far fewer degrees of freedom to over-fit a few calibration windows).
    if cfg.share == "type":
        kinds = list(dict.fromkeys(l.kind for l in linears))
        gene_of = np.array([kinds.index(l.kind) for l in linears])
    else:
        gene_of = np.arange(len(linears))
    n = int(gene_of.max()) + 1
    groups = [list(range(i, min(i + cfg.group_size, n))) for i in range(0, n, cfg.group_size)]
    sizes = layer_sizes(linears)
    gene_bytes = np.bincount(gene_of, weights=sizes, minlength=n)
    if sparsities is not None:
        sparsities = np.asarray(sparsities, dtype=np.float64)
        if sparsities.shape != (len(linears),) or abs(float(sparsities @ sizes / sizes.sum()) - cfg.sparsity) > 1e-6:
            raise BadInputError(f"the fixed per-layer sparsities must be one per layer and meet the budget {cfg.sparsity}")
    settings = {k: v for k, v in asdict(cfg).items() if k != "cache_mb"}
    identity = {"layers": len(linears), "genes": n, "names_hash": hash_names(names), "windows": list(windows.shape),
                "windows_sum": int(windows.sum()),
                "sparsities": None if sparsities is None else [round(float(x), 9) for x in sparsities]}
    n_hold = int(round(cfg.holdout * windows.shape[0])) if cfg.holdout else 0
    if n_hold and n_hold >= windows.shape[0]:
        raise BadInputError(f"holdout {cfg.holdout} leaves no calibration window for the fitness")
    held, windows = (windows[windows.shape[0] - n_hold:], windows[:windows.shape[0] - n_hold]) if n_hold else (None, windows)

    state = None
    if checkpoint and Path(checkpoint).is_file():
        try:
            state = json.loads(Path(checkpoint).read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInputError(f"search state {checkpoint} is damaged ({e}; a run killed while writing it?): delete it "
                                "to start the search again, or use another --out") from None
        if state.get("settings") != settings or state.get("identity") != identity:
            raise BadInputError(f"search state {checkpoint} was written by a search with other settings, model or data: "
                                "rerun with the same settings to resume, or use another --out (or delete the file) "
                                "to start a new search")
        log(f"resuming from {checkpoint}: group {state['group']} generation {state['generation']}")
    rng = np.random.default_rng(cfg.seed)
    if state is not None:
        rng.bit_generator.state = state["rng"]

    if activations is None:
        activations = collect_activations(model, windows)
    cands = Candidates(model, cfg.sparsity, activations, tokens=cfg.tokens, factors=cfg.factors, steps=cfg.steps,
                       cache_mb=cfg.cache_mb)

    def layer_sparsity(genes):
        return genes[n + gene_of] if evolve else sparsities

    def evaluate(genes, start_block, cache, on=None):
        cands.apply(genes[gene_of], layer_sparsity(genes))
        return _fitness(model, windows if on is None else on, start_block, cache, batch_size, tokens=cfg.tokens)

    def legal(trial, genes):
        """The trial on the rho grid and, with evolve, on the budget: the group's sparsity genes
        shifted so that they hold the bytes the genes outside the group leave them."""
        trial[:n] = np.round(np.clip(trial[:n], 0.0, 1.0) * cfg.steps) / cfg.steps
        if evolve:
            inside = np.zeros(n, dtype=bool)
            inside[genes] = True
            rest = float(trial[n:][~inside] @ gene_bytes[~inside])
            share = (cfg.sparsity * gene_bytes.sum() - rest) / gene_bytes[inside].sum()
            trial[n + np.flatnonzero(inside)] = project_budget(trial[n:][inside], gene_bytes[inside], share,
                                                                cfg.allocation.max_sparsity)
        return trial

    def held_out(genes):
        """Early stop: score the generation's best on the held-out windows; True to stop."""
        if held is None:
            return False
        score = evaluate(genes, 0, {}, on=held)
        h = state.setdefault("holdout", {"best": None, "genes": None, "since": 0, "scores": []})
        h["scores"].append(score)
        if h["best"] is None or score < h["best"]:
            h.update(best=score, genes=genes.tolist(), since=0)
        else:
            h["since"] += 1
        return bool(cfg.patience) and h["since"] >= cfg.patience

    t_start = time.time()
    if state is None:
        pop = initial_population(n, cfg, rng, gene_bytes if evolve else None)
        fit = [evaluate(p, 0, {}) for p in progress(pop, desc="initial population", unit="candidate", leave=False)]
        state = {"settings": settings, "identity": identity, "group": 0, "generation": 0,
                 "population": pop.tolist(), "fitness": fit, "history": [], "evaluations": len(fit),
                 "seconds": time.time() - t_start}
        held_out(pop[int(np.argmin(fit))])
        _save(checkpoint, state, rng)
    pop, fit = np.array(state["population"]), list(state["fitness"])
    total_gens = len(groups) * cfg.generations
    done = state["group"] * cfg.generations + state["generation"]
    bar = progress(total=total_gens, initial=done, desc="search", unit="generation")
    while state["group"] < len(groups):
        genes = groups[state["group"]]
        searched = genes + [n + g for g in genes] if evolve else genes  # the genome positions this group moves
        others = [i for i in range(pop.shape[1]) if i not in set(searched)]
        best = pop[int(np.argmin(fit))].copy()
        start_block = min(l.block for l, g in zip(linears, gene_of) if g in set(genes))
        cands.apply(best[gene_of], layer_sparsity(best))
        cache = _block_inputs(model, windows, start_block, batch_size) if start_block else {}
        t0 = time.time()
        if state["generation"] == 0 and not state.get("group_started") and len(groups) > 1:
            # A new group: every individual takes the best's genes outside the group; inside it,
            # the best is kept and the others are drawn around the best's values (earlier group
            # starts made those genes equal across the population, which would leave differential
            # evolution nothing to recombine), then everyone is scored under the new context.
            pop[:, others] = best[others]
            pop[0] = best
            noise = cfg.init_spread * rng.standard_normal((cfg.population - 1, len(genes)))
            pop[1:, genes] = best[genes] + noise
            if evolve:
                pop[1:, [n + g for g in genes]] = best[[n + g for g in genes]] + cfg.allocation.spread * \
                    rng.standard_normal((cfg.population - 1, len(genes)))
            pop[1:] = [legal(p, genes) for p in pop[1:]]
            fit = [evaluate(p, start_block, cache) for p in progress(pop, desc=f"group {state['group']} start", unit="candidate", leave=False)]
            state["group_started"] = True
            state["population"], state["fitness"] = pop.tolist(), fit
            state["evaluations"] += cfg.population
            _save(checkpoint, state, rng)
        trials, trial_fit = [], []
        for i in range(cfg.population):
            a, b, c = rng.choice([j for j in range(cfg.population) if j != i], 3, replace=False)
            mutant = pop[a] + cfg.mutation * (pop[b] - pop[c])
            cross = rng.random(len(searched)) < cfg.crossover
            cross[rng.integers(len(searched))] = True
            trial = pop[i].copy()
            trial[searched] = np.where(cross, mutant[searched], pop[i][searched])
            trial = legal(trial, genes)
            trials.append(trial)
            trial_fit.append(evaluate(trial, start_block, cache))
        pop, fit = _select(np.concatenate([pop, np.array(trials)]), np.array(fit + trial_fit), cfg.population)
        state["evaluations"] += cfg.population
        state["seconds"] += time.time() - t0
        state["history"].append({"group": state["group"], "generation": state["generation"],
                                 "best": fit[0], "mean": float(np.mean(fit)), "seconds": time.time() - t0})
        state["generation"] += 1
        if state["generation"] == cfg.generations:
            state["group"], state["generation"], state["group_started"] = state["group"] + 1, 0, False
        state["population"], state["fitness"] = pop.tolist(), fit
        if held_out(pop[0]):
            log(f"early stop: no held-out gain for {cfg.patience} generations")
            state["group"], state["stopped_early"] = len(groups), True
        _save(checkpoint, state, rng)
        bar.update(1)
        left = (total_gens - bar.n) * (time.time() - t0)
        bar.set_postfix(best=f"{fit[0]:.3f}", mean=f"{np.mean(fit):.3f}", left=f"{left / 60:.0f}min")
    bar.close()
    best, best_fit = pop[int(np.argmin(fit))], float(min(fit))
    if held is not None:  # the held-out best (early stop), scored on the fitness windows too
        best = np.array(state["holdout"]["genes"])
        best_fit = evaluate(best, 0, {})
    s_best = layer_sparsity(best)
    state["best"] = {"rho": best[gene_of].tolist(), "genes": best.tolist(), "fitness": best_fit,
                     "sparsity": None if s_best is None else [float(x) for x in s_best]}
    if held is not None:
        state["best"]["holdout_fitness"] = state["holdout"]["best"]
    state["names"] = names
    state["shapes"] = [[l.module.out_features, l.module.in_features] for l in linears]
    _save(checkpoint, state, rng)
    return state


def _select(pool: np.ndarray, fitness: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Elitist top-k of parents and trials (Algorithm 1), distinct individuals first: copies of
    one good individual would otherwise fill the population and stall the mutation."""
    order = np.argsort(fitness, kind="stable")
    seen, first, dup = set(), [], []
    for i in order:
        key = pool[i].tobytes()
        (dup if key in seen else first).append(i)
        seen.add(key)
    keep = (first + dup)[:k]
    return pool[keep], fitness[keep].tolist()


def hash_names(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _save(path, state, rng) -> None:
    state["rng"] = rng.bit_generator.state
    if path:
        write_json(path, state)


def recipe_from_search(state: dict, sparsity: float, report: list[dict] | None = None, **extra) -> dict:
    """The recipe file's content: per-layer rho (with keep/rank/threshold once applied)."""
    layers = []
    per_layer = state["best"].get("sparsity")
    for i, (name, shape, rho) in enumerate(zip(state["names"], state["shapes"], state["best"]["rho"])):
        s = sparsity if per_layer is None else per_layer[i]
        b = layer_budget(shape[0], shape[1], s, rho)
        entry = {"name": name, "shape": shape, "rho": rho, "keep": b.keep_fraction, "rank": b.rank}
        if per_layer is not None:
            entry["sparsity"] = s
        if report is not None:
            entry["threshold"] = report[i]["threshold"]
        layers.append(entry)
    return {"sparsity": sparsity, **extra, "search": {"settings": state["settings"], "evaluations": state["evaluations"],
            "seconds": state["seconds"], "best_fitness": state["best"]["fitness"], "history": state["history"]},
            "layers": layers}
