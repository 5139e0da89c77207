"""Evolutionary search on a tiny model: elitism, determinism, checkpoint/resume, recipe validity."""

import json

import numpy as np
import pytest

import rsparse.search.evolution as search_mod
from conftest import read_fraction, tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.core.budget import layer_budget
from rsparse.core.data import calibration_windows
from rsparse.search.evolution import SearchConfig, recipe_from_search, search

CFG = dict(sparsity=0.5, population=4, generations=2, group_size=7, seed=3)


@pytest.fixture()
def cal(windows):
    return calibration_windows(windows, 32, 4, seed=1)


def test_search_improves_on_its_start_and_keeps_the_budget(cal):
    model = tiny_model()
    state = search(model, cal, SearchConfig(**CFG), log=lambda m: None)
    # initial population, then per group (2 of 7 layers): re-scoring under the best + 2 generations
    assert state["evaluations"] == 4 + 2 * (4 + 2 * 4)
    assert [(h["group"], h["generation"]) for h in state["history"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    bests = [h["best"] for h in state["history"]]
    assert all(b2 <= b1 + 1e-12 for b1, b2 in zip(bests, bests[1:]))  # elitist: never worse
    assert state["best"]["fitness"] == bests[-1] <= min(h["mean"] for h in state["history"])
    rho = np.array(state["best"]["rho"])
    assert rho.shape == (14,) and ((0 <= rho) & (rho <= 1)).all()
    recipe = recipe_from_search(state, 0.5)
    budgets = [layer_budget(*l["shape"], 0.5, l["rho"]) for l in recipe["layers"]]
    assert read_fraction(budgets) <= 0.5 + 1e-9
    report = sparsify_(model, RSparseConfig(sparsity=0.5, recipe=recipe), cal)  # the recipe fits the model
    assert [r["rho"] for r in report] == [l["rho"] for l in recipe["layers"]]


def test_search_is_deterministic_and_resumes_after_a_kill(cal, tmp_path, monkeypatch):
    full = search(tiny_model(), cal, SearchConfig(**CFG), checkpoint=tmp_path / "a.json", log=lambda m: None)
    again = search(tiny_model(), cal, SearchConfig(**CFG), log=lambda m: None)
    assert again["best"] == full["best"]

    real_save, calls = search_mod._save, {"n": 0}

    def killed_after_three(path, state, rng):
        real_save(path, state, rng)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(search_mod, "_save", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        search(tiny_model(), cal, SearchConfig(**CFG), checkpoint=tmp_path / "b.json", log=lambda m: None)
    partial = json.loads((tmp_path / "b.json").read_text())
    assert "best" not in partial and partial["history"]
    monkeypatch.setattr(search_mod, "_save", real_save)
    messages = []
    resumed = search(tiny_model(), cal, SearchConfig(**CFG), checkpoint=tmp_path / "b.json", log=messages.append)
    assert messages and "resuming" in messages[0]
    assert resumed["best"] == full["best"]
    strip = lambda hist: [(h["group"], h["generation"], h["best"], h["mean"]) for h in hist]  # noqa: E731
    assert strip(resumed["history"]) == strip(full["history"])


def test_checkpoint_of_other_settings_is_refused(cal, tmp_path):
    search(tiny_model(), cal, SearchConfig(**CFG), checkpoint=tmp_path / "s.json", log=lambda m: None)
    with pytest.raises(ValueError, match="other settings"):
        search(tiny_model(), cal, SearchConfig(**dict(CFG, seed=4)), checkpoint=tmp_path / "s.json", log=lambda m: None)


def test_search_with_one_rho_per_projection_type(cal):
    model = tiny_model()
    state = search(model, cal, SearchConfig(**dict(CFG, share="type")), log=lambda m: None)
    assert len(state["best"]["genes"]) == 7 and len(state["best"]["rho"]) == 14  # 2 blocks x 7 types
    assert state["evaluations"] == 4 + 2 * 4  # one group of 7 genes: the initial population + 2 generations
    by_type = {}
    for name, rho in zip(state["names"], state["best"]["rho"]):
        by_type.setdefault(name.rsplit(".", 1)[1], set()).add(rho)
    assert len(by_type) == 7 and all(len(v) == 1 for v in by_type.values())  # each type shares its rho
    assert state["best"]["fitness"] <= min(h["best"] for h in state["history"]) + 1e-12
    again = search(tiny_model(), cal, SearchConfig(**dict(CFG, share="type")), log=lambda m: None)
    assert again["best"] == state["best"]


@pytest.mark.parametrize("bad", [dict(population=3), dict(sparsity=1.0), dict(crossover=1.5), dict(generations=0),
                                 dict(share="block"), dict(init_spread=1.5), dict(factors="pca"),
                                 dict(rho_step=0.3), dict(rho_step=0.0)])
def test_bad_search_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SearchConfig(**dict(CFG, **bad)).validate()


def test_every_group_starts_diverse(cal, tmp_path, monkeypatch):
    """Each group's genes differ across the population when the group starts (else DE stalls):
    read from the checkpoint the search writes once the group's start population is scored."""
    real_save, starts = search_mod._save, []

    def save_and_read(path, state, rng):
        real_save(path, state, rng)
        written = json.loads((tmp_path / "s.json").read_text())
        if written.get("group_started") and written["generation"] == 0:
            starts.append((written["group"], np.array(written["population"])))

    monkeypatch.setattr(search_mod, "_save", save_and_read)
    search(tiny_model(), cal, SearchConfig(**CFG), checkpoint=tmp_path / "s.json", log=lambda m: None)
    assert [g for g, _ in starts] == [0, 1]
    for g, pop in starts:
        genes = slice(7 * g, 7 * g + 7)
        assert len({row[genes].tobytes() for row in pop}) > 1


def test_selection_prefers_distinct_individuals():
    from rsparse.search.evolution import _select

    pool = np.array([[1.0, 1.0], [1.0, 1.0], [0.9, 1.0], [1.0, 0.9]])
    pop, fit = _select(pool, np.array([1.0, 1.0, 2.0, 3.0]), 3)
    assert pop.tolist() == [[1.0, 1.0], [0.9, 1.0], [1.0, 0.9]] and fit == [1.0, 2.0, 3.0]


def test_uniform_grid_scores_each_rho_with_the_search_objective(cal):
    from rsparse import collect_activations, restore_
    from rsparse.search.objective import uniform_grid

    model = tiny_model()
    acts = collect_activations(model, cal)
    grid = uniform_grid(model, cal, 0.5, [0.6, 0.9, 1.0], acts)
    assert [g["rho"] for g in grid] == [0.6, 0.9, 1.0] and len({g["fitness"] for g in grid}) == 3
    restore_(model)
    # the search scores a uniform individual exactly like the grid does
    state = search(model, cal, SearchConfig(**dict(CFG, init_ratio=0.9)), activations=acts, log=lambda m: None)
    assert state["history"] and state["best"]["fitness"] <= min(g["fitness"] for g in grid if g["rho"] in (0.9, 1.0)) + 1e-9


@pytest.mark.parametrize("tokens", ["second_half", "all"])
def test_objective_scores_what_the_evaluation_scores(cal, tokens):
    """The search's fitness of one window is that window's perplexity under the evaluation
    protocol (dense first half, only second-half predictions scored, for "second_half")."""
    from rsparse.core.calibrate import collect_activations
    from rsparse.eval.perplexity import evaluate_perplexity
    from rsparse.search.objective import Candidates, _fitness

    model = tiny_model()
    cands = Candidates(model, 0.5, collect_activations(model, cal), tokens=tokens)
    cands.apply(np.linspace(0.3, 1.0, len(cands.layers)))
    window = cal[:1]
    expected = evaluate_perplexity(model, window, tokens=tokens)["ppl"]
    assert _fitness(model, window, 0, {}, tokens=tokens) == pytest.approx(expected, rel=1e-5)
    other = "all" if tokens == "second_half" else "second_half"
    assert _fitness(model, window, 0, {}, tokens=tokens) != pytest.approx(evaluate_perplexity(model, window, tokens=other)["ppl"], rel=1e-3)


@pytest.mark.parametrize("factors", ["svd", "whitened"])
def test_candidates_score_the_model_sparsify_builds(cal, factors):
    """A candidate applied in place is the model sparsify_ builds from the same recipe (same
    thresholds, same factors, no refinement): the objective scores the model the user gets."""
    from rsparse.core.calibrate import collect_activations
    from rsparse.eval.perplexity import evaluate_perplexity
    from rsparse.search.objective import Candidates

    model = tiny_model()
    acts = collect_activations(model, cal)
    cands = Candidates(model, 0.5, acts, factors=factors, steps=20)
    rhos = np.round(np.linspace(0.3, 1.0, len(cands.layers)) * 20) / 20
    cands.apply(rhos)
    got = evaluate_perplexity(model, cal, tokens="second_half")["ppl"]
    recipe = {"layers": [{"name": l.name, "rho": float(r)} for l, r in zip(cands.layers, rhos)]}
    reference = tiny_model()
    sparsify_(reference, RSparseConfig(sparsity=0.5, recipe=recipe, factors=factors, refine=False, tokens="second_half"),
              acts)
    assert got == pytest.approx(evaluate_perplexity(reference, cal, tokens="second_half")["ppl"], rel=1e-5)
    other = "svd" if factors == "whitened" else "whitened"
    sparsify_(reference, RSparseConfig(sparsity=0.5, recipe=recipe, factors=other, refine=False, tokens="second_half"),
              acts)
    assert got != pytest.approx(evaluate_perplexity(reference, cal, tokens="second_half")["ppl"], rel=1e-4)
