"""The divergence log: every comparison that found differences, kept with both normalised
sequences and the classified divergences in a SQLite file, and served to operators by
``GET /api/divergences`` on the admin listener (I/O). This module owns the record type,
the redaction of configured payload fields before anything reaches the disk, the caps
that keep one pathological stream from bloating the file, bounded retention, and the
background writer: ``add`` only enqueues, and one dedicated thread owns the connection,
so that neither a slow disk nor a lock held by another worker process ever blocks the
event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web

from adapters.compare import Divergence, DivergenceKind
from adapters.events import Event
from adapters.normalise import WILDCARD, check_path

log = logging.getLogger(__name__)

REDACTED: Final = "<redacted>"
MEMORY: Final = ":memory:"

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 1000

# Another worker process may hold the write lock for a batch; waiting this long is
# cheap because only the store's own thread waits.
_BUSY_TIMEOUT_SECONDS: Final = 5.0
# Records taken off the queue per transaction: one fsync amortised over many rows.
_BATCH: Final = 200
_JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS divergences (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    route TEXT NOT NULL,
    protocol TEXT NOT NULL,
    primary_backend TEXT NOT NULL,
    shadow_backend TEXT NOT NULL,
    turn INTEGER,
    reference_status INTEGER,
    subject_status INTEGER,
    kinds TEXT NOT NULL,
    divergence_count INTEGER NOT NULL,
    divergences TEXT NOT NULL,
    reference_count INTEGER NOT NULL,
    reference TEXT NOT NULL,
    subject_count INTEGER NOT NULL,
    subject TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS divergences_route_id ON divergences (route, id);
"""
_COLUMNS: Final = (
    "id, time, route, protocol, primary_backend, shadow_backend, turn, reference_status,"
    " subject_status, kinds, divergence_count, divergences, reference_count, reference,"
    " subject_count, subject"
)
_INSERT: Final = (
    "INSERT INTO divergences (time, route, protocol, primary_backend, shadow_backend, turn,"
    " reference_status, subject_status, kinds, divergence_count, divergences,"
    " reference_count, reference, subject_count, subject)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The (max_rows + 1)-th newest id and everything older goes; the primary key makes it
# a short index walk however large the table is.
# Row ids are handed out as the largest plus one and only the oldest rows are deleted, so
# the newest ``max_rows`` are those above ``max(id) - max_rows``: one look at the end of
# the table, where counting back ``max_rows`` rows with OFFSET walked every row's page
# (8 ms an insert at 10,000 rows, on the proxy's own core).
_TRIM: Final = "DELETE FROM divergences WHERE id <= (SELECT max(id) FROM divergences) - ?"

_T = TypeVar("_T")
_Row = tuple[Any, ...]


class DivergenceStoreError(Exception):
    """The divergence store's file cannot be opened or used; the message names the path."""


@dataclass(frozen=True, slots=True)
class DivergenceRecord:
    """One comparison that found divergences. ``reference`` is legacy's normalised
    sequence and ``subject`` the candidate's (in an A/A run, the primary's and the
    shadow's), whichever of them served; ``time`` is unix seconds, given by the caller."""

    time: float
    route: str
    protocol: str
    primary: str
    shadow: str
    reference: Sequence[Event]
    subject: Sequence[Event]
    divergences: Sequence[Divergence]
    reference_status: int | None = None
    subject_status: int | None = None
    turn: int | None = None


@dataclass(frozen=True, slots=True)
class Redaction:
    """Payload fields never to be stored, as dotted paths with the normaliser's semantics:
    ``*`` matches exactly one level, list items are levels named by their index, a bare
    name matches only the top-level field. A matching field keeps its key and takes the
    value ``REDACTED``, so stored sequences still line up field by field."""

    paths: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, patterns: Iterable[str]) -> Redaction:
        if isinstance(patterns, str):
            raise TypeError(f"redact must be a list of paths, not the string {patterns!r}")
        compiled = []
        for pattern in patterns:
            check_path(pattern)
            compiled.append(tuple(pattern.split(".")))
        return cls(tuple(compiled))

    def data(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """The payload with every matching field redacted; a copy only where it changed.
        Recursion is as deep as the longest pattern, never as deep as the payload."""
        if not self.paths:
            return data
        redacted: Mapping[str, Any] = _redact(data, self.paths)
        return redacted

    def event(self, event: Event) -> Event:
        data = self.data(event.data)
        # Undecodable input carries a raw excerpt whose fields cannot be named, so no
        # configured redaction could reach into it: with any redaction on, it goes.
        if self.paths and event.error is not None and "excerpt" in data:
            data = {**data, "excerpt": REDACTED}
        return event if data is event.data else Event(event.type, data, event.error)

    def quotes_redacted(self, path: str, payloads: Sequence[Mapping[str, Any]] = ()) -> bool:
        """Whether a difference at ``path`` may quote a redacted value: the path lies at or
        below a redacted field, or above one and its value, on either side, is an object
        or list that may hold it. Without the payloads, or when the path cannot be followed
        in them (a key holding a dot), it may."""
        segments = path.split(".")
        found = [_value_at(payload, segments) for payload in payloads]
        found = [value for value in found if value is not _ABSENT]
        if not found:
            return True
        for pattern in self.paths:
            if not all(p in (WILDCARD, s) for p, s in zip(pattern, segments, strict=False)):
                continue
            if len(pattern) <= len(segments):
                return True
            if any(not _is_scalar(value) for value in found):
                return True
        return False

    def divergence(
        self, divergence: Divergence, reference: Sequence[Event] = (), subject: Sequence[Event] = ()
    ) -> Divergence:
        """The divergence, its detail hidden when it may quote a redacted value.
        ``compare`` quotes both sides' values in a ``payload`` detail, and an ``error``
        detail quotes either the decoder's reason (harmless) or the event's own ``error``
        field; the other kinds quote only types and positions. The sequences, when given,
        tell which of those a detail quotes."""
        if not self.paths or not divergence.detail:
            return divergence
        events = [
            event
            for event in (
                _event_at(reference, divergence.index_reference),
                _event_at(subject, divergence.index_subject),
            )
            if event is not None
        ]
        if divergence.kind is DivergenceKind.PAYLOAD:
            paths = divergence.paths
        elif divergence.kind is DivergenceKind.ERROR:
            if events and all(event.error is not None for event in events):
                return divergence
            paths = ("error",)
        else:
            return divergence
        payloads = [event.data for event in events]
        if any(self.quotes_redacted(path, payloads) for path in paths):
            return dataclasses.replace(divergence, detail=REDACTED)
        return divergence


_ABSENT: Final = object()


def _event_at(events: Sequence[Event], index: int | None) -> Event | None:
    return events[index] if index is not None and 0 <= index < len(events) else None


def _value_at(payload: Any, segments: Sequence[str]) -> Any:
    value = payload
    for segment in segments:
        if isinstance(value, Mapping) and segment in value:
            value = value[segment]
        elif isinstance(value, list | tuple) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return _ABSENT
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _redact(value: Any, patterns: tuple[tuple[str, ...], ...]) -> Any:
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]]
        if any(pattern[0] == WILDCARD for pattern in patterns):
            items = value.items()
        else:
            named = dict.fromkeys(pattern[0] for pattern in patterns)
            items = ((key, value[key]) for key in named if key in value)
        copy: dict[Any, Any] | None = None
        for key, old in items:
            new = _redact_field(str(key), old, patterns)
            if new is not old:
                if copy is None:
                    copy = dict(value)
                copy[key] = new
        return value if copy is None else copy
    if isinstance(value, list | tuple):
        listed: list[Any] | None = None
        for index, old in enumerate(value):
            new = _redact_field(str(index), old, patterns)
            if new is not old:
                if listed is None:
                    listed = list(value)
                listed[index] = new
        return value if listed is None else listed
    return value


