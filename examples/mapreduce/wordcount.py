"""Word count: the data-job hello world (``remap compute examples/mapreduce/wordcount.yaml``)."""

import re

from remap.data import count

WORD = re.compile(r"[a-z']+")


def map(line):
    words = WORD.findall(line.lower())
    if not words:
        count("blank_lines")
    for word in words:
        yield word, 1


def combine(word, counts):
    yield sum(counts)


def reduce(word, counts):
    yield word, sum(counts)
