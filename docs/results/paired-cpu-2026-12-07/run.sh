#!/usr/bin/env bash
# #27's 70% seed-0 pair on the first 100 examples of each task, 2 CPU cores (~9 min a row), then the
# paired difference: R-Sparse joint + early stop minus sparse-only greedy. From the repo root:
#   bash docs/results/paired-cpu-2026-12-07/run.sh [OUTDIR]      # default: this directory
set -eu
D=${1:-docs/results/paired-cpu-2026-12-07}
E="rsparse eval --device cpu --batch-size 32 --tasks winogrande,piqa,sciq,openbookqa,hellaswag,boolq,arc_easy,arc_challenge
   --ppl-corpus boolq --ppl-windows 32 --calib-samples 16 --seq-len 512 --xsum-samples 0
   --refine-corpus squad --refine-windows 16 --seed 0 --methods rsparse --sparsities 0.7 --limit 100 --overwrite"
$E --recipe recipes/smollm2-135m-instruct-s70-greedy-sparse-seed0.json --out "$D/greedy"
$E --recipe recipes/smollm2-135m-instruct-s70-greedy-rholayer-holdout-seed0.json --out "$D/joint-es"
rsparse eval --paired "$D/joint-es/results.json" "$D/greedy/results.json" --out "$D/joint-es-minus-greedy" --overwrite
