"""Talk to the proxy listener byte for byte, with a backend that records what gets through.

A raw HTTP/1.1 client over loopback sockets (``connect``, ``request``, ``read_response``
and their parts) sees exactly what the listener writes: status lines, framing,
``Connection`` handling and when the connection ends. A real aiohttp backend
(``backend_app``) records every request that reaches it, so a test can also say what must
never get through. The ``backend`` and ``proxy`` fixtures are ``backend_fixture`` and
``proxy_fixture`` here: a test module imports them to request them by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
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
STATUS_LINE = re.compile(r"(HTTP/1\.[01]) (\d{3})(?: .*)?")


async def bounded(awaitable: Awaitable[T], within: float = TIMEOUT) -> T:
    return await asyncio.wait_for(awaitable, within)


# --- the backend -----------------------------------------------------------------------


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
    cannot arrive with the whole body), ``/cookies/...`` sets two cookies, ``/nocontent``
    is a 204 and ``/notmodified`` a 304; anything else answers with its own raw path and
    query as a text body.
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
        if request.path == "/nocontent":
            return web.Response(status=204)
        if request.path == "/notmodified":
            return web.Response(status=304, headers={"ETag": '"v1"'})
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


@pytest.fixture(name="backend")
async def backend_fixture(aiohttp_server: ServerFactory) -> AsyncIterator[Backend]:
    seen: list[Seen] = []
    release = asyncio.Event()
    yield Backend(url_of(await aiohttp_server(backend_app(seen, release))), seen, release)
    release.set()  # a stream a failed test left waiting ends with the test


@asynccontextmanager
async def proxy_for(url: str, tmp_path: Path, **server: float) -> AsyncIterator[ProxyServer]:
    """A proxy that sends every user to the backend at ``url``, with extra ``server``
    settings."""
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(url, url, flags, routes=ROUTES, server=server)
    async with running_proxy(settings) as proxy:
        yield proxy


@pytest.fixture(name="proxy")
async def proxy_fixture(backend: Backend, tmp_path: Path) -> AsyncIterator[ProxyServer]:
    async with proxy_for(backend.url, tmp_path) as server:
        yield server


# --- the raw client --------------------------------------------------------------------


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


async def read_chunked(
    reader: asyncio.StreamReader, within: float = TIMEOUT
) -> tuple[bytes, bytes]:
    """A chunked body, decoded and raw (trailers included in the raw bytes)."""
    body, raw = b"", b""
    while True:
        size_line = await bounded(reader.readuntil(b"\r\n"), within)
        raw += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        chunk = await bounded(reader.readexactly(size + 2), within)
        raw += chunk
        assert chunk.endswith(b"\r\n"), raw
        body += chunk[:-2]
    while (trailer := await bounded(reader.readuntil(b"\r\n"), within)) != b"\r\n":
        raw += trailer
    return body, raw + b"\r\n"


async def read_head(reader: asyncio.StreamReader, within: float = TIMEOUT) -> Response:
    """A response's status line and headers; its body is left unread."""
    raw_head = await bounded(reader.readuntil(b"\r\n\r\n"), within)
    status_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    assert match is not None, raw_head
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip(), raw_head
        headers.append((name, value.strip()))
    return Response(match.group(1), int(match.group(2)), headers, b"", raw_head)


async def read_body(
    reader: asyncio.StreamReader, response: Response, within: float = TIMEOUT
) -> Response:
    """``response`` with its body: by Content-Length, chunked, or to the end of the stream."""
    if response.status < 200 or response.status in (204, 304):
        return response
    if "chunked" in response.tokens("Transfer-Encoding"):
        body, raw_body = await read_chunked(reader, within)
    elif (length := response.get("Content-Length")) is not None:
        body = raw_body = await bounded(reader.readexactly(int(length)), within)
    else:
        body = raw_body = await bounded(reader.read(), within)
    return replace(response, body=body, raw=response.raw + raw_body)


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False, within: float = TIMEOUT
) -> Response:
    """One whole response; after a HEAD (``head``) it has no body whatever it says. Each
    read must finish ``within`` seconds."""
    response = await read_head(reader, within)
    return response if head else await read_body(reader, response, within)


class Client:
    """One raw connection to the proxy listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await bounded(self.writer.drain())

    async def response(self, *, head: bool = False, within: float = TIMEOUT) -> Response:
        return await read_response(self.reader, head=head, within=within)

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
async def connect(proxy: ProxyServer, *, rcvbuf: int | None = None) -> AsyncIterator[Client]:
    """A connection to the proxy listener; ``rcvbuf`` sets the client's receive buffer (a
    small one makes a client that reads nothing push back on the proxy sooner)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await bounded(loop.sock_connect(sock, ("127.0.0.1", proxy.proxy_port)))
        reader, writer = await bounded(asyncio.open_connection(sock=sock, limit=65536))
    except BaseException:
        sock.close()
        raise
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
