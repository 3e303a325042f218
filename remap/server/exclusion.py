"""The server's persistent list of excluded hosts: connected nodes there get no work.

Kept in ``REMAP_STATE_DIR`` across restarts, so a machine someone needs back stays out until
included again; by host name (what ``status`` shows), which survives a node's restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import layout
from ..errors import ConfigError
from ..settings import Settings

FILE_NAME = "excluded-nodes.json"


def state_dir(settings: Settings) -> Path:
    return Path(settings.state_dir or "~/.remap").expanduser()


class ExclusionList:
    """Host names, kept in ``path`` (None: in memory only, as for the embedded cluster)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.hosts: frozenset[str] = frozenset()
        if path is not None and path.exists():
            self.hosts = self._read(path)

    @classmethod
    def for_settings(cls, settings: Settings) -> ExclusionList:
        return cls(state_dir(settings) / FILE_NAME)

    @staticmethod
    def _read(path: Path) -> frozenset[str]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the excluded-node list {path}: {exc}") from None
        hosts = data.get("excluded") if isinstance(data, dict) else None
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise ConfigError(
                f'excluded-node list {path}: expected {{"excluded": [host names]}}; fix or delete it'
            )
        return frozenset(hosts)

    def change(self, host: str, excluded: bool) -> bool:
        """Add or remove ``host``; save; True if the list changed."""
        hosts = self.hosts | {host} if excluded else self.hosts - {host}
        if hosts == self.hosts:
            return False
        if self.path is not None:
            self._write(self.path, hosts)
        self.hosts = hosts
        return True

    @staticmethod
    def _write(path: Path, hosts: frozenset[str]) -> None:
        """Write whole or not at all (rename), so a crash never leaves half a list."""
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            layout.write_json(path, {"excluded": sorted(hosts)})
        except OSError as exc:
            raise ConfigError(f"cannot save the excluded-node list {path}: {exc}") from None
