"""``remap-server``: parse flags and settings, listen, run until stopped."""

from __future__ import annotations

import argparse
import sys

from twisted.internet import defer

from protocol.connection import person_key

from ..auth import client_secret
from ..cluster import Stopping, start_server
from ..discovery import SERVICE_TYPE, Advertiser
from ..entry import daemon_settings, react_main, run_until_stopped
from ..errors import ConfigError, RemapError, one_line
from ..malloc import keep_freed_memory
from ..net import tls_enabled
from ..settings import load_settings, locate_env_file, settings_help
from ..systemd import unit_args, unit_text
from .drivers import child_dial_host
from .exclusion import ExclusionList, state_dir
from .http import start_http
from .journal import Journal
from .statelock import StateLock
from .trusted import CLUSTER_FILE, HTTP_FILE, KeptSources


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remap-server",
        description="The remap server: nodes and consoles connect here.",
        epilog=settings_help("server"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        help="address to bind (default 127.0.0.1; REMAP_HOST). A non-loopback "
        "address needs REMAP_SECRET_KEY",
    )
    p.add_argument("--port", type=int, help="port (default 7878; REMAP_PORT; 0 picks a free one)")
    p.add_argument(
        "--http-port",
        type=int,
        help="serve the HTTP API and dashboard on this port (REMAP_HTTP_PORT; 0 picks a free one)",
    )
    p.add_argument(
        "--http-host", help="address the HTTP API binds (default 127.0.0.1; REMAP_HTTP_HOST)"
    )
    p.add_argument("--env-file", help="settings file (default: the first of ./.env, ~/.remap/.env)")
    p.add_argument("--log-level", help="debug, info, warn, error (default info)")
    p.add_argument(
        "--print-systemd-unit",
        action="store_true",
        help="print a systemd unit that runs this command as a service, and exit",
    )
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.add_argument(
        "--issue-key",
        metavar="NAME",
        help="print the key person NAME puts in REMAP_SECRET_KEY (with REMAP_USER=NAME), derived "
        "from the cluster secret, and exit",
    )
    return p


def issue_key(args: argparse.Namespace) -> int:
    """Print a person's key: a keyed hash of the name the server recomputes at each handshake."""
    try:
        settings = load_settings({}, dotenv_path=locate_env_file(args.env_file)[0])
        key = person_key(client_secret(settings), args.issue_key)
    except (RemapError, ValueError) as exc:
        print(one_line(ConfigError(str(exc)))[0], file=sys.stderr)
        return 2
    print(key.decode())
    print(
        f"give it to {args.issue_key} with REMAP_USER={args.issue_key}; it can run, kill and "
        "attach to its own jobs only",
        file=sys.stderr,
    )
    return 0


def say(line: str) -> None:
    """A line for the operator, on stderr at once (logs go there too)."""
    print(line, file=sys.stderr, flush=True)


async def serve(reactor, args: argparse.Namespace) -> int:
    settings = daemon_settings(
        args, host=args.host, port=args.port, http_port=args.http_port, http_host=args.http_host
    )
    # before listening: a second server on this state directory is refused, not half started
    lock = StateLock(state_dir(settings))
    lock.acquire()
    try:
        server = await start_server(reactor, settings)
    except BaseException:
        lock.release()
        raise
    Stopping("state lock", lock.release).setServiceParent(server)  # added first: let go last
    server.factory.use_exclusions(ExclusionList.for_settings(settings))
    keep_trusted(reactor, server, server.factory.handshaking, state_dir(settings) / CLUSTER_FILE)
    journal = Journal.for_settings(settings, reactor, threaded=True)
    server.factory.use_journal(journal)
    if journal is not None:  # detached data and vertex jobs survive a restart, as others do
        Stopping("journal", journal.close).setServiceParent(server)  # closed before the lock
        server.factory.drivers.resume_unfinished()
    port = server.port.getHost().port
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(f"{port}\n")
    say(f"remap server listening on {settings.host}:{port}")
    advertiser = await advertise(reactor, settings, server.factory.secret, port)
    if advertiser is not None:
        Stopping("advert", advertiser.stop).setServiceParent(server)
    if settings.http_port is not None:
        web = await start_http(
            reactor, settings, server.factory, server.factory.secret, cluster_port=port
        )
        Stopping("http", web.stop).setServiceParent(server)
        keep_trusted(reactor, server, web.connections, state_dir(settings) / HTTP_FILE)
        # the command in full: a console finds no server on its own (a loopback one is not
        # advertised) and cannot know the HTTP port
        again = (
            f"remap_console.py --server {child_dial_host(settings)}:{port} "
            f"dashboard --http-port {web.port.getHost().port}"
        )
        say(f"dashboard: {web.login_url()} (one-time login link; `{again}` prints a new one)")
    stopped: defer.Deferred = defer.Deferred()
    server.factory.on_stop = lambda: stopped.called or stopped.callback(None)
    # SIGTERM waits for the whole stop too: connections dropped, listening ended, then the
    # stop hooks (HTTP, advert, the journal's last commit and close, last)
    await run_until_stopped(reactor, stopped, server.stopService)
    say("remap server stopped")
    return 0


def keep_trusted(reactor, server, admission, path) -> None:
    """``admission``'s trusted sources from ``path``, and saved there until the server stops."""
    kept = KeptSources(admission, path, reactor)
    Stopping(f"trusted sources ({path.name})", kept.flush).setServiceParent(server)


async def advertise(reactor, settings, secret: bytes, port: int) -> Advertiser | None:
    """Advertise on the LAN unless told not to; a network without multicast is not fatal."""
    if not settings.discovery:
        return None
    advertiser = Advertiser(reactor, settings, secret, port)
    try:
        name = await advertiser.start(tls_enabled(settings))
    except Exception as exc:  # noqa: BLE001 - discovery is a convenience; the server still serves
        say(
            f"warning: not advertised on the LAN ({type(exc).__name__}: {exc}); nodes need --server"
        )
        return None
    if not name:
        say("not advertised on the LAN: listening on loopback only")
        return None
    short = name.removesuffix("." + SERVICE_TYPE)  # as nodes and consoles name it
    say(
        f"advertised on the LAN as {short!r} ({', '.join(advertiser.addresses)}; "
        "REMAP_DISCOVERY=off to stop)"
    )
    return advertiser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_systemd_unit:
        print(unit_text("server", unit_args(argv)), end="")
        return 0
    if args.issue_key is not None:
        return issue_key(args)
    keep_freed_memory()
    return react_main(serve, args)


def run() -> None:
    sys.exit(main())
