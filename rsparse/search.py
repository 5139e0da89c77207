"""Evolutionary search of per-layer sparse/low-rank ratios rho (paper section 3.5, Algorithm 1).

Each individual is a vector of rho_i, one per decoder projection. Every layer keeps its budget
(1-s) whatever its rho (rsparse.budget), so every individual has the same model-level sparsity;
the search only decides how each layer spends its budget. Fitness = mean perplexity of the
sparsified model over the calibration windows, lower is better, under the evaluation protocol
(`tokens`): "second_half" (default) runs each window's first half dense and scores the
predictions at its sparse second half, as rsparse.evaluate_perplexity does; "all" sparsifies and
scores every position.

Differential evolution, as Algorithm 1: for each individual g_i, a mutant m = x1 + F (x2 - x3)
from three other random individuals, a binomial crossover with rate CR (at least one gene from
the mutant), the trial clipped to [0, 1]; the P best of parents and trials survive (elitist).
Group-wise: the genes are split into groups of `group_size` consecutive layers; each group is
optimised for `generations` generations while the other genes are held at the best individual
so far, then the next group. With share="type" (beyond the paper) there is one gene per
projection type (q, k, v, o, gate, up, down), shared by every block: 7 genes to fit instead of
7 x blocks, which the few calibration windows can pin down without over-fitting them.

Costs are kept down by reusing what does not change between candidates:
  * the dense calibration activations (collected once) give every layer's thresholds on a grid
    of rho values (one sort per layer and score type);
  * one SVD per layer gives the factors for every rank (slices of the largest); with
    factors="whitened" (the final model's factors, fitted to the inputs each candidate's
    threshold drops) the factors of a (layer, rho) pair are computed once, when a candidate
    first asks for them, on the weight's device; `rho_step` bounds how many pairs there are;
  * the hidden states entering the first block of the group being optimised are the same for
    all candidates, so each candidate runs only the blocks from there on.
After every generation the state is written atomically to the checkpoint file, so a killed
search resumes where it stopped, losing at most one generation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rsparse.budget import check_sparsity, layer_budget
from rsparse.calibrate import CalibrationActivations, _layer_method, collect_activations, dropped_input_factors, sparsify_
from rsparse.config import FACTORS, RSparseConfig
from rsparse.layer import rsparse_layers
from rsparse.models import decoder_blocks, decoder_linears
from rsparse.report import write_json

SHARES = ("layer", "type")


@dataclass
class SearchConfig:
    sparsity: float = 0.5
    population: int = 32
    generations: int = 5  # per group
    group_size: int = 28  # layers per group
    mutation: float = 0.5  # F
    crossover: float = 0.5  # CR
    init_ratio: float = 0.95  # centre of the initial population (see `initial_population`)
    init_spread: float = 0.05
    share: str = "layer"  # one rho per projection ("layer", the paper) or per projection type ("type")
    tokens: str = "second_half"  # sparse (and scored) positions of the objective: second_half | all
    # Low-rank factors the objective scores candidates with: "svd" (slices of one SVD per layer,
    # cheap) or "whitened" (what sparsify_ builds by default; computed per layer and rho value).
    factors: str = "svd"
    rho_step: float = 0.005  # genes live on a grid of this step; thresholds (and factors) per grid point
    seed: int = 0

    @property
    def steps(self) -> int:
        return round(1 / self.rho_step)

    def validate(self) -> "SearchConfig":
        check_sparsity(self.sparsity)
        if self.population < 4:
            raise ValueError(f"population must be at least 4 (differential evolution needs 3 donors), got {self.population}")
        if self.generations < 1 or self.group_size < 1:
            raise ValueError("generations and group_size must be positive")
        if not 0 < self.mutation <= 2 or not 0 <= self.crossover <= 1:
            raise ValueError(f"mutation F must be in (0, 2] and crossover CR in [0, 1], got {self.mutation}, {self.crossover}")
        if not 0 <= self.init_spread <= 1:
            raise ValueError(f"init_spread must be in [0, 1], got {self.init_spread}")
        if self.tokens not in ("second_half", "all"):
            raise ValueError(f"tokens must be second_half or all, got {self.tokens!r}")
        if self.factors not in FACTORS:
            raise ValueError(f"factors must be one of {', '.join(FACTORS)}, got {self.factors!r}")
        if not 0 < self.rho_step <= 1 or abs(round(1 / self.rho_step) * self.rho_step - 1) > 1e-9:
            raise ValueError(f"rho_step must divide 1 (e.g. 0.005, 0.05, 0.1), got {self.rho_step}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {', '.join(SHARES)}, got {self.share!r}")
        return self


class _Candidates:
    """Applies a rho vector to an already sparsified model quickly (no module rebuilding)."""

    def __init__(self, model: nn.Module, sparsity: float, activations: CalibrationActivations, score: str = "auto",
                 tokens: str = "second_half", factors: str = "svd", steps: int = 200):
        base = RSparseConfig(sparsity=sparsity, ratio=0.0, tokens=tokens, refine=False, factors="svd")
        sparsify_(model, base, activations)  # rho = 0 everywhere: largest ranks, caches SVDs
        self.layers = rsparse_layers(model)
        self.sparsity, self.score, self.factors, self.steps = sparsity, score, factors, steps
        grid = torch.linspace(0, 1, steps + 1)
        self.thresholds = []  # per layer: {score kind: tensor of thresholds over the rho grid}
        self.full = []
        for layer in self.layers:
            rows = activations.rows[layer.name].abs().float()
            table = {}
            for kind, scale in (("abs", None), ("weighted", layer.weight.detach().float().norm(dim=0).cpu())):
                s = (rows * scale if scale is not None else rows).reshape(-1).sort().values
                keep = (1 - sparsity) * grid
                idx = ((1 - keep) * s.numel()).round().long().clamp(1, s.numel()) - 1
                t = s[idx]
                t[keep <= 0] = math.inf
                table[kind] = t
            self.thresholds.append(table)
            self.full.append((layer.lr_down.clone(), layer.lr_up.clone()))
        self.norms = [l.weight.detach().float().norm(dim=0) for l in self.layers]
        self.ones = [torch.ones_like(n) for n in self.norms]
        self.rows = [activations.rows[l.name] for l in self.layers] if factors == "whitened" else None
        self.whitened: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, rhos: np.ndarray) -> None:
        for i, (layer, table, rho) in enumerate(zip(self.layers, self.thresholds, rhos)):
            g = int(round(float(rho) * self.steps))
            b = layer_budget(layer.out_features, layer.in_features, self.sparsity, g / self.steps)
            method = _layer_method(b)
            weighted = self.score == "weighted" or (self.score == "auto" and method == "rsparse")
            threshold = float(table["weighted" if weighted else "abs"][g])
            layer.method = method
            layer.keep_fraction = b.keep_fraction
            layer.threshold.fill_(threshold)
            layer.score_scale = self.norms[i] if weighted else self.ones[i]
            layer.rank = b.rank
            layer.lr_down, layer.lr_up = self._factors(i, g, b.rank, threshold, weighted)

    def _factors(self, i: int, g: int, rank: int, threshold: float, weighted: bool):
        down, up = self.full[i]
        if self.factors == "svd" or rank == 0:
            return down[:, :rank], up[:rank]
        if (i, g) not in self.whitened:  # as sparsify_ builds them: fitted to the dropped inputs
            d, u = dropped_input_factors(self.layers[i].weight, self.rows[i], self.norms[i] if weighted else None,
                                         threshold, rank)
            self.whitened[i, g] = (d.to(down.device, down.dtype), u.to(up.device, up.dtype))
        return self.whitened[i, g]


class _Passthrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def _fitness(model: nn.Module, windows: torch.Tensor, start_block: int, cache: dict, batch_size: int = 4,
             tokens: str = "second_half") -> float:
    """Mean per-window perplexity, running blocks >= start_block from cached inputs; with
    "second_half" only the predictions of each window's second half count."""
    first = windows.shape[1] // 2 if tokens == "second_half" else 0
    blocks = decoder_blocks(model)
    saved = list(blocks[:start_block])
    ppls = []

    def inject(module, args):
        return (cache[current],) + tuple(args[1:])

    handle = blocks[start_block].register_forward_pre_hook(inject) if start_block else None
    try:
        for i in range(start_block):
            blocks[i] = _Passthrough()
        device = next(model.parameters()).device
        for current in range(0, windows.shape[0], batch_size):
            ids = windows[current:current + batch_size].to(device)
            logits = model(ids, use_cache=False).logits[:, first:-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, first + 1:], reduction="none").mean(dim=1)
            ppls.extend(nll.exp().tolist())
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
        if handle:
            handle.remove()
    return float(np.mean(ppls))


