"""Discovery with a fake zeroconf (no multicast): match, mismatch, two matches, none, off.

No test here depends on how fast the machine is: browsing reads the fake network's clock,
which stands still until every advert has been announced and resolved (however late the
announcing thread runs) and then jumps past any bound; real waits have generous deadlines.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted

from protocol.messages import PROTOCOL_VERSION
from remap import discovery
from remap.console.session import Session
from remap.discovery import Advert, advert_tag, browse, cluster_id
from remap.errors import ConfigError
from remap.settings import load_settings

SECRET = b"the right secret"
OTHER = b"another cluster's secret"


def advert(name: str, host: str, secret: bytes = SECRET, **kw: Any) -> Advert:
    """What a server holding ``secret`` advertises: its id, and its address vouched for."""
    version = kw.pop("version", PROTOCOL_VERSION)
    tls = kw.pop("tls", False)
    port = kw.pop("port", 7878)
    return Advert(
        name=f"{name}.{discovery.SERVICE_TYPE}",
        host=host,
        port=port,
        cluster=cluster_id(secret),
        version=version,
        tls=tls,
        at=(host,),
        tag=advert_tag(secret, version, tls, port, (host,)),
        **kw,
    )


#: how long browsing may wait in real time for the fake network's thread (a loaded machine)
PATIENCE = 60.0
#: the fake clock once everything was announced: past every bound a test sets
LATER = 1e9


@dataclass
class FakeNetwork:
    """Announces its adverts from a thread of its own, like zeroconf's browser does.

    :meth:`clock` is browsing's clock: 0 until every advert was resolved, then :data:`LATER`,
    so a settle or a timeout only ends a browse once the network has said everything."""

    adverts: list[Advert]
    started_on: list[str] = field(default_factory=list)
    closed: bool = False
    resolved: set[str] = field(default_factory=set)

    def start(self, on_name: Any) -> None:
        self.started_on.append(threading.current_thread().name)
        names = [a.name for a in self.adverts]
        threading.Thread(target=lambda: [on_name(n) for n in names], daemon=True).start()

    def resolve(self, name: str, timeout: float) -> Advert | None:
        self.resolved.add(name)
        return next((a for a in self.adverts if a.name == name), None)

    def clock(self) -> float:
        return LATER if self.resolved >= {a.name for a in self.adverts} else 0.0

    def close(self) -> None:
        self.closed = True


def test_cluster_id_is_keyed_and_reveals_nothing():
    """The id is stable for a secret, differs between secrets, and does not contain it."""
    assert cluster_id(SECRET) == cluster_id(SECRET)
    assert cluster_id(SECRET) != cluster_id(OTHER)
    assert len(cluster_id(SECRET)) == 16
    assert SECRET.hex()[:8] not in cluster_id(SECRET)


def test_match_is_chosen_and_said():
    """One server of our cluster: it is chosen and the line names it and its address."""
    net = FakeNetwork([advert("remap on a", "10.9.0.2")])
    found = browse(net, SECRET, timeout=PATIENCE, settle=0.05, clock=net.clock)
    assert found.chosen is not None and found.chosen.address == "10.9.0.2:7878"
    assert found.lines() == [
        "discovery: chose server 'remap on a' at 10.9.0.2:7878 (cluster id matches)"
    ]
    assert net.closed


def test_a_match_ends_the_browse_early():
    """Once a match settles, browsing stops without waiting out the bound (an hour here, on
    the real clock; the test waits a minute for it)."""
    found: list[Any] = []
    net = FakeNetwork([advert("a", "10.9.0.2")])
    browsing = threading.Thread(
        target=lambda: found.append(browse(net, SECRET, timeout=3600, settle=0.05)), daemon=True
    )
    browsing.start()
    browsing.join(PATIENCE)
    assert not browsing.is_alive(), "the browse waited out its bound after a match"
    assert found[0].chosen is not None and found[0].chosen.host == "10.9.0.2"


def test_mismatch_is_listed_and_not_chosen():
    """A server of another cluster is seen, named with the reason, and never chosen."""
    net = FakeNetwork([advert("theirs", "10.9.0.3", secret=OTHER)])
    found = browse(net, SECRET, timeout=PATIENCE, clock=net.clock)
    assert found.chosen is None
    assert found.lines() == [
        "discovery: ignored server 'theirs' at 10.9.0.3:7878: another cluster "
        "(its cluster id does not match this secret)"
    ]
    assert "saw 'theirs' at 10.9.0.3:7878: another cluster" in found.failure()


def test_match_beside_mismatch_and_other_versions():
    """Ours is chosen; another cluster's and an incompatible version's are listed as ignored."""
    net = FakeNetwork(
        [
            advert("theirs", "10.9.0.3", secret=OTHER),
            advert("old", "10.9.0.4", version=PROTOCOL_VERSION + 1),
            advert("ours", "10.9.0.2"),
            advert("tls", "10.9.0.5", tls=True),
        ]
    )
    found = browse(net, SECRET, timeout=PATIENCE, settle=PATIENCE, clock=net.clock)
    assert found.chosen is not None and found.chosen.host == "10.9.0.2"
    reasons = {a.host: why for a, why in found.ignored}
    assert "another cluster" in reasons["10.9.0.3"]
    assert "protocol version" in reasons["10.9.0.4"]
    assert "requires TLS" in reasons["10.9.0.5"]


def test_two_matches_pick_one_and_say_so():
    """Two servers of our cluster: browsing waits for the second to settle, the first by
    name is chosen, and the line names the other."""
    net = FakeNetwork([advert("remap on b", "10.9.0.6"), advert("remap on a", "10.9.0.2")])
    found = browse(net, SECRET, timeout=PATIENCE, settle=PATIENCE, clock=net.clock)
    assert found.chosen is not None and found.chosen.host == "10.9.0.2"
    assert [a.host for a in found.also_matching] == ["10.9.0.6"]
    lines = found.lines()
    assert "2 servers of this cluster answered" in lines[1]
    assert "'remap on b' at 10.9.0.6:7878" in lines[1] and "--server" in lines[1]


def test_none_gives_up_after_the_bound_with_one_clear_line():
    """Nobody answers: browse waits out the bound (never less), and the failure is one line
    with advice."""
    start = time.monotonic()
    found = browse(FakeNetwork([]), SECRET, timeout=0.4)
    assert time.monotonic() - start >= 0.35
    assert found.chosen is None and found.lines() == []
    text = found.failure()
    assert "\n" not in text
    assert "within 0.4s (no remap server answered)" in text and "--server" in text
    assert "--server 127.0.0.1:7878" in text, "a server on loopback is never found: say so"


def test_the_bound_ends_a_browse_that_keeps_hearing_other_clusters():
    """Servers of other clusters keep answering: the browse still ends at its bound (on its
    clock, ten seconds a reading here), having listed only those it heard before it."""
    net = FakeNetwork([advert(f"theirs{i}", f"10.9.1.{i}", secret=OTHER) for i in range(50)])
    readings = iter(range(0, 10**6, 10))
    found = browse(net, SECRET, timeout=100, clock=lambda: float(next(readings)))
    assert found.chosen is None
    assert 0 < len(found.ignored) < 50
    assert "within 100s (saw 'theirs0' at 10.9.1.0:7878: another cluster" in found.failure()


def test_discovery_off_or_no_secret_or_server_set_means_no_browse(monkeypatch):
    """REMAP_DISCOVERY=off, a set REMAP_SERVER, or no secret: the console never browses."""

    def explode(*a: Any, **kw: Any) -> Any:
        raise AssertionError("browsed although it should not")

    monkeypatch.setattr(discovery, "ZeroconfNetwork", explode)
    for env in (
        {"REMAP_SECRET_KEY": "s", "REMAP_DISCOVERY": "off"},
        {"REMAP_SECRET_KEY": "s", "REMAP_DISCOVERY": "on", "REMAP_SERVER": "10.0.0.1:7878"},
        {"REMAP_DISCOVERY": "on"},
    ):
        settings = load_settings(environ=env, dotenv_path=None)
        assert not discovery.wanted(settings) or settings.server
        assert Session(settings).locate() == settings.server


def test_console_session_uses_what_discovery_found(monkeypatch):
    """The console's session takes the chosen server's address and says what it chose."""
    # theirs is announced first: the browse (on the real clock) ends a settle after ours
    net = FakeNetwork([advert("theirs", "10.9.0.3", secret=OTHER), advert("ours", "10.9.0.2")])
    monkeypatch.setattr(discovery, "ZeroconfNetwork", lambda interfaces: net)
    said: list[str] = []
    environ = {"REMAP_SECRET_KEY": SECRET.decode(), "REMAP_DISCOVERY": "on"}
    environ["REMAP_DISCOVERY_TIMEOUT"] = str(PATIENCE)
    settings = load_settings(environ=environ, dotenv_path=None)
    session = Session(settings, announce=said.append)
    assert session.locate() == "10.9.0.2:7878"
    assert session.settings.server == "10.9.0.2:7878"
    assert any("chose server 'ours'" in line for line in said)
    assert any("ignored server 'theirs'" in line for line in said)


def test_console_status_without_a_find_is_one_config_error(monkeypatch):
    """status with nothing discovered: one ConfigError line naming the bound and --server."""
    monkeypatch.setattr(discovery, "ZeroconfNetwork", lambda interfaces: FakeNetwork([]))
    settings = load_settings(
        environ={
            "REMAP_SECRET_KEY": "s",
            "REMAP_DISCOVERY": "on",
            "REMAP_DISCOVERY_TIMEOUT": "0.2",
        },
        dotenv_path=None,
    )
    with pytest.raises(ConfigError, match=r"within 0\.2s .*--server HOST:PORT"):
        Session(settings, announce=lambda text: None).connect(allow_embedded=False)


@pytest_twisted.ensureDeferred
async def test_discover_browses_off_the_reactor_thread():
    """discover() runs zeroconf's side on a pool thread and returns on the reactor thread."""
    from twisted.internet import reactor

    net = FakeNetwork([advert("ours", "10.9.0.2")])
    settings = load_settings(environ={"REMAP_DISCOVERY_TIMEOUT": str(PATIENCE)}, dotenv_path=None)
    found = await discovery.discover(reactor, settings, SECRET, network=lambda: net)
    assert found.chosen is not None and found.chosen.host == "10.9.0.2"
    assert net.started_on and net.started_on[0] != threading.current_thread().name
    assert threading.current_thread() is threading.main_thread()


