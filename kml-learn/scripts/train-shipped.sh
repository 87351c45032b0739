#!/bin/bash
# Trains the shipped default models (models/{baseline,linear,logistic,tree}.json)
# on the union of the traces recorded by record-all.sh:
#   kml-learn/scripts/train-shipped.sh [TRACEDIR] [MODELDIR]
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
FEATURES=portable
DESC="union of 8 fio workloads (workloads/{$(echo $NAMES | tr ' ' ',')}.fio), 12 s each on a 1 GiB direct-I/O loop device, mq-deadline, nr_requests 1024, expiries per kml-learn/scripts/workloads.txt; see docs/learning.md"
mkdir -p "$MODELS"
for KIND in baseline linear logistic tree; do
    "$AGENT" train --trace "$LIST" --model "$KIND" --features "$FEATURES" --out "$MODELS/$KIND.json" --workload "$DESC" --quiet
done
