"""Unwatched WebSocket sessions (``proxy.websocket_direct``) frame by frame, on loopback.

Raw-socket clients (hand-written handshake, hand-built masked frames) and backends
(aiohttp, or raw ones that do the handshake by hand) talk through a real proxy, so that
frame splitting, length forms, fragmentation, protocol violations, the closing
handshake, back-pressure, shutdown and the metrics are seen as a client sees them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.app import ProxyServer
from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags
from tests.raw_websocket import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    Connect,
    EchoBackend,
    RawBackend,
    ServerFactory,
    WsClient,
    at_eof,
    close_payload,
    close_writer,
    eventually,
    frame,
    next_frame,
    switching,
    url_of,
)

LIMIT = 1024 * 1024
LABELS = {"route": "agent", "backend": "candidate"}
PRIMARY = {**LABELS, "role": "primary"}


# -- backends ----------------------------------------------------------------------------


@pytest.fixture
async def flags_path(tmp_path: Path) -> Path:
    return write_flags(tmp_path / "flags.json", flags_document(rollout=100))


@pytest.fixture
async def echo(aiohttp_server: ServerFactory) -> tuple[EchoBackend, str]:
    backend = EchoBackend()
    server = await aiohttp_server(backend.app())
    return backend, url_of(server)


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = RawBackend()
    await backend.start()
    yield backend
    await backend.close()


def proxy_to(
    url: str, flags: Path, **server: Any
) -> contextlib.AbstractAsyncContextManager[ProxyServer]:
    settings = make_settings(
        url, url, flags, routes=ROUTES, server={"max_ws_message_bytes": LIMIT, **server}
    )
    return running_proxy(settings)


@contextlib.asynccontextmanager
async def stoppable(
    url: str, flags: Path
) -> AsyncIterator[tuple[ProxyServer, Callable[[], asyncio.Task[bool | None]]]]:
    """A proxy, and a call that starts stopping it in the background (the task); stopped
    at the exit either way."""
    running = proxy_to(url, flags)
    server = await running.__aenter__()
    stopping: list[asyncio.Task[bool | None]] = []

    def stop() -> asyncio.Task[bool | None]:
        stopping.append(asyncio.create_task(running.__aexit__(None, None, None)))
        return stopping[0]

    try:
        yield server, stop
    finally:
        if stopping:
            await stopping[0]
        else:
            await running.__aexit__(None, None, None)


@pytest.fixture
async def proxy(echo: tuple[EchoBackend, str], flags_path: Path) -> AsyncIterator[ProxyServer]:
    async with proxy_to(echo[1], flags_path) as server:
        yield server


async def through(
    raw_backend: RawBackend, connect: Connect, server: ProxyServer
) -> tuple[WsClient, asyncio.StreamReader, asyncio.StreamWriter]:
    """A session through the proxy to the raw backend, which accepts the handshake."""
    opening = asyncio.create_task(connect(server))
    reader, writer, key = await raw_backend.next()
    writer.write(switching(key))
    return await asyncio.wait_for(opening, 5), reader, writer


async def echoed(client: WsClient, backend: EchoBackend, text: bytes) -> None:
    """One text message there and back: the session is up and relaying."""
    await client.send_frame(TEXT, text)
    assert await received(backend) == ("text", text.decode())
    assert (await client.recv()).payload == text


async def received(backend: EchoBackend) -> tuple[str, str | bytes]:
    return await asyncio.wait_for(backend.messages.get(), 5)


async def backend_close(backend: EchoBackend) -> tuple[int | None, str | None]:
    return await asyncio.wait_for(backend.closes.get(), 5)


def sample(server: ProxyServer, name: str, labels: dict[str, str]) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


# -- 1. frames split at every byte, frames together ---------------------------------------


async def test_a_frame_written_one_byte_at_a_time_and_two_frames_in_one_write_arrive_whole(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    backend = echo[0]
    client = await connect(proxy)
    text = "split at every byte: ünïcödé ✓"
    await client.send_bytewise(frame(TEXT, text.encode()))
    assert await received(backend) == ("text", text)
    got = await client.recv()
    assert (got.fin, got.opcode, got.payload.decode()) == (True, TEXT, text)

    # Two frames of one message in one write.
    await client.send(frame(TEXT, b"two frames, ", fin=False) + frame(CONT, b"one write", fin=True))
    assert await received(backend) == ("text", "two frames, one write")
    got = await client.recv()
    assert (got.opcode, got.payload) == (TEXT, b"two frames, one write")

    # Two whole messages in one write.
    await client.send(frame(TEXT, b"first") + frame(BINARY, b"\x00second\xff"))
    assert await received(backend) == ("text", "first")
    assert await received(backend) == ("binary", b"\x00second\xff")
    assert (await client.recv()).payload == b"first"
    assert (await client.recv()).payload == b"\x00second\xff"


async def test_a_fragmented_message_written_one_byte_at_a_time_arrives_whole(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    backend = echo[0]
    client = await connect(proxy)
    await client.send_bytewise(
        frame(TEXT, b"frag", fin=False) + frame(CONT, b"men", fin=False) + frame(CONT, b"ted")
    )
    got = await client.recv()
    assert got.opcode != CLOSE, f"closed with {got.close}"
    assert (got.opcode, got.payload) == (TEXT, b"fragmented")
    assert await received(backend) == ("text", "fragmented")


# -- 2. payload length forms ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
async def test_every_payload_length_form_is_relayed_intact_both_ways(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect, size: int
) -> None:
    backend = echo[0]
    client = await connect(proxy)
    text = ("abcdefghijklmnopqrstuvwxyz0123456789" * (size // 36 + 1))[:size]
    data = os.urandom(size)
    await client.send_frame(TEXT, text.encode())
    await client.send_frame(BINARY, data)
    assert await received(backend) == ("text", text)
    assert await received(backend) == ("binary", data)
    got = await client.recv()
    assert (got.fin, got.opcode, got.payload) == (True, TEXT, text.encode())
    got = await client.recv()
    assert (got.fin, got.opcode, got.payload) == (True, BINARY, data)


# -- 3. fragmented messages --------------------------------------------------------------


async def test_a_message_in_three_frames_reaches_the_backend_whole(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    backend = echo[0]
    client = await connect(proxy)
    await client.send_frame(TEXT, b"one, ", fin=False)
    await asyncio.sleep(0.01)
    await client.send_frame(PING, b"in between")  # control frames may come between fragments
    await asyncio.sleep(0.01)
    await client.send_frame(CONT, b"two, ", fin=False)
    await asyncio.sleep(0.01)
    await client.send_frame(CONT, b"three")
    assert await received(backend) == ("text", "one, two, three")
    frames = {(f.opcode, f.payload) for f in [await client.recv(), await client.recv()]}
    assert frames == {(PONG, b"in between"), (TEXT, b"one, two, three")}


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param((300_000, 10), id="large-first-frame"),
        pytest.param((10, 600_000, 10), id="large-middle-continuation"),
        pytest.param((10, 300_000), id="large-final-continuation"),
    ],
)
async def test_a_fragmented_message_with_a_frame_larger_than_one_read_arrives_whole(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect, sizes: tuple[int, ...]
) -> None:
    """Each frame comes in several reads (the proxy reads at most 256 KiB at a time);
    the whole message (under 1 MiB) is within the limit."""
    backend = echo[0]
    client = await connect(proxy)
    parts = [os.urandom(n) for n in sizes]
    data = b"".join(
        frame(BINARY if i == 0 else CONT, part, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    )
    await client.send(data)
    got = await client.recv()
    assert got.opcode != CLOSE, f"closed with {got.close}"
    assert (got.opcode, got.payload) == (BINARY, b"".join(parts))
    assert await received(backend) == ("binary", b"".join(parts))


async def test_a_fragmented_message_over_the_limit_closes_with_1009(
    echo: tuple[EchoBackend, str], flags_path: Path, connect: Connect
) -> None:
    backend = echo[0]
    async with proxy_to(echo[1], flags_path, max_ws_message_bytes=2048) as server:
        client = await connect(server)
        await client.send_frame(TEXT, b"a" * 1000, fin=False)
        await client.send_frame(CONT, b"b" * 1000, fin=False)
        await client.send_frame(CONT, b"c" * 1000)  # 3000 in all, each frame under 2048
        assert (await client.recv_close())[0] == 1009
        assert (await backend_close(backend))[0] == 1001
        await client.aclose()


# -- 4. protocol violations from the client -----------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(frame(TEXT, b"not masked", mask=False), id="unmasked"),
        pytest.param(frame(TEXT, b"rsv1", rsv=0x40), id="rsv1"),
        pytest.param(frame(TEXT, b"rsv3", rsv=0x10), id="rsv3"),
        pytest.param(frame(PING, b"p" * 126), id="ping-126-bytes"),
        pytest.param(frame(PING, b"part", fin=False), id="fragmented-ping"),
        pytest.param(frame(CONT, b"orphan"), id="continuation-without-message"),
        pytest.param(frame(0x3, b"reserved"), id="reserved-opcode-3"),
        pytest.param(frame(0xB, b"reserved"), id="reserved-control-opcode-11"),
        pytest.param(
            frame(TEXT, b"open", fin=False) + frame(TEXT, b"again"), id="new-message-in-fragmented"
        ),
    ],
)
async def test_a_client_breaking_the_protocol_gets_1002_and_the_backend_1001(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect, bad: bytes
) -> None:
    backend = echo[0]
    client = await connect(proxy)
    await echoed(client, backend, b"fine")
    await client.send(bad)
    assert (await client.recv_close())[0] == 1002
    assert (await backend_close(backend))[0] == 1001
    assert backend.messages.empty()


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        pytest.param(frame(TEXT, b"not masked", mask=False), 1002, id="1002-unmasked"),
        pytest.param(frame(TEXT, b"y" * 2000), 1009, id="1009-too-big"),
    ],
)
async def test_a_client_closed_for_its_own_fault_has_its_connection_ended_promptly(
    echo: tuple[EchoBackend, str], flags_path: Path, connect: Connect, bad: bytes, code: int
) -> None:
    """After its close (1002, 1009) and the client's answer, the proxy ends the client's
    TCP connection, as it does after 1014 or a normal closing handshake, rather than
    holding it until ``server.connect_timeout`` (2 s here) and then resetting it."""
    server_settings = {"max_ws_message_bytes": 1024, "connect_timeout": 2}
    async with proxy_to(echo[1], flags_path, **server_settings) as server:
        client = await connect(server)
        await client.send(bad)
        assert (await client.recv_close())[0] == code
        assert (await backend_close(echo[0]))[0] == 1001
        await client.send_frame(CLOSE, close_payload(code))
        ended = await eventually(client.reader.at_eof, within=1.0)
        assert ended, f"the client's connection is still open 1 s after the {code} handshake"


# -- 5. a backend breaking the protocol -----------------------------------------------------


@pytest.mark.parametrize("together", [True, False], ids=["with-the-101", "after-the-101"])
async def test_a_backend_sending_a_masked_frame_closes_the_client_with_1011(
    raw_backend: RawBackend, flags_path: Path, connect: Connect, together: bool
) -> None:
    async with proxy_to(raw_backend.url, flags_path) as server:
        opening = asyncio.create_task(connect(server))
        reader, writer, key = await raw_backend.next()
        bad = frame(TEXT, b"masked by a server", mask=True)
        if together:
            writer.write(switching(key) + bad)
            client = await asyncio.wait_for(opening, 5)
        else:
            writer.write(switching(key))
            client = await asyncio.wait_for(opening, 5)
            await asyncio.sleep(0.05)
            writer.write(bad)
        got = await client.recv()
        assert got.opcode == CLOSE
        assert got.close[0] == 1011
        to_backend = await next_frame(reader)
        assert to_backend.masked
        assert to_backend.close[0] == 1002
        await client.send_frame(CLOSE, close_payload(1011))
        assert await at_eof(client.reader)
        await close_writer(writer)  # the backend that broke the protocol ends its connection


# -- 6. a backend refusing or botching the handshake ---------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda key: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", id="403"),
        pytest.param(
            lambda key: switching(base64.b64encode(os.urandom(16)).decode()), id="wrong-accept"
        ),
        pytest.param(
            lambda key: switching(key, "Sec-WebSocket-Protocol: agent.v9\r\n"),
            id="protocol-not-offered",
        ),
        pytest.param(
            lambda key: switching(key, "Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            id="extension",
        ),
    ],
)
async def test_a_backend_refusing_or_botching_the_handshake_closes_the_client_with_1014(
    raw_backend: RawBackend,
    flags_path: Path,
    connect: Connect,
    answer: Callable[[str], bytes],
) -> None:
    async with proxy_to(raw_backend.url, flags_path) as server:
        opening = asyncio.create_task(connect(server, protocols="agent.v1"))
        reader, writer, key = await raw_backend.next()
        writer.write(answer(key))
        client = await asyncio.wait_for(opening, 5)
        assert "sec-websocket-protocol" not in client.headers
        assert client.headers["x-strangler-backend"] == "candidate"
        assert (await client.recv_close())[0] == 1014
        assert await at_eof(reader)  # the proxy dropped the backend's connection
        await client.send_frame(CLOSE, close_payload(1014))
        assert await at_eof(client.reader)


# -- 7. the closing handshake ----------------------------------------------------------------


async def test_a_client_close_reaches_the_backend_with_code_and_reason_and_the_answer_returns(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    backend = echo[0]
    backend.answer = (4002, b"see you")
    client = await connect(proxy)
    await client.send_frame(CLOSE, close_payload(4000, b"bye now"))
    assert await backend_close(backend) == (4000, "bye now")
    assert await client.recv_close() == (4002, "see you")
    assert await at_eof(client.reader)
    await asyncio.wait_for(backend.ended.get(), 5)


async def test_a_client_close_to_a_raw_backend_ends_both_connections(
    raw_backend: RawBackend, flags_path: Path, connect: Connect
) -> None:
    async with proxy_to(raw_backend.url, flags_path) as server:
        client, reader, writer = await through(raw_backend, connect, server)
        await client.send_frame(CLOSE, close_payload(4000, b"bye now"))
        got = await next_frame(reader)
        assert got.masked
        assert got.close == (4000, "bye now")
        writer.write(frame(CLOSE, close_payload(4000, b"ok"), mask=False))
        assert await client.recv_close() == (4000, "ok")
        assert await at_eof(client.reader)
        assert await at_eof(reader)  # the proxy ended the backend's connection


async def test_a_backend_close_reaches_the_client_with_code_and_reason_and_both_connections_end(
    raw_backend: RawBackend, flags_path: Path, connect: Connect
) -> None:
    async with proxy_to(raw_backend.url, flags_path) as server:
        client, reader, writer = await through(raw_backend, connect, server)
        writer.write(frame(CLOSE, close_payload(4001, b"done"), mask=False))
        assert await client.recv_close() == (4001, "done")
        await client.send_frame(CLOSE, close_payload(4001, b"done too"))
        answer = await next_frame(reader)
        assert answer.masked
        assert answer.close == (4001, "done too")
        assert await at_eof(client.reader)
        assert await at_eof(reader)


async def test_an_aiohttp_backend_close_reaches_the_client_with_code_and_reason(
    aiohttp_server: ServerFactory, flags_path: Path, connect: Connect
) -> None:
    ended: asyncio.Queue[int | None] = asyncio.Queue()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=4001, message=b"done")
        await ended.put(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws/agent", handler)
    backend = await aiohttp_server(app)
    async with proxy_to(url_of(backend), flags_path) as server:
        client = await connect(server)
        assert await client.recv_close() == (4001, "done")
        await client.send_frame(CLOSE, close_payload(4001))
        assert await asyncio.wait_for(ended.get(), 5) == 4001
        assert await at_eof(client.reader)


# -- 8. a client that vanishes -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["abort", "fin"])
async def test_a_client_that_vanishes_gets_the_backend_a_1001(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect, how: str
) -> None:
    backend = echo[0]
    client = await connect(proxy)
    await echoed(client, backend, b"hello")
    if how == "abort":
        client.writer.transport.abort()
    else:
        client.writer.close()
    assert (await backend_close(backend))[0] == 1001
    assert await eventually(lambda: sample(proxy, "strangler_websocket_sessions", LABELS) == 0)


async def test_a_client_that_vanishes_while_the_backend_is_held_back_ends_the_session_promptly(
    raw_backend: RawBackend, flags_path: Path, connect: Connect
) -> None:
    """The client stops reading, so the proxy stops reading the backend; then the client
    vanishes. The proxy sends the backend a 1001 and must read on (discarding the frames
    still in flight) to get the backend's answer and end the session, rather than leave
    the backend unread until ``server.connect_timeout`` (2 s here) runs out."""
    async with proxy_to(raw_backend.url, flags_path, connect_timeout=2) as server:
        opening = asyncio.create_task(connect(server, rcvbuf=64 * 1024))
        reader, writer, key = await raw_backend.next()
        writer.write(switching(key))
        client = await asyncio.wait_for(opening, 5)
        chunk = frame(BINARY, bytes(64 * 1024), mask=False)
        written = 0

        async def flood() -> None:
            nonlocal written
            while True:
                writer.write(chunk)
                await writer.drain()
                written += 1

        flooding = asyncio.create_task(flood())
        try:
            last = -1
            for _ in range(100):
                await asyncio.sleep(0.2)
                if written == last:
                    break
                last = written
            assert written == last, "the backend was never held back"
            assert sample(server, "strangler_websocket_sessions", LABELS) == 1
            client.writer.transport.abort()
            got = await next_frame(reader)
            assert got.masked
            assert got.close[0] == 1001
        finally:
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
        writer.write(frame(CLOSE, close_payload(1001), mask=False))
        ended = await eventually(
            lambda: sample(server, "strangler_websocket_sessions", LABELS) == 0, within=1.0
        )
        assert ended, "the session is still open 1 s after the backend answered the 1001"
        assert await at_eof(reader)


# -- 10. back-pressure --------------------------------------------------------------------------


async def test_a_client_that_reads_nothing_holds_the_backend_back(
    aiohttp_server: ServerFactory, flags_path: Path, connect: Connect
) -> None:
    chunk_size, count = 64 * 1024, 1024  # 64 MiB in all
    sent = 0

    async def flood(request: web.Request) -> web.WebSocketResponse:
        nonlocal sent
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        filler = bytes(chunk_size - 4)
        for i in range(count):
            await ws.send_bytes(i.to_bytes(4, "big") + filler)
            sent += chunk_size
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws/agent", flood)
    backend = await aiohttp_server(app)
    async with proxy_to(url_of(backend), flags_path) as server:
        client = await connect(server, rcvbuf=64 * 1024)
        # Wait until the backend's sends stall: no progress for 0.5 s.
        last, still = -1, 0.0
        for _ in range(100):
            await asyncio.sleep(0.05)
            if sent == last:
                still += 0.05
                if still >= 0.5:
                    break
            else:
                last, still = sent, 0.0
        assert still >= 0.5, f"the backend never stalled ({sent} bytes sent)"
        assert 0 < sent < 32 * 1024 * 1024, f"the backend sent {sent} bytes"

        # Reading resumes the flow: everything arrives, in order.
        for i in range(count):
            got = await client.recv()
            assert got.opcode == BINARY
            assert len(got.payload) == chunk_size
            assert int.from_bytes(got.payload[:4], "big") == i
        assert sent == chunk_size * count
        assert await client.close_handshake(1000) == (1000, "")


# -- 11. shutdown -----------------------------------------------------------------------------


async def test_stopping_the_proxy_closes_the_client_and_the_backend_with_1001(
    echo: tuple[EchoBackend, str], flags_path: Path, connect: Connect
) -> None:
    backend = echo[0]
    async with stoppable(echo[1], flags_path) as (server, stop):
        client = await connect(server)
        await client.send_frame(TEXT, b"before the end")
        assert (await client.recv()).payload == b"before the end"
        stopped = stop()
        code, _ = await client.recv_close()
        assert code == 1001
        await client.send_frame(CLOSE, close_payload(1001))
        assert await at_eof(client.reader)
        assert (await backend_close(backend))[0] == 1001
        await asyncio.wait_for(asyncio.shield(stopped), 5)


async def test_an_upgrade_while_the_proxy_drains_is_refused_with_503(
    echo: tuple[EchoBackend, str], flags_path: Path, connect: Connect
) -> None:
    async with stoppable(echo[1], flags_path) as (server, stop):
        session = await connect(server)
        late = await connect(server, handshake=False)  # connected, nothing sent yet
        stopped = stop()
        # The session's 1001 says the proxy drains; its connections are still open.
        assert (await session.recv_close())[0] == 1001
        key = base64.b64encode(os.urandom(16)).decode()
        await late.send_head(
            [
                "GET /ws/agent HTTP/1.1",
                "Host: proxy.test",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                "X-User-Id: user-2",
            ]
        )
        assert await late.read_head() == 503
        assert late.headers["connection"] == "close"
        await session.send_frame(CLOSE, close_payload(1001))
        await asyncio.wait_for(asyncio.shield(stopped), 5)


# -- 12. metrics --------------------------------------------------------------------------------


def first_events(server: ProxyServer) -> float:
    return sample(server, "strangler_first_event_seconds_count", PRIMARY)


async def test_metrics_count_sessions_turns_and_the_outcome(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    assert sample(proxy, "strangler_websocket_sessions", LABELS) == 0
    client = await connect(proxy)
    assert sample(proxy, "strangler_websocket_sessions", LABELS) == 1
    for i in range(3):
        await client.send_frame(TEXT, f"turn {i}".encode())
        assert (await client.recv()).payload == f"turn {i}".encode()
    assert first_events(proxy) == 3
    assert await client.close_handshake(1000) == (1000, "")
    assert sample(proxy, "strangler_websocket_sessions", LABELS) == 0
    outcome = {**PRIMARY, "outcome": "success"}
    assert sample(proxy, "strangler_requests_total", outcome) == 1
    assert first_events(proxy) == 3


async def test_a_ping_and_its_pong_are_not_a_turn(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    client = await connect(proxy)
    await client.send_frame(PING, b"are you there")
    got = await client.recv()
    assert (got.opcode, got.payload) == (PONG, b"are you there")
    assert first_events(proxy) == 0, "a client ping and the backend's pong counted as a turn"
    await client.send_frame(TEXT, b"a real turn")
    assert (await client.recv()).payload == b"a real turn"
    assert first_events(proxy) == 1


async def test_a_backend_ping_is_not_the_first_event_of_a_turn(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    client = await connect(proxy)
    await client.send_frame(TEXT, b"ping-then-answer")
    assert (await client.recv()).opcode == PING
    assert (await client.recv()).payload == b"answer"  # 0.2 s after the ping
    assert first_events(proxy) == 1
    seconds = sample(proxy, "strangler_first_event_seconds_sum", PRIMARY)
    assert seconds >= 0.2, f"first event after {seconds:.4f} s: the backend's ping was counted"


async def test_a_fragmented_client_message_is_a_turn(
    proxy: ProxyServer, echo: tuple[EchoBackend, str], connect: Connect
) -> None:
    client = await connect(proxy)
    await client.send(frame(TEXT, b"in ", fin=False) + frame(CONT, b"two"))
    assert (await client.recv()).payload == b"in two"
    assert first_events(proxy) == 1
