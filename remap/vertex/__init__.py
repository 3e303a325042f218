"""Vertex jobs: Pregel-style supersteps over a partitioned graph (issue 12)."""

from __future__ import annotations

#: supersteps a vertex job runs at most unless told (API, job files and VertexConfig alike)
DEFAULT_MAX_SUPERSTEPS = 30


def parse_edge(line: str) -> tuple[int, int | None, float | int | None] | None:
    """``SRC [DST [WEIGHT]]`` of an edge-list line as numbers (None for blank and ``#`` lines);
    a whole-number weight stays an ``int``, so sums of weights stay exact."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    src = int(fields[0])
    dst = int(fields[1]) if len(fields) > 1 else None
    weight = None
    if len(fields) > 2:
        value = float(fields[2])
        weight = int(value) if value.is_integer() else value
    return src, dst, weight
