#!/bin/bash
# What a new user meets: `kml-agent run --model auto` live on the held-out
# workloads of heldout.txt (applications, expiries and depths the shipped models
# never saw), in three arms, each on its own fresh loop device and fio run:
#   shipped     --no-calibrate --retrain-every 0   (the model as shipped)
#   calibrated  --retrain-every 0                  (live threshold calibration)
#   online      (defaults: calibration and retraining every 10 s)
# The agent's own per-second verdicts against outcomes (`run --json` ticks) are
# summed per phase by newuser_summary.py.
#
#   kml-learn/scripts/newuser.sh [OUTDIR] [SECONDS]
#
# ARMS="online" runs only the named arms; KML_AGENT=path runs another build of
# the agent (to compare two builds, alternate them in one session); KML_MODEL=M
# starts from model M instead of `auto` (a shipped name or a file).
#
# Needs root and `cargo xtask build --release`. Run it under
# `flock /run/lock/kml-kernel.lock` beside other kernel work.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
AGENT=${KML_AGENT:-$ROOT/target/release/kml-agent}
ARMS=${ARMS:-shipped calibrated online}
MODEL=${KML_MODEL:-auto}
OUT=${1:-/tmp/kml-newuser}
DUR=${2:-30}
mkdir -p "$OUT"
IMG=$OUT/disk.img
DEV=""
FIO=""
cleanup() {
    if [ -n "$FIO" ] && kill -0 "$FIO" 2>/dev/null; then kill "$FIO" 2>/dev/null || true; wait "$FIO" 2>/dev/null || true; fi
    if [ -n "$DEV" ]; then losetup -d "$DEV" 2>/dev/null || true; fi
    rm -f "$IMG"
}
trap cleanup EXIT INT TERM

one() { # NAME R W NR ARM ARGS...
    local name=$1 r=$2 w=$3 nr=$4 arm=$5
    shift 5
    truncate -s 1G "$IMG"
    DEV=$(losetup -f --show --direct-io=on "$IMG")
    local q=/sys/block/$(basename "$DEV")/queue
    echo mq-deadline > "$q/scheduler"
    echo "$nr" > "$q/nr_requests"
    echo "$r" > "$q/iosched/read_expire"
    echo "$w" > "$q/iosched/write_expire"
    dd if=/dev/zero of="$DEV" bs=4M count=256 oflag=direct status=none
    FILENAME=$DEV RUNTIME=$((DUR + 4)) fio "$ROOT/workloads/$name.fio" > /dev/null 2>&1 &
    FIO=$!
    sleep 1
    "$AGENT" run --device "$(basename "$DEV")" --model "$MODEL" --json --duration "${DUR}s" "$@" \
        > "$OUT/$name.$arm.jsonl" 2> "$OUT/$name.$arm.log"
    kill "$FIO" 2>/dev/null || true
    wait "$FIO" 2>/dev/null || true
    FIO=""
    losetup -d "$DEV"
    DEV=""
    rm -f "$IMG"
    echo "$name $arm: $(grep -c '"event":"tick"' "$OUT/$name.$arm.jsonl") ticks; $(grep -o -- '--model auto: [^;]*' "$OUT/$name.$arm.log" | head -1)"
}

grep -v '^#' "$HERE/heldout.txt" | while read -r NAME R W NR; do
    [ -n "$NAME" ] || continue
    for ARM in $ARMS; do
        case $ARM in
        shipped) one "$NAME" "$R" "$W" "${NR:-1024}" shipped --no-calibrate --retrain-every 0 ;;
        calibrated) one "$NAME" "$R" "$W" "${NR:-1024}" calibrated --retrain-every 0 ;;
        online) one "$NAME" "$R" "$W" "${NR:-1024}" online ;;
        *) echo "unknown arm $ARM (shipped, calibrated, online)" >&2; exit 2 ;;
        esac
    done
done
python3 "$HERE/newuser_summary.py" "$OUT"
