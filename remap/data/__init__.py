"""Data jobs: map/reduce over files in a data directory every node sees.

User modules may call :func:`count` to add to a job's counters.
"""

from __future__ import annotations

from .counters import count

__all__ = ["count"]
