#!/usr/bin/env bash
# Wait up to SECONDS for run.sh's rows, packing the finished ones into DEST/res.tgz every minute
# (so a call cut off at its limit still brings them back); stop early once every row has ended or
# 3 have failed. Ends with the list of finished rows and the GPU's load.
R=${1:-/tmp/res}; S=${2:-540}; D=${3:-$OUT}
C="$(dirname "$0")/collect.sh"
for ((t = 10; t <= S; t += 10)); do
  sleep 10
  failed=$(grep -vc " rc=0$" "$R/done.txt" 2>/dev/null); ended=$(wc -l < "$R/done.txt" 2>/dev/null)
  if [ "${failed:-0}" -ge 3 ] || [ "${ended:-0}" -ge "$(wc -l < "$R/rows.txt")" ]; then break; fi
  (( t % 60 == 0 )) && bash "$C" "$R" "$D"
done
bash "$C" "$R" "$D"
cat "$R/done.txt" 2>/dev/null; nvidia-smi --query-gpu=name,utilization.gpu,memory.used,memory.total --format=csv; uptime
