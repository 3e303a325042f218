"""The classic Pregel example: every vertex learns the largest value that can reach it.

Input: edge-list lines ``SRC DST`` (directed). A vertex's starting value is its own id, so a
vertex ends with the largest id among the vertices with a path to it (itself included).
"""

from remap.vertex import parse_edge


def prepare(line):
    edge = parse_edge(line)
    if edge is None:
        return None
    src, dst, _ = edge
    if dst is None:
        return (src, src, [])
    return [(src, src, [dst]), (dst, dst, [])]


def compute(ctx, vertex_id, value, messages):
    best = max([value, *messages])
    if ctx.superstep == 0 or best > value:
        ctx.send_to_neighbors(best)
    return best, True


combine = max


def output(vertex_id, value):
    return f"{vertex_id}\t{value}"
