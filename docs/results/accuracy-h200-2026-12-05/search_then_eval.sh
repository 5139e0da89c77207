#!/usr/bin/env bash
# run.sh's "R-Sparse, searched rho, uniform allocation" rows. With a shipped recipe (RECIPE exists):
# the row's eval with it. Without: first the per-layer rho search of the joint rows
# (docs/allocation.md: --share layer, 8 x 2 generations, 12 CoQA windows of 256, whitened factors,
# rho step 0.025, seed N) on the uniform allocation, on the GPU, then the eval with its recipe.
#   search_then_eval.sh RECIPE SPARSITY SEED EVAL_COMMAND... --out DIR
# (run.sh appends --out DIR; a search writes DIR.search/recipe.json)
set -eu
recipe=$1 s=$2 seed=$3; shift 3
out="${@: -1}"
if [ ! -f "$recipe" ]; then
  recipe="$out.search/recipe.json"
  python3 -m rsparse.cli search --model "$M" --device cuda --sparsity "$s" --allocate uniform --share layer \
    --population 8 --generations 2 --calib-samples 12 --seq-len 256 --factors whitened --rho-step 0.025 \
    --search-batch-size 12 --ppl-windows 0 --seed "$seed" --out "$out.search"
fi
exec "$@" --recipe "$recipe"
