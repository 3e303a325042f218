"""Single-source shortest paths on a weighted directed graph (a vertex job).

Input: lines ``SRC DST WEIGHT`` (weight optional, default 1). The source is vertex ``SOURCE``;
vertices it cannot reach are written as ``unreachable``.
"""

import math

SOURCE = 0


def _number(text):
    value = float(text)
    return int(value) if value.is_integer() else value


def prepare(line):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    src = int(fields[0])
    if len(fields) == 1:
        return (src, math.inf, [])
    dst = int(fields[1])
    weight = _number(fields[2]) if len(fields) > 2 else 1
    return [(src, math.inf, [(dst, weight)]), (dst, math.inf, [])]


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
