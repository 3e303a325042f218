"""``remap``: the console. One-shot commands, or an interactive shell with the same commands."""

from __future__ import annotations

import argparse
import cmd
import contextlib
import difflib
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from protocol.status import read_status

from .. import __version__
from ..errors import EXIT_INTERRUPTED, JobFailed, JobKilled, OutputError, RemapError, one_line
from ..jobfile import load_job
from ..logs import start_logging
from ..settings import load_settings, locate_env_file, settings_help
from ..sinks import os_reason, render_line
from . import render
from .session import Session, make_job_sink

HELP = """\
commands:
  compute JOB.yaml [--json] [--detach] [--traceback] ...  run a job (embedded cluster if no server); all options: help compute
  status [--json]                      cluster summary: nodes, cores busy/total, jobs
  nodes [--json]                       connected nodes
  jobs [--json]                        jobs, running and recent
  kill JOB_ID | kill --cluster [--yes] stop a job, or every node and the server
  drain NODE                           let a node finish its work and take no more
  undrain NODE                         let a drained node take work again
  exclude NODE                         keep a node's host out of all work (kept across restarts)
  include NODE                         let an excluded host's nodes work again
  dashboard [--http-port N] [--token]  print a one-time login link to the server's dashboard
  attach JOB_ID [--json]               collect a detached job's results (alias: results)
  help [COMMAND]                       this text, or one command's options
  quit                                 leave the shell
"""


#: commands whose argument is a job or node id, completed from the server's status
ID_COMMANDS = {
    **dict.fromkeys(("kill", "attach", "results"), "jobs"),
    **dict.fromkeys(("drain", "undrain", "exclude", "include"), "nodes"),
}


def _python_on_path() -> str:
    """``python`` when that name runs this interpreter's environment, else its full path."""
    found = shutil.which("python")
    same = found is not None and Path(found).parent == Path(sys.executable).parent
    return "python" if same else sys.executable


#: exit codes beyond the error classes' own (RemapError.exit_code: 1, 2, 3, 4)
EXIT_FAILED_ARGUMENTS = 5
#: the output's reader left first: as the shell reports a writer killed by SIGPIPE (128 + 13)
EXIT_BROKEN_PIPE = 141

EXIT_CODES = f"""\
exit codes:
  0    the job finished and every argument succeeded
  1    the job failed or was killed, or its output could not be written
  2    a bad job file, setting or command line
  3    authentication or version mismatch with the server
  4    the server is unreachable or the connection was lost
  {EXIT_FAILED_ARGUMENTS}    the job finished but some arguments failed (on_error: continue)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the job was killed
  {EXIT_BROKEN_PIPE}  the reader of the output left first (remap status | head -1)
"""


class UsageError(RemapError):
    exit_code = 2


class ReaderLeft(OutputError):
    """The reader of stdout left mid-job (``compute job.yaml | head``): the job ends and the
    console leaves quietly with 141, as after any write to a closed pipe."""

    exit_code = EXIT_BROKEN_PIPE


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so the shell survives a typo."""

    commands: dict[str, argparse.ArgumentParser]  # (the top one's) each command's parser

    def error(self, message: str) -> None:  # type: ignore[override]
        unknown = re.match(r"argument COMMAND: invalid choice: '(.*?)' \(", message)
        if unknown:  # as the shell and `help` name it, not argparse's list with `shell`
            raise no_command(unknown.group(1))
        raise UsageError(f"{self.prog}: {message}")


#: the global options' names in an argparse Namespace
GLOBAL_FLAGS = ("server", "env_file", "cores", "log_level")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every command takes, before or after its name (``remap status --server H:P``).

    Under a command they default to SUPPRESS, so a flag given before the command stays.
    """
    default = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("global options") if not top else parser
    group.add_argument(
        "--server",
        default=default,
        help="HOST:PORT of the server (default: REMAP_SERVER; none = embedded cluster)",
    )
    group.add_argument(
        "--env-file",
        default=default,
        help="settings file to read (default: the first of ./.env, .env next to the job file, "
        "~/.remap/.env)",
    )
    group.add_argument("--cores", type=int, default=default, help="cores of the embedded cluster")
    group.add_argument(
        "--log-level", default=default, help="debug, info, warn or error (logs go to stderr)"
    )


