#!/usr/bin/env python3
"""scikit-learn reference for `cargo xtask bench`'s training-time measure.

Reads the feature matrix the bench exported with kml's own feature code
(one column per kml feature, then `missed` and `delay_us`, rows in insert-time
order), fits on the first --fit-fraction of the rows (kml fits on the same
first 80% with `train --train-fraction 1.0`, and tunes its threshold on the
rest), and prints one JSON object: fit wall times, and as a sanity check each
model's balanced accuracy on the remaining rows with default thresholds.

What is fitted (kml's counterpart in brackets):
  linear    LinearRegression of delay_us on all features      [ridge least squares, linear]
  logistic  StandardScaler + LogisticRegression (lbfgs), max_iter 100 and 10
                                                               [L-BFGS from a least-squares start, 10 iterations]
  tree      DecisionTreeClassifier depth 6, min_samples_leaf 50, class_weight balanced,
            on all fit rows and on 50,000 evenly spaced ones   [linfa-trees on <= 50,000 evenly spaced rows]
"""
import argparse
import json
import platform
import sys
import time
import warnings

import numpy as np
import pandas as pd
import sklearn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("features")
    ap.add_argument("--fit-fraction", type=float, default=0.8)
    ap.add_argument("--tree-samples", type=int, default=50_000)
    args = ap.parse_args()

    t = time.perf_counter()
    df = pd.read_csv(args.features)
    read_s = time.perf_counter() - t
    feature_cols = [c for c in df.columns if c not in ("missed", "delay_us")]
    X = df[feature_cols].to_numpy(dtype=np.float64)
    y = df["missed"].to_numpy(dtype=np.int64)
    d = df["delay_us"].to_numpy(dtype=np.float64)
    budget = df["deadline_budget_us"].to_numpy(dtype=np.float64) if "deadline_budget_us" in df else None
    n = len(df)
    m = int(round(args.fit_fraction * n))
    Xf, yf, df_ = X[:m], y[:m], d[:m]
    Xt, yt = X[m:], y[m:]

    results = []

    def timed(name, kind, fit, predict, rows):
        t0 = time.perf_counter()
        model = fit()
        secs = time.perf_counter() - t0
        bal = None
        if len(yt) and len(set(yt.tolist())) == 2:
            bal = float(balanced_accuracy_score(yt, predict(model)))
        results.append({"name": name, "kind": kind, "fit_s": secs, "fit_rows": rows,
                        "balanced_accuracy_rest": bal})
        print(f"{name}: {secs:.3f}s on {rows} rows, balanced accuracy on the rest {bal}", file=sys.stderr)

    timed("LinearRegression", "linear",
          lambda: LinearRegression().fit(Xf, df_),
          lambda mdl: (mdl.predict(Xt) > budget[m:]).astype(int) if budget is not None else None,
          m)
    for iters in (100, 10):
        def fit_logistic(iters=iters):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                return make_pipeline(StandardScaler(), LogisticRegression(max_iter=iters)).fit(Xf, yf)
        timed(f"StandardScaler+LogisticRegression(max_iter={iters})", "logistic",
              fit_logistic, lambda mdl: mdl.predict(Xt), m)
    tree = dict(max_depth=6, min_samples_leaf=50, class_weight="balanced", random_state=0)
    timed("DecisionTreeClassifier (all fit rows)", "tree",
          lambda: DecisionTreeClassifier(**tree).fit(Xf, yf), lambda mdl: mdl.predict(Xt), m)
    stride = max(1, m // args.tree_samples)
    idx = np.arange(0, m, stride)
    timed(f"DecisionTreeClassifier ({len(idx)} evenly spaced rows)", "tree",
          lambda: DecisionTreeClassifier(**tree).fit(Xf[idx], yf[idx]), lambda mdl: mdl.predict(Xt), len(idx))

    threads = None
    try:
        from threadpoolctl import threadpool_info
        threads = sorted({(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()})
    except Exception:  # noqa: BLE001 - informative only
        pass
    print(json.dumps({
        "rows": n, "fit_rows": m, "features": feature_cols, "read_csv_s": read_s,
        "miss_rate": float(y.mean()) if n else None,
        "versions": {"python": platform.python_version(), "sklearn": sklearn.__version__,
                     "numpy": np.__version__, "pandas": pd.__version__},
        "threadpools": threads, "models": results,
    }))


if __name__ == "__main__":
    main()
