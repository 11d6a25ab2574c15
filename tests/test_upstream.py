"""The upstream pool against real loopback servers that send exactly the bytes we choose."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.upstream import (
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ServerFactory = Callable[..., Awaitable[TestServer]]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# Each connection's task of a Backend sets its request log here.
_REQUESTS: contextvars.ContextVar[list[tuple[bytes, bytes]]] = contextvars.ContextVar("requests")


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off the wire, recorded: its head, and a body framed by Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    _REQUESTS.get([]).append((head, body))
    return head, body


def replies(*responses: bytes) -> Script:
    """Answer the requests on a connection with these bytes, in turn, the last one for
    every request after; close when the client does."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        turn = 0
        while True:
            await read_request(reader)
            writer.write(responses[min(turn, len(responses) - 1)])
            await writer.drain()
            turn += 1

    return script


class Backend:
    """A raw asyncio server on loopback: each connection runs ``scripts[n]`` (the last
    one for later connections) and every request head and body is recorded."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts or (replies(OK),)
        self.connections = 0
        self.closed = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Backend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()  # the scripts end on the EOF this gives their readers
        _, pending = await asyncio.wait(self._tasks, timeout=1.0) if self._tasks else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        _REQUESTS.set(self.requests)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a swallowed cancel keeps asyncio's stream callback from logging it
        finally:
            self.closed += 1
            writer.close()
            self._tasks.discard(task)


async def drain(response: UpstreamResponse) -> bytes:
    body = b"".join([chunk async for chunk in response])
    response.release()
    return body


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take the request, never answer, return when the client closes."""
    await read_request(reader)
    await reader.read()


# -- the request on the wire ---------------------------------------------------------------


async def test_method_target_and_headers_reach_the_backend_verbatim() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        headers = [("X-Case", "MiXeD"), ("x-dup", "1"), ("x-dup", "2"), ("Cookie", "a=b; c=d")]
        await drain(await pool.request(backend.origin, "GET", "/a%2Fb/%zz?q=1&q=2", headers))
        await drain(await pool.request(backend.origin, "PROPFIND", "*", []))
        await pool.close()
    host = f"127.0.0.1:{backend.port}"
    assert backend.requests == [
        (
            f"GET /a%2Fb/%zz?q=1&q=2 HTTP/1.1\r\nHost: {host}\r\nX-Case: MiXeD\r\n"
            "x-dup: 1\r\nx-dup: 2\r\nCookie: a=b; c=d\r\n\r\n".encode(),
            b"",
        ),
        (f"PROPFIND * HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), b""),
    ]


async def test_a_body_goes_with_its_length_and_post_put_patch_always_carry_one() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "POST", "/p", [], b"\x00\xffbody"))
        await drain(await pool.request(backend.origin, "PUT", "/p", []))
        await drain(await pool.request(backend.origin, "DELETE", "/p", [], b"x"))
        await drain(await pool.request(backend.origin, "OPTIONS", "/p", []))
        await pool.close()
    heads = [head.split(b"\r\n", 2)[2] for head, _ in backend.requests]
    assert heads == [
        b"Content-Length: 6\r\n\r\n",
        b"Content-Length: 0\r\n\r\n",
        b"Content-Length: 1\r\n\r\n",
        b"\r\n",
    ]
    assert [body for _, body in backend.requests] == [b"\x00\xffbody", b"", b"x", b""]


async def test_a_large_body_arrives_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: written apart from the head
    async with Backend() as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "POST", "/big", [], body))
        await pool.close()
    assert backend.requests[0][1] == body


async def test_the_callers_host_and_matching_content_length_are_kept_not_doubled() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        headers = [("host", "public.example"), ("content-length", "3")]
        await drain(await pool.request(backend.origin, "POST", "/", headers, b"abc"))
        await pool.close()
    assert backend.requests == [
        (b"POST / HTTP/1.1\r\nhost: public.example\r\ncontent-length: 3\r\n\r\n", b"abc")
    ]


