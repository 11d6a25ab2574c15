"""The upstream pool writing a request body that is still arriving (``UpstreamPool.open``).

A raw loopback backend records the bytes of each request exactly as they arrive, so the
tests see the framing the pool chose, whether a connection served again, and what a
backend is left with when a body is cut.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from proxy.upstream import UpstreamError, UpstreamPool, UpstreamTimeout

TIMEOUT = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Recorder:
    """What a raw backend saw: each request's head and body bytes (as framed on the
    wire), per connection; ``early``: answer as soon as the head is in."""

    early: bool = False
    answer: bool = True
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    incomplete: list[bytes] = field(default_factory=list)  # bodies cut short
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        body = b""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.early:
                    writer.write(OK)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = b""
                if length is not None:
                    while len(body) < int(length.group(1)):
                        more = await reader.read(int(length.group(1)) - len(body))
                        if not more:
                            raise asyncio.IncompleteReadError(body, None)
                        body += more
                else:
                    while not body.endswith(b"0\r\n\r\n"):
                        more = await reader.read(65536)
                        if not more:
                            raise asyncio.IncompleteReadError(body, None)
                        body += more
                self.requests.append((number, head, body))
                body = b""
                if self.answer and not self.early:
                    writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            if body:
                self.incomplete.append(body)
        writer.close()


@asynccontextmanager
async def backend(recorder: Recorder) -> AsyncIterator[str]:
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def read_all(pool: UpstreamPool, origin: str, length: int, pieces: list[bytes]) -> bytes:
    conn = await pool.open(origin, "POST", "/up", b"X-A: 1\r\n", length)
    for piece in pieces:
        conn.send_body(piece)
        await conn.drain_body()
    conn.end_body()
    response = await asyncio.wait_for(conn.response_head(), TIMEOUT)
    async with response:
        return b"".join([chunk async for chunk in response])


@pytest.mark.parametrize(
    ("length", "framing", "wire"),
    [
        (11, b"Content-Length: 11", b"hello world"),
        (-1, b"Transfer-Encoding: chunked", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ],
)
async def test_a_streamed_body_goes_framed_as_its_length_says_and_the_connection_serves_again(
    length: int, framing: bytes, wire: bytes
) -> None:
    recorder = Recorder()
    async with backend(recorder) as origin:
        pool = UpstreamPool()
        for _ in range(2):
            assert await read_all(pool, origin, length, [b"hello", b" world"]) == b"ok"
        await pool.close()
    assert [(number, body) for number, _, body in recorder.requests] == [(1, wire), (1, wire)]
    assert all(framing in head for _, head, _ in recorder.requests)
    assert pool.stats.reused == 1


async def test_the_read_timeout_does_not_run_while_the_backend_waits_for_the_body() -> None:
    recorder = Recorder()
    async with backend(recorder) as origin:
        pool = UpstreamPool(read_timeout=0.2)
        conn = await pool.open(origin, "POST", "/up", b"", 4)
        await asyncio.sleep(0.6)  # the client is slow, not the backend
        conn.send_body(b"late")
        conn.end_body()
        response = await asyncio.wait_for(conn.response_head(), TIMEOUT)
        async with response:
            assert b"".join([chunk async for chunk in response]) == b"ok"
        await pool.close()


async def test_the_read_timeout_runs_once_the_whole_body_has_gone() -> None:
    recorder = Recorder(answer=False)
    async with backend(recorder) as origin:
        pool = UpstreamPool(read_timeout=0.2)
        conn = await pool.open(origin, "POST", "/up", b"", 4)
        conn.send_body(b"body")
        conn.end_body()
        began = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(conn.response_head(), TIMEOUT)
        assert asyncio.get_running_loop().time() - began < 2.0
        await pool.close()


async def test_an_answer_before_the_whole_body_went_ends_the_connection_after_it() -> None:
    recorder = Recorder(early=True)
    async with backend(recorder) as origin:
        pool = UpstreamPool()
        conn = await pool.open(origin, "POST", "/up", b"", 4)
        response = await asyncio.wait_for(conn.response_head(), TIMEOUT)
        async with response:
            assert b"".join([chunk async for chunk in response]) == b"ok"
        # What the backend makes of the rest is unknown: the connection is not reused.
        assert pool.stats.idle == 0
        assert await read_all(pool, origin, 2, [b"hi"]) == b"ok"
        await pool.close()
    assert pool.stats.opened == 2


async def test_a_cut_body_fails_the_exchange_and_the_backend_never_takes_a_part_for_whole() -> None:
    recorder = Recorder()
    async with backend(recorder) as origin:
        pool = UpstreamPool()
        conn = await pool.open(origin, "POST", "/up", b"", 100)
        conn.send_body(b"x" * 40)
        await asyncio.sleep(0.05)
        conn.cut("the client's body failed")
        with pytest.raises(UpstreamError, match="the client's body failed"):
            await asyncio.wait_for(conn.response_head(), TIMEOUT)
        with pytest.raises(UpstreamError):
            conn.send_body(b"more")
        for _ in range(100):
            if recorder.incomplete:
                break
            await asyncio.sleep(0.01)
        await pool.close()
    assert recorder.requests == []
    assert recorder.incomplete == [b"x" * 40]
    assert pool.stats.connections == 0
