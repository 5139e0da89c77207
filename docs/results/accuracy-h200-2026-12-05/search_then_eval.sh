#!/usr/bin/env bash
# run.sh's "R-Sparse, searched rho, uniform allocation" rows: the per-layer rho search of the joint
# rows (docs/allocation.md: --share layer, 8 x 2 generations, 12 CoQA windows of 256, whitened
# factors, rho step 0.025, seed N) on the uniform allocation, on the GPU; then the row's eval with
# the searched recipe.   search_then_eval.sh SPARSITY SEED EVAL_COMMAND... --out DIR
# (run.sh appends --out DIR; the search writes DIR.search/recipe.json)
set -eu
s=$1 seed=$2; shift 2
out="${@: -1}"
python3 -m rsparse.cli search --model "$M" --device cuda --sparsity "$s" --allocate uniform --share layer \
  --population 8 --generations 2 --calib-samples 12 --seq-len 256 --factors whitened --rho-step 0.025 \
  --search-batch-size 12 --ppl-windows 0 --seed "$seed" --out "$out.search"
exec "$@" --recipe "$out.search/recipe.json"
