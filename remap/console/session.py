"""A console session: one connection (or embedded cluster) reused by every command."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.options import JobOptions

from .. import bundle, discovery, runtime
from ..api import function_blob
from ..auth import SecretMissing
from ..client import ClusterClient, JobStream, read_into
from ..dial import connect_console
from ..errors import ConfigError
from ..jobfile import JobSpec, count_arguments, iter_arguments, load_callables
from ..net import tls_enabled
from ..settings import Settings, env_search_text
from ..sinks import Sink, make_sink

if TYPE_CHECKING:
    from ..cluster import EmbeddedCluster


def job_blob(spec: JobSpec) -> bytes:
    """A job file's callables pickled (or one line saying which cannot travel), with its
    modules and files (see :mod:`remap.bundle`)."""
    fn, reduce_fn = load_callables(spec)
    blob = function_blob(fn, reduce_fn, name=getattr(fn, "__qualname__", repr(fn)))
    return bundle.wrap(blob, bundle.collect(spec.modules, spec.files, spec.base_dir))


class Session:
    """Owns the reactor-side objects; every public method blocks the calling thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        announce: Callable[[str], None] | None = None,
        env_searched: Sequence[Path] = (),
        embedded_for_requests: bool = False,
    ) -> None:
        self.settings = settings
        #: where a .env was looked for, in order (for the "no secret" error)
        self.env_searched = list(env_searched)
        #: the shell: status before any compute starts the embedded cluster rather than failing
        self.embedded_for_requests = embedded_for_requests
        self.client: ClusterClient | None = None
        self.embedded: EmbeddedCluster | None = None
        self.announce = announce or (lambda text: print(text, file=sys.stderr))
        self.found: discovery.Found | None = None

    def locate(self) -> str | None:
        """The server's address: configured, or found once by discovery (see discovery.wanted)."""
        if self.found is None:
            self.settings, self.found = discovery.locate(
                self.settings, self.announce, want_tls=tls_enabled(self.settings)
            )
        return self.settings.server

    # ------------------------------------------------------------------ connection

    def connected(self) -> bool:
        return self.client is not None and self.client.link is not None

    def connect(self, *, allow_embedded: bool) -> ClusterClient:
        if self.connected():
            return self.client  # type: ignore[return-value]
        if self.locate():
            try:
                self.client = runtime.run(
                    connect_console, runtime.reactor(), self.settings, self.settings.server
                )
            except SecretMissing as exc:
                raise SecretMissing(f"{exc}; {env_search_text(self.env_searched)}") from None
        elif self.embedded is not None or allow_embedded:
            if self.embedded is None:
                from ..cluster import EmbeddedCluster  # the composition root: only when embedded

                self.embedded = EmbeddedCluster(runtime.reactor(), self.settings)
                address = runtime.run(self.embedded.start)
                why = "no server configured"
                if self.found is not None:
                    why = self.found.failure().partition("; pass")[0]
                self.announce(
                    f"{why}: started an embedded local cluster with "
                    f"{self.embedded.cores} cores on {address}"
                )
            self.client = runtime.run(self.embedded.connect)
        elif self.found is not None:
            raise ConfigError(self.found.failure())
        else:
            raise ConfigError(
                "no server configured: pass --server HOST:PORT or set REMAP_SERVER "
                "(compute alone runs on an embedded local cluster)"
            )
        return self.client

    def dashboard_link(self, http_port: int | None = None) -> str:
        """A one-time login link: the embedded cluster serves a dashboard (in the shell with no
        server it starts, as for status); a server is asked."""
        if self.embedded is None and not self.settings.server and self.embedded_for_requests:
            self.connect(allow_embedded=True)
        if self.embedded is not None:
            return runtime.run(self.embedded.start_dashboard, timeout=10)
        from .dashboard import login_link

        return login_link(self.settings, http_port)

    def can_request(self) -> bool:
        """Whether a request would reach a cluster without starting anything new."""
        return self.connected() or (self.settings.server is None and self.embedded is not None)

    def close(self) -> None:
        if self.client is not None:
            runtime.run(self.client.close, timeout=5)
        if self.embedded is not None:
            with contextlib.suppress(Exception):  # shutting down anyway; children die with us
                runtime.run(self.embedded.stop, timeout=15)
            self.embedded = None
        self.client = None

    def request(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        client = self.connect(allow_embedded=self.embedded_for_requests)
        return runtime.run(lambda: getattr(client, method)(*args), timeout=timeout)

    # ------------------------------------------------------------------ jobs

    def start_job(
        self,
        spec: JobSpec,
        *,
        keep_arguments: bool = False,
        detach: bool = False,
        wait_for_nodes: float | None = None,
        on_notice: Callable[[str], None] | None = None,
        on_output: Callable[[int, str], None] | None = None,
    ) -> JobStream:
        """Submit a job; its results are taken on the caller's thread (``stream.collect``).

        ``keep_arguments``: the sink stores arguments; ``on_notice`` and ``on_output`` run on
        the reactor thread and must only queue their text.
        """
        blob = job_blob(spec)
        client = self.connect(allow_embedded=True)
        detach = detach or spec.options.detach
        stream = JobStream(
            blob,
            replace(spec.options, detach=detach, wait_for_nodes=wait_for_nodes),
            call_soon=runtime.reactor().callFromThread,
            total_hint=count_arguments(spec),
            keep_arguments=keep_arguments,
            runs=True,
            on_notice=on_notice,
            on_output=on_output,
            # a detached job's results stay on the server: nothing is held here
            result_buffer=0 if detach else self.settings.result_buffer,
        ).start(client)
        # read and pickled on a thread of their own: a slow pipe must not stop the network
        read_into(stream, iter_arguments(spec, max_line=client.frame_room()))
        return stream

    def attach(self, job: int) -> JobStream:
        client = self.connect(allow_embedded=False)
        stream = JobStream(
            b"",
            JobOptions(),
            call_soon=runtime.reactor().callFromThread,
            result_buffer=self.settings.result_buffer,
        )
        return stream.attach(client, job)


def make_job_sink(spec: JobSpec, *, on_item: Any = None) -> Sink:
    mode = spec.options.mode
    return make_sink(
        mode,
        output=spec.output,
        reduce_fn=load_callables(spec)[1] if mode == "reduce" else None,
        on_item=on_item,
    )
