"""scikit-learn's GridSearchCV(n_jobs=-1) on remap's joblib backend against loky, same run.

    python bench/gridsearch.py [--rounds 3]

Both use every CPU: loky's default, and remap's embedded cluster (every CPU by default).
Each round runs loky then remap on the same grid; the table shows the median wall time of
each, their ratio, the CPU seconds this process and its child processes (loky's workers,
remap's cores) spent per search (psutil; robust to other load on the machine, unlike wall
time), the bytes remap pickled for the calls, and whether the scores are identical.
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
import remap.api
import remap.joblib

#: what remap pickled for the calls of the current search (counted around dumps_argument)
_pickled = {"calls": 0, "bytes": 0, "seconds": 0.0}
_dumps_argument = remap.api.dumps_argument


def _counting_dumps(value: object, what: object) -> bytes:
    start = time.perf_counter()
    blob = _dumps_argument(value, what)  # type: ignore[arg-type]
    _pickled["seconds"] += time.perf_counter() - start
    _pickled["calls"] += 1
    _pickled["bytes"] += len(blob)
    return blob


remap.api.dumps_argument = _counting_dumps


def cpu_seconds() -> float:
    """CPU time of this process and every descendant alive now (loky workers, remap cores)."""
    try:
        import psutil
    except ImportError:  # pip install -e ".[bench]"
        return float("nan")
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total


def search(backend: str, cluster: remap.Cluster | None) -> tuple[float, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    grid = {"C": [0.5, 1, 2, 4, 8, 16], "gamma": [0.0005, 0.001, 0.002, 0.004]}
    gs = GridSearchCV(SVC(), grid, cv=5, n_jobs=-1)
    kwargs = {"cluster": cluster} if cluster is not None else {}
    start = time.perf_counter()
    with joblib.parallel_backend(backend, **kwargs):
        gs.fit(X, y)
    return time.perf_counter() - start, gs.cv_results_["mean_test_score"]


def measured(backend: str, cluster: remap.Cluster | None) -> tuple[float, float, np.ndarray]:
    """Wall seconds, CPU seconds (this process and its children), scores."""
    cpu = cpu_seconds()
    wall, scores = search(backend, cluster)
    return wall, cpu_seconds() - cpu, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loky_times, remap_times, loky_cpu, remap_cpu, same = [], [], [], [], True
    with remap.connect() as cluster:  # started once, as a session would
        search("remap", cluster)  # warm: cores import scikit-learn once
        search("loky", None)
        for _ in range(args.rounds):
            t_loky, c_loky, s_loky = measured("loky", None)
            _pickled.update(calls=0, bytes=0, seconds=0.0)
            t_remap, c_remap, s_remap = measured("remap", cluster)
            loky_times.append(t_loky)
            remap_times.append(t_remap)
            loky_cpu.append(c_loky)
            remap_cpu.append(c_remap)
            same = same and bool(np.array_equal(s_loky, s_remap))
        cores = cluster.cores()
    lo, re = statistics.median(loky_times), statistics.median(remap_times)
    lc, rc = statistics.median(loky_cpu), statistics.median(remap_cpu)
    print(
        "| GridSearchCV(SVC, 24 candidates × 5 folds, digits) | wall s (median) "
        "| ratio to loky | CPU s per search (median) |"
    )
    print("|---|---|---|---|")
    print(f"| loky (joblib default) | {lo:.2f} | 1.00 | {lc:.2f} |")
    print(f"| remap embedded ({cores} cores) | {re:.2f} | {re / lo:.2f} | {rc:.2f} |")
    print(
        f"remap pickled {_pickled['calls']} calls, {_pickled['bytes'] / 1e6:.1f} MB in "
        f"{_pickled['seconds']:.2f} s (last round); identical scores: {same}; "
        f"rounds: {args.rounds}; target: remap ≤ 1.10 × loky"
    )


if __name__ == "__main__":
    main()
