#!/usr/bin/env bash
# CPU: held-out perplexity of #27's recipes (32 BoolQ windows of 512, calibration 16 CoQA x 512,
# thresholds refined on calibration + 16 SQuAD windows)
cd /work/main
PY=/tmp/cc/.venv/bin/python
RUN="$PY -m rsparse.cli run --calib-samples 16 --seq-len 512 --ppl-corpus boolq --ppl-windows 32 --refine-corpus squad --refine-windows 16"
for s in 70 60 50; do
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); [l.update(rho=0.9) for l in d['layers']]; json.dump(d, open(sys.argv[2], 'w'))" \
    recipes/smollm2-135m-instruct-s$s-greedy-sparse-seed0.json /tmp/ppl/greedy-rho09-s$s.json
  for seed in 0 1; do
    $RUN --sparsity 0.$s --seed $seed --methods sparse,rsparse --recipe recipes/smollm2-135m-instruct-s$s-greedy-sparse-seed0.json --out /tmp/ppl/uniform-sparse+greedy-sparse-s$s-seed$seed
    $RUN --sparsity 0.$s --seed $seed --methods rsparse --recipe /tmp/ppl/greedy-rho09-s$s.json --out /tmp/ppl/greedy-rho09-s$s-seed$seed
    $RUN --sparsity 0.$s --seed $seed --methods rsparse --ratio 0.95 --out /tmp/ppl/uniform-rho095-s$s-seed$seed
  done
done
