"""A word count slow enough that a node can be killed mid-map and mid-reduce (chaos tests)."""

import time

MAP_DELAY = 0.004  # seconds per line
REDUCE_DELAY = 0.015  # seconds per key


def map(line):
    time.sleep(MAP_DELAY)
    for word in line.split():
        yield word, 1


def combine(word, counts):
    yield sum(counts)


def reduce(word, counts):
    time.sleep(REDUCE_DELAY)
    yield word, sum(counts)
