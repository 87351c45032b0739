#!/bin/bash
# Records every workload of workloads.txt (12 s each) into OUTDIR (default
# /tmp/kml-traces): kml-learn/scripts/record-all.sh [OUTDIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-/tmp/kml-traces}
grep -v '^#' "$HERE/workloads.txt" | while read -r NAME R W; do
    [ -n "$NAME" ] || continue
    "$HERE/record.sh" "$NAME" "$ROOT/workloads/$NAME.fio" "$R" "$W" 12 "$OUT"
done
