"""Per-person keys: derived from the cluster secret and a name, checked at the handshake; a
person may touch only their own jobs and no cluster-wide action.

The handshake is driven sans-IO (two ``Connection`` objects); the permissions through the
server's connection handler with fake links, so no socket is opened.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from protocol import Authenticated, Connection
from protocol import messages as m
from protocol.connection import person_key
from protocol.errors import AuthError
from remap.server.main import main as server_main
from remap.server.service import RemapServerFactory, ServerConnection
from tests.test_handshake import failure, run_handshake
from tests.test_scheduler import FakeLink

SECRET = b"the cluster secret"


def _handshake(role: str, user: str, key: bytes) -> tuple[list, list]:
    server = Connection("server", SECRET)
    client = Connection(role, key, user=user)
    client.initiate()
    return run_handshake(server, client)


def test_a_persons_key_authenticates_as_that_person() -> None:
    s_events, c_events = _handshake("console", "alice", person_key(SECRET, "alice"))
    (auth,) = [e for e in s_events if isinstance(e, Authenticated)]
    assert (auth.peer_role, auth.peer_user) == ("console", "alice")
    assert any(isinstance(e, Authenticated) for e in c_events)


@pytest.mark.parametrize(
    ("user", "key"),
    [
        pytest.param("alice", person_key(SECRET, "bob"), id="another-name's-key"),
        pytest.param("alice", person_key(b"another cluster", "alice"), id="another-cluster"),
        pytest.param("alice", SECRET, id="the-secret-claiming-a-name"),
    ],
)
def test_a_key_for_another_name_or_cluster_is_refused(user: str, key: bytes) -> None:
    s_events, c_events = _handshake("console", user, key)
    assert not any(isinstance(e, Authenticated) for e in s_events)
    assert isinstance(failure(c_events), AuthError)


def test_a_node_may_not_use_a_persons_key() -> None:
    s_events, _ = _handshake("node", "alice", person_key(SECRET, "alice"))
    error = failure(s_events)
    assert isinstance(error, AuthError) and "nodes use the cluster secret" in str(error)


def test_issue_key_prints_the_derived_key(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REMAP_SECRET_KEY", SECRET.decode())
    monkeypatch.chdir(tmp_path)
    assert server_main(["--issue-key", "alice"]) == 0
    assert capsys.readouterr().out.strip() == person_key(SECRET, "alice").decode()
    assert server_main(["--issue-key", "no spaces allowed"]) == 2
    assert capsys.readouterr().err.startswith("error: a user name is")


# ============================================================================ permissions


def _reply(link: FakeLink, re: int) -> m.Message:
    (answer,) = [x for x in link.sent if getattr(x, "re", None) == re]
    return answer


class Console:
    """A console authenticated as ``user`` ("" = the cluster secret) on the server handler."""

    ids = iter(range(1, 10_000))

    def __init__(self, factory: RemapServerFactory, user: str) -> None:
        self.link = FakeLink(user or "admin")
        self.link.peer = self.link.name  # type: ignore[attr-defined]
        self.handler = ServerConnection(factory)
        self.handler.authenticated(self.link, Authenticated("console", "s", user))

    def ask(self, msg_type: type, **fields: Any) -> m.Message:
        rid = next(self.ids)
        self.handler.message_received(self.link, msg_type(id=rid, **fields))
        return _reply(self.link, rid)

    def submit(self) -> int:
        answer = self.ask(m.Submit, name="j", detach=True, payload=b"fn")
        assert isinstance(answer, m.Submitted), answer
        return answer.job


def _cluster() -> tuple[RemapServerFactory, Console, Console, Console]:
    factory = RemapServerFactory(Clock(), SECRET, max_frame=1 << 20, job_ids_from=1)
    return factory, Console(factory, "alice"), Console(factory, "bob"), Console(factory, "")


def test_a_person_may_not_kill_or_attach_to_anothers_job_but_may_their_own() -> None:
    factory, alice, bob, admin = _cluster()
    bobs = bob.submit()
    alices = alice.submit()
    for msg_type in (m.Kill, m.Attach):
        refused = alice.ask(msg_type, job=bobs)
        assert isinstance(refused, m.Error) and refused.code == "forbidden", refused
        assert "belongs to 'bob'" in refused.message
    assert not [x for x in alice.link.sent if isinstance(x, m.Results)]
    assert factory.scheduler.jobs[bobs].state == "running"
    assert isinstance(alice.ask(m.Attach, job=alices), m.Ok)
    assert isinstance(alice.ask(m.Kill, job=alices), m.Ok)
    assert factory.scheduler.jobs[alices].state == "killed"
    # the cluster secret may touch anyone's job
    assert isinstance(admin.ask(m.Kill, job=bobs), m.Ok)
    nodes, jobs, _ = factory.scheduler.status()
    assert {j.id: j.owner for j in jobs} == {bobs: "bob", alices: "alice"}


@pytest.mark.parametrize(
    ("msg_type", "fields"),
    [
        (m.Drain, {"node": "x"}),
        (m.Undrain, {"node": "x"}),
        (m.Exclude, {"node": "x"}),
        (m.Include, {"node": "x"}),
        (m.KillCluster, {}),
    ],
)
def test_cluster_wide_actions_need_the_cluster_secret(msg_type: type, fields: dict) -> None:
    factory, alice, _bob, admin = _cluster()
    refused = alice.ask(msg_type, **fields)
    assert isinstance(refused, m.Error) and refused.code == "forbidden", refused
    command = "kill --cluster" if msg_type is m.KillCluster else msg_type.TYPE  # as typed
    assert refused.message == f"{command} needs the cluster secret; alice's key may not"
    if msg_type is not m.KillCluster:  # the admin's request is carried out (or: no such node)
        assert getattr(admin.ask(msg_type, **fields), "code", "") != "forbidden"


@pytest.mark.slow
def test_real_consoles_with_person_keys(make_cluster, tmp_path) -> None:
    """Real processes: ``remap-server --issue-key`` prints keys; Alice's console runs a detached
    job recorded as hers; Bob's console cannot kill it (exit non-zero, one line, no traceback)
    nor drain a node; Alice can kill it; a key issued for bob used as alice is refused."""
    import json
    import subprocess
    import sys

    from tests.cluster_harness import ROOT, SERVER_SCRIPT, clean_env
    from tests.test_failures import QUICK, _job

    c = make_cluster(1, cores=1)

    def issue(name: str) -> str:
        done = subprocess.run(
            [sys.executable, SERVER_SCRIPT, "--issue-key", name, "--env-file", "/dev/null"],
            env=clean_env(c.home, {"REMAP_SECRET_KEY": c.secret}),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=QUICK,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    alice = {"REMAP_SECRET_KEY": issue("alice"), "REMAP_USER": "alice"}
    bob = {"REMAP_SECRET_KEY": issue("bob"), "REMAP_USER": "bob"}
    job = _job(tmp_path, "alices", "nap", args_range=[0, 200], chunksize=1)  # 20 s on one core
    submitted = c.assert_ok(c.console("compute", job, "--detach", "--json", env=alice))
    job_id = json.loads(submitted.stdout)["job"]
    info = next(j for j in c.status()["jobs"] if j["id"] == job_id)
    assert info["owner"] == "alice", info
    refused = c.console("kill", str(job_id), env=bob, timeout=QUICK)
    assert refused.returncode != 0 and "belongs to 'alice'" in refused.stderr, c.explain(refused)
    assert "Traceback" not in refused.stderr
    drain = c.console("drain", c.status()["nodes"][0]["id"], env=bob, timeout=QUICK)
    assert drain.returncode != 0 and "needs the cluster secret" in drain.stderr, c.explain(drain)
    wrong = c.console("status", env={**bob, "REMAP_USER": "alice"}, timeout=QUICK)
    assert wrong.returncode == 3, c.explain(wrong)  # authentication
    c.assert_ok(c.console("kill", str(job_id), env=alice, timeout=QUICK))
