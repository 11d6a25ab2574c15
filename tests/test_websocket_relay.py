"""WebSocket relay through a real proxy to real loopback backends."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from flags.file import FileFlagProvider
from proxy.app import ProxyServer
from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]


class Backend:
    """A WebSocket backend that echoes, reports what it saw, and obeys commands."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pongs: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed_with: asyncio.Queue[int | None] = asyncio.Queue()
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws/agent", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse(protocols=("agent.v2", "agent.v1"), autoping=False)
        await ws.prepare(request)
        await ws.send_str(f"hello from {self.name}")
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"as asked")
                    break
                if msg.data == "ping-me":
                    await ws.ping(b"backend-ping")
                    continue
                await ws.send_str(f"{self.name}:{msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(b"bin:" + msg.data)
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                await self.pongs.put(msg.data)
        await self.closed_with.put(ws.close_code)
        return ws


def url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def backends(aiohttp_server: ServerFactory) -> tuple[Backend, Backend, str, str]:
    legacy, candidate = Backend("legacy"), Backend("candidate")
    legacy_server = await aiohttp_server(legacy.app())
    candidate_server = await aiohttp_server(candidate.app())
    return legacy, candidate, url_of(legacy_server), url_of(candidate_server)


@pytest.fixture
async def flags_path(tmp_path: Path) -> Path:
    return write_flags(tmp_path / "flags.json", flags_document(rollout=100))


@pytest.fixture
async def proxy(
    backends: tuple[Backend, Backend, str, str], flags_path: Path
) -> AsyncIterator[ProxyServer]:
    settings = make_settings(
        backends[2], backends[3], flags_path, routes=ROUTES, server={"max_ws_message_bytes": 2048}
    )
    async with running_proxy(settings) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def connect(
    client: aiohttp.ClientSession, proxy: ProxyServer, user: str = "user-1", **kwargs: object
) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect(
        proxy.proxy_url + "/ws/agent",
        headers={"X-User-Id": user},
        **kwargs,  # type: ignore[arg-type]
    )


async def test_text_and_binary_frames_are_relayed_both_ways(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with await connect(client, proxy) as ws:
        assert await ws.receive_str() == "hello from candidate"
        await ws.send_str("run the tool")
        assert await ws.receive_str() == "candidate:run the tool"
        await ws.send_bytes(b"\x00\xff\x10")
        assert await ws.receive_bytes() == b"bin:\x00\xff\x10"


async def test_the_handshake_names_the_backend_and_carries_the_chosen_subprotocol(
    proxy: ProxyServer, client: aiohttp.ClientSession, backends: tuple[Backend, Backend, str, str]
) -> None:
    async with await connect(client, proxy, protocols=("agent.v1",)) as ws:
        assert ws.protocol == "agent.v1"
        assert ws._response.headers["X-Strangler-Backend"] == "candidate"
        assert await ws.receive_str() == "hello from candidate"
    seen = backends[1].headers[-1]
    assert seen["x-user-id"] == "user-1"
    assert seen["x-forwarded-for"] == "127.0.0.1"


async def test_pings_and_pongs_travel_end_to_end_in_both_directions(
    proxy: ProxyServer, client: aiohttp.ClientSession, backends: tuple[Backend, Backend, str, str]
) -> None:
    async with await connect(client, proxy, autoping=False) as ws:
        await ws.receive_str()
        await ws.ping(b"client-ping")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"client-ping")
        await ws.send_str("ping-me")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.PING, b"backend-ping")
        await ws.pong(msg.data)
        assert await asyncio.wait_for(backends[1].pongs.get(), 5) == b"backend-ping"


async def test_close_codes_are_relayed_from_the_client_to_the_backend(
    proxy: ProxyServer, client: aiohttp.ClientSession, backends: tuple[Backend, Backend, str, str]
) -> None:
    ws = await connect(client, proxy)
    await ws.receive_str()
    await ws.close(code=4000, message=b"bye")
    assert await asyncio.wait_for(backends[1].closed_with.get(), 5) == 4000


@pytest.mark.parametrize("code", [1000, 1008, 4001])
async def test_close_codes_are_relayed_from_the_backend_to_the_client(
    proxy: ProxyServer, client: aiohttp.ClientSession, code: int
) -> None:
    async with await connect(client, proxy) as ws:
        await ws.receive_str()
        await ws.send_str(f"close:{code}")
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == code
        assert msg.extra == "as asked"


async def test_a_session_stays_on_its_backend_when_the_flag_changes(
    proxy: ProxyServer, client: aiohttp.ClientSession, flags_path: Path
) -> None:
    async with await connect(client, proxy) as ws:
        assert await ws.receive_str() == "hello from candidate"
        write_flags(flags_path, flags_document(rollout=0))
        assert isinstance(proxy.flags, FileFlagProvider)
        proxy.flags.reload_if_changed()  # what the file watcher does on its next poll
        assert not proxy.flags.is_enabled("ssot-dispatcher", "user-1")
        async with await connect(client, proxy) as fresh:
            assert await fresh.receive_str() == "hello from legacy"
        await ws.send_str("still here")
        assert await ws.receive_str() == "candidate:still here"


async def test_an_unreachable_backend_closes_the_client_with_1014(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=100))
    async with running_proxy(make_settings(dead, dead, flags, routes=ROUTES)) as server:
        async with await connect(client, server) as ws:
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE
            assert msg.data == 1014


async def test_a_message_over_the_limit_closes_with_1009(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with await connect(client, proxy) as ws:
        await ws.receive_str()
        await ws.send_str("x" * 4096)
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 1009


async def test_a_backend_that_vanishes_closes_the_client_with_1011(
    aiohttp_server: ServerFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("about to vanish")
        assert request.transport is not None
        request.transport.abort()
        return ws

    app = web.Application()
    app.router.add_get("/ws/agent", handler)
    backend = await aiohttp_server(app)
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(url_of(backend), url_of(backend), flags, routes=ROUTES)
    async with running_proxy(settings) as server:
        async with await connect(client, server) as ws:
            assert await ws.receive_str() == "about to vanish"
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE
            assert msg.data == 1011


async def test_a_backend_that_never_completes_the_handshake_closes_the_client_with_1011(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads the upgrade request and never answers

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{silent_server.sockets[0].getsockname()[1]}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(url, url, flags, routes=ROUTES, server={"read_timeout": 0.3})
    try:
        async with running_proxy(settings) as server:
            async with await connect(client, server) as ws:
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 1011
                assert msg.extra == "legacy backend timeout"
    finally:
        for writer in accepted:
            writer.close()
        silent_server.close()
        await silent_server.wait_closed()
