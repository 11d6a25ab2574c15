"""Watched WebSocket sessions at scale: they open as fast as direct ones, never wait for
shadow capacity, and an idle one costs little memory. The proxy runs in its own process
(``strangler run``); the clients and the backends are plain asyncio protocols here, so
that thousands of them cost this process little."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.proxy_harness import (
    StranglerProcess,
    flags_document,
    rss_bytes,
    strangler_process,
    write_flags,
)
from tests.raw_websocket import TEXT, accept_for, eventually, frame

# -- a backend: accepts every handshake, echoes short text messages ------------------------


class _BackendConnection(asyncio.Protocol):
    def __init__(self, backend: RawEchoBackend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.backend.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if not self.open:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            key = re.search(rb"(?i)\r\nsec-websocket-key: *(\S+)", head)
            assert key is not None
            shadow = re.search(rb"(?i)\r\nx-strangler-shadow: *1", head) is not None
            self.backend.count(shadow)
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                % accept_for(key.group(1).decode()).encode()
            )
            self.open, self.buffer = True, rest
        # Short masked frames only (what the tests send): echoed unmasked, as text.
        while len(self.buffer) >= 6 and len(self.buffer) >= 6 + (self.buffer[1] & 0x7F):
            size = self.buffer[1] & 0x7F
            mask, payload = self.buffer[2:6], self.buffer[6 : 6 + size]
            self.buffer = self.buffer[6 + size :]
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.transport.write(frame(TEXT, data, mask=False))


class RawEchoBackend:
    def __init__(self) -> None:
        self.primaries = 0
        self.shadows = 0
        self.server: asyncio.Server | None = None
        self.transports: list[asyncio.Transport] = []

    def count(self, shadow: bool) -> None:
        if shadow:
            self.shadows += 1
        else:
            self.primaries += 1

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _BackendConnection(self), "127.0.0.1", 0, backlog=4096
        )
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for transport in self.transports:
                transport.abort()
            await self.server.wait_closed()


# -- a client: the handshake, then it holds the session open --------------------------------


class _Client(asyncio.Protocol):
    def __init__(self, user: str) -> None:
        self.user = user
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.lost = False
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            f"GET /ws/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nX-User-Id: {self.user}\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.opened.done():
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101 "):
                self.opened.set_exception(AssertionError(head.split(b"\r\n")[0]))
                return
            self.opened.set_result(None)
            self.buffer = rest
        while len(self.buffer) >= 2 and len(self.buffer) >= 2 + (self.buffer[1] & 0x7F):
            size = self.buffer[1] & 0x7F
            self.messages.put_nowait(self.buffer[2 : 2 + size])
            self.buffer = self.buffer[2 + size :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the handshake"))


async def open_sessions(port: int, count: int, first: int = 0) -> list[_Client]:
    """``count`` sessions, at most 200 handshakes in flight (the listen backlog is 1024)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)

    async def one(i: int) -> _Client:
        async with gate:
            _, client = await loop.create_connection(
                lambda: _Client(f"user-{i}"), "127.0.0.1", port
            )
            await asyncio.wait_for(client.opened, 30)
            return client

    return list(await asyncio.gather(*(one(first + i) for i in range(count))))


