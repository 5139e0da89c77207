import json, sys, time
import numpy as np
from rsparse.core.calibrate import collect_activations
from rsparse.core.data import load_windows
from rsparse.core.models import load_model, decoder_linears
from rsparse.search.allocate import block_rho
sp, seed, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
min_gain = float(sys.argv[4]) if len(sys.argv) > 4 else 0.01
t = time.time()
model, tok = load_model(None, device="cpu")
w = load_windows(tok, "coqa", 256, 12, "calibration", seed)
act = collect_activations(model, w, seed=seed)
rec = json.load(open(f"recipes/smollm2-135m-instruct-s{round(sp*100)}-greedy-sparse-seed0.json"))
by = {e["name"]: e["sparsity"] for e in rec["layers"]}
names = [l.name for l in decoder_linears(model)]
s = [by[n] for n in names]
from rsparse.search.config import BlockRhoConfig
r = block_rho(model, w, s, act, BlockRhoConfig(min_gain=min_gain))
layers = [{"name": n, "rho": rho, "sparsity": x} for n, rho, x in zip(names, r["rho"], s)]
json.dump({"sparsity": sp, "layers": layers, "block_rho": {k: v for k, v in r.items() if k not in ("rho", "names")},
           "seconds": time.time() - t}, open(out, "w"), indent=1)
print("ranked", sum(x < 1 for x in r["rho"]), "of", len(names), "in", round(time.time() - t), "s")
print("err sparse", np.round(r["error"]["sparse"], 4).tolist())
print("err chosen", np.round(r["error"]["chosen"], 4).tolist())
