"""The Airflow provider with remap's HTTP API faked: deferral, the trigger, XCom, on_kill.

Skipped unless Airflow is installed (``pip install -e ".[airflow]"``; CI runs it in its own
step). The HTTP layer is replaced at :meth:`RemapApi.request`, so every call the provider
makes is recorded and answered from a script.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("airflow")

try:  # Airflow 3
    from airflow.sdk.exceptions import AirflowException, TaskDeferred
except ImportError:  # Airflow 2
    from airflow.exceptions import AirflowException, TaskDeferred

from remap.airflow import get_provider_info  # noqa: E402
from remap.airflow.api import RemapApi, RemapApiError  # noqa: E402
from remap.airflow.hooks import RemapHook  # noqa: E402
from remap.airflow.operators import RemapJobOperator  # noqa: E402
from remap.airflow.triggers import RemapJobTrigger  # noqa: E402

pytestmark = pytest.mark.airflow

JOB_YAML = "function: squares.py:square\nargs_range: [0, 100]\n"


class FakeServer:
    """Answers the provider's requests: a job that runs for ``polls`` GETs, then ``final``."""

    def __init__(self, final: str = "done", polls: int = 2) -> None:
        self.final = final
        self.polls = polls
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, api: RemapApi, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:  # fmt: skip
        assert api.token == "tok" and api.base_url == "https://remap.lan:7880"
        self.calls.append((method, path, body and (content_type, body.decode())))
        if (method, path) == ("POST", "/api/v1/jobs"):
            return {"job": 42, "name": "squares", "results": "/data/jobs/42.jsonl"}
        if (method, path) == ("GET", "/api/v1/jobs/42"):
            self.polls -= 1
            state = "running" if self.polls > 0 else self.final
            return {"id": 42, "state": state, "done": 90, "failed": 10, "message": "m"}
        if (method, path) == ("POST", "/api/v1/jobs/42/kill"):
            return {"job": 42, "state": "killed"}
        raise RemapApiError(f"{method} {path}: HTTP 404")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(RemapApi, "request", lambda api, *a, **k: fake.request(api, *a, **k))
    monkeypatch.setenv(
        "AIRFLOW_CONN_REMAP_DEFAULT",
        json.dumps(
            {
                "conn_type": "remap",
                "host": "remap.lan",
                "port": 7880,
                "password": "tok",
                "extra": {"ca_file": ""},
                "schema": "https",
            }
        ),
    )
    return fake


def _run_trigger(trigger: RemapJobTrigger) -> dict[str, Any]:
    async def first() -> Any:
        async for event in trigger.run():
            return event.payload

    return asyncio.run(first())


def test_provider_info_names_the_connection_type_and_hook() -> None:
    info = get_provider_info()
    (conn,) = info["connection-types"]
    assert conn == {
        "connection-type": "remap",
        "hook-class-name": "remap.airflow.hooks.RemapHook",
    }
    assert RemapHook.conn_type == "remap"


def test_the_operator_submits_and_defers_without_waiting(server: FakeServer) -> None:
    op = RemapJobOperator(task_id="t", job=JOB_YAML, poll_interval=0.01)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context={})
    assert server.calls == [("POST", "/api/v1/jobs", ("application/yaml", JOB_YAML))]
    trigger = deferred.value.trigger
    assert isinstance(trigger, RemapJobTrigger) and deferred.value.method_name == (
        "execute_complete"
    )
    # the serialized trigger carries the connection id, never the token
    path, kwargs = trigger.serialize()
    assert "tok" not in json.dumps(kwargs)
    module, _, name = path.rpartition(".")
    rebuilt = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)


def test_a_dict_job_travels_as_json(server: FakeServer) -> None:
    op = RemapJobOperator(task_id="t", job={"function": "a.py:f", "args": [1]}, deferrable=False)
    server.polls = 1
    op.execute(context={})
    assert server.calls[0][2] == ("application/json", '{"function": "a.py:f", "args": [1]}')


@pytest.mark.parametrize("final", ["done", "failed", "killed"])
def test_the_trigger_fires_once_the_job_ends(server: FakeServer, final: str) -> None:
    server.final, server.polls = final, 3
    event = _run_trigger(RemapJobTrigger(42, "remap_default", 0.01, "/data/jobs/42.jsonl"))
    assert event == {
        "job": 42,
        "state": final,
        "done": 90,
        "failed": 10,
        "message": "m",
        "results": "/data/jobs/42.jsonl",
    }
    assert [c[1] for c in server.calls].count("/api/v1/jobs/42") == 3
    op = RemapJobOperator(task_id="t", job=JOB_YAML)
    if final == "done":
        assert op.execute_complete({}, event) == event  # the return value goes to XCom
    else:
        with pytest.raises(AirflowException, match=f"remap job 42 {final}"):
            op.execute_complete({}, event)


