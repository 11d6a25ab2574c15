"""Every Prometheus collector of the proxy, on a registry of its own (shell).

Names and labels are the contract of SPEC section 11 that dashboards and alert rules
use. No label carries a user id or any other unbounded value: routes, backends, roles,
outcomes, kinds and reasons all come from small fixed sets or the configuration.
With several worker processes, prometheus_client's multiprocess mode keeps the values in
shared files and each gauge says how the workers' values combine.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Outcome(enum.StrEnum):
    """How one exchange ended, as seen by the proxy."""

    SUCCESS = "success"  # backend answered 1xx-3xx / WebSocket closed normally
    CLIENT_ERROR = "client_error"  # backend answered 4xx
    SERVER_ERROR = "server_error"  # backend answered 5xx
    UNREACHABLE = "unreachable"  # no connection to the backend (502 / 1014)
    TIMEOUT = "timeout"  # backend too slow (504 / 1011)
    TOO_LARGE = "too_large"  # request body or message over the limit (413 / 1009)
    BROKEN = "broken"  # backend failed mid-stream
    CLIENT_CLOSED = "client_closed"  # the client went away first

    __hash__ = str.__hash__  # str's C hash in the slot (see routing.Backend)


ERROR_OUTCOMES = frozenset(
    {Outcome.SERVER_ERROR, Outcome.UNREACHABLE, Outcome.TIMEOUT, Outcome.BROKEN}
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Labelled children looked up once per label set: ``labels()`` validates and
        # locks on every call, which shows on the per-request path.
        self._children: dict[tuple[object, ...], Any] = {}
        self._batches: dict[tuple[str, str, str], _Batch] = {}
        self._increments: dict[tuple[Any, tuple[str, ...]], int] = {}
        # A list: typed as the fixed-length tuple it is built from, mypyc would keep it
        # unboxed and box its 17 floats into a new tuple at every use.
        self._bounds: list[float] = [*LATENCY_BUCKETS, math.inf]
        r = self.registry
        # Registered first, so that it runs before the collectors it feeds.
        r.register(_Flush(self))
        self.requests = Counter(
            "strangler_requests_total",
            "Exchanges relayed, by route, backend, role and outcome.",
            ["route", "backend", "role", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "strangler_request_duration_seconds",
            "Time from the request to the last byte of the response.",
            ["route", "backend", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_event = Histogram(
            "strangler_first_event_seconds",
            "Time from the request (or WebSocket client message) to the first event.",
            ["route", "backend", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.comparisons = Counter(
            "strangler_comparisons_total",
            "Primary and shadow sequences compared, by outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.divergences = Counter(
            "strangler_divergences_total",
            "Differences found between primary and shadow sequences, by kind.",
            ["route", "kind"],
            registry=r,
        )
        self.contract_violations = Counter(
            "strangler_contract_violations_total",
            "Event sequences that break the route's event contract.",
            ["route", "backend"],
            registry=r,
        )
        self.isolation_violations = Counter(
            "strangler_isolation_violations_total",
            "Events carrying another user's id, withheld from the client.",
            ["route", "backend"],
            registry=r,
        )
        self.recording_limit = Counter(
            "strangler_recording_limit_total",
            "Exchanges or WebSocket turns whose events passed the recording limit on one "
            "side (not compared, not checked against the contract).",
            ["route", "backend", "role"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "strangler_shadow_dropped_total",
            "Shadow runs not started or not finished, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.rollout_percent = Gauge(
            "strangler_rollout_percent",
            "The flag's rollout percentage as this replica sees it.",
            ["route", "flag"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.rollbacks = Counter(
            "strangler_rollbacks_total",
            "Automatic and operator rollbacks, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.judge_state = Gauge(
            "strangler_judge_state",
            "0 healthy, 1 holding, 2 failing, 3 rolled back.",
            ["route"],
            registry=r,
            multiprocess_mode="max",
        )
        self.websocket_sessions = Gauge(
            "strangler_websocket_sessions",
            "WebSocket sessions open now.",
            ["route", "backend"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.invalid_user_ids = Counter(
            "strangler_invalid_user_ids_total",
            "Requests whose user id was not UTF-8, served as having none (legacy).",
            ["route"],
            registry=r,
        )
        self.flags_invalid = Counter(
            "strangler_flags_invalid_total",
            "Flags documents refused as malformed or unsound; the last good flags stayed in"
            " force (each process counts what it refused).",
            registry=r,
        )
        self.flags_loaded = Gauge(
            "strangler_flags_loaded_timestamp_seconds",
            "Unix time at which the flags in force were loaded (the oldest among workers).",
            registry=r,
            multiprocess_mode="livemin",
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def increment(self, metric: Counter, *labels: str) -> None:
        """One more on a labelled counter, batched until the next collection."""
        key = (metric, labels)
        pending = self._increments
        pending[key] = pending.get(key, 0) + 1

    def count_dropped(self, route: str, reason: str) -> None:
        self.increment(self.shadow_dropped, route, reason)

    # The three per-exchange observations are batched: a few native updates here, the
    # Prometheus values (locked, and mmap-backed with workers) updated in bulk by
    # ``flush``, which every collection of the registry runs first. One batch per
    # route, backend and role holds all three: one lookup per exchange. A batch lives
    # as long as the proxy (``flush`` empties it in place), so that what lasts longer
    # than an exchange, a WebSocket session, looks its batch up once.

    def batch(self, route: str, backend: str, role: str) -> _Batch:
        key = (route, backend, role)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(len(self._bounds))
        return batch

    def count_request(self, route: str, backend: str, role: str, outcome: str) -> None:
        counts = self.batch(route, backend, role).counts
        counts[outcome] = counts.get(outcome, 0) + 1

    def observe_first_event(self, route: str, backend: str, role: str, seconds: float) -> None:
        self.first_event_in(self.batch(route, backend, role), seconds)

    def exchange(
        self,
        route: str,
        backend: str,
        role: str,
        outcome: str,
        duration: float | None,
        first_event: float | None,
    ) -> None:
        """One exchange's count, duration and first-event time at once (either time may
        be missing)."""
        batch = self.batch(route, backend, role)
        counts = batch.counts
        counts[outcome] = counts.get(outcome, 0) + 1
        if duration is not None:
            batch.duration_total += duration
            batch.duration_buckets[self._bucket(duration)] += 1
        if first_event is not None:
            self.first_event_in(batch, first_event)

    def first_event_in(self, batch: _Batch, seconds: float) -> None:
        """A first-event time, into a batch the caller holds (see ``batch``)."""
        batch.first_total += seconds
        batch.first_buckets[self._bucket(seconds)] += 1

    def _bucket(self, value: float) -> int:
        """The first bucket whose bound is at or above the value (Prometheus' "le"). Most
        values fall in the first few, so a compiled scan beats a call to bisect."""
        bounds = self._bounds
        index = 0
        last = len(bounds) - 1
        while index < last and value > bounds[index]:
            index += 1
        return index

    def flush(self) -> None:
        """Move the batched observations into the Prometheus values."""
        # Batches are emptied in place, not replaced: sessions hold theirs. Everything
        # here runs on the event loop's thread, as every observation does.
        for labels, batch in self._batches.items():
            counts, batch.counts = batch.counts, {}
            for outcome, n in counts.items():
                self._child(self.requests, *labels, outcome).inc(n)
            durations, firsts = batch.duration_total, batch.first_total
            batch.duration_total = batch.first_total = 0.0
            for metric, buckets, total in (
                (self.duration, batch.duration_buckets, durations),
                (self.first_event, batch.first_buckets, firsts),
            ):
                if not any(buckets):
                    continue
                child = self._child(metric, *labels)
                # prometheus_client keeps a histogram child as per-bucket (non-cumulative)
                # values and a sum; observe() adds to one bucket and the sum, as here.
                for index, n in enumerate(buckets):
                    if n:
                        child._buckets[index].inc(n)
                        buckets[index] = 0
                child._sum.inc(total)
        increments, self._increments = self._increments, {}
        for (metric, values), n in increments.items():
            self._child(metric, *values).inc(n)


class SupervisorMetrics:
    """The collectors of the process that supervises the workers, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.worker_restarts = Counter(
            "strangler_worker_restarts_total",
            "Worker processes started again after they died, by how they ended.",
            ["cause"],
            registry=self.registry,
        )


class _Batch:
    """What one route, backend and role saw since the last flush."""

    __slots__ = ("counts", "duration_buckets", "duration_total", "first_buckets", "first_total")

    def __init__(self, size: int) -> None:
        self.counts: dict[str, int] = {}
        self.duration_total = 0.0
        self.duration_buckets = [0] * size
        self.first_total = 0.0
        self.first_buckets = [0] * size


class _Flush:
    """A collector with no metrics of its own: collecting the registry flushes first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._metrics.flush()
        return []
