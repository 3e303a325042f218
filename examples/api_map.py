"""remap.connect: map, lazy imap over an endless generator, reduce, and the cluster's status.

Run: python examples/api_map.py   (no server configured: it starts an embedded local cluster;
set REMAP_SERVER=HOST:PORT and REMAP_SECRET_KEY to use a real one)
"""

import itertools
import operator

import remap


def collatz_steps(n: int) -> int:
    """Defined in __main__: cloudpickle ships it to the cores by value."""
    steps = 0
    while n > 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def reciprocal(x: float) -> float:
    return 1 / x


if __name__ == "__main__":
    with remap.connect(cores=2) as cluster:
        print(f"connected: {cluster} with {cluster.cores()} cores")

        steps = cluster.map(collatz_steps, range(1, 10_001))
        print(
            "longest Collatz run below 10000:",
            max(steps),
            "steps, from",
            steps.index(max(steps)) + 1,
        )

        # imap reads an endless generator lazily: at most `buffersize` ahead of what we consume
        results = cluster.imap(collatz_steps, itertools.count(1), buffersize=1000)
        for n, s in enumerate(results, start=1):
            if s > 200:
                print("first n with more than 200 steps:", n)
                break
        results.close()  # stops the job on the cluster

        print(
            "total steps 1..10000:", cluster.reduce(collatz_steps, range(1, 10_001), operator.add)
        )

        print("pairs:", cluster.starmap(operator.truediv, [(1, 2), (3, 4)]))

        try:
            cluster.map(reciprocal, [4, 2, 0, 1])
        except ZeroDivisionError as exc:  # the remote exception, raised here with its own type
            print("remote error:", repr(exc))
            print(exc.__cause__)  # the traceback from the core