def close_all(clients: list[_Client]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


# -- the proxy in its own process ------------------------------------------------------------------


@asynccontextmanager
async def watched_proxy(
    tmp_path: Path, url: str, *, max_concurrent: int
) -> AsyncIterator[StranglerProcess]:
    """A shadowed WebSocket route with an isolation check and a contract: watched."""
    write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    config = tmp_path / "strangler.toml"
    config.write_text(
        f"""
[server]
port = 0
[admin]
port = 0
[backends]
legacy = "{url}"
candidate = "{url}"
[flags]
file = "flags.json"
[shadow]
max_concurrent = {max_concurrent}
drain_seconds = 0.5
[divergences]
path = "{tmp_path / "divergences.sqlite3"}"
[[routes]]
name = "agent"
path = "/ws/agent"
protocol = "websocket"
flag = "ssot-dispatcher"
shadow = 1.0
user_field = "user_id"
contract = "agent_started agent_completed"
"""
    )
    async with strangler_process(config) as running:
        yield running


def port_of(running: StranglerProcess) -> int:
    return int(running.proxy_url.rsplit(":", 1)[1])


async def metric(running: StranglerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry ``labels``."""
    async with aiohttp.ClientSession() as http:
        async with http.get(running.admin_url + "/metrics") as resp:
            text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def backend() -> AsyncIterator[tuple[RawEchoBackend, str]]:
    echo = RawEchoBackend()
    url = await echo.start()
    yield echo, url
    await echo.close()


# -- the tests -----------------------------------------------------------------------------------


async def test_2000_watched_sessions_open_within_10_s_and_stay_open(
    tmp_path: Path, backend: tuple[RawEchoBackend, str]
) -> None:
    echo, url = backend
    async with watched_proxy(tmp_path, url, max_concurrent=256) as running:
        port = port_of(running)
        started = time.monotonic()
        clients = await open_sessions(port, 2000)
        elapsed = time.monotonic() - started
        try:
            assert elapsed < 10, f"2,000 watched sessions took {elapsed:.1f} s to open"
            await asyncio.sleep(1.0)
            assert not any(client.lost for client in clients)
            assert await metric(running, "strangler_websocket_sessions") == 2000
            # Every session still relays: a message there and back on a sample of them.
            sample = clients[::40]
            for client in sample:
                assert client.transport is not None
                client.transport.write(frame(TEXT, b'{"user_id": "%s"}' % client.user.encode()))
            for client in sample:
                assert await asyncio.wait_for(client.messages.get(), 10) == (
                    b'{"user_id": "%s"}' % client.user.encode()
                )
            # Shadow capacity was 256: the sessions beyond it went unshadowed, counted.
            assert echo.primaries == 2000
            assert echo.shadows == 256
            dropped = await metric(
                running, "strangler_shadow_dropped_total", route="agent", reason="concurrency"
            )
            assert dropped == 2000 - 256
        finally:
            close_all(clients)


async def test_sessions_beyond_shadow_capacity_are_relayed_unshadowed_and_counted(
    tmp_path: Path, backend: tuple[RawEchoBackend, str]
) -> None:
    echo, url = backend
    async with watched_proxy(tmp_path, url, max_concurrent=2) as running:
        clients = await open_sessions(port_of(running), 5)
        try:
            await eventually(lambda: echo.shadows == 2)
            for client in clients:
                assert client.transport is not None
                client.transport.write(frame(TEXT, b'{"user_id": "%s"}' % client.user.encode()))
                assert await asyncio.wait_for(client.messages.get(), 10) == (
                    b'{"user_id": "%s"}' % client.user.encode()
                )
            assert (echo.primaries, echo.shadows) == (5, 2)
            # Workers write their counts for the supervisor's /metrics once a second.
            dropped = 0.0
            for _ in range(50):
                dropped = await metric(
                    running, "strangler_shadow_dropped_total", route="agent", reason="concurrency"
                )
                if dropped >= 3:
                    break
                await asyncio.sleep(0.1)
            assert dropped == 3
        finally:
            close_all(clients)
        # Once shadowed sessions end, their room serves new sessions again.
        await asyncio.sleep(0.5)
        more = await open_sessions(port_of(running), 2, first=100)
        try:
            await eventually(lambda: echo.shadows == 4)
            assert echo.shadows == 4
        finally:
            close_all(more)


N_IDLE = 1000
MAX_KIB_PER_SESSION = 16


async def test_an_idle_watched_session_with_a_shadow_costs_at_most_16_kib(
    tmp_path: Path, backend: tuple[RawEchoBackend, str]
) -> None:
    echo, url = backend
    async with watched_proxy(tmp_path, url, max_concurrent=2 * N_IDLE) as running:
        port = port_of(running)
        # Warm up first: what the first sessions make once (allocator arenas, code paths,
        # metric children) is not what each session costs.
        warm = await open_sessions(port, 200)
        await eventually(lambda: echo.shadows == 200)
        await asyncio.sleep(0.5)
        before = rss_bytes(running.proc.pid) // 1024
        clients = await open_sessions(port, N_IDLE, first=200)
        try:
            await eventually(lambda: echo.shadows == 200 + N_IDLE)
            assert echo.shadows == 200 + N_IDLE  # every session has its shadow connection
            await asyncio.sleep(0.5)
            after = rss_bytes(running.proc.pid) // 1024
        finally:
            close_all(clients)
            close_all(warm)
        per_session = (after - before) / N_IDLE
        print(f"an idle watched session with a shadow: {per_session:.1f} KiB")
        assert per_session <= MAX_KIB_PER_SESSION, f"{per_session:.1f} KiB a session"
