"""The callback relay and the server's edge cases, black-box over loopback.

Every test talks to a real proxy from raw client sockets (``tests.raw_http``). A request
that is not the first on its client connection finds a warm upstream connection and is
relayed by callbacks (``_Direct``); the tests warm the pool first where that path is the
point. Covered: pipelined requests whose bodies arrive late, chunk trailers (neither
headers of the next request nor unbounded), lingering close after a 413, absolute-form
targets, a callback exchange failing before the head, back-pressure from a slow reader,
the client gone before the head or mid-stream, HEAD/204/304, the backend failing
mid-body, forwarded and connection-named headers, HTTP/1.0 clients, metrics counted once
per exchange, and shutdown with a held exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.app import ProxyServer
from tests.proxy_harness import flags_document, make_settings, running_proxy, write_flags
from tests.raw_http import (
    STREAM_PARTS,
    Backend,
    Client,
    ServerFactory,
    bounded,
    connect,
    proxy_for,
    read_body,
    read_head,
    request,
    url_of,
)

# The ``backend`` and ``proxy`` fixtures: pytest finds them among this module's names.
from tests.raw_http import backend_fixture as backend_fixture
from tests.raw_http import proxy_fixture as proxy_fixture

HANG = 2.0  # a shorter bound where only a stuck proxy would keep a test waiting


# --- a raw backend: one coroutine per connection ---------------------------------------

ConnHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawBackend:
    url: str
    connections: int = 0
    closed: list[float] = field(default_factory=list)  # loop time each connection ended


@asynccontextmanager
async def raw_backend(handler: ConnHandler) -> AsyncIterator[RawBackend]:
    loop = asyncio.get_running_loop()
    state = RawBackend("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            state.closed.append(loop.time())
            writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A request's head and its Content-Length body (the pool frames bodies that way)."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length: *(\d+)", head)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return head, body


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- warming, metrics, loop errors and closed connections ------------------------------


async def warm(client: Client) -> None:
    """One exchange, so that the next request finds a warm upstream connection."""
    response = await client.exchange(request("GET", "/warm"))
    assert response.status == 200, response.raw


def requests_counted(proxy: ProxyServer) -> dict[tuple[str, ...], float]:
    """strangler_requests_total by (route, backend, role, outcome)."""
    proxy.metrics.flush()
    counts: dict[tuple[str, ...], float] = {}
    for metric in proxy.metrics.registry.collect():
        if metric.name != "strangler_requests":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                labels = sample.labels
                key = (labels["route"], labels["backend"], labels["role"], labels["outcome"])
                counts[key] = sample.value
    return counts


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect what reaches the loop's exception handler (errors escaping callbacks)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def assert_closed_soon(upstream: RawBackend) -> None:
    """The backend's connection ends within a second of now (the client has just gone)."""
    gone = asyncio.get_running_loop().time()
    for _ in range(100):
        if upstream.closed:
            break
        await asyncio.sleep(0.01)
    assert upstream.closed and upstream.closed[0] - gone < 1.0


# --- pipelining, trailers, lingering close and targets ---------------------------------


async def test_a_pipelined_request_whose_body_arrives_later_is_answered(
    backend: Backend, tmp_path: Path
) -> None:
    # The POST's head came with the GET, while the GET was being served: reading was
    # paused to hold the pipeline, and must resume once the POST is the one served.
    # (A short grace: while its reading is paused the proxy does not see this client leave.)
    async with (
        proxy_for(backend.url, tmp_path, shutdown_grace=0.2) as proxy,
        connect(proxy) as client,
    ):
        await client.send(
            request("GET", "/echo/first")
            + b"POST /echo/second HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 10\r\n\r\nhello"
        )
        first = await client.response()
        assert (first.status, first.body) == (200, b"/echo/first")
        await client.send(b"world")
        second = await client.response(within=HANG)
        assert (second.status, second.body) == (200, b"/echo/second")
    assert backend.seen[-1].body == b"helloworld"


