#!/bin/bash
# Records one trace of a fio workload on a fresh loop device with mq-deadline.
#
#   kml-learn/scripts/record.sh NAME JOB.fio READ_EXPIRE_MS WRITE_EXPIRE_MS [SECONDS] [OUTDIR]
#
# Creates a 1 GiB image in OUTDIR (default /tmp/kml-traces), attaches it as a
# direct-I/O loop device, selects mq-deadline with nr_requests 1024 (requests wait
# in the scheduler, not for a tag), sets the expiries, runs fio with
# FILENAME=/dev/loopN and RUNTIME=SECONDS+6, records SECONDS (default 12) with
# `kml-agent record` two seconds into the run, and writes OUTDIR/NAME.csv plus
# NAME.fio.txt (fio's report) and NAME.rec.txt (the agent's summary, and the
# expiries read back: mq-deadline keeps them in jiffies, so with HZ=250 `1` acts
# as 4 ms and `10` as 12 ms). The loop device is detached and fio stopped on any
# exit. NR_REQUESTS in the environment overrides the 1024 (deeper queues). Needs
# root and `cargo xtask build --release` (target/release/kml-agent).
set -euo pipefail

NAME=$1; JOB=$(realpath "$2"); R=$3; W=$4; DUR=${5:-12}; OUT=${6:-/tmp/kml-traces}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
AGENT=$ROOT/target/release/kml-agent
mkdir -p "$OUT"
IMG=$OUT/$NAME.img
DEV=""
FIO=""
cleanup() {
    if [ -n "$FIO" ] && kill -0 "$FIO" 2>/dev/null; then kill "$FIO" 2>/dev/null || true; wait "$FIO" 2>/dev/null || true; fi
    if [ -n "$DEV" ]; then losetup -d "$DEV" 2>/dev/null || true; fi
    rm -f "$IMG"
}
trap cleanup EXIT INT TERM

truncate -s 1G "$IMG"
DEV=$(losetup -f --show --direct-io=on "$IMG")
N=$(basename "$DEV")
Q=/sys/block/$N/queue
echo mq-deadline > "$Q/scheduler"
echo "${NR_REQUESTS:-1024}" > "$Q/nr_requests"
echo "$R" > "$Q/iosched/read_expire"
echo "$W" > "$Q/iosched/write_expire"
# Pre-fill so reads are served from allocated blocks, as on a used disk.
dd if=/dev/zero of="$DEV" bs=4M count=256 oflag=direct status=none

FILENAME=$DEV RUNTIME=$((DUR + 6)) fio "$JOB" > "$OUT/$NAME.fio.txt" 2>&1 &
FIO=$!
sleep 2
{
    echo "workload $(basename "$JOB") device $N read_expire $(cat "$Q/iosched/read_expire") ms write_expire $(cat "$Q/iosched/write_expire") ms (asked $R/$W) nr_requests $(cat "$Q/nr_requests") fifo_batch $(cat "$Q/iosched/fifo_batch") writes_starved $(cat "$Q/iosched/writes_starved")"
} > "$OUT/$NAME.rec.txt"
"$AGENT" record --device "$N" --duration "${DUR}s" --out "$OUT/$NAME.csv" 2>> "$OUT/$NAME.rec.txt"
wait "$FIO" || true
FIO=""
cat "$OUT/$NAME.rec.txt"
