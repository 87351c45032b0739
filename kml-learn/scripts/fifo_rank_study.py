#!/usr/bin/env python3
"""Offline study of the neighbours' place in the FIFO (issue 13; scratch analysis,
not shipped): does a request's fate follow from how soon a request just below it
in sector order becomes mq-deadline's FIFO head? Needs numpy, scikit-learn and
lightgbm (pip).

    E=target/release/examples/sortorder_export
    for t in TRAIN/*.csv HELD/*.csv; do $E $t OUT/$(basename $t .csv).so; done
    kml-learn/scripts/fifo_rank_study.py OUT within NAME...   # per trace, later window
    kml-learn/scripts/fifo_rank_study.py OUT transfer         # 8 trained -> 5 held out
    ... --model tree   # the kernel's model family instead of gradient boosting

Feature sets, each kml's 22 features plus:
- exact neighbours: the lowest FIFO place (queued same-direction requests older)
  among the 1, 2, 4, 8, 16 nearest queued requests below in sector order;
- bucket exact / slot: the same from 4 MiB sector buckets (the request's own and
  the 1, 2, 4, 8 below), the place of each bucket's oldest request exactly, or at
  the age ring's slot resolution (what a kernel array of per-bucket, per-slot
  counts can keep);
- bucket stale: the bucket's oldest since it was last empty (what the kernel
  keeps today), at slot resolution;
- walk: buckets walked down until they hold 1, 4, 16 queued requests (at most
  16 buckets), the place of the oldest among them at slot resolution: the kernel
  form proposed in docs/learning.md; "ring of 32 / 64": the same when the age ring
  holds only that many slot periods, so that an oldest that has left it is known
  only as older than the ring (place 0).
In `transfer` each place is turned into a time against the budget,
log2(place x issue gap / budget): a count means nothing at another depth, the
time it takes to drain does.

`within`: per trace, the first 50% fits, the next 20% sets the balanced
threshold, the last 30% judges. `transfer`: fits on the first 50% of each of the
eight training traces (at most 150,000 requests each; the tree on 100,000 of the
union, as the shipped tree-position), the threshold on their next 20%, and judges
each held-out trace whole. Prints balanced accuracy % / AUC.
"""
import sys

import lightgbm as lgb
import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.tree import DecisionTreeClassifier

TRAIN = ("bursty randrw-small randrw-mixed-bs randread-seqwrite write-heavy "
         "checkpoint read-burst batch-writer").split()
HELD = "backup-oltp deep-oltp-wal deep-randrw lsm-compaction oltp-wal".split()
NONE = 1e6  # no queued request in reach: later than anything


def balanced(y, p):
    tpr = (p & y).sum() / max(y.sum(), 1)
    tnr = (~p & ~y).sum() / max((~y).sum(), 1)
    return 50 * (tpr + tnr)


def threshold(y, p):
    return max(np.quantile(p, np.linspace(0.01, 0.99, 99)), key=lambda t: balanced(y, p > t))


def running_min(columns):
    out, m = [], np.full(len(columns[0]), NONE)
    for c in columns:
        m = np.minimum(m, np.where(c < 0, NONE, c))
        out.append(m.copy())
    return out


def load(out_dir, name):
    cols = open(f"{out_dir}/{name}.so.cols").read().split()
    X = np.fromfile(f"{out_dir}/{name}.so.bin", dtype="<f8").reshape(-1, len(cols))
    c = {n: i for i, n in enumerate(cols)}
    kml = cols[cols.index("sector_mib"):cols.index("miss_share_other") + 1]
    f = {n: X[:, c[n]] for n in kml}
    y = X[:, c["missed"]].astype(bool)
    nb = running_min([X[:, c[f"fifo_rank_b{k}"]] for k in range(1, 17)])
    for k in (1, 2, 4, 8, 16):
        f[f"nb{k}"] = nb[k - 1]
    for kind in ("old_rank", "old_rank_slot", "stale_rank_slot"):
        bk = running_min([X[:, c[f"bk{w}_{kind}"]] for w in range(8)])
        for w in (0, 1, 3, 7):
            f[f"{kind}{w}"] = bk[w]
    for k in (1, 4, 16):
        for src, dst in ((f"walk{k}_rank_slot", f"walk{k}"),
                         (f"walk{k}_rank_ring32", f"ring32_{k}"),
                         (f"walk{k}_rank_ring64", f"ring64_{k}")):
            v = X[:, c[src]]
            f[dst] = np.where(v < 0, NONE, v)
    gap = np.maximum(X[:, c["issue_gap_ns"]], 1)
    budget = np.maximum(X[:, c["budget_ns"]], 1)
    for n in [n for n in f if n not in kml]:
        f[n + "_t"] = np.log2(np.maximum(f[n], 0.5) * gap / budget)
    return y, f, kml