class _IP:
    def __init__(self, ip: Any) -> None:
        self.ip = ip


class _Adapter:
    def __init__(self, name: str, *ips: Any) -> None:
        self.name = name
        self.nice_name = name
        self.ips = [_IP(ip) for ip in ips]


def test_interfaces_by_name_or_address():
    """Interfaces are named or given as IPv4 addresses; an unknown name lists the real ones."""
    adapters = [_Adapter("lo", "127.0.0.1"), _Adapter("eth0", "192.168.1.5", ("fe80::1", 0, 2))]
    assert discovery.interface_addresses(None, adapters) is None
    assert discovery.interface_addresses("eth0", adapters) == ["192.168.1.5"]
    assert discovery.interface_addresses("eth0, 10.0.0.1", adapters) == [
        "192.168.1.5",
        "10.0.0.1",
    ]
    with pytest.raises(ConfigError, match="no interface 'wlan9'.*eth0, lo"):
        discovery.interface_addresses("wlan9", adapters)


def test_advert_from_txt_record():
    """TXT bytes become an Advert; IPv4 is preferred; no address means nothing to dial."""
    props = {b"v": b"1", b"tls": b"1", b"cid": b"abcd"}
    got = discovery.advert_from("x", ["fe80::1", "10.0.0.7"], 7000, props)
    assert got == Advert("x", "10.0.0.7", 7000, cluster="abcd", version=1, tls=True)
    assert discovery.advert_from("x", [], 7000, props) is None


