"""The proxy listener's HTTP/1.1 server, seen byte for byte from raw client sockets.

Every test talks to a real proxy over loopback with ``asyncio.open_connection``, so it
sees exactly what the listener writes: status lines, framing, ``Connection`` handling
and when the connection ends. One real aiohttp backend records every request that
reaches it, so a test can also say what must never get through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from proxy.app import ProxyServer
from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerFactory = Callable[..., Awaitable[TestServer]]
T = TypeVar("T")

TIMEOUT = 5.0
STREAM_PARTS = (b"part-1;", b"part-2;", b"part-3;")
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STATUS_LINE = re.compile(r"(HTTP/1\.[01]) (\d{3})(?: .*)?")


# --- the backend ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the backend received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Backend:
    url: str
    seen: list[Seen]
    release: asyncio.Event  # lets a ``/stream/...`` answer go on after its first part

    @property
    def paths(self) -> list[str]:
        return [request.path_qs for request in self.seen]


def backend_app(seen: list[Seen], release: asyncio.Event) -> web.Application:
    """Records every request, even one no route matches, then answers by path.

    ``/ws/...`` echoes WebSocket text frames, ``/stream/...`` streams ``STREAM_PARTS``
    without a Content-Length (the rest only once ``release`` is set, so that the head
    cannot arrive with the whole body), ``/cookies/...`` sets two cookies; anything else
    answers with its own raw path and query as a text body.
    """

    async def echo_websocket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
        return ws

    async def stream_parts(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        first, *rest = STREAM_PARTS
        await response.write(first)
        await release.wait()
        for part in rest:
            await response.write(part)
        await response.write_eof()
        return response

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        return await handler(request)

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/ws/"):
            return await echo_websocket(request)
        if request.path.startswith("/stream/"):
            return await stream_parts(request)
        response = web.Response(body=request.raw_path.encode(), content_type="text/plain")
        if request.path.startswith("/cookies/"):
            response.headers.add("Set-Cookie", "a=1")
            response.headers.add("Set-Cookie", "b=2")
        return response

    app = web.Application(middlewares=[record])
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def backend(aiohttp_server: ServerFactory) -> AsyncIterator[Backend]:
    seen: list[Seen] = []
    release = asyncio.Event()
    yield Backend(url_of(await aiohttp_server(backend_app(seen, release))), seen, release)
    release.set()  # a stream a failed test left waiting ends with the test


@asynccontextmanager
async def proxy_for(
    backend: Backend, tmp_path: Path, **server: float
) -> AsyncIterator[ProxyServer]:
    """A proxy that sends every user to ``backend``, with extra ``server`` settings."""
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(backend.url, backend.url, flags, routes=ROUTES, server=server)
    async with running_proxy(settings) as proxy:
        yield proxy


@pytest.fixture
async def proxy(backend: Backend, tmp_path: Path) -> AsyncIterator[ProxyServer]:
    async with proxy_for(backend, tmp_path) as server:
        yield server


# --- the raw client --------------------------------------------------------------------


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, TIMEOUT)


def request(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "HTTP/1.1"
) -> bytes:
    """A request's bytes: a Host header, ``headers``, and a Content-Length for ``body``."""
    lines = [f"{method} {target} {version}", "Host: proxy.test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True)
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def tokens(self, name: str) -> set[str]:
        """The lower-cased comma-separated tokens of every ``name`` header."""
        return {t.strip().lower() for v in self.all(name) for t in v.split(",") if t.strip()}


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A chunked body, decoded and raw (trailers included in the raw bytes)."""
    body, raw = b"", b""
    while True:
        size_line = await bounded(reader.readuntil(b"\r\n"))
        raw += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        chunk = await bounded(reader.readexactly(size + 2))
        raw += chunk
        assert chunk.endswith(b"\r\n"), raw
        body += chunk[:-2]
    while (trailer := await bounded(reader.readuntil(b"\r\n"))) != b"\r\n":
        raw += trailer
    return body, raw + b"\r\n"


async def read_head(reader: asyncio.StreamReader) -> Response:
    """A response's status line and headers; its body is left unread."""
    raw_head = await bounded(reader.readuntil(b"\r\n\r\n"))
    status_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    assert match is not None, raw_head
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip(), raw_head
        headers.append((name, value.strip()))
    return Response(match.group(1), int(match.group(2)), headers, b"", raw_head)


async def read_body(reader: asyncio.StreamReader, response: Response) -> Response:
    """``response`` with its body: by Content-Length, chunked, or to the end of the stream."""
    if response.status < 200 or response.status in (204, 304):
        return response
    if "chunked" in response.tokens("Transfer-Encoding"):
        body, raw_body = await read_chunked(reader)
    elif (length := response.get("Content-Length")) is not None:
        body = raw_body = await bounded(reader.readexactly(int(length)))
    else:
        body = raw_body = await bounded(reader.read())
    return replace(response, body=body, raw=response.raw + raw_body)


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    """One whole response; after a HEAD (``head``) it has no body whatever it says."""
    response = await read_head(reader)
    return response if head else await read_body(reader, response)


class Client:
    """One raw connection to the proxy listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await bounded(self.writer.drain())

    async def response(self, *, head: bool = False) -> Response:
        return await read_response(self.reader, head=head)

    async def exchange(self, data: bytes, *, head: bool = False) -> Response:
        await self.send(data)
        return await self.response(head=head)

    async def rest(self) -> bytes:
        """Whatever the proxy still sends before it closes; a reset counts as closed."""
        try:
            return await bounded(self.reader.read())
        except ConnectionResetError:
            return b""


@asynccontextmanager
async def connect(proxy: ProxyServer) -> AsyncIterator[Client]:
    reader, writer = await bounded(asyncio.open_connection("127.0.0.1", proxy.proxy_port))
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


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


async def test_an_http_1_0_request_with_keep_alive_keeps_the_connection_open(
    proxy: ProxyServer,
) -> None:
    async with connect(proxy) as client:
        for path in ("/echo/old-1", "/echo/old-2"):
            response = await client.exchange(
                request("GET", path, "Connection: keep-alive", version="HTTP/1.0")
            )
            assert (response.status, response.body) == (200, path.encode())
            assert "keep-alive" in response.tokens("Connection")


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    backend: Backend, tmp_path: Path
) -> None:
    async with (
        proxy_for(backend, tmp_path, keepalive_timeout=0.3) as proxy,
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
    async with proxy_for(backend, tmp_path, max_body_bytes=1000) as proxy:
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
