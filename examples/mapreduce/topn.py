"""Top N items per category with a secondary sort: reduce reads only the first N values.

Input lines: ``category,item,score``. Keys ``(category, -score, item)`` sort best first;
``group`` makes one reduce call per category (and partitions by category).
"""

import itertools

N = 3


def map(line):
    category, item, score = line.split(",")
    yield (category, -int(score), item), (item, int(score))


def group(key):
    return key[0]


def reduce(category, values):
    best = itertools.islice(values, N)
    yield category, " ".join(f"{item}:{score}" for item, score in best)