async def test_non_ascii_header_bytes_decoded_as_aiohttp_does_go_out_unchanged() -> None:
    raw = b"caf\xc3\xa9 \xff"
    async with Backend() as backend:
        pool = UpstreamPool()
        value = raw.decode("utf-8", "surrogateescape")
        await drain(await pool.request(backend.origin, "GET", "/", [("X-Raw", value)]))
        await pool.close()
    assert b"\r\nX-Raw: " + raw + b"\r\n" in backend.requests[0][0]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body"),
    [
        ("GET", "/", [("X-A", "v\r\nX-Injected: 1")], b""),
        ("GET", "/", [("X-A", "v\nX-Injected: 1")], b""),
        ("GET", "/", [("X-A", "v\rX")], b""),
        ("GET", "/", [("X-A", "v\x00")], b""),
        ("GET", "/", [("X-A\r\nX-Injected", "1")], b""),
        ("GET", "/", [("Content-Length ", "0")], b""),
        ("GET", "/", [("X:A", "1")], b""),
        ("GET", "/", [("", "1")], b""),
        ("GET", "/ HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /", [], b""),
        ("GET", "/a b", [], b""),
        ("GET", "", [], b""),
        ("GET /x HTTP/1.1\r\n", "/", [], b""),
        ("", "/", [], b""),
        ("POST", "/", [("Transfer-Encoding", "chunked")], b"abc"),
        ("POST", "/", [("Content-Length", "2")], b"abc"),
    ],
)
async def test_a_request_that_could_split_or_desync_is_refused(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        with pytest.raises(ValueError):
            await pool.request(backend.origin, method, target, headers, body)
        await pool.close()
    assert backend.connections == 0


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/a b"),
        ("GET", "/a\r\nX-Injected: 1"),
        ("GET", "/a\nb"),
        ("GET /x", "/"),
        ("GET\r\n", "/"),
    ],
)
async def test_a_parsers_header_block_with_a_bad_request_line_is_refused(
    method: str, target: str
) -> None:
    # Header lines as bytes skip the header checks (a parser made them); the request
    # line given as text is still checked.
    async with Backend() as backend:
        pool = UpstreamPool()
        with pytest.raises(ValueError):
            await pool.request(backend.origin, method, target, b"X-A: 1\r\n")
        await pool.close()
    assert backend.connections == 0


async def test_a_parsers_target_as_bytes_goes_out_as_it_came() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        for target in (b"/a/%C3%A9?q=%FF&r=1", "/caf\u00e9?q=\udcff"):
            await drain(await pool.request(backend.origin, "GET", target, b"X-A: 1\r\n"))
        await pool.close()
    lines = [head.split(b"\r\n", 1)[0] for head, _ in backend.requests]
    assert lines == [b"GET /a/%C3%A9?q=%FF&r=1 HTTP/1.1", b"GET /caf\xc3\xa9?q=\xff HTTP/1.1"]


@pytest.mark.parametrize(
    "origin", ["ftp://127.0.0.1:1", "http://127.0.0.1:1/path", "http://u:p@127.0.0.1:1", "http://"]
)
async def test_an_origin_must_be_scheme_host_and_port(origin: str) -> None:
    pool = UpstreamPool()
    with pytest.raises(ValueError):
        await pool.request(origin, "GET", "/", [])


# -- response framing -----------------------------------------------------------------------


async def body_from(response_bytes: bytes, method: str = "GET") -> tuple[UpstreamResponse, bytes]:
    async with Backend(replies(response_bytes)) as backend:
        pool = UpstreamPool()
        response = await pool.request(backend.origin, method, "/", [])
        body = await drain(response)
        await pool.close()
    return response, body


async def test_a_content_length_body_is_read_to_its_length() -> None:
    response, body = await body_from(
        b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"
    )
    assert (response.status, response.reason, response.version) == (201, "Created", "1.1")
    assert response.headers == [("Content-Length", "5"), ("X-A", "1")]
    assert body == b"hello"