def test_a_copied_advert_pointing_elsewhere_is_not_dialled():
    """Anyone on the LAN hears the cluster id: a copy of our server's advert (id and tag) on
    an attacker's address, named to sort first, is ignored and our server chosen. (Dialled, it
    was a relay: the handshake passed through to the real server, then the attacker wrote a
    job of its own to the node, which ran it.)"""
    ours = advert("remap on b", "10.9.0.2")
    copies = [
        dataclasses.replace(ours, name=f"!a.{discovery.SERVICE_TYPE}", host="10.66.0.1"),
        dataclasses.replace(
            ours, name=f"!b.{discovery.SERVICE_TYPE}", host="10.66.0.1", at=("10.66.0.1",)
        ),
        dataclasses.replace(ours, name=f"!c.{discovery.SERVICE_TYPE}", port=7999),
        Advert(
            f"!d.{discovery.SERVICE_TYPE}",
            "10.66.0.1",
            7878,
            cluster=cluster_id(SECRET),
            version=PROTOCOL_VERSION,
        ),  # fmt: skip
    ]
    net = FakeNetwork([*copies, ours])
    found = browse(net, SECRET, timeout=PATIENCE, settle=PATIENCE, clock=net.clock)
    assert found.chosen == ours
    assert [a.name for a, _ in found.ignored] == [c.name for c in copies]
    assert all("not vouched for by this secret" in why for _, why in found.ignored)


