"""A shadow never harms the primary: whatever the shadow backend does, the client gets
the same bytes as without shadowing, no errors, and shutdown keeps its deadline."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.app import ProxyServer
from proxy.metrics import Metrics
from proxy.routing import Backend
from proxy.settings import Settings, ShadowSettings
from proxy.shadow import ShadowRunner
from tests.proxy_harness import flags_document, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]
BODY = b"".join(
    b'{"type": "%s", "user_id": "u", "n": %d}\n' % (t.encode(), i)
    for i, t in enumerate(["agent_started", "agent_thinking", "agent_completed"])
)
SHADOW_TIMEOUT = 1.0
DRAIN = 0.5


async def primary_backend(aiohttp_server: ServerFactory) -> str:
    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for line in BODY.splitlines(keepends=True):
            await resp.write(line)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stream)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


@asynccontextmanager
async def raw_backend(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with suppress(ConnectionError, asyncio.IncompleteReadError):
            await behaviour(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.Event().wait()


async def reset_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"type": "agen')
    await writer.drain()
    writer.transport.abort()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()


async def ten_times_slower(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        await asyncio.sleep(0.3)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
        )
        await writer.drain()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def settings_for(legacy: str, candidate: str, flags: Path, shadow: float) -> Settings:
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 2.0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "backends": {"legacy": legacy, "candidate": candidate},
            "flags": {"provider": "file", "file": flags},
            "shadow": {"timeout": SHADOW_TIMEOUT, "drain_seconds": DRAIN},
            "divergences": {"path": flags.parent / "divergences.sqlite3"},
            "routes": [
                {
                    "name": "stream",
                    "path": "/api",
                    "protocol": "ndjson",
                    "flag": "ssot-dispatcher",
                    "shadow": shadow,
                    "shadow_methods": ["POST"],
                }
            ],
        }
    )


async def exchanges(server: ProxyServer, n: int) -> list[tuple[int, str, str, bytes]]:
    async def one(i: int) -> tuple[int, str, str, bytes]:
        async with aiohttp.ClientSession() as client:
            async with client.post(
                server.proxy_url + "/api/turn",
                data=b'{"prompt": "p"}',
                headers={"X-User-Id": f"u{i}"},
            ) as resp:
                body = await resp.read()
                return (
                    resp.status,
                    resp.headers["Content-Type"],
                    resp.headers["X-Strangler-Backend"],
                    body,
                )

    return await asyncio.gather(*(one(i) for i in range(n)))


SHADOW_BEHAVIOURS = {
    "hangs": hang,
    "resets mid-stream": reset_mid_stream,
    "answers garbage": garbage,
    "is ten times slower": ten_times_slower,
}


@pytest.mark.parametrize("behaviour", [*SHADOW_BEHAVIOURS, "refuses connections"])
async def test_the_primary_is_byte_identical_whatever_the_shadow_backend_does(
    aiohttp_server: ServerFactory, tmp_path: Path, behaviour: str
) -> None:
    legacy = await primary_backend(aiohttp_server)
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))

    async with _shadow_url(behaviour) as candidate:
        baseline_server = ProxyServer(
            settings_for(legacy, candidate, flags, shadow=0.0), registry=CollectorRegistry()
        )
        await baseline_server.start()
        try:
            baseline = await exchanges(baseline_server, 10)
        finally:
            await baseline_server.stop()

        server = ProxyServer(
            settings_for(legacy, candidate, flags, shadow=1.0), registry=CollectorRegistry()
        )
        await server.start()
        stopped = False
        try:
            shadowed = await exchanges(server, 10)
            # Shutdown keeps its deadline even with shadows stuck in flight.
            await asyncio.wait_for(server.stop(), timeout=2.0 + DRAIN + 2.0)
            stopped = True
        finally:
            if not stopped:
                await server.stop()

    assert shadowed == baseline
    assert all(status == 200 and body == BODY for status, _, _, body in shadowed)
    registry = server.metrics.registry
    dropped = sum(
        registry.get_sample_value(
            "strangler_shadow_dropped_total", {"route": "stream", "reason": reason}
        )
        or 0
        for reason in ("timeout", "unreachable", "error", "shutdown", "breaker")
    )
    compared = sum(
        registry.get_sample_value(
            "strangler_comparisons_total", {"route": "stream", "outcome": outcome}
        )
        or 0
        for outcome in ("match", "mismatch")
    )
    if behaviour == "is ten times slower":
        assert compared == 10 and dropped == 0
    else:
        assert dropped == 10  # every shadow that did not finish is counted by reason


@asynccontextmanager
async def _shadow_url(behaviour: str) -> AsyncIterator[str]:
    if behaviour == "refuses connections":
        yield refused_url()
        return
    async with raw_backend(SHADOW_BEHAVIOURS[behaviour]) as url:
        yield url


async def test_shadows_beyond_the_concurrency_bound_are_dropped_and_counted(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    legacy = await primary_backend(aiohttp_server)
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with raw_backend(hang) as candidate:
        settings = settings_for(legacy, candidate, flags, shadow=1.0)
        shadow = settings.shadow.model_copy(update={"max_concurrent": 3, "timeout": 30.0})
        server = ProxyServer(
            settings.model_copy(update={"shadow": shadow}), registry=CollectorRegistry()
        )
        await server.start()
        try:
            results = await exchanges(server, 8)
            assert all(status == 200 for status, *_ in results)
            assert server.proxy is not None and server.proxy.shadows.running() == 3
        finally:
            await server.stop()
    registry = server.metrics.registry
    assert (
        registry.get_sample_value(
            "strangler_shadow_dropped_total", {"route": "stream", "reason": "concurrency"}
        )
        == 5
    )
    assert (
        registry.get_sample_value(
            "strangler_shadow_dropped_total", {"route": "stream", "reason": "shutdown"}
        )
        == 3
    )


async def test_a_backend_whose_shadows_keep_failing_gets_none_for_a_while_then_a_probe(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    legacy = await primary_backend(aiohttp_server)
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with raw_backend(hang) as candidate:
        settings = settings_for(legacy, candidate, flags, shadow=1.0)
        shadow = settings.shadow.model_copy(
            update={"timeout": 0.2, "breaker_failures": 2, "breaker_seconds": 0.5}
        )
        server = ProxyServer(
            settings.model_copy(update={"shadow": shadow}), registry=CollectorRegistry()
        )
        await server.start()
        try:
            assert server.proxy is not None
            shadows = server.proxy.shadows

            await exchanges(server, 2)  # two shadows, both time out: the breaker opens
            await asyncio.wait_for(shadows.settle(), 5)
            results = await exchanges(server, 3)
            assert all(status == 200 for status, *_ in results)
            assert shadows.running() == 0  # held back, not started
            await asyncio.sleep(0.5)  # the pause itself: time is what is waited for
            await exchanges(server, 2)
            assert shadows.running() == 1  # one probe; the other held back while it runs
            await asyncio.wait_for(shadows.settle(), 5)
        finally:
            await server.stop()
    registry = server.metrics.registry

    def dropped(reason: str) -> float:
        labels = {"route": "stream", "reason": reason}
        return registry.get_sample_value("strangler_shadow_dropped_total", labels) or 0

    assert dropped("timeout") == 3
    assert dropped("breaker") == 4


async def test_a_shadow_that_succeeds_closes_the_breaker() -> None:
    runner = ShadowRunner(
        ShadowSettings(breaker_failures=2, breaker_seconds=60.0),
        Metrics(CollectorRegistry()),
        connect_timeout=1.0,
        read_timeout=1.0,
    )
    try:
        runner.report("r", Backend.CANDIDATE, ok=False)
        assert runner.admits("r", Backend.CANDIDATE)  # one failure is not a pattern
        runner.report("r", Backend.CANDIDATE, ok=False)
        assert not runner.admits("r", Backend.CANDIDATE)
        assert runner.admits("r", Backend.LEGACY)  # per backend
        assert runner.admits("other", Backend.CANDIDATE)  # and per route
        runner.report("r", Backend.CANDIDATE, ok=True)
        assert runner.admits("r", Backend.CANDIDATE)
    finally:
        await runner.close()
