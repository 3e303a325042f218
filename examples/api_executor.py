"""remap.Executor: the concurrent.futures interface on a cluster.

Run: python examples/api_executor.py
"""

import concurrent.futures
import math

import remap


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def risky(x: int) -> float:
    return 1 / x


if __name__ == "__main__":
    with remap.Executor(max_workers=2) as executor:  # an embedded cluster with 2 cores
        futures = {executor.submit(is_prime, n): n for n in range(10**6, 10**6 + 200)}
        primes = sorted(futures[f] for f in concurrent.futures.as_completed(futures) if f.result())
        print(f"{len(primes)} primes just above a million, the first {primes[0]}")

        print("map:", list(executor.map(pow, [2, 3, 4], [5, 5, 5], timeout=60)))

        future = executor.submit(risky, 0)
        try:
            future.result(timeout=60)
        except ZeroDivisionError as exc:  # the remote exception, same type
            print("remote error:", repr(exc))
            print(exc.__cause__)  # the traceback from the core
