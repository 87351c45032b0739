#!/bin/bash
# Which lanes a model needs at first contact: trains one model per named feature
# set on the eight training traces (as train-shipped.sh trains tree-position),
# then judges each on every trace of the held-out folders with `kml-agent eval`,
# and prints per set and folder the mean balanced accuracy at the model's own
# threshold, at the best threshold in hindsight, and the mean AUC.
#
#   SETS="sf=scale-free nowalk=write_dir,dir_wait_log,..." \
#     kml-learn/scripts/feature_set_study.sh TRAIN_DIR OUT_DIR HELDOUT_DIR...
#
# TRAIN_DIR holds the eight traces of workloads.txt (record-all.sh); each
# HELDOUT_DIR any traces (record-heldout.sh, or another recording of the eight).
# KINDS (default "tree") and TREE_ARGS (default: tree-position's shape) choose the
# trainers. Offline only: no root, no kernel. Session 29 (docs/learning.md,
# "Where issue 13 ends") measured the position lanes' worth with it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
AGENT=${KML_AGENT:-$ROOT/target/release/kml-agent}
KINDS=${KINDS:-tree}
TREE_ARGS=${TREE_ARGS:---max-depth 8 --min-samples-leaf 100 --tree-max-samples 100000}
if [ $# -lt 3 ] || [ -z "${SETS:-}" ]; then
    echo "usage: SETS=\"name=features ...\" $0 TRAIN_DIR OUT_DIR HELDOUT_DIR..." >&2
    exit 2
fi
TRAIN=$1
OUT=$2
shift 2
NAMES=$(grep -v '^#' "$HERE/workloads.txt" | awk 'NF {print $1}')
LIST=$(for n in $NAMES; do printf '%s/%s.csv,' "$TRAIN" "$n"; done)
LIST=${LIST%,}
mkdir -p "$OUT"
for kv in $SETS; do
    name=${kv%%=*}
    set=${kv#*=}
    for kind in $KINDS; do
        extra=()
        [ "$kind" = tree ] && read -r -a extra <<< "$TREE_ARGS"
        "$AGENT" train --trace "$LIST" --model "$kind" --features "$set" "${extra[@]}" \
            --out "$OUT/$kind-$name.json" --quiet > "$OUT/train-$kind-$name.txt"
    done
done
# One line per (folder, trace, model): the folder, the trace's name, the model's
# name, then eval's JSON.
for dir in "$@"; do
    for trace in "$dir"/*.csv; do
        for model in "$OUT"/*.json; do
            printf '%s %s %s ' "$dir" "$(basename "$trace" .csv)" "$(basename "$model" .json)"
            "$AGENT" eval --trace "$trace" --model "$model" --json --quiet
        done
    done
done > "$OUT/evals.txt"
python3 - "$OUT/evals.txt" <<'EOF'
import collections, json, sys
by = collections.defaultdict(dict)
one_class = collections.defaultdict(list)
for line in open(sys.argv[1]):
    folder, trace, model, js = line.split(" ", 3)
    j = json.loads(js)
    if j["one_class"]:
        # No score means anything on a trace with one class: named, not averaged.
        one_class[(model, folder)].append(trace)
        continue
    by[(model, folder)][trace] = (
        100 * j["quantized_balanced_accuracy"],
        100 * j["quantized_best_balanced_accuracy"],
        j["quantized_auc"],
        100 * j["references"]["oracle_balanced_accuracy"],
    )
for (model, folder), traces in sorted(by.items()):
    n = len(traces)
    own, best, auc, oracle = (sum(v[i] for v in traces.values()) / n for i in range(4))
    skipped = one_class.get((model, folder))
    print(f"{model:24s} {folder:24s} own {own:5.1f} best {best:5.1f} auc {auc:.3f} "
          f"(1 ms oracle {oracle:5.1f}) | "
          + " ".join(f"{t}={v[0]:.1f}" for t, v in sorted(traces.items()))
          + (f" | one class: {' '.join(skipped)}" if skipped else ""))
EOF
