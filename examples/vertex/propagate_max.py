"""The classic Pregel example: every vertex learns the largest value that can reach it.

Input: edge-list lines ``SRC DST`` (directed). A vertex's starting value is its own id, so a
vertex ends with the largest id among the vertices with a path to it (itself included).
"""


def prepare(line):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    src = int(fields[0])
    if len(fields) == 1:
        return (src, src, [])
    dst = int(fields[1])
    return [(src, src, [dst]), (dst, dst, [])]


def compute(ctx, vertex_id, value, messages):
    best = max([value, *messages])
    if ctx.superstep == 0 or best > value:
        ctx.send_to_neighbors(best)
    return best, True


combine = max


def output(vertex_id, value):
    return f"{vertex_id}\t{value}"
