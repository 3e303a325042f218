"""Inverted index with two reducer sets: word -> documents, and a document-length histogram.

``map`` yields ``(key, value)`` for the default set and ``("lengths", key, value)`` for the
second one; ``reduce_lengths`` reduces that set (``reduce`` the default one).
"""

import os
import re

WORD = re.compile(r"[a-z']+")


def read(path):
    """One record per document: its name and its whole text (documents are small)."""
    with open(path, encoding="utf-8") as f:
        yield os.path.basename(path), f.read()


def map(document):
    name, text = document
    words = WORD.findall(text.lower())
    for word in sorted(set(words)):
        yield word, name
    yield "lengths", len(words) // 10 * 10, 1


def reduce(word, names):
    yield word, " ".join(sorted(set(names)))


def combine_lengths(bucket, ones):
    yield sum(ones)


def reduce_lengths(bucket, counts):
    yield f"{bucket}-{bucket + 9} words", sum(counts)
