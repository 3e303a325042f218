"""Graphs for the vertex-job tests: networkx graphs written as edge-list files, and the
example programs loaded as modules."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import networkx as nx

from remap.vertex.program import Program, program_from_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "vertex"


def example(name: str) -> Program:
    spec = importlib.util.spec_from_file_location(f"vertex_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return program_from_module(module)


def edge_lines(graph: nx.Graph, weight: str | None = None) -> list[str]:
    """One line per edge (isolated vertices as a line of their own), in a shuffled order."""
    lines = []
    for u, v, data in graph.edges(data=True):
        lines.append(f"{u} {v} {data[weight]}" if weight else f"{u} {v}")
    lines += [str(v) for v in graph.nodes if graph.degree(v) == 0]
    random.Random(7).shuffle(lines)
    return lines


def write_files(directory: Path, lines: list[str], files: int) -> list[Path]:
    """Spread lines over ``files`` files (round robin), so one vertex's edges are split."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"part-{i}.txt" for i in range(files)]
    for i, path in enumerate(paths):
        path.write_text("".join(line + "\n" for line in lines[i::files]))
    return paths


def power_law_digraph(n: int, seed: int) -> nx.DiGraph:
    """A directed scale-free graph without parallel edges, with dangling vertices."""
    g = nx.DiGraph(nx.scale_free_graph(n, seed=seed))
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    return g


def parse_output(lines: list[str]) -> dict[int, str]:
    out = {}
    for line in lines:
        vid, value = line.split("\t")
        out[int(vid)] = value
    return out
