"""What keeps calibration and perplexity small in memory must not change their results: rows
sampled a group of layers at a time and shared between projections reading one input, no
full-vocabulary logits, perplexity one window at a time."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rsparse.methods.rsparse as rsparse_method
from conftest import tiny_model
from rsparse import RSparseConfig, collect_activations, evaluate_perplexity, sparsify_
from rsparse.core.calibrate import sample_layer_inputs, sample_module_groups, sample_module_inputs
from rsparse.core.models import decoder_linears


def _windows(n=6, seq_len=32, seed=1):
    return torch.randint(0, 300, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("second_half", [False, True])
def test_rows_sampled_in_groups_are_the_rows_of_one_pass(model, second_half):
    windows = _windows()
    modules = {l.name: l.module for l in decoder_linears(model)}
    whole = sample_layer_inputs(model, windows, 50, 0, second_half=second_half)
    groups = list(sample_module_groups(model, modules, windows, 50, 0, second_half=second_half, budget=1))
    assert len(groups) > 2
    merged = {name: rows for group in groups for name, rows in group.items()}
    assert list(merged) == list(whole)
    for name, rows in whole.items():
        assert rows.shape == (50, modules[name].in_features)
        assert torch.equal(merged[name], rows), name


def test_projections_reading_one_input_share_their_rows(model):
    windows = _windows()
    rows = collect_activations(model, windows, max_rows_per_layer=40).rows
    block = "model.layers.1"
    q, k, v, o = (rows[f"{block}.self_attn.{p}_proj"] for p in "qkvo")
    gate, up, down = (rows[f"{block}.mlp.{p}_proj"] for p in ("gate", "up", "down"))
    assert q is k is v and gate is up
    assert o is not q and gate is not q and down is not gate
    # a module sampled on its own gets the same rows
    alone = sample_module_inputs(model, {"k": model.model.layers[1].self_attn.k_proj}, windows, 40, 0)
    assert torch.equal(alone["k"], k)


def test_calibration_computes_no_logits(model):
    calls = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    try:
        collect_activations(model, _windows())
    finally:
        handle.remove()
    assert calls == []  # every pass stops once the last projection has its input


def test_sparsify_from_windows_in_groups_equals_from_collected_activations(monkeypatch):
    windows = _windows()
    config = RSparseConfig(sparsity=0.5, tokens="second_half", seq_len=32, max_rows_per_layer=50)
    reference = tiny_model()
    expected = sparsify_(reference, config, collect_activations(reference, windows, max_rows_per_layer=50))
    monkeypatch.setattr(rsparse_method, "sample_budget", lambda model: 1)  # a group per projection
    model = tiny_model()
    assert sparsify_(model, config, windows) == expected  # thresholds (refined too), kept fractions
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


class _NoLogitsToKeep(nn.Module):
    """The model behind a forward that does not take logits_to_keep: full logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, use_cache=None):
        return self.model(input_ids, use_cache=use_cache)


@pytest.mark.parametrize("tokens", ["second_half", "all"])
def test_perplexity_in_windows_equals_one_cross_entropy_over_full_logits(model, tokens):
    windows = _windows(n=5)
    first = windows.shape[1] // 2 if tokens == "second_half" else 0
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits[:, first:-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, first + 1:].reshape(-1), reduction="none")
    expected = math.exp(float(nll.double().mean()))
    for batch_size in (1, 2, 5):
        assert evaluate_perplexity(model, windows, tokens=tokens, batch_size=batch_size)["ppl"] == pytest.approx(expected, rel=1e-6)
    wrapped = _NoLogitsToKeep(model)
    assert evaluate_perplexity(wrapped, windows, tokens=tokens)["ppl"] == pytest.approx(expected, rel=1e-6)


def test_perplexity_computes_logits_of_the_scored_positions_only(model):
    windows = _windows(n=2)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        evaluate_perplexity(model, windows, tokens="second_half")
    finally:
        handle.remove()
    assert seen == [windows.shape[1] // 2]
