"""The proxy listener's HTTP/1.1 server, seen byte for byte from raw client sockets.

Every test talks to a real proxy over loopback with the raw client of ``tests.raw_http``,
so it sees exactly what the listener writes: status lines, framing, ``Connection``
handling and when the connection ends. One real aiohttp backend records every request
that reaches it, so a test can also say what must never get through.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import socket
import struct
from pathlib import Path

import pytest

from proxy.app import ProxyServer
from proxy.server import HttpServer, Request
from tests.raw_http import (
    STREAM_PARTS,
    Backend,
    bounded,
    connect,
    proxy_for,
    read_body,
    read_head,
    request,
)

# The ``backend`` and ``proxy`` fixtures: pytest finds them among this module's names.
from tests.raw_http import backend_fixture as backend_fixture
from tests.raw_http import proxy_fixture as proxy_fixture

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def assert_served(proxy: ProxyServer, path: str) -> None:
    """A plain GET on a new connection is answered by the backend."""
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", path))
    assert (response.status, response.body) == (200, path.encode())


# --- keep-alive, pipelining and connection life ---------------------------------------


async def test_three_requests_one_after_another_share_one_keep_alive_connection(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        for i in range(3):
            response = await client.exchange(request("GET", f"/echo/{i}"))
            assert (response.status, response.body) == (200, f"/echo/{i}".encode())
            assert "close" not in response.tokens("Connection")
    assert backend.paths == ["/echo/0", "/echo/1", "/echo/2"]


async def test_pipelined_requests_in_one_write_are_answered_in_order(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        await client.send(
            request("GET", "/echo/1")
            + request("POST", "/echo/2", body=b"a body between two requests")
            + request("GET", "/echo/3")
        )
        for i in (1, 2, 3):
            response = await client.response()
            assert (response.status, response.body) == (200, f"/echo/{i}".encode())
    assert backend.paths == ["/echo/1", "/echo/2", "/echo/3"]
    assert backend.seen[1].body == b"a body between two requests"


async def test_a_client_connection_close_is_echoed_and_the_proxy_closes_after_the_response(
    proxy: ProxyServer,
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "/echo/bye", "Connection: close"))
        assert (response.status, response.body) == (200, b"/echo/bye")
        assert "close" in response.tokens("Connection")
        assert await client.rest() == b""


async def test_an_http_1_0_request_without_keep_alive_is_answered_then_the_connection_closes(
    proxy: ProxyServer,
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "/echo/old", version="HTTP/1.0"))
        assert (response.status, response.body) == (200, b"/echo/old")
        assert await client.rest() == b""


@pytest.mark.parametrize("header", ["Connection", "Proxy-Connection"])
async def test_an_http_1_0_request_with_keep_alive_keeps_the_connection_open(
    proxy: ProxyServer, header: str
) -> None:
    # llhttp reads both headers; either way the request stays HTTP/1.0, so the answer
    # must say keep-alive (an HTTP/1.0 client takes its absence for a close).
    async with connect(proxy) as client:
        for path in ("/echo/old-1", "/echo/old-2"):
            response = await client.exchange(
                request("GET", path, f"{header}: keep-alive", version="HTTP/1.0")
            )
            assert (response.status, response.body) == (200, path.encode())
            assert "keep-alive" in response.tokens("Connection")


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    backend: Backend, tmp_path: Path
) -> None:
    async with (
        proxy_for(backend.url, tmp_path, keepalive_timeout=0.3) as proxy,
        connect(proxy) as client,
    ):
        response = await client.exchange(request("GET", "/echo/idle"))
        assert response.status == 200
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        assert await client.rest() == b""
        assert loop.time() - idle_since >= 0.25  # kept alive first, not closed at once


async def test_two_hundred_requests_on_one_connection_each_get_their_own_response(
    proxy: ProxyServer, backend: Backend
) -> None:
    paths = [f"/echo/many/{i}?n={i}" for i in range(200)]
    async with connect(proxy) as client:
        for path in paths:
            response = await client.exchange(request("GET", path))
            assert (response.status, response.body) == (200, path.encode())
    assert backend.paths == paths


# --- request bodies --------------------------------------------------------------------


async def test_a_chunked_request_body_reaches_the_backend_whole_with_a_content_length(
    proxy: ProxyServer, backend: Backend
) -> None:
    chunks = b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    async with connect(proxy) as client:
        head = request("POST", "/echo/chunked", "Transfer-Encoding: chunked")
        response = await client.exchange(head + chunks)
        assert response.status == 200
    [seen] = backend.seen
    assert seen.body == b"hello world"
    assert seen.headers.get("Content-Length") == "11"
    assert "Transfer-Encoding" not in seen.headers


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        head = request("POST", "/echo/expect", "Content-Length: 5", "Expect: 100-continue")
        interim = await client.exchange(head)
        assert interim.raw.startswith(b"HTTP/1.1 100 Continue\r\n")
        assert backend.seen == []
        response = await client.exchange(b"hello")
        assert (response.status, response.body) == (200, b"/echo/expect")
    assert [(seen.path_qs, seen.body) for seen in backend.seen] == [("/echo/expect", b"hello")]


async def test_expect_100_continue_over_the_body_limit_is_a_413_without_a_100_continue(
    backend: Backend, tmp_path: Path
) -> None:
    async with proxy_for(backend.url, tmp_path, max_body_bytes=1000) as proxy:
        async with connect(proxy) as client:
            head = request("POST", "/echo/big", "Content-Length: 5000", "Expect: 100-continue")
            response = await client.exchange(head)
            assert response.status == 413
        await assert_served(proxy, "/echo/after")
    assert backend.paths == ["/echo/after"]


# --- response framing ------------------------------------------------------------------


async def test_a_head_response_has_the_content_length_but_no_body(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("HEAD", "/echo/head"), head=True)
        assert response.status == 200
        assert response.get("Content-Length") == str(len(b"/echo/head"))
        # Any body bytes would be read as the next response's status line.
        response = await client.exchange(request("GET", "/echo/next"))
        assert (response.status, response.body) == (200, b"/echo/next")
    assert [seen.method for seen in backend.seen] == ["HEAD", "GET"]


async def test_a_streamed_response_is_chunked_to_an_http_1_1_client(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        await client.send(request("GET", "/stream/1.1"))
        response = await read_head(client.reader)
        backend.release.set()
        response = await read_body(client.reader, response)
        assert response.status == 200
        assert response.get("Transfer-Encoding") == "chunked"
        assert response.get("Content-Length") is None
        assert response.body == b"".join(STREAM_PARTS)
        # The connection stays usable after the last chunk.
        response = await client.exchange(request("GET", "/echo/next"))
        assert (response.status, response.body) == (200, b"/echo/next")


async def test_a_streamed_response_to_an_http_1_0_client_is_unframed_and_ends_with_the_close(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        await client.send(request("GET", "/stream/1.0", version="HTTP/1.0"))
        response = await read_head(client.reader)
        backend.release.set()
        response = await read_body(client.reader, response)
        assert response.status == 200
        assert response.get("Transfer-Encoding") is None
        assert response.get("Content-Length") is None
        assert response.body == b"".join(STREAM_PARTS)  # read until the proxy closed


async def test_repeated_response_headers_reach_the_client_all_and_in_order(
    proxy: ProxyServer,
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "/cookies/two"))
        assert response.status == 200
        assert response.all("Set-Cookie") == ["a=1", "b=2"]


# --- request targets -------------------------------------------------------------------


async def test_an_absolute_form_target_reaches_the_backend_as_its_path_and_query(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "http://example.test/echo/abs?q=1"))
        assert response.status == 200
    assert backend.paths == ["/echo/abs?q=1"]


async def test_a_percent_encoded_path_and_query_are_relayed_verbatim(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "/echo/a%20b%2Fc?x=%41"))
        assert (response.status, response.body) == (200, b"/echo/a%20b%2Fc?x=%41")
    assert backend.paths == ["/echo/a%20b%2Fc?x=%41"]


# --- malformed and refused requests ----------------------------------------------------

MALFORMED = [
    pytest.param(b"\x00\x01GARBAGE\r\n\r\n", None, id="garbage"),
    pytest.param(
        request("POST", "/echo/bad", "Content-Length: 5", "Transfer-Encoding: chunked")
        + b"0\r\n\r\n",
        None,
        id="content-length-and-chunked",
    ),
    pytest.param(
        request("POST", "/echo/bad", "Content-Length: 5", "Content-Length: 6") + b"hello!",
        None,
        id="two-content-lengths",
    ),
    pytest.param(
        request("POST", "/echo/bad", "Transfer-Encoding: chunked") + b"zz\r\nhello\r\n0\r\n\r\n",
        None,
        id="invalid-chunk-size",
    ),
    pytest.param(request("GET", "/echo/bad", "NoColonHere"), None, id="header-without-colon"),
    pytest.param(request("GET", "/echo/bad", "X-Big: " + "a" * 70_000), 431, id="head-over-64-kib"),
]


@pytest.mark.parametrize(("raw", "expected"), MALFORMED)
async def test_a_malformed_request_is_a_4xx_ends_the_connection_and_never_reaches_the_backend(
    proxy: ProxyServer, backend: Backend, raw: bytes, expected: int | None
) -> None:
    async with connect(proxy) as client:
        await client.send(raw)
        response = await client.response()
        if expected is None:
            assert 400 <= response.status < 500, response.raw
        else:
            assert response.status == expected, response.raw
        assert await client.rest() == b""
    await assert_served(proxy, "/echo/after")
    assert backend.paths == ["/echo/after"]


async def test_garbage_after_a_request_on_a_keep_alive_connection_ends_the_connection(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "/echo/first"))
        assert (response.status, response.body) == (200, b"/echo/first")
        await client.send(b"\x00\x01GARBAGE\r\n\r\n")
        rest = await client.rest()
        assert rest == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", rest), rest
    await assert_served(proxy, "/echo/after")
    assert backend.paths == ["/echo/first", "/echo/after"]


async def test_a_connect_request_is_refused_with_a_4xx_and_never_reaches_the_backend(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(request("CONNECT", "example.test:443"))
        assert 400 <= response.status < 500, response.raw
    await assert_served(proxy, "/echo/after")
    assert backend.paths == ["/echo/after"]


async def test_an_h2c_upgrade_is_answered_as_plain_http_1_1_without_the_upgrade(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        upgrade = request(
            "GET",
            "/echo/h2c",
            "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
        )
        response = await client.exchange(upgrade)
        assert (response.status, response.body) == (200, b"/echo/h2c")
        assert response.get("Upgrade") is None
        # Still HTTP/1.1 on the same connection.
        response = await client.exchange(request("GET", "/echo/next"))
        assert (response.status, response.body) == (200, b"/echo/next")
    assert backend.paths == ["/echo/h2c", "/echo/next"]
    assert "Upgrade" not in backend.seen[0].headers
    assert "HTTP2-Settings" not in backend.seen[0].headers


async def test_the_listener_reads_the_fields_it_acts_on_in_any_spelling() -> None:
    # The key header, Host, Content-Length and Upgrade are each classified once per
    # spelling (and past the cache's bound, each time): the spelling never matters.
    seen: list[tuple[str | None, str | None, int, bytes, bool]] = []

    async def handler(request: Request) -> None:
        # As the relay takes a body: what came since the last call, until b"".
        parts = []
        while part := await request.next_body(1024):
            parts.append(part)
        body = b"".join(parts)
        seen.append((request.key, request.host, request.length, body, request.upgrade))
        request.respond(200, "OK", [], b"")

    server = HttpServer(handler, key_header="X-User-Id")
    for i in range(5000):  # past the bound of the name cache
        server.field(b"X-Filler-%d" % i)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.start(sock)
    spellings = [
        ("X-User-Id", "Host", "Content-Length"),
        ("x-user-id", "host", "content-length"),
        ("X-USER-ID", "HOST", "CONTENT-LENGTH"),
        ("x-UsEr-iD", "hOsT", "cOnTeNt-LeNgTh"),
    ]
    try:
        reader, writer = await bounded(asyncio.open_connection("127.0.0.1", port))
        for n, (key, host, length) in enumerate(spellings):
            writer.write(
                f"POST /{n} HTTP/1.1\r\n{host}: h{n}.test\r\n{key}: user-{n}\r\n"
                f"X-Filler-{n}: x\r\n{length}: 4\r\n\r\nbody".encode()
            )
            assert (await bounded(reader.readuntil(b"\r\n\r\n"))).startswith(b"HTTP/1.1 200")
        # An Upgrade header in any spelling is an upgrade request to llhttp, and to us.
        writer.write(
            b"GET /up HTTP/1.1\r\nHost: u.test\r\nuPgRaDe: websocket\r\nCONNECTION: UPGRADE\r\n\r\n"
        )
        await bounded(reader.read(1))
        writer.close()
    finally:
        await server.shutdown(1.0)
        sock.close()
    assert seen[:4] == [(f"user-{n}", f"h{n}.test", 4, b"body", False) for n in range(4)]
    assert seen[4][4] is True
    assert len(server.fields) == 4096


# --- WebSocket -------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (payloads under 126 bytes)."""
    assert len(payload) < 126
    mask = b"\x12\x34\x56\x78"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The opcode and payload of one final, unmasked server frame."""
    first, second = await bounded(reader.readexactly(2))
    assert first & 0x80 and not second & 0x80, (first, second)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await bounded(reader.readexactly(2)))
    elif length == 127:
        (length,) = struct.unpack("!Q", await bounded(reader.readexactly(8)))
    return first & 0x0F, await bounded(reader.readexactly(length))


async def test_a_websocket_upgrade_works_on_a_connection_that_already_served_a_request(
    proxy: ProxyServer, backend: Backend
) -> None:
    key = base64.b64encode(b"sixteen byte key").decode()
    accept = base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "/echo/before"))
        assert (response.status, response.body) == (200, b"/echo/before")
        handshake = await client.exchange(
            request(
                "GET",
                "/ws/agent",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                "X-User-Id: user-1",
            )
        )
        assert handshake.status == 101, handshake.raw
        assert handshake.get("Sec-WebSocket-Accept") == accept
        await client.send(client_frame(0x1, b"hello through the proxy"))
        assert await read_server_frame(client.reader) == (0x1, b"hello through the proxy")
        await client.send(client_frame(0x8, struct.pack("!H", 1000)))
        opcode, _ = await read_server_frame(client.reader)
        assert opcode == 0x8
        assert await client.rest() == b""
    assert backend.paths == ["/echo/before", "/ws/agent"]
