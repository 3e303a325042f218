"""Single-source shortest paths on a weighted directed graph (a vertex job).

Input: lines ``SRC DST WEIGHT`` (weight optional, default 1). The source is vertex ``SOURCE``;
vertices it cannot reach are written as ``unreachable``.
"""

import math

from remap.vertex import parse_edge

SOURCE = 0


def prepare(line):
    edge = parse_edge(line)
    if edge is None:
        return None
    src, dst, weight = edge
    if dst is None:
        return (src, math.inf, [])
    return [(src, math.inf, [(dst, 1 if weight is None else weight)]), (dst, math.inf, [])]


def compute(ctx, vertex_id, value, messages):
    best = min(messages, default=math.inf)
    if ctx.superstep == 0 and vertex_id == SOURCE:
        best = 0
    if best < value:
        for target, weight in ctx.edges:
            ctx.send(target, best + weight)
        return best, True
    return value, True


combine = min


def output(vertex_id, value):
    return f"{vertex_id}\t{'unreachable' if value == math.inf else value}"