def _redact_field(key: str, value: Any, patterns: tuple[tuple[str, ...], ...]) -> Any:
    below = []
    for pattern in patterns:
        if pattern[0] in (key, WILDCARD):
            if len(pattern) == 1:
                return REDACTED
            below.append(pattern[1:])
    return _redact(value, tuple(below)) if below else value


@dataclass(frozen=True, slots=True)
class _Pending:
    """A record waiting to be written, with the lengths of its sequences before they
    were cut to the prefix that can be stored."""

    record: DivergenceRecord
    reference_count: int
    subject_count: int


@dataclass(frozen=True, slots=True)
class _Limits:
    events: int
    side_bytes: int
    divergences: int
    paths: int


def _event_json(event: Event) -> bytes:
    as_dict = {"type": event.type, "data": event.data, "error": event.error}
    try:
        return orjson.dumps(as_dict, option=_JSON_OPTIONS)
    except TypeError as error:  # not JSON (a huge int, too deep): keep the event's place
        as_dict["data"] = {"<not stored>": f"the payload is not JSON: {error}"}
        return orjson.dumps(as_dict)


def _divergence_json(divergence: Divergence, max_paths: int) -> bytes:
    return orjson.dumps(
        {
            "kind": str(divergence.kind),
            "index_reference": divergence.index_reference,
            "index_subject": divergence.index_subject,
            "event_type": divergence.event_type,
            "paths": list(divergence.paths[:max_paths]),
            "path_count": len(divergence.paths),
            "detail": divergence.detail,
        }
    )


