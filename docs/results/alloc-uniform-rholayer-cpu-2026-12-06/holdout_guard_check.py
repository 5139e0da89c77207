"""The search's own held-out quarter (the last 3 of 12 CoQA windows of 256, seed N) scored for
sparse-only (rho 1), uniform rho 0.95 and the early stop's pick, from a search_state.json:
    python holdout_guard_check.py S60_STATE 0.6 SEED   (one JSON line; holdout_guard_check.jsonl)
"""
import json, sys
import numpy as np
from rsparse.core.calibrate import collect_activations
from rsparse.core.data import load_windows
from rsparse.core.models import load_model
from rsparse.search.objective import Candidates, _fitness
state_path, sparsity, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
st = json.load(open(state_path))
model, tok = load_model(None, device="cpu")
w = load_windows(tok, "coqa", 256, 12, "calibration", seed)
act = collect_activations(model, w, seed=seed)
held = w[9:]
c = Candidates(model, sparsity, act, tokens="second_half", factors="whitened", steps=40)
n = len(c.layers)
out = {}
for name, g in [("sparse_only", np.ones(n)), ("uniform_095", np.full(n, 0.95)), ("pick", np.array(st["holdout"]["genes"]))]:
    c.apply(g)
    out[name] = {"held": _fitness(model, held, 0, {}), "fit": _fitness(model, w[:9], 0, {})}
print(json.dumps({"state": state_path, "stored_holdout_best": st["holdout"]["best"], **out}))
