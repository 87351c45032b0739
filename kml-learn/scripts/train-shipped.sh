#!/bin/bash
# Trains the shipped default models on the union of the traces recorded by
# record-all.sh:
#   kml-learn/scripts/train-shipped.sh [TRACEDIR] [MODELDIR]
# models/{baseline,linear,logistic,tree}.json use the portable features (what the
# kernel computes today); models/logistic-position.json adds the eight position
# features (kml_ebpf_common::position), models/tree-position.json reads the
# scale-free set (trainers::SCALE_FREE_FEATURES): `run --model auto` takes them
# once kml-ebpf computes those (position::KERNEL_COMPUTES_POSITION), and the agent
# refuses to install them before.
# Each trace is split by insert time (first 70% trains, its last 20% tunes the
# threshold, the last 30% is held back); the model file keeps the held-back metrics.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TRACES=${1:-/tmp/kml-traces}
MODELS=${2:-$ROOT/models}
AGENT=$ROOT/target/release/kml-agent
NAMES=$(grep -v '^#' "$HERE/workloads.txt" | awk 'NF {print $1}')
LIST=$(for n in $NAMES; do printf '%s/%s.csv,' "$TRACES" "$n"; done)
LIST=${LIST%,}
DESC="union of 8 fio workloads (workloads/{$(echo $NAMES | tr ' ' ',')}.fio), 12 s each on a 1 GiB direct-I/O loop device, mq-deadline, nr_requests 1024, expiries per kml-learn/scripts/workloads.txt; see docs/learning.md"
mkdir -p "$MODELS"
for KIND in baseline linear logistic tree; do
    "$AGENT" train --trace "$LIST" --model "$KIND" --features portable --out "$MODELS/$KIND.json" --workload "$DESC" --quiet
done
"$AGENT" train --trace "$LIST" --model logistic --features portable+position --out "$MODELS/logistic-position.json" --workload "$DESC" --quiet
# The position tree reads the scale-free set (no count of queued requests, no time
# in µs; session 27).
"$AGENT" train --trace "$LIST" --model tree --features scale-free --max-depth 8 --min-samples-leaf 100 --tree-max-samples 100000 --out "$MODELS/tree-position.json" --workload "$DESC" --quiet
