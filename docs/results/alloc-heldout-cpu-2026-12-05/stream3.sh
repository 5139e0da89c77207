#!/usr/bin/env bash
cd /work/main
PY=/tmp/cc/.venv/bin/python
export OMP_NUM_THREADS=1
RUN="$PY -m rsparse.cli run --calib-samples 16 --seq-len 512 --ppl-corpus boolq --ppl-windows 32 --refine-corpus squad --refine-windows 16"
$PY -c "import json,sys; d=json.load(open(sys.argv[1])); [l.update(rho=0.9) for l in d['layers']]; json.dump(d, open(sys.argv[2], 'w'))" \
    recipes/smollm2-135m-instruct-s50-greedy-sparse-seed0.json /tmp/ppl/greedy-rho09-s50.json
$RUN --sparsity 0.70 --seed 1 --methods rsparse --ratio 0.95 --out /tmp/ppl/uniform-rho095-s70-seed1
$RUN --sparsity 0.60 --seed 0 --methods rsparse --ratio 0.95 --out /tmp/ppl/uniform-rho095-s60-seed0
$RUN --sparsity 0.60 --seed 1 --methods sparse,rsparse --recipe recipes/smollm2-135m-instruct-s60-greedy-sparse-seed0.json --out /tmp/ppl/uniform-sparse+greedy-sparse-s60-seed1
$RUN --sparsity 0.60 --seed 1 --methods rsparse --recipe /tmp/ppl/greedy-rho09-s60.json --out /tmp/ppl/greedy-rho09-s60-seed1
$RUN --sparsity 0.60 --seed 1 --methods rsparse --ratio 0.95 --out /tmp/ppl/uniform-rho095-s60-seed1
for seed in 0 1; do
$RUN --sparsity 0.50 --seed $seed --methods sparse,rsparse --recipe recipes/smollm2-135m-instruct-s50-greedy-sparse-seed0.json --out /tmp/ppl/uniform-sparse+greedy-sparse-s50-seed$seed
$RUN --sparsity 0.50 --seed $seed --methods rsparse --recipe /tmp/ppl/greedy-rho09-s50.json --out /tmp/ppl/greedy-rho09-s50-seed$seed
$RUN --sparsity 0.50 --seed $seed --methods rsparse --ratio 0.95 --out /tmp/ppl/uniform-rho095-s50-seed$seed
done
