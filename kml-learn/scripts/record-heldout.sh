#!/bin/bash
# Records the held-out workloads of heldout.txt (12 s each) into OUTDIR (default
# /tmp/kml-traces/heldout): kml-learn/scripts/record-heldout.sh [OUTDIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-/tmp/kml-traces/heldout}
grep -v '^#' "$HERE/heldout.txt" | while read -r NAME R W NR; do
    [ -n "$NAME" ] || continue
    NR_REQUESTS=${NR:-1024} "$HERE/record.sh" "$NAME" "$ROOT/workloads/$NAME.fio" "$R" "$W" 12 "$OUT"
done
