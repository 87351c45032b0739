#!/usr/bin/env python3
"""Offline study of the tick band (issue 13; scratch analysis, not shipped): how
much of the deadline-miss label an insert-time predictor can know. Needs numpy,
pandas, scikit-learn and lightgbm (pip).

    for t in TRACES/*.csv; do
        target/release/examples/features_export $t OUT/$(basename $t); done
    kml-learn/scripts/tick_band_study.py OUT/*.csv

The label is mq-deadline's own: dispatched in a jiffy after `fifo_time`. Per
trace, with a time split (first 50% fits, next 20% sets the balanced threshold,
last 30% judges) and gradient boosting (150 rounds, 63 leaves) on kml's features:
- where dispatches fall against the deadline (issue_jiffies - fifo_time), and the
  miss rate by the insert's phase within its jiffy (quartiles of the 4 ms tick);
- balanced accuracy / AUC with the 22 features; + the insert's jiffy phase (the
  tick's time learnt as the first event seen in each jiffy); + what follows the
  insert within its budget, unknowable at insert (requests inserted and
  dispatched in each direction): how much of the label is the load to come;
- the tick band (dispatched in the deadline's jiffy or the next): its share of
  requests and of errors, accuracy in it, balanced accuracy outside it, and the
  ceiling of a predictor right outside it and as good as this one in it.
"""
import sys

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

JIFFY_NS = 4_000_000  # HZ=250, the machines measured


def balanced(y, p):
    tpr = (p & y).sum() / max(y.sum(), 1)
    tnr = (~p & ~y).sum() / max((~y).sum(), 1)
    return 0.5 * (tpr + tnr)


def fit(X, y, a, b):
    m = lgb.LGBMClassifier(n_estimators=150, learning_rate=0.1, num_leaves=63, verbose=-1)
    m.fit(X[:a], y[:a])
    tune = m.predict_proba(X[a:b])[:, 1]
    qs = np.unique(np.quantile(tune, np.linspace(0.005, 0.995, 199)))
    thr = max(qs, key=lambda t: balanced(y[a:b], tune >= t))
    s = m.predict_proba(X[b:])[:, 1]
    auc = roc_auc_score(y[b:], s) if 0 < y[b:].mean() < 1 else float('nan')
    return s >= thr, 100 * balanced(y[b:], s >= thr), auc


def study(path):
    df = pd.read_csv(path)
    df = df[(df.insert_jiffies > 0) & (df.issue_jiffies > 0) & (df.fifo_time > 0)]
    df = df.reset_index(drop=True)
    features = list(df.columns[8:])
    # The tick's time as an observer learns it: the first event seen in the jiffy.
    events = pd.concat([df[['insert_jiffies', 'insert_ns']].set_axis(['j', 'ns'], axis=1),
                        df[['issue_jiffies', 'issue_ns']].set_axis(['j', 'ns'], axis=1)])
    tick = events.groupby('j').ns.min()
    phase = (df.insert_ns.values - df.insert_jiffies.map(tick).values).clip(0, JIFFY_NS - 1)
    df['phase'] = phase >> 18  # 16 steps of 262 µs
    insert, budget = df.insert_ns.values, (df.deadline_ns - df.insert_ns).values
    write = df.is_write.values == 1
    for side, name in ((write, 'same'), (~write, 'other')):
        for col, times in (('insert', df.insert_ns.values), ('issue', df.issue_ns.values)):
            # For each request: requests of its own (same) or the other direction
            # inserted / dispatched within its budget after its insert.
            counts = {}
            for d in (True, False):
                t = np.sort(times[write == d])
                counts[d] = np.searchsorted(t, insert + budget) - np.searchsorted(t, insert)
            mine = write if name == 'same' else ~write
            df[f'next_{col}_{name}'] = np.where(mine, counts[True], counts[False])
    y = df.missed.values.astype(bool)
    late = (df.issue_jiffies - df.fifo_time).values
    n = len(df)
    a, b = int(n * .5), int(n * .7)
    quart = np.minimum(phase * 4 // JIFFY_NS, 3)
    future = ['next_insert_same', 'next_insert_other', 'next_issue_same', 'next_issue_other']
    rows = [fit(df[f].values.astype(float), y, a, b)
            for f in (features, features + ['phase'], features + ['phase'] + future)]
    pred, yt, lt = rows[1][0], y[b:], late[b:]
    band = (lt == 0) | (lt == 1)
    wrong = pred != yt
    ceiling = np.where(band, pred, yt)
    dist = pd.Series(np.clip(late, -3, 3)).value_counts(normalize=True).sort_index()
    name = path.rsplit('/', 1)[-1].removesuffix('.csv')
    print(f'{name}: {n} requests, {100 * y.mean():.1f}% missed')
    print('  dispatched vs deadline (jiffies late, clipped at ±3): '
          + ' '.join(f'{int(k):+d}:{100 * v:.1f}%' for k, v in dist.items()))
    print('  miss rate by the insert\'s phase in its jiffy (quartiles): '
          + ' '.join(f'{100 * y[quart == k].mean():.1f}%' for k in range(4)))
    print('  balanced accuracy / AUC: 22 features {:.1f} / {:.3f}; + phase {:.1f} / {:.3f}; '
          '+ the next budget\'s inserts and dispatches (hindsight) {:.1f} / {:.3f}'.format(
              rows[0][1], rows[0][2], rows[1][1], rows[1][2], rows[2][1], rows[2][2]))
    outside = ~band
    print(f'  tick band: {100 * band.mean():.1f}% of requests, {100 * wrong[band].sum() / max(wrong.sum(), 1):.1f}% '
          f'of errors, {100 * (1 - wrong[band].mean()):.1f}% accurate in it; outside it balanced accuracy '
          f'{100 * balanced(yt[outside], pred[outside]):.1f}; right outside it: {100 * balanced(yt, ceiling):.1f}',
          flush=True)


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        study(p)
