"""Vertex jobs: Pregel-style supersteps over a partitioned graph (issue 12)."""
