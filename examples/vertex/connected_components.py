"""Connected components (undirected) as a vertex job, with a min combiner.

Input: edge-list lines ``A B``; each edge joins both ends. Every vertex ends with the smallest
vertex id of its component as its label.
"""

from remap.vertex import parse_edge


def prepare(line):
    edge = parse_edge(line)
    if edge is None:
        return None
    a, b, _ = edge
    if b is None:
        return (a, a, [])
    return [(a, a, [b]), (b, b, [a])]


def compute(ctx, vertex_id, value, messages):
    if ctx.superstep == 0:
        label = min([value, *ctx.targets])
        ctx.send_to_neighbors(label)
        return label, True
    label = min(messages)
    if label < value:
        ctx.send_to_neighbors(label)
        return label, True
    return value, True


combine = min


def output(vertex_id, value):
    return f"{vertex_id}\t{value}"
