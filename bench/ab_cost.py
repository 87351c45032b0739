#!/usr/bin/env python3
"""In-kernel cost of two agent builds (or two models) side by side, alternating.

`cargo xtask bench --only cost` measures this tree's programs against an agent
without a model. To judge a change to the programs, this runs two agent
binaries (A and B: say, main's and a branch's, each embedding its own eBPF
object) one after the other on one tmpfs loop device under mq-deadline, each
alone with its model under the same fio job, the order alternating by round,
and reports ns per run of insert (with the tail-called inference stage), issue
and complete (bpf_stats), with B - A per round and a 95% interval of the mean.
Alone, not both at once, so that each meets the caches as in production: two
agents on one device run back to back on each event, and the second finds the
request's lines warm (measured: B - A swung by 40 ns with the order).

    bench/ab_cost.py A_AGENT B_AGENT [--rounds 10] [--model M] [--model-b M]
                     [--job bench/cost-deep.fio] [--secs 4]

Root only; restores bpf_stats_enabled and removes the device and mount.
"""
import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGS = ("kml_raw_rq_insert", "kml_raw_rq_issue", "kml_raw_rq_complete")
# Two-sided 95% t quantiles by degrees of freedom (small samples).
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
       10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}


def t95(df):
    return T95.get(df) or T95[max(k for k in T95 if k <= df)] if df >= 1 else float("nan")


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def prog_ids(pid):
    ids = set()
    for f in glob.glob(f"/proc/{pid}/fdinfo/*"):
        try:
            with open(f) as fd:
                ids.update(int(l.split()[1]) for l in fd if l.startswith("prog_id:"))
        except OSError:
            pass
    return ids


def stats():
    return {p["id"]: (p.get("name"), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(sh("bpftool", "prog", "show", "-j"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a_agent")
    ap.add_argument("b_agent")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default=os.path.join(ROOT, "models/tree-position.json"))
    ap.add_argument("--model-b", help="B's model (default: --model)")
    ap.add_argument("--job", default=os.path.join(ROOT, "bench/cost-deep.fio"))
    ap.add_argument("--secs", default="4")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("ab_cost.py: needs root (loads eBPF programs, sets up a loop device)")
    mnt = tempfile.mkdtemp(prefix="kml-ab-")
    env = {k: v for k, v in os.environ.items() if k != "KML_EBPF_OBJECT"}
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_was = f.read().strip()
    dev = None
    res = {"A": {}, "B": {}}
    try:
        sh("mount", "-t", "tmpfs", "-o", "size=1200m,mode=0700", "tmpfs", mnt)
        sh("fallocate", "-l", "1G", os.path.join(mnt, "disk"))
        dev = sh("losetup", "-f", "--show", os.path.join(mnt, "disk")).strip()
        name = os.path.basename(dev)
        with open(f"/sys/block/{name}/queue/scheduler", "w") as f:
            f.write("mq-deadline")
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        arms = {"A": (args.a_agent, args.model), "B": (args.b_agent, args.model_b or args.model)}
        for r in range(args.rounds):
            order = "AB" if r % 2 == 0 else "BA"
            line = [f"round {r + 1} ({order})"]
            for tag in order:
                binary, model = arms[tag]
                agent = subprocess.Popen(
                    [binary, "run", "--device", name, "--retrain-every", "0", "--model", model],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                try:
                    time.sleep(3)  # loaded and attached
                    ids = prog_ids(agent.pid)
                    before = stats()
                    subprocess.run(["fio", args.job, "--output-format=terse"], check=True,
                                   capture_output=True,
                                   env=dict(os.environ, FILENAME=dev, RUNTIME=args.secs))
                    after = stats()
                finally:
                    agent.send_signal(signal.SIGINT)
                    agent.wait(timeout=30)
                for i in ids:
                    prog, t1, c1 = after.get(i, (None, 0, 0))
                    _, t0, c0 = before.get(i, (None, 0, 0))
                    if prog in PROGS and c1 > c0:
                        ns = (t1 - t0) / (c1 - c0)
                        res[tag][prog] = res[tag].get(prog, []) + [ns]
                        line.append(f"{tag}.{prog[11:]} {ns:.0f}")
            print("  ".join(line), flush=True)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_was or "0")
        if dev:
            subprocess.run(["losetup", "-d", dev])
        subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
        os.rmdir(mnt)
    print("\n| program | A median | B median | B - A, mean (95% interval) | per round |")
    print("| --- | ---: | ---: | --- | --- |")
    for prog in PROGS:
        a, b = res["A"].get(prog, []), res["B"].get(prog, [])
        d = [y - x for x, y in zip(a, b)]
        if len(d) < 2:
            continue
        m, half = statistics.mean(d), t95(len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
        print(f"| {prog[11:]} | {statistics.median(a):.0f} | {statistics.median(b):.0f} | "
              f"{m:+.1f} ({m - half:+.1f}..{m + half:+.1f}) | {' '.join(f'{x:+.0f}' for x in d)} |")


if __name__ == "__main__":
    main()
