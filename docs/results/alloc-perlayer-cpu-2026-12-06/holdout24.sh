#!/usr/bin/env bash
# greedy + per-layer rho + early stop with a larger held-out split: 24 windows, a third held out
# usage: bash holdout24.sh 60:0 60:1 50:0 50:1   (sparsity:seed cells; 2026-12-07 on 2 CPU cores)
set -u
cd "$(dirname "$0")/../../.."  # the repo root
for cell in "$@"; do
  s=${cell%:*}; n=${cell#*:}; O=${OUTDIR:-/tmp/holdout24}/s$s-seed$n
  mkdir -p $O
  .venv/bin/rsparse search --sparsity 0.$s --allocation-from recipes/smollm2-135m-instruct-s$s-greedy-sparse-seed0.json \
    --share layer --population 8 --generations 2 --calib-samples 24 --seq-len 256 --factors whitened \
    --rho-step 0.025 --ppl-windows 0 --holdout 0.33 --patience 2 --seed $n --out $O > $O/search.log 2>&1
  .venv/bin/rsparse run --calib-samples 16 --seq-len 512 --ppl-corpus boolq --ppl-windows 32 --refine-corpus squad \
    --refine-windows 16 --sparsity 0.$s --seed $n --methods rsparse --recipe $O/recipe.json --out $O/heldout > $O/heldout.log 2>&1
done