def test_the_advertised_txt_record_vouches_for_its_addresses_only():
    """The server's TXT record, read back as zeroconf hands it over: it matches, and the
    address dialled is one it names, not an address record someone else added; a changed
    port or TLS flag no longer matches."""
    props = discovery.advert_properties(SECRET, False, 7000, ["10.0.0.7", "192.168.1.4"])
    txt = {k.encode(): v.encode() for k, v in props.items()}
    got = discovery.advert_from("x", ["10.66.0.1", "192.168.1.4"], 7000, txt)
    assert got is not None and got.host == "192.168.1.4"
    assert discovery.mismatch(got, SECRET, want_tls=False) == ""
    only_theirs = discovery.advert_from("x", ["10.66.0.1"], 7000, txt)
    assert only_theirs is not None and only_theirs.host == "10.0.0.7"
    moved = discovery.advert_from("x", ["10.0.0.7"], 7001, txt)
    assert moved is not None and "not vouched for" in discovery.mismatch(moved, SECRET, False)
    tls = discovery.advert_properties(SECRET, True, 7000, ["10.0.0.7"])
    plain = discovery.advert_from(
        "x", ["10.0.0.7"], 7000, {k.encode(): v.encode() for k, v in {**tls, "tls": "0"}.items()}
    )
    assert plain is not None
    assert "not vouched for" in discovery.mismatch(plain, SECRET, False)


def test_python_api_dials_the_server_discovery_chose(monkeypatch, capsys):
    """connect() with a secret and no address browses too, and dials what it chose (here a
    closed loopback port, so the error names the discovered address)."""
    import remap
    from remap.errors import ServerUnreachable

    net = FakeNetwork([advert("ours", "127.0.0.1", port=1)])
    monkeypatch.setattr(discovery, "ZeroconfNetwork", lambda interfaces: net)
    monkeypatch.setenv("REMAP_DISCOVERY", "on")
    with pytest.raises(ServerUnreachable, match=r"127\.0\.0\.1:1"):
        remap.connect(secret=SECRET, env_file=None, connect_timeout=5)
    assert "discovery: chose server 'ours' at 127.0.0.1:1" in capsys.readouterr().err
