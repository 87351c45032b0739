#!/usr/bin/env python3
"""Offline study of a burst's onset (issue 13; scratch analysis, not shipped):
where misses are rare and come in bursts (oltp-wal: 0.1-1.3% of requests), is
there an insert-time signal of the burst beginning that kml's features lack?
Needs numpy, pandas, scikit-learn and lightgbm (pip).

    for d in REC1 REC2 REC3; do
        target/release/examples/features_export $d/oltp-wal.csv $d/oltp-wal.feat.csv; done
    kml-learn/scripts/burst_onset_study.py oltp-wal REC1 REC2 REC3

Each REC is a folder of one recording (`record-heldout.sh`): the raw trace
WORKLOAD.csv (flushes included) and its export WORKLOAD.feat.csv. Candidates,
each from events before the insert only:
- the device stalling: flushes in flight, time since the last flush began, since
  the last dispatch (also over the dispatch gap's average), since the last
  completion; the last completion's service time and its average (1/16);
- the queue growing: inserts over completions in the last 1 ms, dispatches in it;
- misses recently: time since the last dispatch that missed (the kernel knows a
  miss at dispatch, as the miss shares do), in the request's direction, in µs and
  over the request's budget.
Prints each candidate's AUC beside kml's best features', then trains gradient
boosting on one recording and judges it on the others (own threshold: tuned on the
training recording; best: in hindsight), with the scale-free set and with the
candidates added. Results: docs/learning.md, "A burst's onset, one threshold per
workload, a rule the tree does not beat (session 28)".
"""
import sys

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

SCALE_FREE = [
    "write_dir", "dir_wait_log", "expected_wait_log", "issue_distance_log2",
    "miss_share_same", "miss_share_other", "head_age_log", "below_age_log",
    "lead_log", "older_half_share", "expired_share", "due_count_share",
]
KML_BEST = ["expired_share", "dir_wait_log", "head_age_log", "miss_share_same"]


def log2p(x):
    return np.log2(np.maximum(np.asarray(x, dtype=np.float64), 0.0) + 1.0)


def before(times, t):
    """Index of the last of the sorted `times` strictly before each of `t` (-1: none)."""
    return np.searchsorted(times, t, "left") - 1


def count_in(times, t, span):
    return np.searchsorted(times, t, "left") - np.searchsorted(times, t - span, "left")


def candidates(raw, feat):
    t = feat.insert_ns.values
    flush = raw[raw.op == "flush"]
    req = raw[raw.op != "flush"]
    fi, fc = np.sort(flush.insert_ns.values), np.sort(flush.complete_ns.values)
    c = pd.DataFrame(index=feat.index)
    c["flush_inflight"] = before(fi, t) - before(fc, t)
    j = before(fi, t)
    c["since_flush_log"] = np.where(j >= 0, log2p((t - fi[np.maximum(j, 0)]) / 1024), 40)
    issues = np.sort(req[req.issue_ns > 0].issue_ns.values)
    j = before(issues, t)
    since_issue = np.where(j >= 0, t - issues[np.maximum(j, 0)], 1 << 40)
    c["since_issue_log"] = log2p(since_issue / 1024)
    c["stall_over_gap"] = log2p(since_issue) - log2p(feat.issue_gap_ns.values)
    done = req[(req.complete_ns > 0) & (req.issue_ns > 0)].sort_values("complete_ns")
    ct = done.complete_ns.values
    service = (done.complete_ns - done.issue_ns).values.astype(np.float64)
    service_avg = pd.Series(service).ewm(alpha=1 / 16).mean().values
    j = before(ct, t)
    has = j >= 0
    c["since_complete_log"] = np.where(has, log2p((t - ct[np.maximum(j, 0)]) / 1024), 40)
    c["last_service_log"] = np.where(has, log2p(service[np.maximum(j, 0)] / 1024), 0)
    c["service_avg_log"] = np.where(has, log2p(service_avg[np.maximum(j, 0)] / 1024), 0)
    inserts = np.sort(req.insert_ns.values)
    c["growth_1ms"] = log2p(count_in(inserts, t, 1_000_000)) - log2p(count_in(ct, t, 1_000_000))
    c["issues_1ms_log"] = log2p(count_in(issues, t, 1_000_000))
    # Misses as the kernel learns them: at dispatch, in the request's direction.
    issued = feat[feat.issue_ns > 0]
    since = np.full(len(feat), np.nan)
    for write in (0, 1):
        m = np.sort(issued[(issued.missed == 1) & (issued.is_write == write)].issue_ns.values)
        if len(m) == 0:
            continue
        j = before(m, t)
        v = np.where(j >= 0, (t - m[np.maximum(j, 0)]) / 1024, np.nan)
        since = np.where(feat.is_write.values == write, v, since)
    c["since_miss_same_log"] = np.where(np.isnan(since), 40, log2p(np.nan_to_num(since)))
    c["since_miss_same_rel"] = np.where(
        np.isnan(since), 30, c.since_miss_same_log - log2p(feat.deadline_budget_us.values)
    )
    return c


