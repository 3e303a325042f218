"""Jobs submitted over HTTP: a job file whose functions live in the apps directory.

Only functions in ``REMAP_APPS_DIR`` can run, and a job naming anything else (``os:system``,
``../x.py``), or a name an apps file only imports (``app.py:run`` after ``from subprocess import
run``), is refused before any import: the HTTP token lets its holder run what the operator
wrote, never arbitrary code. No server path comes from the request: ``args_path`` and
``output`` are refused, ``modules:`` and ``files:`` must be inside the apps directory, and the
results go to ``<data dir>/http/<submission>/results.jsonl``. The job runs in a console child
(the command line's ``compute``), so its module is imported and its arguments pickled off the
server's reactor thread.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.logger import Logger

from ...bundle import module_files
from ...data import layout
from ...errors import ConfigError
from ...jobfile import load_job_text, yaml_problem
from ..drivers import ConsoleChild, last_error, spawn_console_child

MAX_BODY = 64 * 1024
#: submissions remembered (for their results); the oldest finished ones are forgotten
MAX_KEPT = 100
#: keys a submitted job may not have: they name server paths or outlive the request's intent
REFUSED_KEYS = {
    "args_path": "args_path names a file on the server: send args or args_range",
    "output": "the server chooses where results go (read them from the results URL)",
    "detach": "every job submitted over HTTP runs detached from the request",
    "kind": "only function jobs can be submitted over HTTP",
}
MODES = ("file", "none")
#: the console child's exit codes when its job finished: every argument succeeded, or some
#: failed under ``on_error: continue`` (their errors are in the results)
ENDED_WELL = (0, 5)
#: the tail ``prepare`` gives a submitted job's name: its submission's id
HTTP_NAME = re.compile(r" \[http ([0-9a-f]{8})\]$")
#: seconds to wait for the submitted job to reach the scheduler
START_TIMEOUT = 60.0


class SubmitError(Exception):
    """A submission refused with a reason the client sees (HTTP 400)."""


@dataclass
class Submission:
    id: str
    name: str
    directory: Path
    job_id: int | None = None
    exit_code: int | None = None
    ended: bool = False
    stderr: bytearray = field(default_factory=bytearray)
    #: called once the console child has exited (its output file is committed by then)
    waiters: list[Any] = field(default_factory=list)

    @property
    def results(self) -> Path:
        return self.directory / "results.jsonl"


def _unlined(error: str, source: str) -> str:
    """A checked job's error names "the job file" without a line: what was checked is the
    one-line JSON the server wrote, whose line 1 is not where the client wrote the key."""
    return re.sub(rf"{re.escape(source)}:\d+: ", "the job file: ", error)


def parse_body(body: bytes, content_type: str) -> dict:
    """The job file as a mapping, from JSON or YAML (JSON is parsed as JSON so that its errors
    read as JSON errors)."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text) if content_type == "application/json" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:  # one line naming the line, as the console says it
        raise SubmitError(yaml_problem(exc, "the job file")) from None
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise SubmitError(f"the job file is not valid {content_type}: {exc}") from None
    if not isinstance(value, dict):
        raise SubmitError("the job file must be a mapping of keys to values")
    return value


def _top_level_names(body: list[ast.stmt]) -> tuple[set[str], set[str]]:
    """Names a module's own statements define (``def``, ``class``, ``NAME = ...``) and names
    it imports, also under a top-level ``if``/``try``/``with``/``for``; a loop's or a ``with``'s
    target is not a definition (``for fn in (imported, ...)`` would make imported code callable),
    nor is the base of an attribute assignment."""
    defined: set[str] = set()
    imported: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
            continue  # what its body binds is not the module's
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                defined.update(
                    n.id
                    for n in ast.walk(target)
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                )
        blocks = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")]
        blocks += [handler.body for handler in getattr(node, "handlers", [])]
        for block in blocks:
            inner_defined, inner_imported = _top_level_names(block)
            defined |= inner_defined
            imported |= inner_imported
    return defined, imported


