#!/usr/bin/env python3
"""Offline study of the miss-feedback candidate features (issue 13; scratch
analysis, not shipped). Needs numpy and lightgbm (pip).

    for t in TRACES/*.csv TRACES/heldout/*.csv; do
        target/release/examples/feedback_export $t OUT/$(basename $t); done
    kml-learn/scripts/feedback_study.py OUT

Prints: each candidate's AUC alone; a per-trace time split (first 50% fits,
next 20% sets the threshold, last 30% judges); and the number a new user meets
first, trained on the eight training workloads (first 70% fit, last 30%
threshold) and judged on each held-out workload whole. Models: gradient
boosting (100 rounds) and one tree of depth 8 (like the shipped tree).
"""
import sys

import lightgbm as lgb
import numpy as np

DIR = sys.argv[1].rstrip('/') + '/'
TRAIN = ['batch-writer', 'bursty', 'checkpoint', 'randread-seqwrite',
         'randrw-mixed-bs', 'randrw-small', 'read-burst', 'write-heavy']
HELD = ['backup-oltp', 'deep-oltp-wal', 'deep-randrw', 'lsm-compaction', 'oltp-wal']
PORTABLE = ['write_dir', 'dir_wait_log', 'expected_wait_log', 'dir_wait_us',
            'expected_wait_us', 'deadline_budget_us', 'issue_distance_log2']
POSITION = ['head_age_log', 'older_half', 'expired', 'due_below', 'below_age_log',
            'recent', 'lead_log', 'due_count']
NEW = ['mewma2', 'mewma4', 'mewma6', 'oewma4', 'mfrac1ms']
SETS = {
    'portable+position': PORTABLE + POSITION,
    '+ miss feedback (ewma)': PORTABLE + POSITION + ['mewma2', 'mewma4', 'mewma6', 'oewma4'],
    '+ mewma4 only': PORTABLE + POSITION + ['mewma4'],
    # What was built from the study (label::miss_share_step, weight 2^-6, both
    # directions): the feature columns of the export.
    '+ miss shares as shipped': PORTABLE + POSITION + ['miss_share_same', 'miss_share_other'],
}
MODELS = {
    'gbm': (dict(objective='binary', learning_rate=0.1, num_leaves=63,
                 min_data_in_leaf=100, is_unbalance=True, verbose=-1), 100),
    'tree8': (dict(objective='binary', learning_rate=1.0, max_depth=8, num_leaves=255,
                   min_data_in_leaf=100, is_unbalance=True, verbose=-1), 1),
}


def auc(s, y):
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    order = np.argsort(s, kind='mergesort')
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    ranks = (np.bincount(inv, weights=ranks) / cnt)[inv]  # ties: mean rank
    p = y.sum()
    n = len(y) - p
    if p == 0 or n == 0:
        return float('nan')
    return (ranks[y == 1].sum() - p * (p + 1) / 2) / (p * n)


def best_threshold(s, y):
    order = np.argsort(-s)
    ys = y[order]
    p = ys.sum()
    n = len(ys) - p
    ba = 0.5 * (np.cumsum(ys) / p + (n - np.cumsum(1 - ys)) / n)
    return s[order][np.argmax(ba)]


def balanced_accuracy(s, y, t):
    flag = s >= t
    p = y.sum()
    n = len(y) - p
    if p == 0 or n == 0:
        return float('nan')
    return 0.5 * ((flag & (y == 1)).sum() / p + ((~flag) & (y == 0)).sum() / n)


def matrix(a, cols):
    return np.column_stack([a[c] for c in cols]).astype(np.float64)


def fit(model, x, y):
    params, rounds = MODELS[model]
    return lgb.train(params, lgb.Dataset(x, y), rounds)


data = {n: np.genfromtxt(DIR + n + '.csv', delimiter=',', names=True, dtype=np.int64)
        for n in TRAIN + HELD}

print('AUC of each candidate alone (the better direction)')
for n in TRAIN + HELD:
    a = data[n]
    y = a['missed']
    cells = ' '.join(f"{c} {max(auc(a[c], y), 1 - auc(a[c], y)):.3f}"
                     for c in ['expired', 'older_half'] + NEW)
    print(f"  {n:18s} miss {y.mean():.3f}  {cells}")

for model in MODELS:
    print(f'\n{model}: per-trace time split, balanced accuracy % / AUC on the last 30%')
    for n in TRAIN + HELD:
        a = data[n]
        y = a['missed']
        i1, i2 = int(.5 * len(y)), int(.7 * len(y))
        cells = []
        for cols in SETS.values():
            x = matrix(a, cols)
            m = fit(model, x[:i1], y[:i1])
            t = best_threshold(m.predict(x[i1:i2]), y[i1:i2])
            p = m.predict(x[i2:])
            cells.append(f"{100 * balanced_accuracy(p, y[i2:], t):.1f}/{auc(p, y[i2:]):.3f}")
        print(f"  {n:18s} " + '  '.join(f"{s}: {c}" for s, c in zip(SETS, cells)))

    print(f'\n{model}: trained on the eight, judged on each held-out workload whole '
          '(balanced accuracy % / AUC / balanced accuracy at its own best threshold)')
    for s, cols in SETS.items():
        cut = [int(.7 * len(data[n])) for n in TRAIN]
        fx = np.concatenate([matrix(data[n][:c], cols) for n, c in zip(TRAIN, cut)])
        fy = np.concatenate([data[n]['missed'][:c] for n, c in zip(TRAIN, cut)])
        tx = np.concatenate([matrix(data[n][c:], cols) for n, c in zip(TRAIN, cut)])
        ty = np.concatenate([data[n]['missed'][c:] for n, c in zip(TRAIN, cut)])
        m = fit(model, fx, fy)
        t = best_threshold(m.predict(tx), ty)
        res = []
        for n in HELD:
            y = data[n]['missed']
            p = m.predict(matrix(data[n], cols))
            res.append((balanced_accuracy(p, y, t), auc(p, y),
                        balanced_accuracy(p, y, best_threshold(p, y))))
        cells = '  '.join(f"{n} {100 * r[0]:.1f}/{r[1]:.3f}/{100 * r[2]:.1f}"
                          for n, r in zip(HELD, res))
        print(f"  {s:24s} {cells}  mean {100 * np.mean([r[0] for r in res]):.1f}"
              f" / at own threshold {100 * np.mean([r[2] for r in res]):.1f}")
