#!/bin/bash
# Times features_at_insert, infer_linear and infer_tree in the kernel:
#   kml-learn/bpf-bench/run.sh [REPEAT]
# Builds the socket filters (nightly + bpf-linker, as `cargo xtask setup` installs),
# loads them with bpftool into a private bpffs mount, runs each REPEAT times
# (default 5,000,000) with BPF_PROG_TEST_RUN and prints the average ns per run, then
# unloads them and unmounts. Root only.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPEAT=${1:-5000000}
TARGET=${CARGO_TARGET_DIR:-/tmp/kml-bpf-bench-target}
FS=$(mktemp -d /tmp/kml-bpf-bench-fs.XXXXXX)
PKT=$(mktemp /tmp/kml-bpf-bench-pkt.XXXXXX)
cleanup() { rm -rf "$FS/progs" 2>/dev/null; umount "$FS" 2>/dev/null; rmdir "$FS"; rm -f "$PKT"; }
trap cleanup EXIT INT TERM
(cd "$HERE" && CARGO_ENCODED_RUSTFLAGS=$(printf -- '--cfg=bpf_target_arch="x86_64"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Clink-arg=--disable-expand-memcpy-in-order\x1f-Ctarget-cpu=v3') \
    cargo +nightly build --quiet --release --target bpfel-unknown-none -Z build-std=core --bins --target-dir "$TARGET")
mount -t bpf bpf "$FS"
head -c 64 /dev/zero > "$PKT"
bpftool prog loadall "$TARGET/bpfel-unknown-none/release/bench" "$FS/progs" type socket
for p in bench_empty bench_features bench_linear bench_tree bench_position bench_position_queue bench_position_deep bench_position_cost_deep; do
    ns=$(bpftool prog run pinned "$FS/progs/$p" data_in "$PKT" repeat "$REPEAT" | grep -o 'duration (average): [0-9]*ns')
    size=$(bpftool prog show pinned "$FS/progs/$p" | grep -o 'xlated [0-9]*B')
    printf '%-16s %s  (%s)\n' "$p" "$ns" "$size"
done
