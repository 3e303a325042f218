"""What the server counts for ``/metrics`` and the dashboard: a scheduler watcher and a collector.

Gauges and per-job counters are read from the scheduler when scraped; only what it forgets is
kept here (batch latencies, totals over pruned jobs, recent errors, the throughput history).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protocol import messages as m

#: errors kept for the dashboard and per job
RECENT_ERRORS = 50
JOB_ERRORS = 20
#: (time, tasks done, tasks failed) samples kept for the throughput chart (one per tick)
HISTORY = 300
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerStats:
    """Watches the scheduler (see ``Scheduler.watchers``) and serves Prometheus text."""

    def __init__(self, scheduler: Any, traffic: Any) -> None:
        self.scheduler = scheduler
        self.traffic = traffic
        self.done_total = 0
        self.failed_total = 0
        self.errors: deque[dict] = deque(maxlen=RECENT_ERRORS)
        self.job_errors: dict[int, deque[dict]] = {}
        self.history: deque[tuple[float, int, int]] = deque(maxlen=HISTORY)
        self.registry = CollectorRegistry(auto_describe=False)
        self.batch_seconds = Histogram(
            "remap_batch_seconds",
            "Seconds from sending a batch to a node to its answer",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)  # collect() reads the scheduler at scrape time
        scheduler.watchers.append(self)

    def close(self) -> None:
        if self in self.scheduler.watchers:
            self.scheduler.watchers.remove(self)

    # ------------------------------------------------------------------ scheduler watcher

    def batch_finished(self, job: Any, n: int, seconds: float) -> None:
        self.batch_seconds.observe(max(0.0, seconds))

    def results_delivered(self, job: Any, msg: m.Results) -> None:
        failed = len(msg.errors)
        self.failed_total += failed
        self.done_total += len(msg.answered) - failed  # a fold's partial covers its batch too
        if not failed:
            return
        now = self.scheduler.clock.seconds()
        per_job = self.job_errors.get(job.id)
        if per_job is None:
            per_job = self.job_errors[job.id] = deque(maxlen=JOB_ERRORS)
            for gone in [j for j in self.job_errors if j not in self.scheduler.jobs]:
                del self.job_errors[gone]
        for error in msg.errors:
            pos, type_name, text = error[0], error[1], error[2]
            entry = {
                "job": job.id,
                "job_name": job.options.name,
                "index": msg.answered[pos] if 0 <= pos < len(msg.answered) else None,
                "type": str(type_name)[:200],
                "message": str(text)[:500],
                "time": round(now, 3),
            }
            self.errors.append(entry)
            per_job.append(entry)

    # ------------------------------------------------------------------ dashboard

    def sample(self) -> None:
        """Record one throughput point (called once per tick)."""
        self.history.append(
            (round(self.scheduler.clock.seconds(), 3), self.done_total, self.failed_total)
        )

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Any]:
        sched = self.scheduler
        nodes = list(sched.nodes.values())
        done = CounterMetricFamily(
            "remap_job_tasks_done", "Arguments finished without error, by job", labels=["job"]
        )
        failed = CounterMetricFamily(
            "remap_job_tasks_failed",
            "Arguments that raised or were given up, by job",
            labels=["job"],
        )
        for job in sched.jobs.values():
            done.add_metric([str(job.id)], job.done)
            failed.add_metric([str(job.id)], job.failed)
        yield done
        yield failed
        yield CounterMetricFamily(
            "remap_tasks_done", "Arguments finished without error, all jobs", self.done_total
        )
        yield CounterMetricFamily(
            "remap_tasks_failed", "Arguments that failed, all jobs", self.failed_total
        )
        yield GaugeMetricFamily("remap_nodes", "Connected nodes", len(nodes))
        yield CounterMetricFamily(
            "remap_nodes_lost",
            "Nodes lost without a goodbye (crashed, killed, link cut or silent); work re-queued",
            sched.nodes_lost,
        )
        yield CounterMetricFamily(
            "remap_nodes_left",
            "Nodes that left as asked (said goodbye, or were told to stop); work re-queued",
            sched.nodes_left,
        )
        yield GaugeMetricFamily(
            "remap_cores", "Cores of connected nodes", sum(n.cores for n in nodes)
        )
        yield GaugeMetricFamily(
            "remap_cores_busy",
            "Cores running a batch",
            sum(min(n.cores, len(n.inflight)) for n in nodes),
        )
        yield GaugeMetricFamily(
            "remap_queue_depth",
            "Arguments queued on the server, waiting for a core",
            sum(j.pending_count for j in sched.active.values()),
        )
        yield GaugeMetricFamily("remap_jobs_running", "Jobs running", len(sched.active))
        yield GaugeMetricFamily(
            "remap_detached_results_bytes",
            "Bytes of detached jobs' results in the server's memory (REMAP_DETACHED_RESULTS_MEMORY*)",
            sched.kept_bytes,
        )
        yield CounterMetricFamily(
            "remap_received_bytes",
            "Bytes received from nodes and consoles",
            self.traffic.received,
        )
        yield CounterMetricFamily(
            "remap_sent_bytes", "Bytes sent to nodes and consoles", self.traffic.sent
        )