async def test_a_chunked_body_loses_its_framing_extensions_and_trailers() -> None:
    response, body = await body_from(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1;x\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    assert body == b"hello world!"
    assert response.headers == [("Transfer-Encoding", "chunked")]


async def test_content_encoding_is_left_alone() -> None:
    compressed = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    _, body = await body_from(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n" + compressed
    )
    assert body == compressed


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
async def test_a_body_without_length_runs_until_the_server_closes(head: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head + b"first ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"second")

    async with Backend(script) as backend:
        pool = UpstreamPool()
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"first second"
        assert pool.stats.idle == 0
        await pool.close()


async def test_set_cookie_duplicates_keep_their_order_and_spelling() -> None:
    response, _ = await body_from(
        b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nContent-Length: 0\r\nSet-Cookie: b=2\r\n"
        b"SET-COOKIE: c=3; Path=/\r\n\r\n"
    )
    assert response.headers == [
        ("set-cookie", "a=1"),
        ("Content-Length", "0"),
        ("Set-Cookie", "b=2"),
        ("SET-COOKIE", "c=3; Path=/"),
    ]


@pytest.mark.parametrize(
    ("method", "response_bytes"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n"),
    ],
)
async def test_head_204_and_304_have_no_body_and_keep_the_connection(
    method: str, response_bytes: bytes
) -> None:
    async with Backend(replies(response_bytes, OK)) as backend:
        pool = UpstreamPool()
        response = await pool.request(backend.origin, method, "/", [])
        assert response.complete
        assert await drain(response) == b""
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        await pool.close()
    assert backend.connections == 1


async def test_interim_100_and_103_responses_are_skipped() -> None:
    response, body = await body_from(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert (response.status, response.headers, body) == (200, [("Content-Length", "2")], b"ok")


async def test_the_first_chunk_is_readable_while_the_server_holds_the_rest() -> None:
    gate = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"4\r\nrest\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Backend(script) as backend:
        pool = UpstreamPool()
        response = await pool.request(backend.origin, "GET", "/", [])
        assert await asyncio.wait_for(response.read_chunk(), 1) == b"first"
        assert not response.complete
        gate.set()
        assert await response.read_chunk() == b"rest"
        assert await response.read_chunk() == b""
        response.release()
        assert pool.stats.idle == 1
        await pool.close()


# -- keep-alive -------------------------------------------------------------------------------


async def test_sequential_requests_share_one_keep_alive_connection() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        for _ in range(20):
            assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        assert (pool.stats.opened, pool.stats.reused, pool.stats.idle) == (1, 19, 1)
        await pool.close()
    assert backend.connections == 1


async def test_an_unread_but_complete_response_still_frees_its_connection() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        async with await pool.request(backend.origin, "GET", "/", []):
            pass
        async with await pool.request(backend.origin, "GET", "/", []):
            pass
        assert pool.stats.opened == 1
        await pool.close()


@pytest.mark.parametrize(
    ("request_headers", "response_bytes"),
    [
        ([], b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
        ([], b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 2\r\n\r\nok"),
        ([], b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        # llhttp takes this for keep-alive; the pool reuses HTTP/1.0 only on Connection.
        ([], b"HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\nok"),
        ([("Connection", "close")], OK),
    ],
)
async def test_connection_close_from_either_side_is_honoured(
    request_headers: list[tuple[str, str]], response_bytes: bytes
) -> None:
    async with Backend(replies(response_bytes)) as backend:
        pool = UpstreamPool()
        for _ in range(3):
            assert await drain(await pool.request(backend.origin, "GET", "/", request_headers))
        assert pool.stats.idle == 0
        await pool.close()
    assert backend.connections == 3


async def test_http_1_0_with_keep_alive_is_reused() -> None:
    response_bytes = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    async with Backend(replies(response_bytes)) as backend:
        pool = UpstreamPool()
        for _ in range(3):
            await drain(await pool.request(backend.origin, "GET", "/", []))
        await pool.close()
    assert backend.connections == 1


async def test_an_idle_connection_the_server_closes_is_dropped_without_a_retry() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()

    async with Backend(answer_once) as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: pool.stats.idle == 0)
        await drain(await pool.request(backend.origin, "GET", "/", []))
        assert (pool.stats.opened, pool.stats.retried, pool.stats.connections) == (2, 0, 1)
        await pool.close()


async def test_idle_connections_expire_after_the_keepalive_timeout() -> None:
    async with Backend() as backend:
        pool = UpstreamPool(keepalive_timeout=0.05)
        await drain(await pool.request(backend.origin, "GET", "/", []))
        assert pool.stats.idle == 1
        await eventually(lambda: backend.closed == 1)
        assert (pool.stats.idle, pool.stats.connections) == (0, 0)
        await pool.close()


async def test_idle_connections_stack_last_in_first_out_up_to_the_per_origin_cap() -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(OK)
            await writer.drain()

    async with Backend(slow) as backend:
        pool = UpstreamPool(max_idle_per_origin=2)
        tasks = [
            asyncio.create_task(pool.request(backend.origin, "GET", "/", [])) for _ in range(3)
        ]
        await eventually(lambda: len(backend.requests) == 3)
        gate.set()
        for response in await asyncio.gather(*tasks):
            await drain(response)
        assert (pool.stats.idle, pool.stats.connections) == (2, 2)
        newest = pool._idle[backend.origin][-1]
        response = await pool.request(backend.origin, "GET", "/", [])
        assert response._conn is newest
        await drain(response)
        await pool.close()


# -- the stale keep-alive race -------------------------------------------------------------


async def closes_on_second_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer one request, then close on the next as if the idle timer had just fired."""
    await read_request(reader)
    writer.write(OK)
    await writer.drain()
    await read_request(reader)


async def test_a_get_on_a_connection_the_server_just_closed_is_retried_once() -> None:
    async with Backend(closes_on_second_request) as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "GET", "/1", []))
        assert await drain(await pool.request(backend.origin, "GET", "/2", [])) == b"ok"
        assert (pool.stats.opened, pool.stats.retried) == (2, 1)
        await pool.close()
    assert [head.split(b" ")[1] for head, _ in backend.requests] == [b"/1", b"/2", b"/2"]


async def test_a_post_on_a_connection_the_server_just_closed_is_not_retried() -> None:
    async with Backend(closes_on_second_request) as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "GET", "/1", []))
        with pytest.raises(UpstreamError) as caught:
            await pool.request(backend.origin, "POST", "/2", [], b"once")
        assert not isinstance(caught.value, UpstreamTimeout | UpstreamUnreachable)
        assert (pool.stats.opened, pool.stats.retried) == (1, 0)
        await pool.close()
    assert len(backend.requests) == 2


async def test_a_post_whose_write_failed_is_retried_because_nothing_was_sent() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "GET", "/", []))
        # White-box: the idle connection's transport closes and the very next request
        # picks it before the loop has run connection_lost.
        pool._idle[backend.origin][-1]._transport.close()  # type: ignore[union-attr]
        assert await drain(await pool.request(backend.origin, "POST", "/", [], b"x")) == b"ok"
        assert (pool.stats.opened, pool.stats.retried) == (2, 1)
        await pool.close()
    assert [body for _, body in backend.requests] == [b"", b"x"]


async def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with Backend(close_at_once) as backend:
        pool = UpstreamPool()
        with pytest.raises(UpstreamError):
            await pool.request(backend.origin, "GET", "/", [])
        assert pool.stats.retried == 0
        await pool.close()
    assert backend.connections == 1


# -- framing violations -----------------------------------------------------------------------

BIG = b"X-Big: " + b"a" * 8000 + b"\r\n"
VIOLATIONS = {
    "content-length and transfer-encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "transfer-encoding and content-length": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "differing content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "content-length list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "signed content-length": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "invalid chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "negative chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n",
    "overflowing chunk size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n"
    ),
    "head over the limit": b"HTTP/1.1 200 OK\r\n" + BIG + b"Content-Length: 2\r\n\r\nok",
    "unterminated header over the limit": b"HTTP/1.1 200 OK\r\n" + BIG,
    "folded header": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "not http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "protocol upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    ),
}


# The server closes right after these: the close is what makes them wrong.
CUT_SHORT = {
    "connection closed before any byte": b"",
    "connection closed mid-head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "short content-length body": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
    "unfinished chunked body": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    ),
}


@pytest.mark.parametrize(
    ("bad", "then_close"),
    [*((bad, False) for bad in VIOLATIONS.values()), *((bad, True) for bad in CUT_SHORT.values())],
    ids=[*VIOLATIONS, *CUT_SHORT],
)
async def test_a_framing_violation_fails_the_exchange_and_the_connection_is_not_reused(
    bad: bytes, then_close: bool
) -> None:
    async def answer_badly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(bad)
        await writer.drain()
        if not then_close:
            # The error must come from the bytes themselves, not from a close.
            await reader.read()

    async with Backend(answer_badly, replies(OK)) as backend:
        pool = UpstreamPool(max_head_bytes=4096, read_timeout=2.0)
        with pytest.raises(UpstreamError) as caught:
            await drain(await pool.request(backend.origin, "GET", "/", []))
        assert not isinstance(caught.value, UpstreamTimeout)
        assert pool.stats.idle == 0
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        assert pool.stats.opened == 2
        await pool.close()
    assert backend.connections == 2


async def test_bytes_on_an_idle_connection_get_it_discarded() -> None:
    async def answer_then_babble(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
        await writer.drain()
        await reader.read()

    async with Backend(answer_then_babble, replies(OK)) as backend:
        pool = UpstreamPool()
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        await eventually(lambda: pool.stats.discarded == 1)
        assert (pool.stats.idle, pool.stats.connections) == (0, 0)
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        await pool.close()
    assert backend.connections == 2


# -- failures and timeouts ---------------------------------------------------------------------


async def test_a_refused_connection_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = UpstreamPool()
    with pytest.raises(UpstreamUnreachable):
        await pool.request(f"http://127.0.0.1:{port}", "GET", "/", [])
    assert pool.stats.connections == 0
    await pool.close()


async def test_no_response_head_within_the_read_timeout_is_a_timeout() -> None:
    async with Backend(hold) as backend:
        pool = UpstreamPool(read_timeout=0.1)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await pool.request(backend.origin, "GET", "/", [])
        assert 0.09 < time.monotonic() - started < 1.0
        assert pool.stats.retried == 0
        await eventually(lambda: backend.closed == 1)
        await pool.close()


async def test_a_body_that_stalls_for_the_read_timeout_is_a_timeout_after_what_came() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await reader.read()

    async with Backend(stall) as backend:
        pool = UpstreamPool(read_timeout=0.1)
        response = await pool.request(backend.origin, "GET", "/", [])
        assert await response.read_chunk() == b"hello"
        with pytest.raises(UpstreamTimeout):
            await response.read_chunk()
        response.release()
        await eventually(lambda: backend.closed == 1)
        assert pool.stats.connections == 0
        await pool.close()


async def test_the_read_timeout_is_between_bytes_not_for_the_whole_body() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"steady":
            await asyncio.sleep(0.04)
            writer.write(bytes([byte]))
            await writer.drain()
        await reader.read()

    async with Backend(trickle) as backend:
        pool = UpstreamPool(read_timeout=0.12)
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"steady"
        await pool.close()


async def test_waiting_for_a_connection_counts_against_the_connect_timeout() -> None:
    async with Backend(hold) as backend:
        pool = UpstreamPool(max_connections=1, connect_timeout=0.1)
        holder = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: len(backend.requests) == 1)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await pool.request(backend.origin, "GET", "/", [])
        assert time.monotonic() - started < 1.0
        assert pool.stats.waiting == 0
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert pool.stats.connections == 0
        await pool.close()


async def test_the_connection_limit_queues_requests_first_come_first_served() -> None:
    gate = asyncio.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(OK)
            await writer.drain()

    async with Backend(gated) as backend:
        pool = UpstreamPool(max_connections=2)
        order: list[int] = []

        async def fetch(n: int) -> None:
            body = await drain(await pool.request(backend.origin, "GET", f"/{n}", []))
            assert body == b"ok"
            order.append(n)

        tasks = []
        for n in range(6):
            tasks.append(asyncio.create_task(fetch(n)))
            await asyncio.sleep(0.005)
        await eventually(lambda: pool.stats.waiting == 4)
        assert backend.connections == 2
        gate.set()
        await asyncio.gather(*tasks)
        assert order[2:] == [2, 3, 4, 5]
        assert (pool.stats.opened, backend.connections) == (2, 2)
        await pool.close()


async def test_at_the_limit_another_origins_idle_connection_gives_way() -> None:
    async with Backend() as first, Backend() as second:
        pool = UpstreamPool(max_connections=1)
        await drain(await pool.request(first.origin, "GET", "/", []))
        assert await drain(await pool.request(second.origin, "GET", "/", [])) == b"ok"
        assert pool.stats.connections == 1
        await eventually(lambda: first.closed == 1)
        await pool.close()


# -- back-pressure ---------------------------------------------------------------------------


async def test_a_reader_that_does_not_read_holds_back_a_64_mib_body() -> None:
    total = 64 * 1024 * 1024
    piece = b"x" * (1024 * 1024)
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent < total:
            writer.write(piece)
            sent += len(piece)
            await writer.drain()

    async with Backend(flood) as backend:
        pool = UpstreamPool(read_timeout=0.1)
        response = await pool.request(backend.origin, "GET", "/", [])
        received = len(await response.read_chunk())
        # The reader dawdles past the read timeout while the server keeps pushing: a
        # paused reader is not a stalled server.
        await asyncio.sleep(0.3)
        bound = 512 * 1024  # the high-water mark plus one read of the transport
        assert response.buffered <= bound
        assert sent < total // 2
        while received < 16 * 1024 * 1024:  # reading again resumes the flow
            assert response.buffered <= bound
            received += len(await response.read_chunk())
        response.close()
        assert pool.stats.connections == 0
        await pool.close()


async def test_a_lagging_reader_gets_many_small_pieces_joined_up_to_64_kib() -> None:
    # 2,000 chunks of 100 bytes (200 kB, under the high-water mark) arrive before the
    # first read: the reader gets them in order, joined into pieces of at most 64 KiB
    # (four), and nothing twice.
    pieces = [b"%04d" % i + b"." * 96 for i in range(2000)]
    body = b"".join(pieces)
    written = asyncio.Event()

    async def chunky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(framed + b"0\r\n\r\n")
        await writer.drain()
        written.set()
        await reader.read()

    async with Backend(chunky) as backend:
        pool = UpstreamPool()
        response = await pool.request(backend.origin, "GET", "/", [])
        await asyncio.wait_for(written.wait(), 2)
        await eventually(lambda: response.buffered == len(body))
        reads = []
        while chunk := await response.read_chunk():
            reads.append(chunk)
        assert b"".join(reads) == body
        assert len(reads) == 4
        assert max(map(len, reads)) <= 64 * 1024
        await pool.close()


class TakingSink:
    """A sink as the relays are one: it takes every byte it is woken for."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = asyncio.Event()

    def upstream_ready(self, connection: UpstreamConnection) -> None:
        response = connection.response
        if response is None:
            return
        self.body += response.take()
        if response.complete:
            response.release()
            self.done.set()


async def test_a_sink_is_not_paused_by_one_read_larger_than_the_buffer_mark() -> None:
    # The event loops here read at most 256,000 bytes at a time, below the 256 KiB mark,
    # so one larger read is delivered by hand: the mark must not pause a connection whose
    # sink takes everything at once, or the rest of the body would never be read.
    size = 300 * 1024
    rest = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        await rest.wait()
        writer.write(b"tail")
        await reader.read()

    async with Backend(script) as backend:
        pool = UpstreamPool()
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        sink = TakingSink()
        connection = pool.start(backend.origin, "GET", "/", b"", b"", sink)
        assert connection is not None
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + 4)
        connection.data_received(head + b"x" * size)
        assert bytes(sink.body) == b"x" * size
        rest.set()
        await asyncio.wait_for(sink.done.wait(), 2.0)
        assert bytes(sink.body[size:]) == b"tail"
        assert pool.stats.idle == 1
        await pool.close()


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelling_a_request_awaiting_its_head_closes_the_connection() -> None:
    async with Backend(hold) as backend:
        pool = UpstreamPool()
        task = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: len(backend.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (pool.stats.connections, pool.stats.idle) == (0, 0)
        await eventually(lambda: backend.closed == 1)
        await pool.close()


async def test_cancelling_a_body_read_closes_the_connection_instead_of_reusing_it() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await reader.read()

    async with Backend(half, replies(OK)) as backend:
        pool = UpstreamPool()
        response = await pool.request(backend.origin, "GET", "/", [])
        assert await response.read_chunk() == b"hello"
        task = asyncio.create_task(response.read_chunk())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        response.release()
        assert (pool.stats.connections, pool.stats.idle) == (0, 0)
        await eventually(lambda: backend.closed == 1)
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        await pool.close()


async def test_cancelling_while_queued_for_a_slot_leaves_the_queue_clean() -> None:
    async with Backend(hold) as backend:
        pool = UpstreamPool(max_connections=1)
        holder = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: len(backend.requests) == 1)
        queued = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: pool.stats.waiting == 1)
        queued.cancel()
        holder.cancel()
        await asyncio.gather(holder, queued, return_exceptions=True)
        assert (pool.stats.waiting, pool.stats.connections) == (0, 0)
        await pool.close()


async def test_a_response_left_mid_body_by_async_with_is_closed_not_pooled() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await reader.read()

    async with Backend(half) as backend:
        pool = UpstreamPool()
        async with await pool.request(backend.origin, "GET", "/", []) as response:
            assert await response.read_chunk() == b"hello"
        assert (pool.stats.connections, pool.stats.idle) == (0, 0)
        with pytest.raises(UpstreamError):
            await response.read_chunk()
        await eventually(lambda: backend.closed == 1)
        await pool.close()


# -- closing the pool -----------------------------------------------------------------------


async def test_closing_the_pool_closes_idle_connections_and_refuses_requests() -> None:
    async with Backend() as backend:
        pool = UpstreamPool()
        await drain(await pool.request(backend.origin, "GET", "/", []))
        in_flight = await pool.request(backend.origin, "GET", "/", [])
        await drain(await pool.request(backend.origin, "GET", "/", []))
        assert pool.stats.idle == 1
        await pool.close()
        assert pool.closed
        assert (pool.stats.idle, pool.stats.connections) == (0, 1)
        await eventually(lambda: backend.closed == 1)
        with pytest.raises(UpstreamError):
            await pool.request(backend.origin, "GET", "/", [])
        assert await drain(in_flight) == b"ok"  # released after close: closed, not pooled
        assert (pool.stats.idle, pool.stats.connections) == (0, 0)
        await eventually(lambda: backend.closed == 2)


async def test_closing_the_pool_fails_queued_requests() -> None:
    async with Backend(hold) as backend:
        pool = UpstreamPool(max_connections=1)
        holder = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: len(backend.requests) == 1)
        queued = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: pool.stats.waiting == 1)
        await pool.close()
        with pytest.raises(UpstreamError):
            await queued
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        assert pool.stats.connections == 0


# -- an aiohttp backend, for sanity -----------------------------------------------------------


async def test_an_aiohttp_backend_is_spoken_to_correctly(aiohttp_server: ServerFactory) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        response = web.json_response(
            {"method": request.method, "path": request.raw_path, "body": body.decode()}
        )
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for part in (b"one\n", b"two\n", b"three\n"):
            await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/stream", stream)
    server = await aiohttp_server(app)
    origin = f"http://127.0.0.1:{server.port}"
    pool = UpstreamPool()
    response = await pool.request(origin, "POST", "/echo?x=%2F", [("X-A", "1")], b"payload")
    assert response.status == 200
    assert [v for k, v in response.headers if k == "Set-Cookie"] == ["a=1", "b=2"]
    assert await drain(response) == b'{"method": "POST", "path": "/echo?x=%2F", "body": "payload"}'
    response = await pool.request(origin, "GET", "/stream", [])
    assert ("Transfer-Encoding", "chunked") in response.headers
    assert await drain(response) == b"one\ntwo\nthree\n"
    assert (await pool.request(origin, "HEAD", "/stream", [])).status in (200, 405)
    assert pool.stats.opened == 1
    await pool.close()


# -- TLS ---------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-newkey", "ec"),
            *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(cert)),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_origins_speak_tls(tmp_path: Path) -> None:
    # openssl ships with every Debian base system; without it this test must fail, not skip.
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(OK)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "localhost", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(ssl_context=client_context)
    for _ in range(2):
        assert await drain(await pool.request(f"https://localhost:{port}", "GET", "/", [])) == b"ok"
    assert pool.stats.opened == 1
    await pool.close()
    server.close()
    await server.wait_closed()


