#!/usr/bin/env bash
# #27's seed-0 pair at S% (70 or 60) on the first 100 examples of each task, 2 CPU cores (~9 min a
# row), then the paired difference: R-Sparse joint + early stop minus sparse-only greedy.
# From the repo root:
#   bash docs/results/paired-cpu-2026-12-07/run.sh 70 [OUTDIR]     # default: this directory's s70/
set -eu
S=${1:?sparsity in percent: 70 or 60}
D=${2:-docs/results/paired-cpu-2026-12-07/s$S}
E=".venv/bin/rsparse eval --device cpu --batch-size 32 --tasks winogrande,piqa,sciq,openbookqa,hellaswag,boolq,arc_easy,arc_challenge
   --ppl-corpus boolq --ppl-windows 32 --calib-samples 16 --seq-len 512 --xsum-samples 0
   --refine-corpus squad --refine-windows 16 --seed 0 --methods rsparse --sparsities 0.$S --limit 100 --overwrite"
$E --recipe recipes/smollm2-135m-instruct-s$S-greedy-sparse-seed0.json --out "$D/greedy"
$E --recipe recipes/smollm2-135m-instruct-s$S-greedy-rholayer-holdout-seed0.json --out "$D/joint-es"
.venv/bin/rsparse eval --paired "$D/joint-es/results.json" "$D/greedy/results.json" --out "$D/joint-es-minus-greedy" --overwrite