def _defined_in(path: Path, name: str, key: str) -> None:
    """SubmitError unless the file's own statements define ``name`` (``def``, ``class``,
    ``NAME = ...``, also under a top-level ``if`` or ``try``): a name it imports (``from
    subprocess import run``, also one it defines too) or a module attribute (``__class__``)
    is anybody's code."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise SubmitError(f"key '{key}': cannot read {path.name}: {exc}") from None
    defined, imported = _top_level_names(tree.body)
    if name.startswith("__") or name not in defined or name in imported:
        raise SubmitError(
            f"the job file: key '{key}': no function '{name}' written in {path.name} (only "
            "functions written in the server's apps directory run, not names a file there imports)"
        )


def _inside(apps: Path, ref: str, key: str) -> str:
    """``ref`` rewritten as ``/abs/FILE.py:NAME`` inside ``apps``, or SubmitError."""
    target, colon, name = ref.partition(":")
    if not colon:
        if key == "reduce":  # a bare NAME: a function in the job's own file
            return ref
        raise SubmitError(f"key '{key}': expected FILE.py:NAME or module:NAME, got {ref!r}")
    if target.endswith(".py"):
        path = (apps / target).resolve()
    else:
        parts = target.split(".")
        if not all(p.isidentifier() for p in parts):
            raise SubmitError(f"key '{key}': {target!r} is neither a .py file nor a module name")
        path = (apps / Path(*parts)).with_suffix(".py").resolve()
        if not path.is_file():
            path = (apps / Path(*parts) / "__init__.py").resolve()
    if not path.is_relative_to(apps) or not path.is_file():
        raise SubmitError(
            f"key '{key}': {target!r} is not a file in the server's apps directory "
            "(only functions installed there can run)"
        )
    _defined_in(path, name, key)
    return f"{path}:{name}"


def _shipped(apps: Path, value: Any, key: str) -> list[str]:
    """``modules:`` or ``files:`` as absolute paths inside ``apps``, or SubmitError: the console
    child would ship any file the server can read (``files: [~/.remap/secret]``) to an app that
    could hand it back to the token's holder."""
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise SubmitError(f"key '{key}': expected a list of names in the apps directory")
    what = "file" if key == "files" else "module"
    paths = []
    for entry in (e.strip() for e in entries):
        path = apps / entry
        if key == "modules" and entry.isidentifier() and (apps / f"{entry}.py").is_file():
            path = apps / f"{entry}.py"  # a module's name: its file or package in apps
        real = path.resolve()
        if key == "files":
            found = real.is_file()
        else:
            found = (real.is_file() and real.suffix == ".py") or (real / "__init__.py").is_file()
        if not entry or not found or not real.is_relative_to(apps):
            raise SubmitError(
                f"key '{key}': {entry!r} is not a {what} in the server's apps directory"
            )
        if key == "modules" and real.is_dir():  # what ships of a package: all inside apps too
            for name, source in module_files(real):
                if not source.resolve().is_relative_to(apps):
                    raise SubmitError(
                        f"key 'modules': {name} of {entry!r} links out of the server's apps "
                        "directory (only what is installed there ships)"
                    )
        paths.append(str(path))
    return paths


def prepare(raw: dict, apps_dir: Path, data_dir: Path) -> Submission:
    """Check a job file and write the one the console child will run."""
    for key, why in REFUSED_KEYS.items():
        if key in raw:
            raise SubmitError(f"key '{key}' is not allowed over HTTP: {why}")
    mode = raw.get("response_mode", "file")
    if mode not in MODES:
        raise SubmitError(f"response_mode must be one of {', '.join(MODES)} over HTTP")
    apps = apps_dir.resolve()
    job = dict(raw)
    if not isinstance(job.get("function"), str):
        raise SubmitError("key 'function' is required: FILE.py:NAME or module:NAME in the apps dir")
    job["function"] = _inside(apps, job["function"], "function")
    if isinstance(job.get("reduce"), str):
        job["reduce"] = _inside(apps, job["reduce"], "reduce")
    for key in ("modules", "files"):
        if key in job:
            job[key] = _shipped(apps, job[key], key)
    if layout.open_to_all(data_dir):  # its console child runs the job file written there
        raise SubmitError(
            "the server's data directory is writable by everyone, so no job runs from it: let "
            "only the cluster's user or group write its REMAP_DATA_DIR (chmod o-w)"
        )
    sub_id = secrets.token_hex(4)
    name = str(job.get("name") or Path(job["function"].rpartition(":")[0]).stem)[:80]
    job["name"] = f"{name} [http {sub_id}]"
    directory = data_dir / "http" / sub_id
    job["response_mode"] = mode
    if mode == "file":
        job["output"] = str(directory / "results.jsonl")
    text = json.dumps(job)
    try:
        load_job_text(text, apps, "<submitted job>")
    except ConfigError as exc:
        raise SubmitError(_unlined(str(exc), "<submitted job>")) from None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "job.json").write_text(text)
    return Submission(sub_id, job["name"], directory)


