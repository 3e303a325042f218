"""The ``remap`` connection type: host, HTTP port, token as the password, TLS CA in extras."""

from __future__ import annotations

from typing import Any

try:  # Airflow 3
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 2
    from airflow.hooks.base import BaseHook

from .api import RemapApi


class RemapHook(BaseHook):
    """Talks to a remap server's HTTP API (``remap-server --http-port``).

    Connection: ``host``, ``port`` (the HTTP port, 7880 by default), ``password`` (the API
    token, ``remap dashboard --token``), ``schema`` ``https`` or ``http`` (https when a CA is
    given), extra ``{"ca_file": "/path/ca.pem"}`` for a private CA.
    """

    conn_name_attr = "remap_conn_id"
    default_conn_name = "remap_default"
    conn_type = "remap"
    hook_name = "remap"

    def __init__(self, remap_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.remap_conn_id = remap_conn_id

    def get_conn(self) -> RemapApi:
        conn = self.get_connection(self.remap_conn_id)
        extra = conn.extra_dejson or {}
        ca_file = extra.get("ca_file")
        scheme = conn.schema or ("https" if ca_file else "http")
        port = conn.port or 7880
        return RemapApi(f"{scheme}://{conn.host}:{port}", conn.password or "", ca_file=ca_file)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["login"],
            "relabeling": {"password": "API token", "port": "HTTP port", "schema": "http/https"},
            "placeholders": {"extra": '{"ca_file": "/etc/remap/ca.pem"}', "port": "7880"},
        }