def sets(kml, t):
    return {
        "kml's 22": kml,
        "+ exact neighbours": kml + [f"nb{k}{t}" for k in (1, 2, 4, 8, 16)],
        "+ bucket exact": kml + [f"old_rank{w}{t}" for w in (0, 1, 3, 7)],
        "+ bucket exact, slot": kml + [f"old_rank_slot{w}{t}" for w in (0, 1, 3, 7)],
        "+ bucket stale, slot": kml + [f"stale_rank_slot{w}{t}" for w in (0, 1, 3, 7)],
        "+ walk, slot": kml + [f"walk{k}{t}" for k in (1, 4, 16)],
        "+ walk, ring of 32": kml + [f"ring32_{k}{t}" for k in (1, 4, 16)],
        "+ walk, ring of 64": kml + [f"ring64_{k}{t}" for k in (1, 4, 16)],
    }


def fit(model, X, y):
    if model == "tree":
        idx = np.random.default_rng(1).choice(len(y), min(len(y), 100_000), replace=False)
        m = DecisionTreeClassifier(max_depth=8, min_samples_leaf=100, class_weight="balanced")
        return m.fit(X[idx], y[idx])
    m = lgb.LGBMClassifier(n_estimators=150, num_leaves=63, learning_rate=0.1, verbose=-1,
                           subsample=0.5, subsample_freq=1)
    return m.fit(X, y)


def matrix(f, names):
    return np.stack([f[n] for n in names], 1)


def main():
    args = sys.argv[1:]
    model = "lgbm"
    if "--model" in args:
        i = args.index("--model")
        model = args[i + 1]
        del args[i:i + 2]
    out_dir, mode, names = args[0], args[1], args[2:]
    if mode == "within":
        for name in names:
            y, f, kml = load(out_dir, name)
            n = len(y)
            a, b = n // 2, n * 7 // 10
            cells = []
            for label, s in sets(kml, "").items():
                X = matrix(f, s)
                m = fit(model, X[:a], y[:a])
                th = threshold(y[a:b], m.predict_proba(X[a:b])[:, 1])
                p = m.predict_proba(X[b:])[:, 1]
                cells.append(f"{label}: {balanced(y[b:], p > th):.1f} / {roc_auc_score(y[b:], p):.3f}")
            print(f"{name} (miss {100 * y.mean():.1f}%): " + "; ".join(cells), flush=True)
        return
    data = {n: load(out_dir, n) for n in TRAIN + HELD}
    kml = data[TRAIN[0]][2]
    print("held out: " + ", ".join(HELD))
    for label, s in sets(kml, "_t").items():
        fits, tunes = [], []
        for name in TRAIN:
            y, f, _ = data[name]
            X = matrix(f, s)
            n = len(y)
            a, b = n // 2, n * 7 // 10
            idx = np.random.default_rng(0).choice(a, min(a, 150_000), replace=False)
            fits.append((X[idx], y[idx]))
            tunes.append((X[a:b], y[a:b]))
        m = fit(model, np.concatenate([x for x, _ in fits]), np.concatenate([y for _, y in fits]))
        th = threshold(np.concatenate([y for _, y in tunes]),
                       m.predict_proba(np.concatenate([x for x, _ in tunes]))[:, 1])
        res = []
        for name in HELD:
            y, f, _ = data[name]
            p = m.predict_proba(matrix(f, s))[:, 1]
            res.append((balanced(y, p > th), roc_auc_score(y, p)))
        print(f"{label:24s} " + "  ".join(f"{b:.1f} / {a:.3f}" for b, a in res)
              + f"  mean {np.mean([r[0] for r in res]):.1f}", flush=True)


if __name__ == "__main__":
    main()
