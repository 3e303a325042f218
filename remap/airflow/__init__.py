"""An Airflow provider for remap: a hook, a deferrable operator and its trigger.

Installed with ``pip install -e ".[airflow]"``; Airflow finds it through the
``apache_airflow_provider`` entry point, which calls :func:`get_provider_info`. This module
imports nothing from Airflow so that the entry point is cheap to load.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """What Airflow lists for this provider (connection type, hook, operator, trigger)."""
    from .. import __version__

    return {
        "package-name": "remap",
        "name": "remap",
        "description": "Run a remap job file on a remap cluster as one task of a DAG.",
        "versions": [__version__],
        "connection-types": [
            {"connection-type": "remap", "hook-class-name": "remap.airflow.hooks.RemapHook"}
        ],
        "hooks": [{"integration-name": "remap", "python-modules": ["remap.airflow.hooks"]}],
        "operators": [{"integration-name": "remap", "python-modules": ["remap.airflow.operators"]}],
        "triggers": [{"integration-name": "remap", "python-modules": ["remap.airflow.triggers"]}],
    }
