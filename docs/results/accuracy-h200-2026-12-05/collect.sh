#!/usr/bin/env bash
# Copy the rows finished so far (results.json/.md, log tails) from RESDIR to DEST.
R=${1:-/tmp/res}; D=${2:-$OUT}
mkdir -p "$D"
cp "$R"/rows.txt "$R"/done.txt "$R"/*.json "$D"/ 2>/dev/null
for d in "$R"/*/; do n=$(basename "$d"); mkdir -p "$D/$n"; cp "$d"results.* "$D/$n"/ 2>/dev/null; done
for l in "$R"/*.log; do tail -c 3000 "$l" > "$D/$(basename "$l")"; done
cat "$R"/done.txt 2>/dev/null; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; uptime