@torch.no_grad()
def _block_inputs(model: nn.Module, windows: torch.Tensor, block: int, batch_size: int = 4) -> dict:
    """Hidden states entering `block` for each batch of windows, under the current layers."""
    cache = {}
    blocks = decoder_blocks(model)

    class _Stop(Exception):
        pass

    def grab(module, args):
        cache[current] = args[0].detach().clone()
        raise _Stop

    handle = blocks[block].register_forward_pre_hook(grab)
    device = next(model.parameters()).device
    try:
        for current in range(0, windows.shape[0], batch_size):
            try:
                model(windows[current:current + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cache


def initial_population(n_genes: int, cfg: SearchConfig, rng: np.random.Generator) -> np.ndarray:
    """Seeded start: sparse-only (rho 1), the uniform init_ratio, and perturbations around it.

    The paper initialises at random in [0, 1]; with a few hundred evaluations a random start in
    [0, 1]^n is dominated by layers with catastrophic low-rank shares, so we start next to the
    best uniform recipes and let evolution move away from them.
    """
    pop = np.clip(cfg.init_ratio + cfg.init_spread * rng.standard_normal((cfg.population, n_genes)), 0.0, 1.0)
    pop[0] = 1.0
    pop[1] = cfg.init_ratio
    return np.round(pop * cfg.steps) / cfg.steps


def search(model: nn.Module, windows: torch.Tensor, cfg: SearchConfig, checkpoint: str | Path | None = None,
           activations: CalibrationActivations | None = None, log=print, batch_size: int = 4) -> dict:
    """Run (or resume) the search; returns the state with the best recipe and fitness history.
    batch_size: calibration windows per forward pass when scoring a candidate."""
    cfg.validate()
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
    settings = asdict(cfg)
    identity = {"layers": len(linears), "genes": n, "names_hash": hash_names(names), "windows": list(windows.shape),
                "windows_sum": int(windows.sum())}

    state = None
    if checkpoint and Path(checkpoint).is_file():
        state = json.loads(Path(checkpoint).read_text())
        if state.get("settings") != settings or state.get("identity") != identity:
            raise ValueError(f"checkpoint {checkpoint} was written by a search with other settings, model or data; "
                             "use another --checkpoint path or the same settings")
        log(f"resuming from {checkpoint}: group {state['group']} generation {state['generation']}")
    rng = np.random.default_rng(cfg.seed)
    if state is not None:
        rng.bit_generator.state = state["rng"]

    if activations is None:
        activations = collect_activations(model, windows)
    cands = _Candidates(model, cfg.sparsity, activations, tokens=cfg.tokens, factors=cfg.factors, steps=cfg.steps)

    def evaluate(genes, start_block, cache):
        cands.apply(genes[gene_of])
        return _fitness(model, windows, start_block, cache, batch_size, tokens=cfg.tokens)

    t_start = time.time()
    if state is None:
        pop = initial_population(n, cfg, rng)
        fit = [evaluate(p, 0, {}) for p in tqdm(pop, desc="initial population", leave=False)]
        state = {"settings": settings, "identity": identity, "group": 0, "generation": 0,
                 "population": pop.tolist(), "fitness": fit, "history": [], "evaluations": len(fit),
                 "seconds": time.time() - t_start}
        _save(checkpoint, state, rng)
    pop, fit = np.array(state["population"]), list(state["fitness"])
    total_gens = len(groups) * cfg.generations
    done = state["group"] * cfg.generations + state["generation"]
    bar = tqdm(total=total_gens, initial=done, desc="search", unit="gen")
    while state["group"] < len(groups):
        genes = groups[state["group"]]
        others = [i for i in range(n) if i not in set(genes)]
        best = pop[int(np.argmin(fit))].copy()
        start_block = min(l.block for l, g in zip(linears, gene_of) if g in set(genes))
        cands.apply(best[gene_of])
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
            pop[1:, genes] = np.round(np.clip(best[genes] + noise, 0.0, 1.0) * cfg.steps) / cfg.steps
            fit = [evaluate(p, start_block, cache) for p in tqdm(pop, desc=f"group {state['group']} start", leave=False)]
            state["group_started"] = True
            state["population"], state["fitness"] = pop.tolist(), fit
            state["evaluations"] += cfg.population
            _save(checkpoint, state, rng)
        trials, trial_fit = [], []
        for i in range(cfg.population):
            a, b, c = rng.choice([j for j in range(cfg.population) if j != i], 3, replace=False)
            mutant = pop[a] + cfg.mutation * (pop[b] - pop[c])
            cross = rng.random(len(genes)) < cfg.crossover
            cross[rng.integers(len(genes))] = True
            trial = pop[i].copy()
            trial[genes] = np.where(cross, mutant[genes], pop[i][genes])
            trial = np.round(np.clip(trial, 0.0, 1.0) * cfg.steps) / cfg.steps
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
        _save(checkpoint, state, rng)
        bar.update(1)
        left = (total_gens - bar.n) * (time.time() - t0)
        bar.set_postfix(best=f"{fit[0]:.3f}", mean=f"{np.mean(fit):.3f}", left=f"{left / 60:.0f}min")
    bar.close()
    best = pop[int(np.argmin(fit))]
    state["best"] = {"rho": best[gene_of].tolist(), "genes": best.tolist(), "fitness": float(min(fit))}
    state["names"] = names
    state["shapes"] = [[l.module.out_features, l.module.in_features] for l in linears]
    _save(checkpoint, state, rng)
    return state


@torch.no_grad()
def uniform_grid(model: nn.Module, windows: torch.Tensor, sparsity: float, grid, activations: CalibrationActivations,
                 tokens: str = "second_half", factors: str = "svd", batch_size: int = 4) -> list[dict]:
    """The search's calibration fitness of a uniform rho at each grid value: the paper's Table 4
    baseline ("uniform rho by grid search"), scored exactly as the search scores an individual.
    Returns [{"rho", "fitness"}] in grid order; leaves the model sparsified (restore_ undoes it)."""
    steps = 1000  # fine enough for any grid value a user types (0.95, 0.975, ...)
    cands = _Candidates(model, sparsity, activations, tokens=tokens, factors=factors, steps=steps)
    n = len(cands.layers)
    out = []
    for rho in tqdm(list(grid), desc=f"uniform grid at {100 * sparsity:.0f}%", leave=False):
        cands.apply(np.full(n, float(rho)))
        out.append({"rho": float(rho), "fitness": _fitness(model, windows, 0, {}, batch_size, tokens=tokens)})
    return out


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
    for i, (name, shape, rho) in enumerate(zip(state["names"], state["shapes"], state["best"]["rho"])):
        b = layer_budget(shape[0], shape[1], sparsity, rho)
        entry = {"name": name, "shape": shape, "rho": rho, "keep": b.keep_fraction, "rank": b.rank}
        if report is not None:
            entry["threshold"] = report[i]["threshold"]
        layers.append(entry)
    return {"sparsity": sparsity, **extra, "search": {"settings": state["settings"], "evaluations": state["evaluations"],
            "seconds": state["seconds"], "best_fitness": state["best"]["fitness"], "history": state["history"]},
            "layers": layers}


# -- command line: rsparse search ----------------------------------------------------------------

def plot_recipe(recipe: dict, path: str | Path) -> None:
    """rho per layer, one line per projection type, against the block index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type: dict[str, list[tuple[int, float]]] = {}
    for entry in recipe["layers"]:
        parts = entry["name"].split(".")
        block = next(int(p) for p in parts if p.isdigit())
        by_type.setdefault(parts[-1], []).append((block, entry["rho"]))
    fig, ax = plt.subplots(figsize=(9, 4))
    for kind, points in by_type.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, label=kind)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("rho (sparse share of the layer budget)")
    ax.set_title(f"searched recipe at {100 * recipe['sparsity']:.0f}% model-level sparsity")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_search(args) -> int:
    import sys

    from rsparse.calibrate import restore_
    from rsparse.data import load_windows
    from rsparse.models import DEFAULT_MODEL_NAME, load_model
    from rsparse.perplexity import evaluate_perplexity
    from rsparse.report import markdown_table, versions

    cfg = SearchConfig(sparsity=args.sparsity, population=args.population, generations=args.generations,
                       group_size=args.group_size, mutation=args.mutation, crossover=args.crossover,
                       init_ratio=args.init_ratio, init_spread=args.init_spread, share=args.share, tokens=args.tokens,
                       factors=args.factors, rho_step=args.rho_step, seed=args.seed)
    try:
        cfg.validate()
        check_batch_size(args.search_batch_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load_model(args.model, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    windows = load_windows(tok, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    activations = collect_activations(model, windows, seed=args.seed)
    state = search(model, windows, cfg, checkpoint=out / "search_state.json", activations=activations,
                   log=lambda m: print(m, file=sys.stderr), batch_size=args.search_batch_size)
    search_seconds = time.time() - start

    # The final model: the searched recipe through the standard calibration (with refinement).
    names = state["names"]
    recipe = {"layers": [{"name": n, "rho": r} for n, r in zip(names, state["best"]["rho"])]}
    report = sparsify_(model, RSparseConfig(sparsity=cfg.sparsity, recipe=recipe, seq_len=args.seq_len), activations)
    data = recipe_from_search(state, cfg.sparsity, report, model=model_name,
                              calibration={"corpus": args.calib_corpus, "windows": args.calib_samples,
                                           "seq_len": args.seq_len, "seed": args.seed},
                              versions=versions())
    data["search"]["wall_seconds"] = search_seconds
    write_json(out / "recipe.json", data)
    plot_recipe(data, out / "recipe_rho.png")
    print(f"search: {state['evaluations']} evaluations in {search_seconds / 60:.1f} min; "
          f"best calibration fitness {state['best']['fitness']:.3f}", file=sys.stderr)

    rows = []
    if args.ppl_windows:
        evalw = load_windows(tok, args.ppl_corpus, args.ppl_seq_len, args.ppl_windows, "perplexity")
        variants = [("sparse-only", RSparseConfig(sparsity=cfg.sparsity, method="sparse")),
                    (f"uniform rho={cfg.init_ratio}", RSparseConfig(sparsity=cfg.sparsity, ratio=cfg.init_ratio)),
                    ("searched", RSparseConfig(sparsity=cfg.sparsity, recipe=recipe))]
        for label, config in variants:
            sparsify_(model, config, activations)
            r = evaluate_perplexity(model, evalw, tokens=args.tokens, desc=f"perplexity ({label})")
            rows.append({"recipe": label, "target_sparsity": cfg.sparsity,
                         "achieved_sparsity": r["achieved_sparsity"], "ppl": r["ppl"]})
        restore_(model)
        write_json(out / "search_eval.json", {"model": model_name, "rows": rows,
                                              "perplexity": {"corpus": args.ppl_corpus, "windows": int(evalw.shape[0]),
                                                             "seq_len": args.ppl_seq_len, "tokens": args.tokens}})
        table = markdown_table(rows, [("recipe", "recipe"), ("target_sparsity", "target sparsity %"),
                                      ("achieved_sparsity", "achieved sparsity %"), ("ppl", "held-out perplexity")])
        (out / "search_eval.md").write_text(table + "\n")
        print(table)
    print(f"wrote {out / 'recipe.json'} and {out / 'recipe_rho.png'}")
    return 0


def check_batch_size(n: int) -> int:
    if n < 1:
        raise ValueError(f"--search-batch-size must be >= 1, got {n}")
    return n


def add_search_args(p) -> None:
    """The search and data flags shared by `rsparse search` and `rsparse compare-recipes`."""
    p.add_argument("--population", type=int, default=16, help="paper: 32 (see README: scaled for 2 CPU cores)")
    p.add_argument("--generations", type=int, default=3, help="generations per group (paper: 5)")
    p.add_argument("--group-size", type=int, default=28, help="genes per group (paper: 28 layers)")
    p.add_argument("--share", default="layer", choices=list(SHARES),
                   help="one rho per projection (layer, the paper) or per projection type, shared by all blocks (type)")
    p.add_argument("--mutation", type=float, default=0.5, help="differential weight F")
    p.add_argument("--crossover", type=float, default=0.5, help="crossover rate CR")
    p.add_argument("--factors", default="svd", choices=list(FACTORS),
                   help="low-rank factors the objective scores candidates with: svd (slices of one SVD per layer, "
                        "cheap) or whitened (the final model's factors; one fit per layer and rho value, use a "
                        "coarser --rho-step)")
    p.add_argument("--rho-step", type=float, default=0.005, help="grid step of the searched rho values")
    p.add_argument("--search-batch-size", type=int, default=4,
                   help="calibration windows per forward pass when scoring a candidate (larger on a GPU)")
    p.add_argument("--calib-corpus", default="coqa")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (the search objective)")
    p.add_argument("--ppl-corpus", default="boolq", help="held-out perplexity corpus")
    p.add_argument("--ppl-windows", type=int, default=32, help="held-out windows for the final comparison (0: skip)")
    p.add_argument("--ppl-seq-len", type=int, default=512)


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="evolutionary search of per-layer ratios; writes a recipe")
    p.add_argument("--model", default=None)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--init-ratio", type=float, default=0.95, help="centre of the initial population")
    p.add_argument("--init-spread", type=float, default=0.05,
                   help="standard deviation of the initial population around its centre (wider: more exploration)")
    add_search_args(p)
    p.add_argument("--tokens", default="second_half", choices=["second_half", "all"],
                   help="sparse positions in the search objective and the held-out perplexity (second_half: the "
                        "paper's protocol)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/search", help="directory: recipe.json, search_state.json (resume), plots")
    p.set_defaults(func=cmd_search)