def _json_array(parts: Iterable[bytes], max_items: int, max_bytes: int) -> str:
    """A JSON array of the leading parts that fit both caps. A prefix, so that the
    divergences' indices into a sequence stay valid for every event that is kept."""
    kept: list[bytes] = []
    size = 2
    for part in parts:
        if len(kept) >= max_items or size + len(part) + 1 > max_bytes:
            break
        kept.append(part)
        size += len(part) + 1
    return (b"[" + b",".join(kept) + b"]").decode()


def _row(pending: _Pending, redaction: Redaction, limits: _Limits) -> _Row:
    """The row a record is stored as: redacted, capped, encoded (pure, and CPU-bound:
    it runs on the store's thread, not the event loop)."""
    record = pending.record
    if not math.isfinite(record.time):  # SQLite would store NULL and fail the whole batch
        raise ValueError(f"the record's time is {record.time}")

    def side(events: Sequence[Event]) -> str:
        shown = (redaction.event(event) for event in events)
        return _json_array(map(_event_json, shown), limits.events, limits.side_bytes)

    divergences = [
        redaction.divergence(divergence, record.reference, record.subject)
        for divergence in record.divergences
    ]
    kinds = list(dict.fromkeys(str(divergence.kind) for divergence in divergences))
    listed = _json_array(
        (_divergence_json(divergence, limits.paths) for divergence in divergences),
        limits.divergences,
        limits.side_bytes,
    )
    return (
        record.time,
        record.route,
        record.protocol,
        record.primary,
        record.shadow,
        record.turn,
        record.reference_status,
        record.subject_status,
        orjson.dumps(kinds).decode(),
        len(divergences),
        listed,
        pending.reference_count,
        side(record.reference),
        pending.subject_count,
        side(record.subject),
    )