async def test_chunked_request_trailers_do_not_become_headers_of_the_next_request(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(
            b"POST /echo/one HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: from-the-first-request\r\nHost: evil.test\r\n\r\n"
        )
        assert response.status == 200
        response = await client.exchange(request("GET", "/echo/two"))
        assert (response.status, response.body) == (200, b"/echo/two")
    second = backend.seen[-1]
    assert second.path_qs == "/echo/two"
    assert "X-Trailer" not in second.headers
    assert second.headers.get("X-Forwarded-Host") == "proxy.test"


async def test_a_trailer_section_over_the_head_limit_is_refused(
    proxy: ProxyServer, backend: Backend
) -> None:
    # A trailer section is bounded like a header section: over 64 KiB is refused.
    async with connect(proxy) as client:
        await client.send(
            b"POST /echo/trailer HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n3\r\nabc\r\n0\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
        )
        response = await client.response()
        assert response.status in (400, 431), response.raw


async def test_no_request_after_a_413_is_served_on_the_connection_being_closed(
    tmp_path: Path,
) -> None:
    lines: list[bytes] = []  # request lines as the backend received them

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            lines.append(head.split(b"\r\n", 1)[0])
            writer.write(OK)

    async with (
        raw_backend(handler) as upstream,
        proxy_for(upstream.url, tmp_path, max_body_bytes=1000) as proxy,
    ):
        async with connect(proxy) as other:
            await warm(other)  # a warm upstream connection for what follows
        async with connect(proxy) as client:
            await client.send(
                b"POST /echo/big HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 2000\r\n\r\n"
                + b"x" * 10
            )
            response = await client.response()
            assert response.status == 413
            assert "close" in response.tokens("Connection")
            # The client finishes the body it had started, with the next request behind.
            await client.send(b"x" * 1990 + request("POST", "/echo/after-413", body=b"pay"))
            assert await client.rest() == b""
        await asyncio.sleep(0.2)
    # "Connection: close" was said: nothing after the 413'd request may be processed.
    assert lines == [b"GET /warm HTTP/1.1"]


async def test_an_absolute_form_target_without_a_path_keeps_its_query(
    proxy: ProxyServer, backend: Backend
) -> None:
    # "http://host?q=1" is an absolute-URI with an empty path (RFC 3986): its origin
    # form is "/?q=1" (RFC 9112 3.2.2), and its authority is "example.test".
    async with connect(proxy) as client:
        response = await client.exchange(request("GET", "http://example.test?q=1"))
        assert response.status == 200
    [seen] = backend.seen
    assert (seen.path_qs, seen.headers.get("X-Forwarded-Host")) == ("/?q=1", "example.test")


@pytest.mark.parametrize("failure", ["malformed-head", "read-timeout"])
async def test_a_callback_exchange_failing_before_the_head_raises_nothing_later(
    tmp_path: Path, failure: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # the first exchange warms the connection
        await read_request(reader)
        if failure == "malformed-head":
            writer.write(b"HTTP/1.1 2x0 Nope\r\n\r\n")
        await reader.read()  # (the read timeout: say nothing)

    with loop_errors() as errors:
        async with (
            raw_backend(handler) as upstream,
            proxy_for(upstream.url, tmp_path, read_timeout=0.3) as proxy,
        ):
            async with connect(proxy) as client:
                await warm(client)
                response = await client.exchange(request("GET", "/echo/x"))
                assert response.status == (502 if failure == "malformed-head" else 504)
                response = await client.exchange(request("GET", "/echo/after"))
                await asyncio.sleep(0.1)
            counts = requests_counted(proxy)
    assert proxy.proxy is not None and proxy.proxy.pool.stats.reused >= 1
    outcome = "broken" if failure == "malformed-head" else "timeout"
    assert counts.get(("echo", "legacy", "primary", outcome)) == 1, counts
    assert response.status == 200
    # The failure is reported to the exchange once: the upstream connection's loss after it
    # raises nothing out of connection_lost into the loop's exception handler.
    assert [repr(e.get("exception")) for e in errors] == []


# --- the callback relay ---------------------------------------------------------------


async def test_a_slow_reader_of_a_callback_relayed_stream_holds_back_the_backend(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    chunk = b"x" * 65536
    written = [0]
    stalled = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/warm":
            return web.Response(text="warm")
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(2000):  # 128 MiB on offer
            try:
                await asyncio.wait_for(response.write(chunk), 0.3)
            except TimeoutError:
                stalled.set()
                return response
            written[0] += len(chunk)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    upstream = await aiohttp_server(app)
    async with proxy_for(url_of(upstream), tmp_path) as proxy:
        async with connect(proxy, rcvbuf=65536) as client:
            await warm(client)
            await client.send(request("GET", "/big"))
            head = await read_head(client.reader)
            assert head.get("Transfer-Encoding") == "chunked"
            await bounded(stalled.wait())
            assert written[0] < 32 * 1024 * 1024
        assert proxy.proxy is not None and proxy.proxy.pool.stats.reused >= 1


async def test_a_client_gone_while_a_callback_exchange_awaits_the_head_closes_upstream(
    tmp_path: Path,
) -> None:
    second = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        second.set()
        await reader.read()  # no answer: until the proxy closes the connection

    async with raw_backend(handler) as upstream, proxy_for(upstream.url, tmp_path) as proxy:
        async with connect(proxy) as client:
            await warm(client)
            await client.send(request("GET", "/echo/never"))
            await bounded(second.wait())
            assert upstream.closed == []
        await assert_closed_soon(upstream)
        counts = requests_counted(proxy)
    assert counts.get(("echo", "legacy", "primary", "client_closed")) == 1, counts


async def test_a_client_gone_mid_stream_of_a_callback_exchange_closes_upstream(
    tmp_path: Path,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst;\r\n")
        await reader.read()  # the rest never comes: until the proxy closes

    async with raw_backend(handler) as upstream, proxy_for(upstream.url, tmp_path) as proxy:
        async with connect(proxy) as client:
            await warm(client)
            await client.send(request("GET", "/echo/mid"))
            await read_head(client.reader)
            assert await bounded(client.reader.readuntil(b"first;\r\n"))
        await assert_closed_soon(upstream)
        counts = requests_counted(proxy)
    assert counts.get(("echo", "legacy", "primary", "client_closed")) == 1, counts


async def test_pipelined_requests_behind_a_callback_relayed_stream_are_answered_in_order(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        await warm(client)
        await client.send(
            request("GET", "/stream/one")
            + request("POST", "/echo/two", body=b"b2")
            + request("HEAD", "/echo/three")
            + request("GET", "/echo/four")
        )
        first = await read_head(client.reader)
        assert first.get("Transfer-Encoding") == "chunked"
        backend.release.set()
        first = await read_body(client.reader, first)
        assert first.body == b"".join(STREAM_PARTS)
        second = await client.response()
        assert (second.status, second.body) == (200, b"/echo/two")
        third = await client.response(head=True)
        assert third.get("Content-Length") == str(len(b"/echo/three"))
        fourth = await client.response()
        assert (fourth.status, fourth.body) == (200, b"/echo/four")
    assert backend.paths == ["/warm", "/stream/one", "/echo/two", "/echo/three", "/echo/four"]
    assert backend.seen[2].body == b"b2"


async def test_head_204_and_304_through_the_callback_relay_keep_the_connection_in_step(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        await warm(client)
        head = await client.exchange(request("HEAD", "/echo/head"), head=True)
        assert head.status == 200
        assert head.get("Content-Length") == str(len(b"/echo/head"))
        assert head.get("Transfer-Encoding") is None
        empty = await client.exchange(request("GET", "/nocontent"))
        assert empty.status == 204
        assert empty.get("Content-Length") is None and empty.get("Transfer-Encoding") is None
        same = await client.exchange(request("GET", "/notmodified"))
        assert same.status == 304 and same.get("ETag") == '"v1"'
        assert same.get("Transfer-Encoding") is None
        after = await client.exchange(request("GET", "/echo/after"))
        assert (after.status, after.body) == (200, b"/echo/after")
    assert proxy.proxy is not None and proxy.proxy.pool.stats.reused >= 4


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"Content-Length: 100\r\n\r\n" + b"y" * 10, id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
    ],
)
async def test_a_backend_closing_mid_body_in_callback_mode_cuts_the_client_connection(
    tmp_path: Path, partial: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + partial)
        await writer.drain()
        await asyncio.sleep(0.05)  # the head goes out on its own; then the close

    async with raw_backend(handler) as upstream, proxy_for(upstream.url, tmp_path) as proxy:
        async with connect(proxy) as client:
            await warm(client)
            await client.send(request("GET", "/echo/cut"))
            head = await read_head(client.reader)
            assert head.status == 200
            rest = await client.rest()
            if head.get("Content-Length") is not None:
                assert head.get("Content-Length") == "100" and len(rest) < 100
            else:
                assert head.get("Transfer-Encoding") == "chunked"
                assert not rest.endswith(b"0\r\n\r\n"), rest
        counts = requests_counted(proxy)
    assert counts.get(("echo", "legacy", "primary", "broken")) == 1, counts


async def test_forwarded_for_and_connection_named_headers_on_the_callback_relay(
    tmp_path: Path,
) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private-Hop\r\n"
                b"X-Private-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n"
                b"Content-Length: 2\r\n\r\nok"
            )

    async with raw_backend(handler) as upstream, proxy_for(upstream.url, tmp_path) as proxy:
        async with connect(proxy) as client:
            await warm(client)
            response = await client.exchange(
                request(
                    "GET",
                    "/echo/hops",
                    "Connection: keep-alive, X-Client-Hop",
                    "X-Client-Hop: 1",
                    "X-Forwarded-For: 10.1.1.1",
                    "X-Forwarded-For: 10.2.2.2",
                    "X-Strangler-Backend: candidate",
                )
            )
            assert (response.status, response.body) == (200, b"ok")
            assert response.get("X-Private-Hop") is None and response.get("Keep-Alive") is None
            assert response.get("X-Kept") == "yes"
            assert response.all("X-Strangler-Backend") == ["legacy"]
            response = await client.exchange(
                request("GET", "/echo/named", "Connection: X-Forwarded-For", "X-Forwarded-For: x")
            )
            assert response.status == 200
        assert proxy.proxy is not None and proxy.proxy.pool.stats.reused >= 2
    hops = heads[1].decode("latin-1").lower()
    assert "x-client-hop" not in hops and "x-strangler-backend" not in hops
    assert "\r\nx-forwarded-for: 10.1.1.1, 10.2.2.2, 127.0.0.1\r\n" in hops
    assert hops.count("x-forwarded-for") == 1
    named = heads[2].decode("latin-1").lower()
    assert "\r\nx-forwarded-for: 127.0.0.1\r\n" in named


async def test_an_http_1_0_client_gets_a_close_delimited_callback_relayed_stream(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        response = await client.exchange(
            request("GET", "/warm", "Connection: keep-alive", version="HTTP/1.0")
        )
        assert response.status == 200
        await client.send(
            request("GET", "/stream/old", "Connection: keep-alive", version="HTTP/1.0")
        )
        head = await read_head(client.reader)
        backend.release.set()
        assert head.get("Transfer-Encoding") is None and head.get("Content-Length") is None
        assert "close" in head.tokens("Connection")
        assert await client.rest() == b"".join(STREAM_PARTS)


async def test_callback_relayed_exchanges_are_counted_once_each(
    proxy: ProxyServer, backend: Backend
) -> None:
    async with connect(proxy) as client:
        for i in range(5):
            response = await client.exchange(request("GET", f"/echo/{i}"))
            assert response.status == 200
        await client.send(request("GET", "/stream/counted"))
        head = await read_head(client.reader)
        backend.release.set()
        await read_body(client.reader, head)
    assert proxy.proxy is not None and proxy.proxy.pool.stats.reused >= 5
    assert requests_counted(proxy) == {("echo", "legacy", "primary", "success"): 5.0} | {
        ("_unrouted", "legacy", "primary", "success"): 1.0
    }


async def test_shutdown_finishes_a_held_callback_exchange_within_the_grace(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/warm":
            return web.Response(text="warm")
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(2000):
                await response.write(b"z" * 65536)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    upstream = await aiohttp_server(app)
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(
        url_of(upstream), url_of(upstream), flags, server={"shutdown_grace": 0.3}
    )
    loop = asyncio.get_running_loop()
    async with running_proxy(settings) as proxy, connect(proxy, rcvbuf=65536) as client:
        await warm(client)
        await client.send(request("GET", "/big"))
        await read_head(client.reader)
        await asyncio.sleep(0.2)  # the client reads nothing: the exchange is held
        started = loop.time()
        await bounded(proxy.stop())
        assert loop.time() - started < 2.0