def balanced(y, p, threshold):
    flag = p >= threshold
    return 0.5 * ((flag & (y == 1)).sum() / max((y == 1).sum(), 1)
                  + (~flag & (y == 0)).sum() / max((y == 0).sum(), 1))


def best(y, p):
    cuts = np.unique(np.quantile(p, np.linspace(0.3, 0.9999, 400)))
    return max((balanced(y, p, q), q) for q in cuts)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    workload, recs = sys.argv[1], sys.argv[2:]
    data = []
    for rec in recs:
        raw = pd.read_csv(f"{rec}/{workload}.csv", low_memory=False,
                          usecols=["op", "insert_ns", "issue_ns", "complete_ns"])
        raw = raw[raw.op != "op"].astype({"insert_ns": "int64", "issue_ns": "int64",
                                          "complete_ns": "int64"})
        feat = pd.read_csv(f"{rec}/{workload}.feat.csv")
        data.append((rec, feat, candidates(raw, feat)))
    names = list(data[0][2].columns)
    print("AUC (inverted ranking marked -)")
    for rec, feat, cand in data:
        y = feat.missed.values
        if y.min() == y.max():
            print(f"{rec}: one class")
            continue
        cells = []
        for col in names + KML_BEST:
            a = roc_auc_score(y, (cand if col in cand else feat)[col].values)
            cells.append(f"{col} {max(a, 1 - a):.3f}{'-' if a < 0.5 else ''}")
        print(f"{rec} (miss {100 * y.mean():.2f}%): " + ", ".join(cells))
    print("\ngradient boosting, trained on one recording, judged on each other: "
          "own threshold / best / AUC")
    for label, cols in (("scale-free", SCALE_FREE), ("+ candidates", SCALE_FREE + names)):
        for i, (rec, feat, cand) in enumerate(data):
            x = pd.concat([feat[SCALE_FREE], cand], axis=1)
            fit = x.assign(missed=feat.missed).sample(min(len(x), 300_000), random_state=0)
            model = lgb.LGBMClassifier(n_estimators=200, num_leaves=31, learning_rate=0.05,
                                       min_child_samples=100, is_unbalance=True, verbose=-1)
            model.fit(fit[cols], fit.missed)
            _, threshold = best(fit.missed.values, model.predict_proba(fit[cols])[:, 1])
            cells = []
            for k, (other, ofeat, ocand) in enumerate(data):
                if k == i:
                    continue
                ox = pd.concat([ofeat[SCALE_FREE], ocand], axis=1)
                y, p = ofeat.missed.values, model.predict_proba(ox[cols])[:, 1]
                cells.append(f"{other}: {100 * balanced(y, p, threshold):.1f} / "
                             f"{100 * best(y, p)[0]:.1f} / {roc_auc_score(y, p):.3f}")
            print(f"{label:13s} from {rec}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