#: command -> (one-line help, description shown by ``COMMAND --help`` and ``help COMMAND``)
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "compute": (
        "run a job file",
        "Run the job a YAML job file describes and print or write its results. With no "
        "server configured, an embedded local cluster runs it.",
    ),
    "status": ("cluster summary", "Nodes, cores busy/total, and jobs with done/failed/total."),
    "nodes": ("the node table", "Every connected node: host, cores, load, state."),
    "jobs": ("the job table", "Jobs running and recently finished."),
    "kill": (
        "stop a job, or the whole cluster",
        "Stop a job's queued and running work (its cores are killed and replaced), or with "
        "--cluster every node and the server.",
    ),
    "drain": (
        "let a node finish and take no more work",
        "The node finishes the batches it runs and gets no new ones (undrain reverses it).",
    ),
    "undrain": ("let a drained node take work again", "Undo drain: the node gets batches again."),
    "exclude": (
        "keep a node's host out of all work, across restarts",
        "Put the node's host on the server's exclusion list (a file in REMAP_STATE_DIR): its "
        "nodes stay connected but get no work until `include`. NODE is a node id, a unique "
        "prefix, host:pid, or a host name (connected or not).",
    ),
    "include": ("let an excluded host's nodes work again", "Take a host off the exclusion list."),
    "dashboard": (
        "print a login link to the server's dashboard",
        "Print a one-time login link to the server's HTTP dashboard.",
    ),
    "attach": (
        "collect a detached job's results",
        "Collect a detached job's results into what its job file asked for (alias: results); "
        "a detached data or vertex job: show what its tasks print, then its summary.",
    ),
    "results": ("collect a detached job's results", "Same as attach."),
    "help": ("list the commands, or one command's help", "help [COMMAND]"),
    "quit": ("leave the shell", "Leave the interactive shell."),
    "shell": ("interactive shell (the default on a terminal)", "History and tab completion."),
}


#: the commands, as the shell completes them
COMMANDS = tuple(name for name in DESCRIPTIONS if name != "shell")


def no_command(word: str) -> UsageError:
    """An unknown command: the nearest one if it is a typo, else the list."""
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    if close:
        return UsageError(f"no command {word!r}; did you mean {close[0]!r}?")
    return UsageError(f"no command {word!r} (commands: {', '.join(COMMANDS)})")


def job_id(text: str) -> int:
    """A job id as ``remap jobs`` shows it; a data job's own id (its directory's name, as its
    lines print it) is not one, and the error says which is."""
    try:
        return int(text)
    except ValueError:
        data = (
            " (for a data job's phase: the one beside 'NAME [map|reduce ID]')"
            if "-" in text
            else ""
        )
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job id: use the number `remap jobs` shows{data}"
        ) from None


