"""The default job's functions: a readable example of what a job runs.

``collatz_steps`` is called once per argument on some core of the cluster; it must
be a plain function of its argument (and should be idempotent: after a node is lost
a call may run again). ``add`` folds results in ``response_mode: reduce``; it must be
associative and commutative, because partial folds happen on the nodes in any order.
"""


def collatz_steps(n: int) -> int:
    """How many steps the Collatz sequence of ``n`` takes to reach 1."""
    steps = 0
    while n > 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def add(total: int, value: int) -> int:
    """Fold for reduce mode: the sum of all results."""
    return total + value
