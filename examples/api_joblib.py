"""joblib on a cluster: import remap.joblib, then use the "remap" backend.

Run: python examples/api_joblib.py   (needs joblib: pip install joblib)
"""

import joblib
from joblib import Parallel, delayed

import remap
import remap.joblib  # registers the "remap" backend


def digit_sum_of_power(n: int) -> int:
    """The sum of the decimal digits of 2**n."""
    return sum(int(d) for d in str(2**n))


if __name__ == "__main__":
    with remap.connect(cores=2) as cluster:
        with joblib.parallel_backend("remap", cluster=cluster):
            print("n_jobs=-1 means", joblib.effective_n_jobs(-1), "cores")
            sums = Parallel(n_jobs=-1)(delayed(digit_sum_of_power)(n) for n in range(5000))
            print("digit sum of 2**1000:", sums[1000])