def seconds(text: str) -> float:
    """A number of seconds >= 0, refused on the command line before any cluster starts."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # NaN fails ">= 0"
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> Parser:
    parser = Parser(
        prog="remap",
        description="Run a Python function over many arguments on every core you own.",
        epilog=f"{HELP}\n{EXIT_CODES}\n{settings_help('console')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"remap {__version__}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    parser.commands = sub.choices

    def command(name: str) -> Parser:
        short, description = DESCRIPTIONS[name]
        p = sub.add_parser(name, help=short, description=description)
        _global_options(p, top=False)
        return p

    def flag(p: Parser, name: str, text: str) -> None:
        p.add_argument(name, action="store_true", help=text)

    p = command("compute")
    p.epilog = EXIT_CODES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("job", help="the job file (YAML)")
    flag(p, "--json", "machine-readable output")
    flag(p, "--detach", "let the job run on if this console leaves")
    p.add_argument(
        "--wait-for-nodes",
        type=seconds,
        metavar="SECONDS",
        help="fail if no node can run the job within this time",
    )
    flag(p, "--quiet", "no progress bar")
    flag(
        p,
        "--no-task-output",
        "do not show what tasks print or log (default: shown on stderr, REMAP_TASK_OUTPUT)",
    )
    flag(
        p,
        "--dashboard",
        "print a login link to the live dashboard (the embedded cluster serves one)",
    )
    flag(p, "--traceback", "if the job fails, print the remote traceback of the first failing call")
    p.add_argument(
        "--engine",
        default="remap",
        metavar="URL",
        help="remap (default), remap://HOST:PORT or remap://local (remap through the engine "
        "seam), dask://HOST:PORT, dask://local, ray://HOST:PORT or ray://local",
    )
    for name in ("status", "nodes", "jobs"):
        flag(command(name), "--json", "machine-readable output")
    p = command("kill")
    p.add_argument("job", nargs="?", type=job_id, help="the job id (see: remap jobs)")
    flag(p, "--cluster", "stop every node and the server")
    flag(p, "--yes", "do not ask for confirmation")
    for name in ("drain", "undrain", "exclude", "include"):
        command(name).add_argument(
            "node",
            help="a node id or a unique prefix of one, host:pid, or a node name "
            "(its host name, or remap-node --name); see: remap nodes",
        )
    p = command("dashboard")
    p.add_argument("--http-port", type=int, help="the server's HTTP port (REMAP_HTTP_PORT)")
    flag(p, "--token", "print the API's bearer token instead (for scripts and Prometheus)")
    for name in ("attach", "results"):
        p = command(name)
        p.add_argument("job", type=job_id, help="the job id (see: remap jobs)")
        flag(p, "--json", "machine-readable output")
        flag(
            p, "--no-task-output", "a detached data or vertex job: do not show what its tasks print"
        )
    command("help").add_argument("topic", nargs="?", help="a command")
    command("quit")
    command("shell")
    return parser


class Console:
    """Runs parsed commands against a session and prints for a person or a program."""

    def __init__(
        self,
        session: Session,
        out: Any = None,
        err: Any = None,
        env_file: str | Path | None = None,
        parser: Parser | None = None,
    ) -> None:
        self.session = session
        #: the settings file this console read (None: none was found)
        self.env_file = env_file
        self.parser = parser
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def complain(self, exc: BaseException) -> int:
        """An error's one line on stderr; its exit code."""
        line, code = one_line(exc)
        self.note(line)
        return code

    def execute(self, args: argparse.Namespace) -> int:
        handler = getattr(self, f"cmd_{args.command}")
        return handler(args) or 0

    # ------------------------------------------------------------------ compute

    def cmd_compute(self, args: argparse.Namespace) -> int:
        try:
            spec = load_job(args.job)
            detach = self._detach_checked(spec, args)
        except RemapError as exc:  # --json: a script reads one object whatever went wrong
            if args.json:
                self.say(json.dumps(render.failure_json(exc, None)))
            raise
        if spec.kind != "function":
            from .detached import start_detached
            from .filejob import compute_file_job

            return (start_detached if detach else compute_file_job)(self, spec, args)
        from .filejob import terminate_as_interrupt

        with terminate_as_interrupt():  # `timeout`, `kill`: the job is killed as by Ctrl-C
            return self._compute_function(spec, args, detach)

    def _compute_function(self, spec: Any, args: argparse.Namespace, detach: bool) -> int:
        show_stream = spec.options.mode == "stream"
        progress = render.progress_bar(self.err, args.quiet)
        # result lines come from this thread (an engine's job: from its thread), the progress
        # bar from this one: one at a time, so the bar is cleared before a line and stdout is
        # flushed before a redraw
        screen = threading.Lock()
        on_item = self._stream_printer(args.json, progress, screen)
        sink = make_job_sink(spec, on_item=on_item if show_stream else None)
        notes: list[str] = []
        # the reactor thread only queues notices and task output; this thread prints them
        notices: queue.SimpleQueue[str] = queue.SimpleQueue()
        output: queue.SimpleQueue[str] = queue.SimpleQueue()
        show_output = self.session.settings.task_output and not args.no_task_output
        try:
            if args.dashboard:
                self.session.connect(allow_embedded=True)
                self.note(f"dashboard: {self.session.dashboard_link()}")
            if args.engine != "remap":
                from .. import engines

                run = engines.start_job(
                    args.engine,
                    spec,
                    sink,
                    workers=self.session.settings.cores,
                    settings=self.session.settings,
                )
            else:
                run = self.session.start_job(
                    spec,
                    keep_arguments=sink.needs_arguments,
                    detach=detach,
                    wait_for_nodes=args.wait_for_nodes,
                    on_notice=notices.put,
                    on_output=(lambda index, text: output.put(text)) if show_output else None,
                )
        except BaseException as exc:  # it never started: the output is left as it was
            sink.abandon()
            if isinstance(exc, RemapError):
                raise self._closing(exc, None, sink, args.json) from None
            raise
        if detach:
            return self._detached(run, sink, args, spec)
        state = getattr(run, "session", run)  # the counts: a remap job's session, or the engine run

        def tick() -> None:
            render.print_task_output(output, progress, self.err, screen)
            while not notices.empty():
                notes.append(notices.get())
                if progress is None:
                    self.note(f"job: {notes[-1]}")
            if progress:
                with screen:
                    self.out.flush()
                    progress.draw(
                        state.done,
                        state.failed,
                        state.total_hint or (state.sent if state.exhausted else None),
                        notes[-1] if notes and not state.done else "",
                    )

        try:
            # a remap job's sink is fed here, on this thread, never the reactor's (an engine's
            # by the engine run's own thread)
            outcome = run.collect(sink, tick=tick)
        except RemapError as exc:
            if progress:
                progress.clear()
            error = state.first_error if isinstance(exc, JobFailed) else None
            if error is not None:
                where = f"argument {error.index}"
                exc = self.with_traceback(exc, error.traceback, where, args.traceback)
            raise self._closing(exc, run, sink, args.json) from None
        except KeyboardInterrupt:
            if progress:
                progress.clear()
            return self._interrupted(run, sink, args.json)
        finally:
            tick()  # notices and task output that arrived with the last results
            if progress:
                progress.clear()
        self._print_results(spec.options.mode, sink, outcome, args.json)
        return self._failed_arguments(max(state.failed, outcome.failed))

    def _stream_printer(self, as_json: bool, progress: Any, screen: threading.Lock) -> Any:
        """A stream job's ``on_item``: each result as it arrives, ``INDEX: repr`` (``--json``:
        the file mode's line), the progress bar cleared first, stdout flushed 10 times a second."""
        last_flush = [0.0]

        def on_item(index: int, result: Any, error: Any) -> None:
            if as_json:  # the file mode's line: a repr() stands in flagged "repr": true
                line = render_line(index, result, error)
            else:
                line = f"{index}: " + (
                    f"ERROR {error.type_name}: {error.message}" if error else repr(result)
                )
            with screen:
                if progress is not None:
                    progress.clear()
                try:
                    self.out.write(line + "\n")
                    # a slow stream shows each result at once; a fast one flushes 10 times a second
                    now = time.monotonic()
                    if now - last_flush[0] >= 0.1:
                        self.out.flush()
                        last_flush[0] = now
                except BrokenPipeError:
                    raise ReaderLeft("the reader of standard output left") from None
                except OSError as exc:  # stdout is a full disk
                    raise OutputError(
                        f"could not write results to standard output: {os_reason(exc)}"
                    ) from None

        return on_item

    def _detach_checked(self, spec: Any, args: argparse.Namespace) -> bool:
        """Whether the job runs detached, once the flags and the job file agree (a usage
        error here is a job that never started: ``--json`` still prints its one object)."""
        if args.engine != "remap" and spec.kind != "function":
            raise UsageError(f"--engine runs plain jobs only, not kind: {spec.kind}")
        detach = args.detach or (spec.kind == "function" and spec.options.detach)
        if args.engine != "remap" and (detach or args.dashboard):
            raise UsageError("--detach and --dashboard need remap's own engine, not --engine")
        if detach and spec.kind == "function" and spec.options.mode == "reduce":
            raise UsageError(
                "a reduce job cannot run detached: attach could not fold its results (the "
                "reduce function stays with this console); run it attached, or detach it with "
                "response_mode: file or sqlite"
            )
        if detach and spec.kind != "function" and args.wait_for_nodes is not None:
            raise UsageError(
                "--wait-for-nodes bounds an attached data or vertex job's wait; a detached one "
                "waits for its nodes (see it with: remap jobs; end it with: remap kill ID)"
            )
        if detach and not self.session.locate():
            raise UsageError(
                "compute --detach needs a server (--server or REMAP_SERVER): an embedded "
                "cluster ends with its console"
            )
        return detach

    def _closing(self, exc: RemapError, run: Any, sink: Any, as_json: bool) -> RemapError:
        """The job ended badly: add what was kept (and where) to its line; ``--json`` still
        prints the summary, on stdout, with the state and the error."""
        kept = sink.kept()
        if kept:
            exc.args = (f"{str(exc).rstrip('.')}; {kept}",)
        if as_json:
            self._say_failed(sink, exc, run.job_id if run is not None else None)
        return exc

    def _say_failed(self, sink: Any, exc: RemapError, job_id: Any, **extra: Any) -> None:
        """``--json`` of a job that did not finish: its sink's summary with the error."""
        summary = {**sink.summary(), **render.failure_json(exc, job_id), **extra}
        self.say(json.dumps(render.jsonable(summary)))

    def _interrupted(self, run: Any, sink: Any, as_json: bool = False) -> int:
        """Ctrl-C: kill the job, keep what arrived, say what was kept and where (``--json``:
        the summary of a job that did not finish, on stdout, as for any other end)."""
        from ..engines import EngineRun

        name = f"job {run.job_id}" if run.job_id is not None else "the job"
        self.note(f"interrupted: killing {name}")
        if isinstance(run, EngineRun):  # nothing on a server: cancel its chunks from here
            run.fail(JobKilled(f"{name} was interrupted"))
        else:
            run.kill()
            # what arrives until the server's "killed" still goes into the sink
            with contextlib.suppress(RemapError, TimeoutError):
                run.collect(sink, until=time.monotonic() + 5)
            run.detach()
            with contextlib.suppress(Exception):  # exiting interrupted anyway
                sink.close(complete=False)  # (a closed sink's close does nothing)
        kept = sink.kept()
        if kept:
            self.note(f"{name} killed; {kept}")
        if as_json:
            error = f"{name} was interrupted (Ctrl-C) and killed" + (f"; {kept}" if kept else "")
            self._say_failed(sink, JobKilled(error), run.job_id, exit_code=EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED

    def with_traceback(self, exc: JobFailed, traceback: str, where: str, show: bool) -> JobFailed:
        """With ``--traceback``, print where the failing user code raised; else say how to see it."""
        if not traceback or isinstance(exc, (JobKilled, OutputError)):
            return exc
        if show:
            self.note(f"remote traceback of {where}:\n{traceback.rstrip()}")
            return exc
        return type(exc)(f"{exc} (add --traceback to see where it was raised)")

    def _detached(self, run: Any, sink: Any, args: argparse.Namespace, spec: Any) -> int:
        # the arguments live here, so they must all reach the server before we may leave: it
        # answers the last message (args_end) once they are in its journal, or says why not
        while not run.stored_event.wait(0.1):
            if run.error is not None:  # refused, lost, or the input failed
                break
        if run.error is not None:
            sink.abandon()
            raise run.error
        stored = run.stored or {}
        # results are collected by attach (or the writer below), not here: free the output
        run.detach()
        sink.abandon()
        writer = None
        if spec.options.mode in ("sqlite", "file"):
            writer = self._spawn_writer(run.job_id, spec.output)
        why = "" if stored.get("stored") else str(stored.get("why") or "the server did not say")
        if args.json:
            pid = writer.pid if writer else None
            summary = {"job": run.job_id, "detached": True, "writer_pid": pid, "stored": not why}
            self.say(json.dumps({**summary, **({"why": why} if why else {})}))
        else:
            self.say(
                f"job {run.job_id} runs detached; collect results with: "
                f"{self.command_line('attach', str(run.job_id))}"
            )
        if why:  # (a restart of the server would end or forget the job: the user must know)
            self.note(f"warning: job {run.job_id}'s arguments are not on the server's disk: {why}")
            if writer is not None:
                self.say(
                    f"a background console (pid {writer.pid}) writes its results to {spec.output} "
                    f"as they arrive"
                )
        return 0

    def command_line(self, *words: str) -> str:
        """A command for the user to paste later: how this console was started, the server it
        used, and the settings file if a plain start from here would not find the same one."""
        argv0 = sys.argv[0] if sys.argv else ""
        prefix = [_python_on_path(), argv0] if argv0.endswith(".py") else ["remap"]
        flags = []
        if self.session.settings.server:
            flags += ["--server", self.session.settings.server]
        if self.env_file is not None:
            found = locate_env_file(None)[0]
            if found is None or found.resolve() != Path(self.env_file).resolve():
                flags += ["--env-file", str(Path(self.env_file).absolute())]
        return shlex.join([*prefix, *flags, *words])

    def _spawn_writer(self, job: int, output: Any) -> subprocess.Popen:
        """A console of its own session that attaches and writes a file-mode job's output."""
        settings = self.session.settings
        log = Path(f"{output}.log")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        if settings.secret:
            env["REMAP_SECRET_KEY"] = settings.secret
        argv = [sys.executable, "-c", "from remap.console.main import run; run()"]
        argv += ["--server", str(settings.server)]
        if self.env_file is not None:
            argv += ["--env-file", str(self.env_file)]
        argv += ["attach", str(job)]
        with open(log, "ab") as out:
            return subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def _print_results(
        self, mode: str, sink: Any, outcome: Any, as_json: bool, *, errors: bool = True
    ) -> None:
        """What compute and attach print on stdout: the values, or a file mode's summary
        (its line without the errors' count with ``errors=False``: attach says it apart)."""
        summary = sink.summary()
        if mode == "object":
            self._print_values(sink.value(), as_json)
        elif mode == "reduce":
            self.say(json.dumps(render.jsonable(sink.value())))
        elif mode == "stream":
            self.out.flush()  # printed as it came; the last lines may still be buffered
        elif as_json:
            self.say(json.dumps({**summary, "job": outcome.job, "state": outcome.state}))
        else:
            done, failed = summary.get("done", 0), summary.get("failed", 0)
            self.say(
                render.plural(done, "result")
                + (f", {render.plural(failed, 'error')}" if errors and failed else "")
                + (f" written to {summary['output']}" if summary.get("output") else "")
            )

    def _failed_arguments(self, failed: int) -> int:
        """A job that finished with failed arguments (on_error: continue) has its own exit code."""
        if not failed:
            return 0
        self.note(
            f"{failed} argument(s) failed (on_error: continue): exit code {EXIT_FAILED_ARGUMENTS}"
        )
        return EXIT_FAILED_ARGUMENTS

    # ------------------------------------------------------------------ cluster commands

    def cmd_status(self, args: argparse.Namespace) -> int:
        """``status``, and ``jobs`` and ``nodes``: one table of it."""
        status = self.session.request("status")
        if args.json:
            self.say(json.dumps(status if args.command == "status" else status[args.command]))
            return 0
        nodes, jobs, server = read_status(status)
        if args.command == "status":
            self.say(render.status_text(nodes, jobs, server.excluded or [], server.journal or ""))
        else:
            self.say(
                render.jobs_table(jobs) if args.command == "jobs" else render.nodes_table(nodes)
            )
        return 0

    cmd_jobs = cmd_nodes = cmd_status

    def cmd_kill(self, args: argparse.Namespace) -> int:
        if args.cluster and args.job is not None:  # which one was meant is not for us to guess
            raise UsageError(f"kill: give JOB_ID ({args.job}) or --cluster, not both")
        if args.cluster:
            if not args.yes:
                if not sys.stdin.isatty():
                    raise UsageError(
                        "kill --cluster stops every node and the server: add --yes to confirm"
                    )
                answer = input("stop every node and the server? [y/N] ").strip().lower()
                if answer not in ("y", "yes"):
                    self.note("not stopped")
                    return 1
            info = self.session.request("kill_cluster")
            self.say(f"stopping the cluster: {info.get('nodes', 0)} node(s) told to exit")
            return 0
        if args.job is None:
            raise UsageError("kill: give a JOB_ID, or --cluster")
        info = self.session.request("kill", args.job)
        if info.get("ended"):  # an older server does not say: "job N killed" as before
            self.say(f"job {info['job']} had already ended ({info['state']}): nothing to kill")
        else:
            self.say(f"job {info['job']} {info['state']}")
        return 0

    def cmd_drain(self, args: argparse.Namespace) -> int:
        info = self.session.request(args.command, args.node)
        now = "is draining" if args.command == "drain" else "takes work again"
        self.say(f"node {info['host']} ({info['node'][:8]}) {now}")
        return 0

    cmd_undrain = cmd_drain

    def cmd_exclude(self, args: argparse.Namespace) -> int:
        info = self.session.request(args.command, args.node)
        state = "excluded: its nodes get no work" if info["excluded"] else "included again"
        connected = f"{info['nodes']} node(s) connected" if info["nodes"] else "no node connected"
        self.say(
            f"host {info['host']} {state} ({connected}; excluded now: "
            f"{', '.join(info['list']) or 'none'})"
        )
        return 0

    cmd_include = cmd_exclude

    def cmd_dashboard(self, args: argparse.Namespace) -> int:
        if args.token:
            from .dashboard import bearer_token

            self.say(bearer_token(self.session.settings))
        else:
            self.say(self.session.dashboard_link(args.http_port))
        return 0

    def cmd_attach(self, args: argparse.Namespace) -> int:
        """Collect a detached job's results; Ctrl-C leaves the job running, and says so."""
        try:
            return self._attach(args)
        except KeyboardInterrupt:
            again = self.command_line("attach", str(args.job))
            self.note(f"interrupted: job {args.job} runs on; attach again with: {again}")
            return EXIT_INTERRUPTED

    def _attach(self, args: argparse.Namespace) -> int:
        """Collect a detached job's results into the sink its job file asked for."""
        from ..sinks import make_sink

        job = next((j for j in self.session.request("status")["jobs"] if j["id"] == args.job), None)
        if job is None:
            raise UsageError(f"no job {args.job} on the server (see: remap jobs)")
        if job.get("kind") in ("mapreduce", "vertex"):  # a detached driver on the server
            from .detached import attach_detached

            return attach_detached(self, job, args)
        mode = job["mode"]
        if mode == "reduce":
            raise UsageError(
                "attach cannot fold a reduce job's results: it has no reduce function; "
                "run reduce jobs attached"
            )
        output = job.get("output")
        sink = make_sink(  # a stream job's results as compute shows them, as they come
            mode,
            output=output if mode in ("sqlite", "file") else None,
            on_item=self._stream_printer(args.json, None, threading.Lock())
            if mode == "stream"
            else None,
        )
        try:
            run = self.session.attach(args.job)
        except BaseException:
            sink.abandon()
            raise
        try:
            outcome = run.collect(sink)
        except RemapError as exc:
            raise self._closing(exc, run, sink, args.json) from None
        self._print_results(mode, sink, outcome, args.json, errors=False)
        missing = sink.summary().get("missing", 0)
        if missing:
            return self.complain(JobFailed(f"{missing} result(s) of job {args.job} are missing"))
        # errors here beyond what the server counted (results this console could not take);
        # the job's own counts stay the server's, as `status` shows them
        lacking = run.session.failed - outcome.failed
        if lacking > 0:
            return self.complain(
                JobFailed(
                    f"{lacking} result(s) of job {args.job} that the server counts as done are "
                    "errors on this console (too large for its frames, or not unpickled here: "
                    "see them above); the server keeps them"
                )
            )
        return self._failed_arguments(outcome.failed)

    cmd_results = cmd_attach

    def _print_values(self, values: list[Any], as_json: bool) -> None:
        """One JSON array (``--json``) or one JSON value per line; errors as their JSON form."""
        items = [render.jsonable(v.to_json() if hasattr(v, "to_json") else v) for v in values]
        if as_json:
            self.say(json.dumps(items))
        elif items:
            self.say("\n".join(json.dumps(v) for v in items))
        else:  # no line on stdout for no value (`| wc -l` says 0); a person is told why
            self.note("no results: the job had no arguments")

    def cmd_help(self, args: argparse.Namespace) -> int:
        self.say(self.help_text(args.topic))
        return 0

    def help_text(self, topic: str | None) -> str:
        """The command list, or one command's usage, description and options."""
        if not topic:
            return HELP
        if topic not in DESCRIPTIONS:
            raise UsageError(f"help: {no_command(topic)}")
        return (self.parser or build_parser()).commands[topic].format_help().rstrip("\n")

    def cmd_quit(self, args: argparse.Namespace) -> int:
        return 0


class Shell(cmd.Cmd):
    """The interactive console: history, tab completion, the one-shot commands."""

    intro = "remap console: type help for the commands, quit to leave."
    prompt = "remap> "

    def __init__(self, console: Console, parser: Parser) -> None:
        super().__init__()
        self.console = console
        self.parser = parser
        self.history = Path(os.path.expanduser("~")) / ".remap_history"
        with contextlib.suppress(ImportError, OSError):
            import readline

            readline.set_completer_delims(" \t")
            if self.history.exists():
                readline.read_history_file(self.history)

    def default(self, line: str) -> bool:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.console.complain(UsageError(str(exc)))
            return False
        if not words:
            return False
        if words[0] in ("quit", "exit"):
            return True
        if not words[0].startswith("-") and words[0] not in COMMANDS:
            # as `help frobnicate` says it; argparse's line offered `shell`, inside the shell
            self.console.complain(no_command(words[0]))
            return False
        try:
            args = self.parser.parse_args(words)
            if args.command in (None, "shell"):
                return False
            fixed = [f"--{k.replace('_', '-')}" for k in GLOBAL_FLAGS if getattr(args, k, None)]
            if fixed:
                raise UsageError(
                    f"{', '.join(fixed)}: the shell's settings are fixed when it starts "
                    f"(restart it with them: remap {' '.join(fixed)} ...)"
                )
            self.console.execute(args)
        except SystemExit:
            pass
        except (RemapError, KeyboardInterrupt) as exc:
            self.console.complain(exc)
        from .filejob import TERMINATED

        return TERMINATED.is_set()  # a SIGTERM ended the command's job: the shell goes too

    def cmdloop(self, intro: Any = None) -> None:
        """Ctrl-C at the prompt drops the line and gives a fresh prompt, as a shell does (the
        shell's embedded cluster lives on); quit, exit or Ctrl-D leave."""
        while True:
            try:
                super().cmdloop(intro)
                return
            except KeyboardInterrupt:
                self.console.say("^C")
                intro = ""  # not the greeting again

    def do_help(self, arg: str) -> bool:  # type: ignore[override]
        try:
            self.console.say(self.console.help_text(arg.strip() or None))
        except RemapError as exc:
            self.console.complain(exc)
        return False

    def do_EOF(self, arg: str) -> bool:  # noqa: N802 - cmd's name
        self.console.say("")
        return True

    def emptyline(self) -> bool:
        return False

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        return [c + " " for c in COMMANDS if c.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        command = line.split()[0] if line.split() else ""
        if command in ID_COMMANDS:
            return [i + " " for i in self.ids(ID_COMMANDS[command]) if i.startswith(text)]
        if command == "help":
            return [c + " " for c in COMMANDS if c.startswith(text)]
        base = Path(text).parent if "/" in text else Path(".")
        prefix = Path(text).name
        try:
            names = sorted(p for p in base.iterdir() if p.name.startswith(prefix))
        except OSError:
            return []
        return [
            str(p) + ("/" if p.is_dir() else "")
            for p in names
            if p.is_dir() or p.suffix in (".yaml", ".yml")
        ]

    def ids(self, kind: str) -> list[str]:
        """Job or node ids the server knows, for completion; none when it cannot be asked."""
        if not self.console.session.can_request():
            return []
        try:
            status = self.console.session.request("status", timeout=2.0)
        except (RemapError, TimeoutError):
            return []
        return [str(item["id"]) for item in status[kind]]

    def postloop(self) -> None:
        with contextlib.suppress(ImportError, OSError):
            import readline

            readline.write_history_file(self.history)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    session: Session | None = None
    try:
        args = parser.parse_args(argv)
        job_file = args.job if args.command == "compute" else None
        env_file, searched = locate_env_file(args.env_file, job_file)
        settings = load_settings(
            {"server": args.server, "cores": args.cores, "log_level": args.log_level},
            dotenv_path=env_file,
        )
        start_logging(settings.log_level if args.log_level else "error")
        shell = args.command in (None, "shell")
        # in the shell, status and friends start the embedded cluster as compute would
        session = Session(settings, env_searched=searched, embedded_for_requests=shell)
        console = Console(session, env_file=env_file, parser=parser)
        if shell:
            if args.command is None and not sys.stdin.isatty():
                parser.print_help()
                return 2
            Shell(console, parser).cmdloop()
            from .filejob import TERMINATED

            return EXIT_INTERRUPTED if TERMINATED.is_set() else 0
        return console.execute(args)
    except (KeyboardInterrupt, RemapError) as exc:
        line, code = one_line(exc)
        if code != EXIT_BROKEN_PIPE:
            print(line, file=sys.stderr)
        return code
    finally:
        if session is not None:
            session.close()


def run() -> None:
    """Console-script entry point."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`remap status | head -1`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.stderr.flush()
    os._exit(code)  # the reactor thread is a daemon; do not wait on it
