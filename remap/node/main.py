"""``remap-node``: start cores, connect to the server, reconnect when it goes away."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from twisted.internet import defer, threads

from .. import discovery
from ..auth import SecretMissing
from ..cluster import default_cores, start_node
from ..data.layout import PROBE_TIMEOUT, DataDir, DataDirReport, probe
from ..entry import daemon_settings, react_main, run_until_stopped
from ..errors import (
    AuthError,
    CertificateMismatch,
    RemapError,
    ServerUnreachable,
    VersionMismatch,
)
from ..malloc import keep_freed_memory
from ..net import tls_enabled
from ..settings import Settings, env_search_text, locate_env_file, settings_help
from ..systemd import unit_args, unit_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remap-node",
        description="A remap node: runs tasks on this machine's cores.",
        epilog=settings_help("node"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--server",
        help="HOST:PORT of the server (REMAP_SERVER; default: found by discovery when "
        "REMAP_SECRET_KEY is set, else 127.0.0.1:7878)",
    )
    p.add_argument(
        "--cores",
        type=int,
        help=f"cores to run (REMAP_CORES; default cpu count - 1 = {default_cores()})",
    )
    p.add_argument(
        "--name",
        help="this node's name in status and exclude/include (REMAP_NODE_NAME; "
        "default: the host name)",
    )
    p.add_argument("--group", help="node group; jobs with `group:` run only on nodes of that group")
    p.add_argument("--env-file", help="settings file (default: the first of ./.env, ~/.remap/.env)")
    p.add_argument("--log-level", help="debug, info, warn, error (default info)")
    p.add_argument(
        "--print-systemd-unit",
        action="store_true",
        help="print a systemd unit that runs this command as a service, and exit",
    )
    return p


async def serve(reactor, args: argparse.Namespace) -> int:
    settings = daemon_settings(
        args, server=args.server, cores=args.cores, group=args.group, node_name=args.name
    )
    settings = await locate(reactor, settings)
    stopped: defer.Deferred = defer.Deferred()
    refusal: list[RemapError] = []
    #: why the node stops, for its goodbye (SIGTERM and Ctrl-C stop the reactor: "stopping")
    why: list[str] = []

    def shutdown(reason: str) -> None:
        if not stopped.called:
            why.append(f"told to stop by the server: {reason}" if reason else "told to stop")
            stopped.callback(None)

    def refused(error: RemapError) -> None:
        # a wrong secret, version or server name will not fix itself by retrying: stop with
        # a clear line
        if (
            isinstance(error, (AuthError, VersionMismatch, CertificateMismatch))
            and not stopped.called
        ):
            refusal.append(error)  # said once the node has stopped: the last line
            stopped.callback(None)

    data = await probe_data_dir(reactor, settings)
    try:
        node = start_node(
            reactor, settings, on_shutdown=shutdown, on_auth_failure=refused, data=data
        )
    except SecretMissing as exc:  # say where a .env was looked for, as the console does
        searched = locate_env_file(args.env_file)[1]
        raise SecretMissing(f"{exc}; {env_search_text(searched)}") from None
    server = settings.server or f"127.0.0.1:{settings.port}"
    print(started_line(node.pool.size, server), file=sys.stderr, flush=True)
    # SIGTERM waits until the cores are reaped (their CPU time counts in the node's rusage)
    await run_until_stopped(reactor, stopped, lambda: node.stop(why[0] if why else "stopping"))
    if refusal:
        raise refusal[0]
    return 0


def started_line(cores: int, server: str) -> str:
    """The node's first line; more cores than CPUs (``--cores 100`` for 10?) is said there."""
    cpus = os.cpu_count() or 1
    over = f" (more than this machine's {cpus} CPUs: they share them)" if cores > cpus else ""
    return f"remap node: {cores} core{'s' if cores != 1 else ''}{over}, connecting to {server}"


async def probe_data_dir(reactor, settings: Settings) -> DataDirReport:
    """The data directory this node reports (read off the reactor thread: it may be NFS); one
    that does not answer in time is reported unusable."""
    root = str(DataDir.from_setting(settings.data_dir).root)
    d = threads.deferToThread(probe, settings.data_dir)
    d.addTimeout(PROBE_TIMEOUT, reactor)
    try:
        report = await d
    except defer.TimeoutError:
        report = DataDirReport(root, None, f"no answer in {PROBE_TIMEOUT:g}s")
    if report.error:
        print(
            f"remap node: left out of file jobs: cannot use the data directory {root}: "
            f"{report.error}",
            file=sys.stderr,
            flush=True,
        )
    return report


async def locate(reactor, settings: Settings) -> Settings:
    """Settings with the server to dial: as configured, or found by discovery (one clear line
    and exit code 4 when discovery finds none of this cluster's servers in time)."""
    if not discovery.wanted(settings):
        return settings
    print(
        f"remap node: looking for this cluster's server on the LAN "
        f"(up to {settings.discovery_timeout:g}s)",
        file=sys.stderr,
        flush=True,
    )
    found = await discovery.discover(
        reactor, settings, settings.secret.encode(), want_tls=tls_enabled(settings)
    )
    for line in found.lines():
        print(line, file=sys.stderr, flush=True)
    if found.chosen is None:
        raise ServerUnreachable(found.failure())
    return replace(settings, server=found.chosen.address)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_systemd_unit:
        print(unit_text("node", unit_args(argv)), end="")
        return 0
    keep_freed_memory()
    return react_main(serve, args)


def run() -> None:
    sys.exit(main())
