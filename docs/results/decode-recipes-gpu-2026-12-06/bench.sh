#!/usr/bin/env bash
# Decode speed of issue #27's recipes beside the uniform rows, each run against its own dense row:
# the Llama-2-7B shape (random weights; each recipe's model-level budget spread by projection kind
# and relative depth, `bench decode --recipes`) and the embedded SmolLM2 (recipes applied as
# `compress --recipe` applies them). On the device, from the repo root, after
# docs/results/accuracy-h200-2026-12-05/install.sh; PYTHONPATH=/tmp/site:$PWD.
#   bash docs/results/decode-recipes-gpu-2026-12-06/bench.sh OUTDIR
set -u
O=${1:-$OUT}; mkdir -p "$O"
M=${M:-/tmp/rs/SmolLM2-135M-Instruct.Q4_1.gguf}
R=recipes/smollm2-135m-instruct
RECIPES=$R-s50-greedy-sparse-seed0.json,$R-s60-greedy-sparse-seed0.json,$R-s70-greedy-sparse-seed0.json
# the rows not yet measured first (a run cut off at its timeout loses the last ones): 70%, the
# early-stop recipes, the uniform-allocation ones; then the 50/60% per-layer rho rows of 2026-12-06
RECIPES=$RECIPES,$R-s70-greedy-rholayer-seed0.json,$R-s70-greedy-rholayer-holdout-seed0.json,$R-s70-uniform-rholayer-seed0.json
RECIPES=$RECIPES,$R-s60-greedy-rholayer-holdout-seed0.json,$R-s60-uniform-rholayer-seed0.json
RECIPES=$RECIPES,$R-s50-greedy-rholayer-seed0.json,$R-s60-greedy-rholayer-seed0.json
# RECIPES_ONLY=, SP= (uniform rows' sparsities), MTH= (their methods) override; TS=0 skips SmolLM2
RECIPES=${RECIPES_ONLY:-$RECIPES}
C="--sparsities ${SP:-0.5,0.6,0.7} --methods ${MTH:-sparse-only,R-Sparse} --ratio 0.95 --recipes $RECIPES --repeats 2 --hf-tokens 0"
timeout ${T7:-420} python3 -m rsparse.cli bench decode --models llama2-7b $C --out "$O/llama2-7b" 2>&1 | grep -v Warning | tee "$O/llama2-7b.log"
# the 135M model is launch-bound: graph-only steps (what `rsparse generate` runs by default)
[ "${TS:-240}" -gt 0 ] && timeout ${TS:-240} python3 -m rsparse.cli bench decode --model "$M" $C --compile off --out "$O/smollm2" 2>&1 | grep -v Warning | tee "$O/smollm2.log"
