#!/usr/bin/env python3
"""Sums the agent's live verdicts (`run --json` ticks) per phase of a run and
prints balanced accuracy per workload and arm: kml-learn/scripts/newuser_summary.py DIR
(the files DIR/NAME.ARM.jsonl written by newuser.sh)."""
import json
import pathlib
import sys

PHASES = [(0, 2, "0-2 s"), (2, 10, "2-10 s"), (10, 1e9, "10 s-end")]
ARMS = ["shipped", "calibrated", "online"]


def balanced(m):
    pos = m["true_miss"] + m["false_met"]
    neg = m["true_met"] + m["false_miss"]
    if pos == 0 or neg == 0:
        return None
    return 0.5 * (m["true_miss"] / pos + m["true_met"] / neg)


def main(d):
    runs = {}
    for f in sorted(pathlib.Path(d).glob("*.jsonl")):
        name, arm = f.stem.rsplit(".", 1)
        phases = [dict(true_miss=0, false_miss=0, true_met=0, false_met=0) for _ in PHASES]
        whole = dict(true_miss=0, false_miss=0, true_met=0, false_met=0)
        versions = set()
        for line in f.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("event") != "tick":
                continue
            if ev.get("model"):
                versions.add(ev["model"]["version"])
            for i, (lo, hi, _) in enumerate(PHASES):
                if lo <= ev["t_s"] - 1 < hi:  # the tick reports the second before it
                    for k in whole:
                        phases[i][k] += ev["live"][k]
            for k in whole:
                whole[k] += ev["live"][k]
        runs.setdefault(name, {})[arm] = (phases, whole, len(versions))
    print("| workload | arm | " + " | ".join(p[2] for p in PHASES) + " | whole run | model versions |")
    print("| --- | --- |" + " ---: |" * (len(PHASES) + 2))
    for name, arms in runs.items():
        for arm in ARMS:
            if arm not in arms:
                continue
            phases, whole, nv = arms[arm]

            def fmt(m):
                b = balanced(m)
                return "one class" if b is None else f"{100 * b:.1f}"

            print(f"| {name} | {arm} | " + " | ".join(fmt(p) for p in phases) + f" | {fmt(whole)} | {nv} |")


if __name__ == "__main__":
    main(sys.argv[1])
