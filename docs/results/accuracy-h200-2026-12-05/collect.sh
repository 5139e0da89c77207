#!/usr/bin/env bash
# Pack the rows finished so far (results.json/.md, log tails) from RESDIR into DEST/res.tgz: one
# file, since a device call brings back at most 8. Atomic: a call cut off mid-pack keeps the last.
R=${1:-/tmp/res}; D=${2:-$OUT}
T=$(mktemp -d); mkdir -p "$D"
cp "$R"/rows.txt "$R"/done.txt "$R"/*.json "$T"/ 2>/dev/null
for d in "$R"/*/; do n=$(basename "$d"); mkdir -p "$T/$n"; cp "$d"results.* "$d"recipe.json "$T/$n"/ 2>/dev/null; done
for l in "$R"/*.log; do tail -c 3000 "$l" > "$T/$(basename "$l")"; done
tar czf "$D/.res.tgz" -C "$T" . && mv "$D/.res.tgz" "$D/res.tgz"; rm -rf "$T"
