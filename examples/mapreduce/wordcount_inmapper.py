"""Word count with in-mapper combining: each map task counts in a Counter and emits it once.

``map_init`` runs before a task's first record and ``map_final`` after its last; what
``map_final`` returns is map output like ``map``'s. Counting in C (``Counter.update``) instead
of yielding one pair per word takes about half the CPU on the map side.
"""

import re
from collections import Counter

WORD = re.compile(r"[a-z']+")
COUNTS: Counter = Counter()


def map_init():
    COUNTS.clear()


def map(line):
    COUNTS.update(WORD.findall(line.lower()))  # yields nothing: None is fine


def map_final():
    return COUNTS.items()


def combine(word, counts):
    yield sum(counts)


def reduce(word, counts):
    yield word, sum(counts)