def test_a_server_that_cannot_be_asked_fails_the_task(monkeypatch: pytest.MonkeyPatch,
                                                      server: FakeServer) -> None:  # fmt: skip
    def refuse(api: RemapApi, method: str, path: str, *a: Any) -> Any:
        raise RemapApiError(f"{method} {path}: HTTP 401: bad token")

    monkeypatch.setattr(RemapApi, "request", refuse)
    event = _run_trigger(RemapJobTrigger(42, "remap_default", 0.01))
    assert event["state"] == "error" and "401" in event["message"]
    with pytest.raises(AirflowException, match="401"):
        RemapJobOperator(task_id="t", job=JOB_YAML).execute_complete({}, event)


def test_without_deferral_it_polls_and_returns_the_summary(server: FakeServer) -> None:
    op = RemapJobOperator(task_id="t", job=JOB_YAML, deferrable=False, poll_interval=0.01)
    assert op.execute(context={}) == {
        "job": 42,
        "state": "done",
        "done": 90,
        "failed": 10,
        "message": "m",
        "results": "/data/jobs/42.jsonl",
    }


def test_on_kill_kills_the_remote_job(server: FakeServer) -> None:
    op = RemapJobOperator(task_id="t", job=JOB_YAML)
    op.on_kill()  # nothing submitted yet: nothing to kill
    assert server.calls == []
    with pytest.raises(TaskDeferred):
        op.execute(context={})
    op.on_kill()
    assert server.calls[-1][:2] == ("POST", "/api/v1/jobs/42/kill")


def test_killing_the_deferred_task_kills_the_remote_job(server: FakeServer) -> None:
    """Once the task has deferred no worker runs the operator's on_kill: the trigger's, which
    Airflow 3.3+'s triggerer calls when a user kills the task, kills the job, on a trigger
    rebuilt from what it serialized (as the triggerer holds it). A job the server cannot kill
    (ended and pruned, say) is logged, not raised."""
    path, kwargs = RemapJobTrigger(42, "remap_default", 0.01, "/data/jobs/42.jsonl").serialize()
    assert path == "remap.airflow.triggers.RemapJobTrigger"
    asyncio.run(RemapJobTrigger(**kwargs).on_kill())
    assert server.calls == [("POST", "/api/v1/jobs/42/kill", ("application/json", "{}"))]
    asyncio.run(RemapJobTrigger(7, "remap_default", 0.01).on_kill())  # the fake answers 404
    assert server.calls[-1][:2] == ("POST", "/api/v1/jobs/7/kill")


def test_a_job_file_path_is_read(server: FakeServer, tmp_path: Any) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    with pytest.raises(TaskDeferred):
        RemapJobOperator(task_id="t", job=str(path)).execute(context={})
    assert server.calls[0][2] == ("application/yaml", JOB_YAML)


DAG_FILE = """\
import datetime

from airflow.sdk import DAG

from remap.airflow.operators import RemapJobOperator

with DAG("remap_e2e", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
    RemapJobOperator(
        task_id="squares",
        job="function: squares.py:square\\nargs_range: [0, 50]\\n",
        poll_interval=0.2,
    )

if __name__ == "__main__":
    import json

    run = dag.test()
    print("STATE", run.state)
    print("XCOM", json.dumps(run.get_task_instance("squares").xcom_pull(task_ids="squares")))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dag_runs_a_job_on_a_real_server(make_cluster: Any, tmp_path: Any) -> None:
    """``dag.test()`` (SQLite metadata, no scheduler): the operator defers, the trigger runs
    inline, and the job's summary from a real server lands in XCom."""
    import os
    import re
    import subprocess
    import sys

    from remap.server.http.security import derive_token
    from tests.cluster_harness import NodeSpec

    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "squares.py").write_text("def square(x):\n    return x * x\n")
    cluster = make_cluster(
        [NodeSpec(cores=1)],
        server_env={
            "REMAP_HTTP_PORT": "0",
            "REMAP_APPS_DIR": str(apps),
            "REMAP_DATA_DIR": str(tmp_path / "data"),
        },
    )
    port = cluster.wait_for(
        lambda: re.search(r"dashboard: http://[^:]+:(\d+)/", cluster.server.log_text()),
        10,
        "the HTTP port",
    ).group(1)
    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    (home / "dags" / "remap_e2e.py").write_text(DAG_FILE)
    conn = {
        "conn_type": "remap",
        "host": "127.0.0.1",
        "port": int(port),
        "schema": "http",
        "password": derive_token(cluster.secret.encode()),
    }
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_REMAP_DEFAULT": json.dumps(conn),
    }
    airflow = [sys.executable, "-m", "airflow"]
    done = subprocess.run([*airflow, "db", "migrate"], env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, str(home / "dags" / "remap_e2e.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert "STATE success" in done.stdout, (done.stdout[-3000:], done.stderr[-3000:])
    xcom = json.loads(done.stdout.split("XCOM ", 1)[1].splitlines()[0])
    assert (xcom["state"], xcom["done"], xcom["failed"]) == ("done", 50, 0)
    assert cluster.job(xcom["job"])["state"] == "done"
    assert xcom["results"] == f"/api/v1/jobs/{xcom['job']}/results"
