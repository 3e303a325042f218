"""Connected components (undirected) as a vertex job, with a min combiner.

Input: edge-list lines ``A B``; each edge joins both ends. Every vertex ends with the smallest
vertex id of its component as its label.
"""


def prepare(line):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    a = int(fields[0])
    if len(fields) == 1:
        return (a, a, [])
    b = int(fields[1])
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
