"""When a pooled upstream connection may carry another request: the decisions as a table,
then each way a server can put a connection out of step, over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.upstream import (
    FINAL,
    INTERIM,
    PART,
    SURPLUS,
    SWITCHED,
    UNSOLICITED,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    bytes_are,
    clean_to_send,
    head_is,
    keeps_alive,
    reusable,
)
from tests.test_upstream import OK, Backend, drain, eventually, read_request, replies

# White-box: the phases of a connection's exchange (proxy.upstream's _IDLE.._DONE).
IDLE, HEAD, BODY, DONE = 0, 1, 2, 3

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"

# -- the decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "meaning"),
    [(HEAD, PART), (BODY, PART), (DONE, SURPLUS), (IDLE, UNSOLICITED)],
    ids=["awaiting the head", "reading the body", "after the response", "idle"],
)
def test_bytes_are_part_of_the_response_only_while_one_is_awaited(phase: int, meaning: int) -> None:
    assert bytes_are(phase) == meaning


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (100, INTERIM),
        (102, INTERIM),
        (103, INTERIM),
        (199, INTERIM),
        (101, SWITCHED),
        (200, FINAL),
        (204, FINAL),
        (304, FINAL),
        (502, FINAL),
    ],
)
def test_a_1xx_head_is_interim_except_101_which_switches_unasked(status: int, kind: int) -> None:
    assert head_is(status) == kind


# version, said close, said keep-alive, body framed by the close, request asked to close
KEEPS_ALIVE = {
    "HTTP/1.1 by default": (("1.1", False, False, False, False), True),
    "HTTP/1.1 with close": (("1.1", True, False, False, False), False),
    "HTTP/1.1 with close and keep-alive": (("1.1", True, True, False, False), False),
    "HTTP/1.1 claiming keep-alive, body framed by close": (
        ("1.1", False, True, True, False),
        False,
    ),
    "HTTP/1.1 after a request that asked to close": (("1.1", False, False, False, True), False),
    "HTTP/1.0 by default": (("1.0", False, False, False, False), False),
    "HTTP/1.0 with keep-alive": (("1.0", False, True, False, False), True),
    "HTTP/1.0 with keep-alive, body framed by close": (("1.0", False, True, True, False), False),
    "HTTP/0.9": (("0.9", False, True, False, False), False),
}


@pytest.mark.parametrize(("facts", "alive"), KEEPS_ALIVE.values(), ids=KEEPS_ALIVE)
def test_keep_alive_follows_the_version_the_head_and_the_framing(
    facts: tuple[str, bool, bool, bool, bool], alive: bool
) -> None:
    assert keeps_alive(*facts) is alive


# phase, failed, keep-alive, request sent, still open
REUSABLE = {
    "a whole response on a clean connection": ((DONE, False, True, True, True), True),
    "the response still arriving": ((BODY, False, True, True, True), False),
    "no head yet": ((HEAD, False, True, True, True), False),
    "the exchange failed": ((DONE, True, True, True, True), False),
    "no keep-alive": ((DONE, False, False, True, True), False),
    "the request still going out": ((DONE, False, True, False, True), False),
    "condemned or closed meanwhile": ((DONE, False, True, True, False), False),
}


@pytest.mark.parametrize(("facts", "verdict"), REUSABLE.values(), ids=REUSABLE)
def test_a_released_connection_is_pooled_only_when_everything_says_so(
    facts: tuple[int, bool, bool, bool, bool], verdict: bool
) -> None:
    assert reusable(*facts) is verdict


# still open, readable
CLEAN_TO_SEND = {
    "open, nothing to read": ((True, False), True),
    "bytes or the server's close waiting unread": ((True, True), False),
    "closed": ((False, False), False),
}


@pytest.mark.parametrize(("facts", "verdict"), CLEAN_TO_SEND.values(), ids=CLEAN_TO_SEND)
def test_a_connection_carries_a_request_only_with_nothing_waiting_on_it(
    facts: tuple[bool, bool], verdict: bool
) -> None:
    assert clean_to_send(*facts) is verdict


# -- over loopback: what follows a whole response -----------------------------------------

SURPLUS_AFTER = {
    "a second response in the same write": ("GET", OK + FORGED, b"ok"),
    "garbage after the response": ("GET", OK + b"HTTP/1.1 200 OK\r\nX-Smuggled: 1", b"ok"),
    "bytes that are no HTTP after the response": ("GET", OK + b"\x00\xff\x16\x03", b"ok"),
    "a body after a 204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\nsurprise", b""),
    "a body after a HEAD response": (
        "HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"",
    ),
    "a response after a close-delimited one's close promise": (
        "GET",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok" + FORGED,
        b"ok",
    ),
}


@pytest.mark.parametrize(("method", "sent", "body"), SURPLUS_AFTER.values(), ids=SURPLUS_AFTER)
async def test_bytes_after_a_whole_response_in_the_same_read_leave_it_and_condemn_the_connection(
    method: str, sent: bytes, body: bytes
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sent)
        await writer.drain()
        await reader.read()

    async with Backend(answer, replies(OK)) as backend:
        pool = UpstreamPool(read_timeout=2.0)
        response = await pool.request(backend.origin, method, "/", [])
        assert response.status in (200, 204)
        assert await drain(response) == body  # the response stands, whole
        assert pool.stats.idle == 0
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        assert pool.stats.opened == 2
        await pool.close()
    assert backend.connections == 2


LATER = {
    "a second response": ("GET", OK, FORGED),
    "garbage": ("GET", OK, b"HTTP/1.1 200 OK\r\nX-Smuggled: 1"),
    "the server's close of its own accord": ("GET", OK, None),
    "the body of a HEAD response": (
        "HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n",
        b"forged",
    ),
}


@pytest.mark.parametrize(("method", "first", "later"), LATER.values(), ids=LATER)
async def test_bytes_that_reach_the_socket_but_not_the_parser_before_the_next_request_condemn_it(
    method: str, first: bytes, later: bytes | None
) -> None:
    """The server sends them after the response, and the next request is picked before
    the loop has read them: a connection whose bytes are merely waiting is not clean."""
    writers: list[asyncio.StreamWriter] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await read_request(reader)
        writer.write(first)
        await writer.drain()
        await reader.read()

    async with Backend(answer_once, replies(OK)) as backend:
        pool = UpstreamPool(read_timeout=2.0)
        await drain(await pool.request(backend.origin, method, "/", []))
        assert pool.stats.idle == 1
        # Sent and at once followed by the next request: no turn of the loop between.
        if later is None:
            # A FIN on its way at once (abort would close the socket a turn later).
            writers[0].transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        else:
            writers[0].transport.write(later)
        response = await pool.request(backend.origin, "GET", "/", [])
        assert await drain(response) == b"ok"
        assert (pool.stats.opened, pool.stats.retried) == (2, 0)
        assert pool.stats.discarded == (0 if later is None else 1)
        await pool.close()
    assert len(backend.requests) == 2  # the second request never went on the first one


async def test_bytes_on_a_connection_handed_to_a_queued_request_send_it_elsewhere() -> None:
    """At the connection limit a released connection goes straight to the request
    queued for it; bytes that came in between keep that request off it."""
    writers: list[asyncio.StreamWriter] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with Backend(answer_once, replies(OK)) as backend:
        pool = UpstreamPool(max_connections=1, read_timeout=2.0)
        first = await pool.request(backend.origin, "GET", "/", [])
        queued = asyncio.create_task(pool.request(backend.origin, "GET", "/", []))
        await eventually(lambda: pool.stats.waiting == 1)
        await first.read_chunk()
        first.release()  # handed to the queued request, which has not run yet
        writers[0].transport.write(FORGED)
        assert await drain(await queued) == b"ok"
        assert (pool.stats.opened, pool.stats.discarded) == (2, 1)
        await pool.close()
    assert backend.connections == 2


async def test_an_unsolicited_response_on_an_idle_connection_condemns_it() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with Backend(answer_once, replies(OK)) as backend:
        pool = UpstreamPool()
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        writers[0].transport.write(FORGED)
        await eventually(lambda: pool.stats.discarded == 1)  # read while idle
        assert (pool.stats.idle, pool.stats.connections) == (0, 0)
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        await pool.close()


# -- over loopback: heads that do or do not end an exchange -------------------------------

HEADS = {
    "100 Continue, then the response": (
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
        b"ok",
        True,
    ),
    "103 Early Hints, then the response": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK,
        b"ok",
        True,
    ),
    "101 to a request that asked for no upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n" + FORGED,
        None,
        False,
    ),
    "Content-Length and Transfer-Encoding both": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nforged\r\n0\r\n\r\n",
        None,
        False,
    ),
    "keep-alive claimed, the body framed by the close": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nbody until close",
        b"body until close",
        False,
    ),
}


@pytest.mark.parametrize(("sent", "body", "reused"), HEADS.values(), ids=HEADS)
async def test_only_a_final_well_framed_head_answers_and_only_a_clean_end_keeps_the_connection(
    sent: bytes, body: bytes | None, reused: bool
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sent)
        await writer.drain()
        if body is not None and not reused:
            writer.close()  # ends the close-framed body
            return
        while True:
            await read_request(reader)
            writer.write(OK)

    async with Backend(answer, replies(OK)) as backend:
        pool = UpstreamPool(read_timeout=2.0)
        if body is None:
            with pytest.raises(UpstreamError) as caught:
                await drain(await pool.request(backend.origin, "GET", "/", []))
            assert not isinstance(caught.value, UpstreamTimeout)
        else:
            assert await drain(await pool.request(backend.origin, "GET", "/", [])) == body
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        assert pool.stats.opened == (1 if reused else 2)
        await pool.close()


async def test_an_answer_before_the_whole_body_went_out_keeps_the_connection_out_of_the_pool() -> (
    None
):
    """The server answers from the head and never reads the body: what it makes of the
    unread rest is its own affair, and no other request queues behind it."""

    async def answer_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # reads nothing more

    big = b"x" * (32 * 1024 * 1024)  # more than the socket buffers on both sides hold
    async with Backend(answer_early, replies(OK)) as backend:
        pool = UpstreamPool(read_timeout=2.0)
        response = await pool.request(backend.origin, "POST", "/", [], big)
        assert response.status == 413
        assert await drain(response) == b""
        assert pool.stats.idle == 0
        assert await drain(await pool.request(backend.origin, "GET", "/", [])) == b"ok"
        assert pool.stats.opened == 2
        await pool.close()
