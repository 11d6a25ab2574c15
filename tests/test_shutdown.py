"""SIGTERM on a real ``strangler run`` process: drain, 1001 for WebSockets, exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from tests.proxy_harness import StranglerProcess, flags_document, strangler_process, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def started(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[tuple[StranglerProcess, asyncio.Event, asyncio.Event]]:
    release, holding = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"part-1\n")
        holding.set()
        await release.wait()
        await resp.write(b"part-2\n")
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/ws/agent", ws)
    app.router.add_get("/slow", slow)
    backend = await aiohttp_server(app)
    url = f"http://127.0.0.1:{backend.port}"
    write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    config = tmp_path / "strangler.toml"
    config.write_text(
        f"""
[server]
port = 0
shutdown_grace = {SHUTDOWN_GRACE}
[admin]
port = 0
[backends]
legacy = "{url}"
candidate = "{url}"
[flags]
file = "flags.json"
[[routes]]
name = "agent"
path = "/ws/agent"
protocol = "websocket"
flag = "ssot-dispatcher"
"""
    )
    async with strangler_process(config) as running:
        try:
            yield running, release, holding
        finally:
            release.set()


SHUTDOWN_GRACE = 3


async def test_sigterm_drains_http_closes_websockets_with_1001_and_exits_0(
    started: tuple[StranglerProcess, asyncio.Event, asyncio.Event],
) -> None:
    proc, release, holding = started
    async with aiohttp.ClientSession() as client:
        async with client.get(proc.admin_url + "/readyz") as resp:
            assert resp.status == 200
        sock = await client.ws_connect(proc.proxy_url + "/ws/agent", headers={"X-User-Id": "u"})
        await sock.send_str("hello")
        assert await sock.receive_str() == "hello"
        async with client.get(proc.proxy_url + "/slow") as in_flight:
            assert await in_flight.content.readline() == b"part-1\n"
            await holding.wait()
            proc.proc.send_signal(signal.SIGTERM)
            msg = await asyncio.wait_for(sock.receive(), 10)
            assert msg.type is WSMsgType.CLOSE
            assert msg.data == 1001
            # The listener is closed: new exchanges are refused while this one finishes.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(proc.proxy_url + "/slow")
            release.set()
            assert await in_flight.content.read() == b"part-2\n"
        await sock.close()
    assert await asyncio.wait_for(proc.proc.wait(), 10) == 0


async def test_exchanges_that_outlive_the_grace_period_are_cut_and_the_proxy_still_exits_0(
    started: tuple[StranglerProcess, asyncio.Event, asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc, _release, holding = started
    async with aiohttp.ClientSession() as client:
        async with client.get(proc.proxy_url + "/slow") as in_flight:
            assert await in_flight.content.readline() == b"part-1\n"
            await holding.wait()
            proc.proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await in_flight.content.read()
    assert await asyncio.wait_for(proc.proc.wait(), SHUTDOWN_GRACE + 5) == 0