# -- a response split anywhere parses the same --------------------------------------------------

SPLIT_CASES = [
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n",
        (
            200,
            "OK",
            [("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
        ),
        b"hello world",
    ),
    (
        "GET",
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        (404, "Not Found", [("Content-Length", "9")]),
        b"not found",
    ),
    (
        "HEAD",
        b'HTTP/1.1 200 Fine Thanks\r\nContent-Length: 1000\r\nETag: "abc"\r\n\r\n',
        (200, "Fine Thanks", [("Content-Length", "1000"), ("ETag", '"abc"')]),
        b"",
    ),
]


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(SPLIT_CASES),
    cuts=st.lists(st.floats(min_value=0, max_value=1), max_size=6),
)
async def test_a_response_split_at_any_bytes_across_writes_parses_the_same(
    case: tuple[str, bytes, tuple[int, str, list[tuple[str, str]]], bytes], cuts: list[float]
) -> None:
    method, raw, head, body = case
    points = sorted({0, len(raw), *(int(cut * len(raw)) for cut in cuts)})
    pieces = [raw[a:b] for a, b in itertools.pairwise(points) if b > a]

    async def in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                # Two turns of the loop: the client reads this piece before the next
                # is written, so each piece arrives as a read of its own.
                await asyncio.sleep(0)
                await asyncio.sleep(0)

    async with Backend(in_pieces) as backend:
        pool = UpstreamPool()
        for _ in range(2):  # and the connection is reusable after
            response = await pool.request(backend.origin, method, "/", [])
            assert (response.status, response.reason, response.headers) == head
            assert await drain(response) == body
        assert pool.stats.opened == 1
        await pool.close()


