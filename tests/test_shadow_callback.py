"""A shadow on a warm connection of the shadow pool runs by callbacks (no task); whatever
the shadow backend does on that connection, the client gets the same bytes as without
shadowing, the shadow is counted by reason and compared, and shutdown keeps its deadline.

Each case needs a first shadowed exchange that ends cleanly (its shadow connection goes
back idle) and then a second one whose shadow reuses that connection while the shadow
backend misbehaves. Both backends are raw loopback servers, scripted per request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.app import ProxyServer
from proxy.settings import Settings
from tests.proxy_harness import flags_document, running_proxy, write_flags
from tests.raw_http import connect, request

BODY = b"".join(
    b'{"type": "%s", "user_id": "u", "n": %d}\n' % (t.encode(), i)
    for i, t in enumerate(["agent_started", "agent_thinking", "agent_completed"])
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)
WITHIN = 5.0  # no single wait of these tests should come near this

Behaviour = Callable[["RawBackend", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def post(user: str = "u1") -> bytes:
    return request(
        "POST",
        "/api/turn",
        f"X-User-Id: {user}",
        "Content-Type: application/json",
        body=b'{"prompt": "p"}',
    )


def get(user: str = "u1") -> bytes:
    return request("GET", "/api/turn", f"X-User-Id: {user}")


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


# --- scripted raw backends ---------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    connection: int  # 1 for the first connection the backend accepted, and so on
    head: bytes


async def answer(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(ANSWER)
    await writer.drain()
    return True


def after_gate(behaviour: Behaviour) -> Behaviour:
    """``behaviour``, once the test opens the backend's gate."""

    async def gated(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await backend.gate.wait()
        return await behaviour(backend, reader, writer)

    return gated


def answer_once(arrived: int) -> Behaviour:
    """Answer once ``arrived`` requests have come, so that they overlap (one connection
    each)."""

    async def barrier(
        backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await backend.arrived(arrived)
        return await answer(backend, reader, writer)

    return barrier


async def reset_mid_body(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(CHUNKED_HEAD + b'10\r\n{"type": "agen')
    await writer.drain()
    writer.transport.abort()
    return False


async def close_unanswered(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    # What the proxy sees when a server closes an idle keep-alive connection just as the
    # next request goes out on it: the connection ends before any byte of an answer.
    writer.close()
    return False


async def garbage(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()
    return False


async def head_then_stall(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """The head and a first event, then nothing until the proxy closes the connection."""
    first = BODY.splitlines(keepends=True)[0]
    writer.write(CHUNKED_HEAD + b"%x\r\n%s\r\n" % (len(first), first))
    await writer.drain()
    await stall(backend, reader, writer)
    return False


async def stall(
    backend: RawBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Never answer; note when the proxy gives up the connection."""
    with suppress(ConnectionError):
        await reader.read()
    backend.cut += 1
    backend.changed.set()
    return False


class RawBackend:
    """A loopback HTTP/1.1 server on keep-alive connections: the n-th request to arrive
    (from 0, over all connections) gets ``script[n]``, any other ``answer``."""

    def __init__(self, script: dict[int, Behaviour] | None = None) -> None:
        self.script = dict(script or {})
        self.seen: list[Seen] = []
        self.gate = asyncio.Event()
        self.changed = asyncio.Event()  # set whenever a request arrives or a stall is cut
        self.cut = 0  # stalled exchanges whose connection the proxy closed
        self.on_request: Callable[[], None] | None = None
        self.url = ""
        self._connections = 0
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def arrived(self, n: int) -> None:
        await self.until(lambda: len(self.seen) >= n)

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.changed.clear()
            await self.changed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        self._connections += 1
        number = self._connections
        try:
            # Cancelled at the end of the test: end quietly (asyncio logs a cancelled
            # connection handler as an error).
            with suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(content_length(head))
                    index = len(self.seen)
                    self.seen.append(Seen(number, head))
                    if self.on_request is not None:
                        self.on_request()
                    self.changed.set()
                    behaviour: Behaviour = self.script.get(index, answer)
                    if not await behaviour(self, reader, writer):
                        return
        finally:
            writer.transport.abort()
            self._handlers.discard(task)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[RawBackend]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            for writer in self._writers:
                writer.transport.abort()
            await server.wait_closed()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- the proxy ---------------------------------------------------------------------------


def settings_for(
    primary: str, shadow_url: str, directory: Path, *, sample: float, **shadow: Any
) -> Settings:
    directory.mkdir(exist_ok=True)
    flags = write_flags(directory / "flags.json", flags_document(rollout=0))  # legacy serves
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 2.0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "backends": {"legacy": primary, "candidate": shadow_url},
            "flags": {"provider": "file", "file": flags},
            "shadow": {"timeout": 10.0, "drain_seconds": 2.0, **shadow},
            "divergences": {"path": directory / "divergences.sqlite3"},
            "routes": [
                {
                    "name": "stream",
                    "path": "/api",
                    "protocol": "ndjson",
                    "flag": "ssot-dispatcher",
                    "shadow": sample,
                    "shadow_methods": ["GET", "POST"],
                }
            ],
        }
    )


@dataclass
class Stack:
    server: ProxyServer
    primary: RawBackend
    shadow: RawBackend

    @property
    def shadows(self) -> Any:
        assert self.server.proxy is not None
        return self.server.proxy.shadows

    def sample(self, name: str, **labels: str) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def dropped(self, reason: str) -> float:
        return self.sample("strangler_shadow_dropped_total", route="stream", reason=reason)

    def all_dropped(self) -> float:
        reasons = ("timeout", "unreachable", "error", "shutdown", "concurrency", "breaker")
        return sum(self.dropped(reason) for reason in reasons)

    def compared(self, outcome: str) -> float:
        return self.sample("strangler_comparisons_total", route="stream", outcome=outcome)

    def diverged(self, kind: str) -> float:
        return self.sample("strangler_divergences_total", route="stream", kind=kind)

    async def settle(self) -> None:
        await asyncio.wait_for(self.shadows.settle(), WITHIN)

    async def stored(self) -> list[dict[str, Any]]:
        """The divergences kept for the route, newest first."""
        store = self.server.store
        assert store is not None
        await store.flush()
        return await store.recent("stream")


@asynccontextmanager
async def stack(
    tmp_path: Path, script: dict[int, Behaviour] | None = None, **shadow: Any
) -> AsyncIterator[Stack]:
    async with RawBackend().serving() as primary, RawBackend(script).serving() as shadow_be:
        settings = settings_for(
            primary.url, shadow_be.url, tmp_path / "shadowed", sample=1.0, **shadow
        )
        async with running_proxy(settings) as server:
            yield Stack(server, primary, shadow_be)


async def baseline(tmp_path: Path, messages: list[bytes]) -> list[bytes]:
    """The raw responses to ``messages`` on one connection, without any shadow."""
    async with RawBackend().serving() as primary:
        settings = settings_for(primary.url, refused_url(), tmp_path / "baseline", sample=0.0)
        async with running_proxy(settings) as server, connect(server) as client:
            return [(await client.exchange(message)).raw for message in messages]


def assert_nothing_unhandled(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def warm(stack: Stack, connections: int = 1) -> None:
    """The shadow pool now has ``connections`` idle connections to the shadow backend."""
    assert not stack.shadows.tasks and not stack.shadows.callbacks
    assert stack.shadows.pool.stats.idle == connections


async def twice_the_second_shadow_warm(s: Stack, message: bytes) -> list[bytes]:
    """The raw responses to ``message`` sent twice on one connection: the first shadow
    leaves its connection idle, the second takes it by callbacks and is held at the
    shadow backend's gate (still running once the client has its answer) until released."""
    async with connect(s.server) as client:
        first = await client.exchange(message)
        await s.settle()
        warm(s)
        second = await client.exchange(message)
        # The primary has answered; its shadow still waits on the warm connection.
        assert not s.shadows.tasks and len(s.shadows.callbacks) == 1
        s.shadow.gate.set()
        await s.settle()
    return [first.raw, second.raw]


# --- the tests ---------------------------------------------------------------------------


async def test_a_shadow_reset_mid_body_on_a_warm_connection_is_counted_as_an_error_and_compared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await baseline(tmp_path, [post(), post()])
    async with stack(tmp_path, {1: after_gate(reset_mid_body)}) as s:
        assert await twice_the_second_shadow_warm(s, post()) == expected
        assert [seen.connection for seen in s.shadow.seen] == [1, 1]
        assert all(b"X-Strangler-Shadow: 1\r\n" in seen.head for seen in s.shadow.seen)
        assert s.dropped("error") == 1 and s.all_dropped() == 1
        assert s.compared("match") == 1 and s.compared("mismatch") == 1
        assert s.diverged("error") >= 1
        assert s.shadows.pool.stats.connections == 0  # the broken connection is gone
        (record,) = await s.stored()
        assert record["subject_status"] == 200  # the head came on the warm connection
        assert "mid-body" in record["subject"][-1]["error"]
    assert_nothing_unhandled(caplog)


async def test_a_warm_connection_closed_by_the_shadow_backend_is_retried_as_a_task_and_matches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await baseline(tmp_path, [get(), get()])
    async with stack(tmp_path, {1: after_gate(close_unanswered)}) as s:
        assert await twice_the_second_shadow_warm(s, get()) == expected
        # The second shadow went again, on a new connection, and was answered there.
        assert [seen.connection for seen in s.shadow.seen] == [1, 1, 2]
        assert s.all_dropped() == 0
        assert s.compared("match") == 2 and s.compared("mismatch") == 0
        labels = {"route": "stream", "backend": "candidate", "role": "shadow"}
        assert s.sample("strangler_requests_total", **labels, outcome="success") == 2
    assert_nothing_unhandled(caplog)


async def test_garbage_instead_of_a_response_on_a_warm_connection_is_counted_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await baseline(tmp_path, [post(), post()])
    async with stack(tmp_path, {1: after_gate(garbage)}) as s:
        assert await twice_the_second_shadow_warm(s, post()) == expected
        assert [seen.connection for seen in s.shadow.seen] == [1, 1]
        assert s.dropped("error") == 1 and s.all_dropped() == 1
        assert s.compared("match") == 1 and s.compared("mismatch") == 1
        assert s.diverged("error") >= 1
        assert s.shadows.pool.stats.connections == 0
        (record,) = await s.stored()
        assert "malformed response" in record["subject"][-1]["error"]
    assert_nothing_unhandled(caplog)


async def test_a_warm_shadow_that_stalls_after_its_head_times_out_and_its_connection_is_not_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await baseline(tmp_path, [post(), post(), post()])
    async with stack(tmp_path, {1: head_then_stall}, timeout=0.3) as s:
        async with connect(s.server) as client:
            first = await client.exchange(post())
            await s.settle()
            warm(s)
            started = time.monotonic()
            second = await client.exchange(post())
            assert not s.shadows.tasks and len(s.shadows.callbacks) == 1
            await s.settle()  # the deadline ends it
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 2.0
            await asyncio.wait_for(s.shadow.until(lambda: s.shadow.cut == 1), WITHIN)
            assert s.shadows.pool.stats.connections == 0
            assert s.dropped("timeout") == 1 and s.all_dropped() == 1
            assert s.diverged("timeout") == 1 and s.compared("mismatch") == 1
            # The backend recovers: the next shadow gets a new connection, and matches.
            third = await client.exchange(post())
            await s.settle()
        assert [first.raw, second.raw, third.raw] == expected
        assert [seen.connection for seen in s.shadow.seen] == [1, 1, 2]
        assert s.compared("match") == 2 and s.compared("mismatch") == 1
        assert s.all_dropped() == 1
    assert_nothing_unhandled(caplog)


async def test_concurrent_warm_shadows_beyond_max_concurrent_are_dropped_and_never_overrun(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bound, clients = 5, 20
    script: dict[int, Behaviour] = {i: answer_once(bound) for i in range(bound)}
    script.update({bound + i: after_gate(answer) for i in range(bound)})
    expected = (await baseline(tmp_path, [post()]))[0]
    async with stack(tmp_path, script, max_concurrent=bound) as s:
        running: list[int] = []
        s.shadow.on_request = lambda: running.append(s.shadows.running())

        async def one(user: str) -> bytes:
            async with connect(s.server) as client:
                raw = (await client.exchange(post(user))).raw
                running.append(s.shadows.running())
                return raw

        # Warm-up: shadows that overlap leave `bound` idle connections behind.
        warmup = await asyncio.gather(*(one(f"w{i}") for i in range(bound)))
        await s.settle()
        warm(s, bound)

        results = await asyncio.gather(*(one(f"u{i}") for i in range(clients)))
        assert not s.shadows.tasks and len(s.shadows.callbacks) == bound
        assert s.dropped("concurrency") == clients - bound
        s.shadow.gate.set()
        await s.settle()
        assert all(raw == expected for raw in [*warmup, *results])
        assert max(running) <= bound
        assert len(s.shadow.seen) == 2 * bound
        assert {seen.connection for seen in s.shadow.seen} == set(range(1, bound + 1))
        assert s.compared("match") == 2 * bound and s.compared("mismatch") == 0
        assert s.all_dropped() == clients - bound
    assert_nothing_unhandled(caplog)


async def test_shutdown_cuts_warm_callback_shadows_after_the_drain_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n, drain = 3, 0.5
    script: dict[int, Behaviour] = {i: answer_once(n) for i in range(n)}
    script.update({n + i: stall for i in range(n)})
    expected = (await baseline(tmp_path, [post()]))[0]
    async with stack(tmp_path, script, timeout=30.0, drain_seconds=drain) as s:

        async def one(user: str) -> bytes:
            async with connect(s.server) as client:
                return (await client.exchange(post(user))).raw

        warmup = await asyncio.gather(*(one(f"w{i}") for i in range(n)))
        await s.settle()
        warm(s, n)
        results = await asyncio.gather(*(one(f"u{i}") for i in range(n)))
        await asyncio.wait_for(s.shadow.arrived(2 * n), WITHIN)
        assert not s.shadows.tasks and len(s.shadows.callbacks) == n

        started = time.monotonic()
        await asyncio.wait_for(s.server.stop(), drain + 3.0)
        elapsed = time.monotonic() - started
        assert drain * 0.9 <= elapsed <= drain + 1.0
        assert not s.shadows.callbacks and not s.shadows.tasks
        await asyncio.wait_for(s.shadow.until(lambda: s.shadow.cut == n), WITHIN)
        assert all(raw == expected for raw in [*warmup, *results])
        assert s.dropped("shutdown") == n and s.all_dropped() == n
        assert s.compared("match") == n and s.compared("mismatch") == 0
        assert s.compared("ignored") == 0
    assert_nothing_unhandled(caplog)
