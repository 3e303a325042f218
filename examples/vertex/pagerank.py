"""PageRank as a vertex job: ``python remap_console.py compute examples/vertex/pagerank.yaml``.

Input: edge-list lines ``SRC DST`` (``#`` comments allowed). Every vertex starts at 1/N; a
vertex without out-edges (dangling) gives its rank to everyone through the ``dangling``
aggregator, as networkx does. The job stops when the ranks stop changing (the ``change``
aggregator) or at ``max_supersteps``.
"""

from remap.vertex import parse_edge

DAMPING = 0.85
TOLERANCE = 1e-13  # total absolute change of all ranks below which every vertex halts

aggregators = {"dangling": "sum", "change": "sum"}


def prepare(line):
    edge = parse_edge(line)
    if edge is None:
        return None
    src, dst, _ = edge
    if dst is None:
        return (src, None, [])
    return [(src, None, [dst]), (dst, None, [])]


def compute(ctx, vertex_id, value, messages):
    n = ctx.num_vertices
    if ctx.superstep == 0:
        rank = 1.0 / n
    else:
        change = ctx.aggregated("change")
        if ctx.superstep > 1 and change is not None and change < TOLERANCE:
            return value, True  # converged: halt without sending
        spread = ctx.aggregated("dangling", 0.0) / n
        rank = (1.0 - DAMPING) / n + DAMPING * (sum(messages) + spread)
        ctx.aggregate("change", abs(rank - value))
    targets = ctx.targets
    if targets:
        share = rank / len(targets)
        ctx.send_to_neighbors(share)
    else:
        ctx.aggregate("dangling", rank)
    return rank, False


combine = "sum"  # or any function of a list of messages; sum/min/max fold as they are sent


def output(vertex_id, value):
    return f"{vertex_id}\t{value:.12e}"