def _entry(row: sqlite3.Row) -> dict[str, Any]:
    """A stored row as the admin API shows it."""
    reference = orjson.loads(row["reference"])
    subject = orjson.loads(row["subject"])
    divergences = orjson.loads(row["divergences"])
    try:
        moment: str | None = (
            datetime.fromtimestamp(row["time"], tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    except (ValueError, OverflowError, OSError):  # a caller's clock gone wrong
        moment = None
    return {
        "id": row["id"],
        "time": moment,
        "unix_time": row["time"],
        "route": row["route"],
        "protocol": row["protocol"],
        "primary": row["primary_backend"],
        "shadow": row["shadow_backend"],
        "turn": row["turn"],
        "kinds": orjson.loads(row["kinds"]),
        "divergences": divergences,
        "divergence_count": row["divergence_count"],
        "divergences_truncated": len(divergences) < row["divergence_count"],
        "reference": reference,
        "reference_count": row["reference_count"],
        "reference_truncated": len(reference) < row["reference_count"],
        "subject": subject,
        "subject_count": row["subject_count"],
        "subject_truncated": len(subject) < row["subject_count"],
        "reference_status": row["reference_status"],
        "subject_status": row["subject_status"],
    }


class DivergenceStore:
    """Divergence records in one SQLite file, written in batches by a background task
    through one dedicated thread, which also owns the connection and serves reads.

    ``add`` never blocks and never raises: past ``max_pending`` records waiting to be
    written, a record is dropped and counted in ``dropped``. ``written`` counts rows
    committed, ``failed`` records lost to a database error (logged). Several processes
    may share one file: WAL lets readers and one writer proceed together, and the busy
    timeout serialises the writers. At most ``max_rows`` rows are kept, the newest."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_rows: int = 10_000,
        redact: Sequence[str] = (),
        max_pending: int = 10_000,
        max_events: int = 500,
        max_side_bytes: int = 256 * 1024,
        max_divergences: int = 1000,
        max_paths: int = 100,
    ) -> None:
        if max_rows < 1 or max_pending < 1 or max_events < 0 or max_side_bytes < 2:
            raise ValueError("the divergence store's bounds must be positive")
        self.path = path
        self.max_rows = max_rows
        self.redaction = Redaction.of(redact)
        self.max_events = max_events
        self._limits = _Limits(max_events, max_side_bytes, max_divergences, max_paths)
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_pending)
        self._accepted = 0  # records enqueued so far
        self._settled = 0  # of those, records written or failed
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Open or create the file and start the writer; ``DivergenceStoreError`` names
        the path when it cannot be opened."""
        if self._executor is not None or self._closed:
            raise RuntimeError("the divergence store can be started only once")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="divergence-store")
        try:
            self._connection = await self._on_thread(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="divergence-store-writer")

    def add(self, record: DivergenceRecord) -> None:
        """Queue a record for writing; never blocks, never raises."""
        try:
            if self._closed:
                self.dropped += 1
                return
            if self._queue.full():
                self.dropped += 1
                return
            counts = len(record.reference), len(record.subject)
            # Only a bounded prefix is ever stored: the queue need not keep the rest alive.
            cap = self.max_events
            if counts[0] > cap or counts[1] > cap:
                record = dataclasses.replace(
                    record, reference=record.reference[:cap], subject=record.subject[:cap]
                )
            self._queue.put_nowait(_Pending(record, *counts))
            self._accepted += 1
        except Exception:  # a divergence log must never take a request down
            self.dropped += 1
            log.exception("divergence store: a record could not be queued")

    async def recent(
        self, route: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[dict[str, Any]]:
        """The newest records first, as JSON-ready dicts; only ``route``'s if given."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        return await self._on_thread(self._select, route, limit)

    async def flush(self) -> None:
        """Wait until every record added before this call is written (or has failed)."""
        target = self._accepted
        if self._settled >= target:
            return
        if self._writer is None:
            raise RuntimeError("the divergence store is not started")
        waiter = asyncio.get_running_loop().create_future()
        self._flushers.append((target, waiter))
        await waiter

    async def close(self) -> None:
        """Write what was added, stop the writer, close the connection; idempotent."""
        if self._closed:
            return
        self._closed = True  # from here on add() drops: the flush below must end
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            await asyncio.wait([self._writer])
        self.dropped += self._queue.qsize()  # added but never started
        if self._executor is not None:
            await self._on_thread(self._close_connection)
            self._executor.shutdown(wait=False)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                written = await loop.run_in_executor(self._executor, self._insert, batch)
            except Exception:
                log.exception(
                    "divergence store %s: %d records could not be written", self.path, len(batch)
                )
                written = 0
            self.written += written
            self.failed += len(batch) - written
            self._settled += len(batch)
            self._wake_flushers()

    def _wake_flushers(self) -> None:
        waiting = []
        for target, waiter in self._flushers:
            if target > self._settled:
                waiting.append((target, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        self._flushers = waiting

    async def _on_thread(self, work: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RuntimeError("the divergence store is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    # Everything below runs on the store's own thread.

    def _open(self) -> sqlite3.Connection:
        name = str(self.path)
        if name != MEMORY and not Path(name).parent.is_dir():
            raise DivergenceStoreError(
                f"cannot open the divergence store {name}: "
                f"its directory {Path(name).parent} does not exist"
            )
        try:
            connection = sqlite3.connect(name, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
        except sqlite3.Error as error:
            raise DivergenceStoreError(
                f"cannot open the divergence store {name}: {error}"
            ) from error
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL loses at most the last commits on power loss, never
            # consistency: fine for a diagnostic log, and no fsync per batch.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.executescript(_SCHEMA)
        except sqlite3.Error as error:
            connection.close()
            raise DivergenceStoreError(
                f"cannot open the divergence store {name}: {error}"
            ) from error
        return connection

    def _insert(self, batch: list[_Pending]) -> int:
        rows = []
        for pending in batch:
            try:
                rows.append(_row(pending, self.redaction, self._limits))
            except Exception:
                route = pending.record.route
                log.exception("divergence store: a record of route %s cannot be stored", route)
        if not rows:
            return 0
        connection = self._connected()
        # IMMEDIATE takes the write lock up front, waiting out other processes under the
        # busy timeout; a deferred transaction could fail at once on upgrading its lock.
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_INSERT, rows)
            connection.execute(_TRIM, (self.max_rows,))
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return len(rows)

    def _select(self, route: str | None, limit: int) -> list[dict[str, Any]]:
        connection = self._connected()
        try:
            if route is None:
                query = f"SELECT {_COLUMNS} FROM divergences ORDER BY id DESC LIMIT ?"
                rows = connection.execute(query, (limit,)).fetchall()
            else:
                query = (
                    f"SELECT {_COLUMNS} FROM divergences WHERE route = ? ORDER BY id DESC LIMIT ?"
                )
                rows = connection.execute(query, (route, limit)).fetchall()
        except sqlite3.Error as error:
            raise DivergenceStoreError(
                f"cannot read the divergence store {self.path}: {error}"
            ) from error
        return [_entry(row) for row in rows]

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("the divergence store is closed")
        return self._connection


DIVERGENCE_STORE_KEY: Final = web.AppKey("strangler.divergence_store", DivergenceStore)


def add_divergence_routes(app: web.Application, store: DivergenceStore) -> None:
    """Serve ``GET /api/divergences?route=NAME&limit=N`` from ``store``. The caller owns
    the store's start and close."""
    app[DIVERGENCE_STORE_KEY] = store
    app.router.add_get("/api/divergences", list_divergences)


async def list_divergences(request: web.Request) -> web.Response:
    store = request.app[DIVERGENCE_STORE_KEY]
    limit = _parse_limit(request.query.get("limit"))
    if limit is None:
        message = f"limit must be a whole number from 1 to {MAX_LIMIT}"
        return _json({"error": message}, status=400)
    route = request.query.get("route") or None
    try:
        entries = await store.recent(route, limit)
    except (DivergenceStoreError, RuntimeError) as error:  # a broken file, or shutting down
        return _json({"error": str(error)}, status=503)
    # A thousand records of two capped sequences each is megabytes: encode off the loop.
    body = await asyncio.to_thread(orjson.dumps, {"divergences": entries})
    return web.Response(body=body, content_type="application/json")


def _parse_limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    # isdigit alone admits other scripts' digits, and int() admits signs, blanks and "_".
    if not (raw.isascii() and raw.isdigit()):
        return None
    limit = int(raw)
    return limit if 1 <= limit <= MAX_LIMIT else None


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
