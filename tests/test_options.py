"""Job options are declared once (protocol/options.py) and judged by one validator, whichever
face they come through: a job file, the Python API, or a ``submit`` message on the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

import remap
from protocol import messages as m
from protocol.errors import InvalidOption, RemoteProtocolError
from protocol.options import OPTION_FIELDS, JobOptions, OnError, ResponseMode
from remap.errors import ConfigError
from remap.jobfile import load_job_text
from remap.settings import Settings

#: (option, bad value, other options it needs, the problem every face must report)
BAD = [
    ("retries", -1, {}, "expected an integer >= 0, got -1"),
    ("timeout", 0, {}, "expected a number of seconds > 0, got 0"),
    ("priority", 1.5, {}, "expected an integer, got 1.5"),
    ("max_cores", -1, {}, "expected a number of cores >= 0 (0: no limit), got -1"),
    ("min_cores", 3, {"max_cores": 2}, "min_cores 3 is more than max_cores 2"),
    ("group", "", {}, "must not be empty"),
    ("requires", ["a-b"], {}, "'a-b' is not a module name (like numpy or scipy.signal)"),
]
#: the job file's and the API's name for an option, where it differs
API_NAME = {"timeout": "task_timeout"}


def _job_file(tmp_path: Path, options: dict[str, Any]) -> None:
    (tmp_path / "f.py").write_text("def f(x):\n    return x\n")
    lines = ["function: f.py:f", "args: [1]"]
    lines += [f"{key}: {value!r}" for key, value in options.items()]
    text = "\n".join(line.replace("'", '"') for line in lines) + "\n"
    load_job_text(text, tmp_path, source="job.yaml")


def _wire(options: dict[str, Any]) -> None:
    header = msgpack.packb({"t": "submit", "id": 1, "name": "j", **options})
    m.decode(header, b"fn")


@pytest.mark.parametrize(("key", "value", "with_", "problem"), BAD, ids=[r[0] for r in BAD])
def test_one_validator_for_job_file_api_and_wire(
    tmp_path: Path, key: str, value: Any, with_: dict[str, Any], problem: str
) -> None:
    """The same bad option gets the same problem from the job file (with file:line:key), the
    Python API (an InvalidOption, also a ValueError) and the wire (a protocol violation)."""
    options = {**with_, key: value}
    with pytest.raises(ConfigError) as from_file:
        _job_file(tmp_path, options)
    assert f"key '{key}': {problem}" in str(from_file.value)
    assert str(from_file.value).startswith("job.yaml:")

    api_kwargs = {API_NAME.get(k, k): v for k, v in options.items()}
    with pytest.raises(InvalidOption) as from_api:
        remap.connect(settings=Settings(), env_file=None, **api_kwargs)
    assert isinstance(from_api.value, ValueError)
    assert (from_api.value.key, from_api.value.problem) == (key, problem)

    with pytest.raises(RemoteProtocolError) as from_wire:
        _wire(options)
    assert str(from_wire.value) == f"submit.{key}: {problem}"


@pytest.mark.parametrize(
    ("options", "key", "problem"),
    [
        ({"mode": "stream", "output": "out.jsonl"}, "output", "not used when response_mode is 'stream' (only file, sqlite)"),
        ({"mode": "object", "output": "out.jsonl"}, "output", "not used when response_mode is 'object'"),
        ({"mode": "sqlite"}, "mode", "'sqlite' needs key 'output'"),
        ({"mode": "json"}, "mode", "expected one of object, stream, sqlite, file, reduce, none, got 'json'"),
        ({"on_error": "ignore"}, "on_error", "expected one of fail, continue, got 'ignore'"),
        ({"chunksize": 0}, "chunksize", "expected 'auto' or an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_response_modes_and_outputs_are_judged_once(
    options: dict[str, Any], key: str, problem: str
) -> None:
    """Rules between options hold for the options type itself and for the wire: a stream with
    an output file (its output would be silently dropped) is refused wherever it comes from."""
    with pytest.raises(InvalidOption) as direct:
        JobOptions(**options)
    assert direct.value.key == key and problem in direct.value.problem
    with pytest.raises(RemoteProtocolError, match=f"submit.{key}: "):
        _wire(options)


def test_the_submit_message_is_the_options_plus_a_request() -> None:
    """Submit declares no option of its own: its fields are JobOptions' plus id, total, payload;
    it round-trips through the wire with enums and tuples restored."""
    submit_fields = {f.name for f in m.Submit.__dataclass_fields__.values()}
    assert submit_fields == {f.name for f in OPTION_FIELDS} | {"id", "total", "payload"}
    options = JobOptions(name="n", mode="sqlite", output="/tmp/r.db", on_error="continue",
                         requires=["numpy"], chunksize="auto", max_cores=4)  # fmt: skip
    assert options.mode is ResponseMode.SQLITE and options.on_error is OnError.CONTINUE
    assert options.requires == ("numpy",) and options.chunksize is None
    msg = m.Submit.of(options, id=3, total=10, payload=b"fn")
    back = m.decode(*m.encode(msg))
    assert back == msg and JobOptions.of(back) == options
    assert back.mode is ResponseMode.SQLITE and back.requires == ("numpy",)