class Submitter:
    """Starts console children for submitted jobs and remembers where their results are."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        scheduler: Any,
        *,
        apps_dir: str | None,
        data_dir: Path,
        cluster_address: str | None,
        child_env: dict[str, str],
    ) -> None:
        self.reactor = reactor
        self.scheduler = scheduler
        self.apps_dir = Path(apps_dir).expanduser() if apps_dir else None
        self.data_dir = data_dir
        self.cluster_address = cluster_address
        self.child_env = child_env
        self.by_job: OrderedDict[int, Submission] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.apps_dir is not None and self.cluster_address is not None

    def start(self, submission: Submission, on_started: Any, on_failed: Any) -> None:
        """Run the job; call ``on_started(job_id)`` once the scheduler has it, or ``on_failed``."""
        args = ["-c", "import sys; from remap.console.main import main; sys.exit(main())"]
        args += ["--server", str(self.cluster_address), "--env-file", os.devnull, "compute"]
        args += [str(submission.directory / "job.json"), "--quiet", "--json", "--no-task-output"]
        state = {"done": False}

        def ended(code: int | None) -> None:
            submission.exit_code, submission.ended = code, True
            waiters, submission.waiters = submission.waiters, []
            for waiter in waiters:
                waiter()
            if not state["done"]:
                state["done"] = True
                on_failed(self.client_error(submission))
            self.log.info(
                "HTTP job {name} ended (console exit {code})", name=submission.name, code=code
            )

        child = ConsoleChild(submission.stderr, ended)
        spawn_console_child(self.reactor, child, args, self.child_env, str(self.apps_dir))
        deadline = self.reactor.seconds() + START_TIMEOUT

        def look() -> None:
            if state["done"]:
                return
            for job in self.scheduler.jobs.values():
                if job.options.name == submission.name:
                    state["done"] = True
                    submission.job_id = job.id
                    self._keep(submission)
                    on_started(job.id)
                    return
            if self.reactor.seconds() > deadline:
                state["done"] = True
                on_failed("the job did not reach the scheduler in time")
                return
            self.reactor.callLater(0.05, look)

        look()

    def recall(self, job: Any) -> Submission | None:
        """The submission of a job the journal kept from before the server restarted, or None."""
        found = HTTP_NAME.search(job.options.name or "")
        if found is None:
            return None
        directory = self.data_dir / "http" / found.group(1)
        if not (directory / "job.json").is_file():
            return None
        return Submission(
            found.group(1), job.options.name, directory, job_id=job.id, ended=job.finished
        )

    def client_error(self, submission: Submission) -> str:
        """Why the submission's console child ended badly, as the client may see it: without
        server paths (the client knows none of them)."""
        assert self.apps_dir is not None
        exited = f"the job's console exited with code {submission.exit_code}"
        error = (last_error(submission.stderr) or exited)[:500]
        for untouched in ("not written", "left unchanged"):
            error = error.replace(f"; no results kept; {submission.results} {untouched}", "")
        error = _unlined(error, str(submission.directory / "job.json"))
        return error.replace(f"{self.apps_dir.resolve()}{os.sep}", "")

    def _keep(self, submission: Submission) -> None:
        assert submission.job_id is not None
        self.by_job[submission.job_id] = submission
        while len(self.by_job) > MAX_KEPT:
            self.by_job.popitem(last=False)
