"""scikit-learn's GridSearchCV(n_jobs=-1) on remap's joblib backend against loky, same run.

    python bench/gridsearch.py [--rounds 3]

Both use every CPU: loky's default, and remap's embedded cluster (every CPU by default).
Each round runs loky then remap on the same grid; the table shows the median wall time of
each, their ratio, and whether the cross-validation scores are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import joblib
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import remap
import remap.joblib


def search(backend: str, cluster: remap.Cluster | None) -> tuple[float, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    grid = {"C": [0.5, 1, 2, 4, 8, 16], "gamma": [0.0005, 0.001, 0.002, 0.004]}
    gs = GridSearchCV(SVC(), grid, cv=5, n_jobs=-1)
    kwargs = {"cluster": cluster} if cluster is not None else {}
    start = time.perf_counter()
    with joblib.parallel_backend(backend, **kwargs):
        gs.fit(X, y)
    return time.perf_counter() - start, gs.cv_results_["mean_test_score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loky_times, remap_times, same = [], [], True
    with remap.connect() as cluster:  # started once, as a session would
        search("remap", cluster)  # warm: cores import scikit-learn once
        search("loky", None)
        for _ in range(args.rounds):
            t_loky, s_loky = search("loky", None)
            t_remap, s_remap = search("remap", cluster)
            loky_times.append(t_loky)
            remap_times.append(t_remap)
            same = same and bool(np.array_equal(s_loky, s_remap))
    lo, re = statistics.median(loky_times), statistics.median(remap_times)
    print(
        "| GridSearchCV(SVC, 24 candidates × 5 folds, digits) | wall s (median) | ratio to loky |"
    )
    print("|---|---|---|")
    print(f"| loky (joblib default) | {lo:.2f} | 1.00 |")
    print(f"| remap embedded | {re:.2f} | {re / lo:.2f} |")
    print(f"identical scores: {same}; rounds: {args.rounds}; target: remap ≤ 1.10 × loky")


if __name__ == "__main__":
    main()
