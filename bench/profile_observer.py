#!/usr/bin/env python3
"""Where kml's in-kernel time goes, from a `perf record -e cpu-clock -a -g` profile.

This machine's CPUs expose no PMU to the guest (`perf stat -e cycles` says "not
supported"), so the profile is hrtimer-sampled (cpu-clock): IRQ-disabled code is
seen late, at the point interrupts come back. bpf_stats gives ns per program run;
this gives the split inside: each sample whose stack holds a kml program counts
for that program, and for its innermost frame (the program's own code, a helper
such as bpf_probe_read_kernel, or a subprogram such as a libcall).

    perf record -e cpu-clock -F 20000 -a -g -o perf.data -- sleep 6   # while kml runs
    bench/profile_observer.py perf.data
"""
import collections
import subprocess
import sys


def samples(path):
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "ip,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    for block in out.split("\n\n"):
        frames = [line.split(None, 1) for line in block.strip().split("\n") if line.strip()]
        if frames:
            yield [f[1].split("+")[0] if len(f) > 1 else "?" for f in frames]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "perf.data"
    total = 0
    programs = collections.Counter()
    leaves = collections.Counter()
    for stack in samples(path):
        total += 1
        kml = [s for s in stack if s.startswith("bpf_prog_") and "kml" in s]
        if not kml:
            continue
        # bpf_prog_<tag>_<name>: the outermost kml program is the attached one.
        programs[kml[-1].split("_", 3)[-1]] += 1
        leaves[stack[0]] += 1
    if total == 0:
        sys.exit(f"{path}: no samples")
    n = sum(programs.values())
    print(f"{total} samples; {n} under a kml program ({100 * n / total:.1f}% of all CPU time sampled)")
    print("| program | share of all samples |")
    print("| --- | --- |")
    for name, c in programs.most_common():
        print(f"| {name} | {100 * c / total:.2f}% |")
    print()
    print("| innermost frame | share of kml's samples |")
    print("| --- | --- |")
    for name, c in leaves.most_common(15):
        print(f"| {name} | {100 * c / max(n, 1):.1f}% |")


if __name__ == "__main__":
    main()
