"""The recipes under recipes/ name every projection of the embedded SmolLM2-135M once, with its
shape, and spend exactly the byte budget they declare (model-level sparsity = sum s_l w_l / sum w_l)."""
from pathlib import Path

import numpy as np
import pytest

from rsparse.core.config import load_recipe
from rsparse.search.allocate import model_sparsity

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))
# SmolLM2-135M: 30 blocks, hidden 576, 3 KV heads of 64, MLP 1536
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
          "mlp.down_proj": (576, 1536)}


def test_recipes_are_shipped():
    assert len(RECIPES) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_covers_the_model_on_its_budget(path):
    recipe = load_recipe(path)
    expected = {f"model.layers.{b}.{p}": shape for b in range(30) for p, shape in SHAPES.items()}
    layers = recipe["layers"]
    assert sorted(l["name"] for l in layers) == sorted(expected)
    target = recipe["sparsity"]
    sparsities, sizes = [], []
    for l in layers:
        shape = expected[l["name"]]
        assert tuple(l.get("shape", shape)) == shape
        assert 0.0 <= l["rho"] <= 1.0
        sparsities.append(l.get("sparsity", target))
        sizes.append(shape[0] * shape[1])
    assert all(0.0 <= s < 1.0 for s in sparsities)
    assert model_sparsity(sparsities, np.array(sizes, dtype=np.float64)) == pytest.approx(target, abs=1e-6)