# -- the same on uvloop, which the proxy runs on -------------------------------------------------

ON_UVLOOP: list[Callable[[], Coroutine[Any, Any, None]]] = [
    test_method_target_and_headers_reach_the_backend_verbatim,
    test_a_large_body_arrives_whole,
    test_a_chunked_body_loses_its_framing_extensions_and_trailers,
    test_the_first_chunk_is_readable_while_the_server_holds_the_rest,
    test_sequential_requests_share_one_keep_alive_connection,
    test_an_idle_connection_the_server_closes_is_dropped_without_a_retry,
    test_a_get_on_a_connection_the_server_just_closed_is_retried_once,
    test_a_post_on_a_connection_the_server_just_closed_is_not_retried,
    test_a_post_whose_write_failed_is_retried_because_nothing_was_sent,
    test_bytes_on_an_idle_connection_get_it_discarded,
    test_a_refused_connection_is_unreachable,
    test_no_response_head_within_the_read_timeout_is_a_timeout,
    test_a_body_that_stalls_for_the_read_timeout_is_a_timeout_after_what_came,
    test_the_connection_limit_queues_requests_first_come_first_served,
    test_a_reader_that_does_not_read_holds_back_a_64_mib_body,
    test_cancelling_a_request_awaiting_its_head_closes_the_connection,
    test_cancelling_a_body_read_closes_the_connection_instead_of_reusing_it,
    test_closing_the_pool_closes_idle_connections_and_refuses_requests,
]


@pytest.mark.parametrize("scenario", ON_UVLOOP, ids=lambda scenario: scenario.__name__[5:])
def test_the_pool_behaves_the_same_on_uvloop(
    scenario: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    uvloop.run(scenario())
