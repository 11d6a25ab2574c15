"""A lean HTTP/1.1 client pool for talking to the backends (I/O).

It owns the proxy's upstream connections: opening them (``connect_timeout``, an optional
TLS context), a total connection limit with a FIFO queue of waiters, a LIFO stack of
idle keep-alive connections per origin that expire after ``keepalive_timeout``, and one
retry on a fresh connection when a reused one turns out to have been closed by the
server in the meantime. Each connection is an ``asyncio.Protocol`` whose bytes go
straight into httptools (llhttp, strict mode), so a request costs one ``transport.write``
and, for a small response, one future; the per-connection timer is re-armed lazily so a
busy connection does not pay for a timer per request. The response body is streamed as
it arrives with reading paused above a high-water mark, and every framing doubt
(Content-Length with Transfer-Encoding, duplicate lengths, bad chunks, a short body, a
101 nobody asked for) fails the exchange and closes the connection rather than risk
answering one request with the bytes of another. A connection goes back to the pool, and
out of it, only when it is known to be clean (``reusable``, ``clean_to_send``): bytes
after a whole response, on an idle connection, or waiting unread in the socket when the
next request would be written condemn it, and the response they followed stands.

``request`` is awaited; ``start`` runs an exchange on an idle connection by callbacks to
a sink instead (no future at all), for a caller that relays as the bytes come. ``open``
starts a request whose body is still arriving: the caller streams it (``send_body``,
``drain_body`` while the backend is behind, ``end_body``) and awaits ``response_head``;
the read timeout does not run while the backend waits for the caller's body, and a
connection whose answer came before the whole body went is never reused. Response
headers stay bytes (``raw_headers``) unless asked for as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import httptools

from proxy.headers import COMMON_METHODS, as_text, from_wire, http_version, length_line, to_wire

__all__ = [
    "PoolStats",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]


class UpstreamError(Exception):
    """The backend's answer could not be read or trusted; the connection was closed."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the backend: refused, unknown host, or another connect error."""


class UpstreamTimeout(UpstreamError):
    """No connection within ``connect_timeout``, or no bytes within ``read_timeout``."""


# Reading pauses above the high-water mark and resumes below the low one: the buffered
# body is bounded by the high mark plus one read of the transport.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024
# Buffered pieces are handed out joined up to this size; beyond it a join is a copy of
# pieces big enough to stand on their own.
_JOIN_BELOW: Final = 64 * 1024
# Below this the body is copied behind the head so the request leaves in one write
# (and, with TCP_NODELAY, in one segment); above it the copy costs more than a syscall.
_COALESCE_BODY: Final = 16 * 1024
# Timers may fire a little early (the loop's clock resolution); do not re-arm for that.
_TIMER_SLACK: Final = 0.001

_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# Method -> its bytes, for the request line (any other method is encoded).
_METHOD_BYTES: Final = {m: m.encode() for m in COMMON_METHODS}

_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELD: Final = rf"{_TOKEN}: [^\r\n\x00]*"
# Every header line at once: names are tokens (so "Content-Length :" cannot slip past
# the checks below), values carry no NUL and no CR or LF but the line breaks.
_HEADER_BLOCK: Final = re.compile(rf"{_FIELD}(?:\r\n{_FIELD})*")
_METHOD: Final = re.compile(_TOKEN)
_TARGET: Final = re.compile(r"[^\x00-\x20\x7f]+")

# Phases of a connection's current exchange.
_IDLE: Final = 0  # no exchange: in the idle stack, just connected, or handed to a waiter
_HEAD: Final = 1  # request written, waiting for the final response head
_BODY: Final = 2  # head delivered, body arriving
_DONE: Final = 3  # the whole response arrived

# What bytes from the server are, by the phase of the connection they arrive in.
PART: Final = 0  # part of the response a request is waiting for
SURPLUS: Final = 1  # after a complete response: the server and the pool disagree on framing
UNSOLICITED: Final = 2  # no request outstanding: nobody asked for them

# What a response head is, by its status, to a request that asked for no upgrade.
FINAL: Final = 0
INTERIM: Final = 1  # 100 Continue, 103 Early Hints: the final head follows
SWITCHED: Final = 2  # 101: another protocol nobody asked for

# What a poll of an idle connection's socket asks for: bytes, or the server's close.
_READABLE: Final = select.POLLIN | getattr(select, "POLLRDHUP", 0)
# A connection the server closed (or the transport did) polls as ready too; that is the
# keep-alive race, not bytes nobody asked for.
_CLOSED: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


# -- the decisions: whether a connection is clean enough to carry another request ----------
#
# A response on HTTP/1.1 names no request: it answers the oldest unanswered one. The pool
# never pipelines, so a connection carries a request only when nothing is outstanding on
# it; anything the server sends beyond the response to that request means the server and
# the pool no longer agree on which response answers which request, and the connection is
# never used again. These functions decide; the connection below carries them out.


def bytes_are(phase: int) -> int:
    """What bytes arriving in ``phase`` are: PART of the awaited response, SURPLUS after
    a complete one, or UNSOLICITED on a connection with no request outstanding. Surplus
    and unsolicited bytes condemn the connection; only surplus leaves an exchange whose
    response they followed (that response stands: it was whole before they came)."""
    if phase in (_HEAD, _BODY):
        return PART
    return SURPLUS if phase == _DONE else UNSOLICITED


def head_is(status: int) -> int:
    """A head with ``status`` is FINAL, INTERIM (1xx, the real head follows) or SWITCHED
    (101: the pool asks for no upgrade, so the bytes after it are another protocol)."""
    if status >= 200:
        return FINAL
    return SWITCHED if status == 101 else INTERIM


def keeps_alive(
    version: str, said_close: bool, said_keep_alive: bool, eof_body: bool, close_requested: bool
) -> bool:
    """Whether the connection may stay open after a response: HTTP/1.1 unless it said
    close, HTTP/1.0 only if it said keep-alive, and never when the body is framed by the
    close (whatever the head claims: the end of such a body is the end of the connection)
    or the request asked to close."""
    if eof_body or close_requested or said_close:
        return False
    if version == "1.1":
        return True
    return version == "1.0" and said_keep_alive


def reusable(
    phase: int, failed: bool, keep_alive: bool, request_sent: bool, still_open: bool
) -> bool:
    """Whether a released connection goes back to the pool: its response arrived whole
    (``phase`` _DONE) without error, both sides keep it alive, the whole request went out
    (a server that answered before reading all of the body has not read the rest, and
    what it makes of it is its own), and nothing condemned or closed it meanwhile
    (``still_open``)."""
    return phase == _DONE and not failed and keep_alive and request_sent and still_open


def clean_to_send(still_open: bool, readable: bool) -> bool:
    """Whether a connection out of the pool may carry a request now: still open, and with
    nothing waiting to be read, neither bytes nobody asked for nor the server's close. Bytes
    that reached the socket but not yet the parser would otherwise be taken for the answer
    to the request about to be written."""
    return still_open and not readable


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool's counters."""

    opened: int  # connections established since the pool was made
    reused: int  # exchanges that ran on a connection which had served before
    retried: int  # exchanges retried after a reused connection turned out dead
    discarded: int  # connections closed for bytes no request asked for (see bytes_are)
    connections: int  # open or opening connections, in use or idle
    idle: int
    waiting: int  # requests queued for a connection slot


@dataclass(frozen=True, slots=True)
class _Origin:
    key: str
    host: str
    port: int
    host_line: str  # "Host: ...\r\n", added unless the caller sent one
    tls: bool
    host_bytes: bytes  # host_line, encoded


def _parse_origin(origin: str) -> _Origin:
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"origin must be http:// or https://, not {origin!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"origin must be scheme://host[:port] only, not {origin!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"origin has no host: {origin!r}")
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    port = parts.port or default_port
    authority = f"[{host}]" if ":" in host else host
    if port != default_port:
        authority = f"{authority}:{port}"
    host_line = f"Host: {authority}\r\n"
    return _Origin(origin, host, port, host_line, tls, to_wire(host_line))


def _named(name: bytes, lower: bytes, usual: bytes) -> bool:
    """Whether header ``name`` is ``lower`` in any case: the two usual spellings are
    compared as they are, without a call to lower()."""
    return name in (lower, usual) or name.lower() == lower


def _has_field(probe: str, name: str) -> bool:
    """Whether lower-cased header lines ``probe`` have a line starting ``name``."""
    return probe.startswith(name) or f"\n{name}" in probe


def _block_request_head(
    origin: _Origin,
    method: str,
    target: str | bytes,
    block: bytes,
    body: bytes,
    framing: bytes | None = None,
) -> bytes:
    """The request head around header lines a proxy made from a parser's headers: names
    are tokens, values free of CR, LF and NUL (llhttp saw to it), and Host,
    Connection, Transfer-Encoding and Content-Length are gone (the proxy saw to it),
    so only the request line is left to check. A target as bytes is a parser's too:
    printable ASCII, no space (llhttp refuses anything else). ``framing``: the body's
    framing line for a body sent later (see ``open``), else ``body`` sets it."""
    if " " in method or "\n" in method or "\r" in method:
        raise ValueError(f"invalid method {method!r}")
    if isinstance(target, str):
        if " " in target or "\n" in target or "\r" in target:
            raise ValueError(f"invalid request-target {target!r}")
        raw_target = to_wire(target)
    else:
        raw_target = target
    if framing is not None:
        length = framing
    elif body or method in _BODY_METHODS:
        length = length_line(len(body))
    else:
        length = b""
    raw_method = _METHOD_BYTES.get(method)
    if raw_method is None:
        raw_method = to_wire(method)
    return b"%b %b HTTP/1.1\r\n%b%b%b\r\n" % (
        raw_method,
        raw_target,
        origin.host_bytes,
        block,
        length,
    )


def _request_head(
    origin: _Origin,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> tuple[bytes, bool]:
    """The request head as bytes, and whether the caller asked to close the connection."""
    if _METHOD.fullmatch(method) is None:
        raise ValueError(f"invalid method {method!r}")
    if _TARGET.fullmatch(target) is None:
        raise ValueError(f"invalid request-target {target!r}")
    add_host = True
    add_length = bool(body) or method in _BODY_METHODS
    close = False
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    if headers:
        lines = "\r\n".join(map(": ".join, headers))
        # The pattern alone would take a value's injected "\r\nName: v" for one more
        # header; counting the line breaks it allows tells the two apart.
        if _HEADER_BLOCK.fullmatch(lines) is None or lines.count("\n") != len(headers) - 1:
            raise ValueError("header names must be tokens and values free of CR, LF and NUL")
        probe = lines.lower()
        add_host = not _has_field(probe, "host:")
        if _has_field(probe, "transfer-encoding:"):
            # The body is bytes in hand: the pool frames it, a second framing would
            # let the backend and the pool disagree on where the request ends.
            raise ValueError("Transfer-Encoding is set by the pool, not the caller")
        if _has_field(probe, "content-length:"):
            for name, value in headers:
                if name.lower() == "content-length" and value.strip() != str(len(body)):
                    raise ValueError(f"Content-Length {value!r} is not the body's length")
            add_length = False
        if _has_field(probe, "connection:"):
            close = any(
                name.lower() == "connection"
                and "close" in [token.strip().lower() for token in value.split(",")]
                for name, value in headers
            )
        if add_host:
            parts.append(origin.host_line)
        parts.append(lines)
        parts.append("\r\n")
    else:
        parts.append(origin.host_line)
    if add_length:
        parts.append(f"Content-Length: {len(body)}\r\n")
    parts.append("\r\n")
    # surrogateescape gives back the exact bytes aiohttp's parser decoded the client's
    # headers and path from, so non-UTF-8 bytes are relayed verbatim.
    return to_wire("".join(parts)), close


class Sink(Protocol):
    """What hears of an exchange started with ``UpstreamPool.start``."""

    def upstream_ready(self, connection: _Connection) -> None: ...


class UpstreamResponse:
    """A backend's response: the head at once, the body streamed with ``read_chunk``.

    Finish with ``release()`` (the connection goes back to the pool if the whole
    response arrived and keep-alive allows) or ``close()`` (abort), or use
    ``async with``. A response that is neither released nor closed holds its
    connection, and its slot in the pool's limit, until the pool is closed.
    """

    __slots__ = ("_conn", "_ended", "_headers", "raw_headers", "reason", "status", "version")

    def __init__(
        self,
        status: int,
        reason: str,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        conn: _Connection,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        # Raw order, duplicates kept (Set-Cookie), names as the backend spelled them.
        self.raw_headers = raw_headers
        self._headers: list[tuple[str, str]] | None = None
        self._conn: _Connection | None = conn
        self._ended = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers as text (bytes kept through surrogate escapes)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = as_text(self.raw_headers)
        return headers

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (it may still be buffered unread)."""
        conn = self._conn
        return self._ended if conn is None else conn._phase == _DONE and conn._exc is None

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        conn = self._conn
        return 0 if conn is None else conn._buffered

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some if none
        did), b"" at the end of the body. Chunked framing is removed; Content-Encoding
        is not. Raises UpstreamError (after the bytes that did arrive) if the body
        cannot be read to its end."""
        conn = self._conn
        if conn is None:
            if self._ended:
                return b""
            raise UpstreamError("the response was closed before its end")
        while True:
            chunks = conn._chunks
            if chunks:
                if len(chunks) == 1:
                    data = chunks.pop()
                elif conn._buffered <= _JOIN_BELOW:
                    # Small pieces go out as one: fewer, larger writes downstream.
                    data = b"".join(chunks)
                    chunks.clear()
                else:
                    # As many pieces as make _JOIN_BELOW (at least one).
                    count, size = 1, len(chunks[0])
                    while count < len(chunks) and size + len(chunks[count]) <= _JOIN_BELOW:
                        size += len(chunks[count])
                        count += 1
                    data = chunks[0] if count == 1 else b"".join(chunks[:count])
                    del chunks[:count]
                conn._buffered -= len(data)
                if conn._paused and conn._buffered <= _LOW_WATER:
                    conn._resume()
                return data
            if conn._exc is not None:
                raise conn._exc
            if conn._phase == _DONE:
                self._ended = True
                return b""
            waiter = conn._loop.create_future()
            conn._waiter = waiter
            try:
                await waiter
            except BaseException:
                # Cancelled mid-body: the rest of the body is still on its way, so the
                # connection cannot serve anyone else.
                conn._waiter = None
                self.close()
                raise

    @property
    def connection(self) -> _Connection | None:
        """The connection the response arrives on, until released or closed."""
        return self._conn

    def take(self) -> bytes:
        """The body bytes that arrived and were not read yet, at once, without waiting
        (b"" if none did); raises the exchange's UpstreamError once they are read."""
        conn = self._conn
        if conn is None:
            return b""
        chunks = conn._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            conn._buffered = 0
            return data
        if conn._exc is not None:
            raise conn._exc
        return b""

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def release(self) -> None:
        """Give the connection back for reuse if the exchange ended cleanly, else close it."""
        conn = self._detach()
        if conn is None:
            return
        self._ended = self._ended or (conn._phase == _DONE and conn._exc is None)
        if reusable(conn._phase, conn._exc is not None, conn._keep_alive, conn._sent(), conn._open):
            conn._pool._put_idle(conn)
        else:
            conn._abort()

    def close(self) -> None:
        """Abort the connection, e.g. because the client went away mid-stream."""
        conn = self._detach()
        if conn is not None:
            conn._abort()

    def _detach(self) -> _Connection | None:
        """The connection, no longer this response's (its unread body dropped)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._sink = None
            conn._chunks.clear()
            conn._buffered = 0
        return conn

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Connection(asyncio.Protocol):
    """One upstream connection and the exchange running on it (httptools callbacks)."""

    __slots__ = (
        "_buffered",
        "_chunked",
        "_chunked_body",
        "_chunks",
        "_close_requested",
        "_drain",
        "_eof_body",
        "_exc",
        "_fed",
        "_feeding",
        "_got_bytes",
        "_has_length",
        "_head_only",
        "_head_size",
        "_headers",
        "_idempotent",
        "_idle_since",
        "_interim",
        "_keep_alive",
        "_last_rx",
        "_loop",
        "_lost",
        "_named_connection",
        "_open",
        "_origin",
        "_parser",
        "_parser_clean",
        "_paused",
        "_phase",
        "_poll",
        "_pool",
        "_pooled",
        "_reason",
        "_request_sent",
        "_response",
        "_said_close",
        "_said_keep_alive",
        "_sending",
        "_sink",
        "_slot",
        "_stale",
        "_timer",
        "_timer_at",
        "_transport",
        "_unsent",
        "_uses",
        "_violation",
        "_waiter",
        "_with_body",
        "_woken",
        "_write_failed",
        "_write_paused",
    )

    def __init__(self, pool: UpstreamPool, origin: _Origin, loop: asyncio.AbstractEventLoop):
        self._pool = pool
        self._origin = origin
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        # A select.poll's poll, bound, on the socket: is anything waiting unread?
        self._poll: Callable[[int], list[tuple[int, int]]] | None = None
        # The transport's get_write_buffer_size, bound: what of the request is not sent.
        self._unsent: Callable[[], int] | None = None
        self._open = False
        self._slot = True  # holds one of the pool's max_connections until closed
        self._pooled = False
        self._uses = 0
        self._phase = _IDLE
        self._idle_since = 0.0
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._parser: Any = None
        self._parser_clean = False  # at the start of a message: reusable
        # The body bytes not read yet. A list: a deque's append is a method call, a
        # list's is not (compiled), and one read rarely leaves more than a few pieces.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._exc: UpstreamError | None = None
        self._violation: UpstreamError | None = None
        self._response: UpstreamResponse | None = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._sink: Sink | None = None
        self._idempotent = False
        self._feeding = False
        self._woken = False
        # Writing a request body that is still arriving (see UpstreamPool.open).
        self._chunked_body = False
        self._write_paused = False  # the transport's buffer is full: the backend is behind
        self._drain: asyncio.Future[None] | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._head_only = False
        self._close_requested = False
        self._head_size = 0
        self._fed = 0
        self._interim = False
        self._keep_alive = False
        self._eof_body = False
        self._has_length = False
        self._chunked = False
        self._said_close = False
        self._said_keep_alive = False
        self._named_connection = False
        self._got_bytes = False
        self._stale = False
        self._write_failed = False
        # The whole request handed to the transport; with a body, the transport's buffer
        # must also be empty before the connection is reused (see _sent).
        self._request_sent = False
        self._with_body = False
        self._sending = False

    # -- transport callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._unsent = self._transport.get_write_buffer_size
        self._open = True
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            # Heads and small bodies must not wait for Nagle's ACK round trip.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError, ValueError):
                poller = select.poll()
                poller.register(sock.fileno(), _READABLE)
                self._poll = poller.poll

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._receive(data)
            return
        # A sink hears once per read, with all that read brought (head, body, end).
        self._feeding = True
        try:
            self._receive(data)
        finally:
            self._feeding = False
        if self._woken:
            self._woken = False
            sink.upstream_ready(self)

    def _receive(self, data: bytes) -> None:
        if not self._open:
            return
        phase = self._phase
        if phase in (_HEAD, _BODY):
            self._last_rx = self._loop.time()
            self._got_bytes = True
            if phase == _HEAD:
                self._fed += len(data)
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                error = UpstreamError(f"{self._origin.key} switched protocols")
            except httptools.HttpParserError as exc:
                error = self._violation or UpstreamError(
                    f"malformed response from {self._origin.key}: {exc}"
                )
            else:
                if self._phase == _HEAD and self._fed > self._pool._max_head_bytes:
                    self._fail(self._head_too_large())
                return
            if bytes_are(self._phase) == SURPLUS:
                # The response was whole before the bytes after it came in this read.
                self._condemn()
            else:
                self._fail(error)
        else:
            self._condemn()

    def _condemn(self) -> None:
        """Close the connection for bytes no request asked for (SURPLUS or UNSOLICITED):
        the server and the pool no longer agree on which response answers which request,
        so nothing more is sent on it. A response they followed keeps what it got."""
        self._pool._discarded += 1
        self._abort()
        self._wake()

    def _sent(self) -> bool:
        """Whether the whole request went out: written to the transport, and with a body,
        gone from its buffer too."""
        if not self._request_sent:
            return False
        unsent = self._unsent
        return not self._with_body or unsent is None or not unsent()

    def _clean(self) -> bool:
        """Whether the connection may carry a request now (see clean_to_send). A
        transport already closing is left to _start, which then writes nothing."""
        poll = self._poll
        readable = False
        if self._open and poll is not None:
            ready = poll(0)
            if ready:
                readable = True
                if not ready[0][1] & _CLOSED:
                    self._pool._discarded += 1  # bytes, not the server's close
        return clean_to_send(self._open, readable)

    def eof_received(self) -> bool | None:
        # Returning None lets the transport close: a half-closed upstream connection is
        # of no further use, and connection_lost settles the exchange.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._open = False
            self._pool._forget(self)
        phase = self._phase
        if self._exc is not None:
            pass  # the pool closed it on purpose, the error is already recorded
        elif phase == _HEAD:
            if not self._got_bytes:
                # Nothing came back: on a reused connection this is the keep-alive race
                # (the server closed it while idle), which a retry can paper over.
                # A reset or EPIPE does not prove the server never read the request,
                # so only an idempotent request may go again (see request()).
                self._stale = self._uses > 1
                error = UpstreamError(f"{self._origin.key} closed the connection before responding")
            else:
                error = UpstreamError(f"{self._origin.key} closed the connection mid-head")
            self._set_error(error)
        elif phase == _BODY:
            if self._eof_body:
                self._phase = _DONE  # a close-delimited body ends with the connection
            else:
                self._set_error(UpstreamError(f"{self._origin.key} closed the connection mid-body"))
        self._wake()
        self._wake_drain()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._sending:
            self._last_rx = self._loop.time()  # the backend is taking the body: not silent
        self._wake_drain()

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._phase != _HEAD:
            # A second response: the read goes no further (see _receive).
            raise self._violate(f"{self._origin.key} sent bytes after the response")

    def on_status(self, reason: bytes) -> None:
        # llhttp hands over spans; a status line split across reads comes in pieces.
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase != _HEAD:
            return  # a chunked body's trailer fields: not relayed, and never framing
        self._head_size += len(name) + len(value) + 4
        self._headers.append((name, value))
        size = len(name)
        # The length test keeps lower() off the common headers (_named off the usual
        # spellings of the framing ones).
        if size == 10 and name.lower() == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            self._said_close = self._said_close or b"close" in tokens
            self._said_keep_alive = self._said_keep_alive or b"keep-alive" in tokens
            self._named_connection = True
        elif size == 16 and name.lower() == b"proxy-connection":
            self._named_connection = True  # llhttp reads it as Connection
        elif size == 14 and _named(name, b"content-length", b"Content-Length"):
            self._has_length = True
        elif size == 17 and _named(name, b"transfer-encoding", b"Transfer-Encoding"):
            # llhttp frames by chunks only when chunked is the final coding.
            self._chunked = (
                value == b"chunked" or value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            )

    def on_headers_complete(self) -> None:
        if self._head_size + len(self._reason) > self._pool._max_head_bytes:
            raise self._violate(str(self._head_too_large()))
        parser = self._parser
        status: int = parser.get_status_code()
        if status < 200:
            if head_is(status) == SWITCHED:
                raise self._violate(f"{self._origin.key} switched protocols")
            self._interim = True  # 100 Continue, 103 Early Hints: the real head follows
            return
        version = http_version(parser, parser.should_keep_alive(), self._named_connection)
        no_body = self._head_only or status == 204 or status == 304
        self._eof_body = not no_body and not self._has_length and not self._chunked
        self._keep_alive = keeps_alive(
            version, self._said_close, self._said_keep_alive, self._eof_body, self._close_requested
        )
        self._response = UpstreamResponse(
            status,
            from_wire(self._reason),
            version,
            self._headers,
            self,
        )
        self._phase = _BODY
        self._wake()
        if self._head_only:
            # httptools cannot tell llhttp that a HEAD response has no body, so the
            # exchange ends here; any byte after this is a violation (on_body).
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self._phase != _BODY:
            if self._interim:
                raise self._violate(f"{self._origin.key} sent a body with an interim response")
            # A body after a HEAD response, which was whole at its head.
            raise self._violate(f"{self._origin.key} sent bytes after the response")
        self._chunks.append(body)
        self._buffered += len(body)
        # The mark is for a reader that lags (read_chunk). A sink takes all that one read
        # brought as soon as the read is parsed and says itself when to stop (hold), so
        # the size of one read must not pause it with no one to resume it.
        if self._buffered > _HIGH_WATER and self._sink is None and not self._paused and self._open:
            assert self._transport is not None
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._reason = b""
            self._headers = []
            self._has_length = self._chunked = False
            self._said_close = self._said_keep_alive = self._named_connection = False
            return
        if self._phase == _BODY:
            # llhttp is at the start of the next message: the parser serves again.
            self._parser_clean = self._keep_alive
            self._finish()

    # -- a sink's view of its exchange (see UpstreamPool.start) ------------------------

    @property
    def response(self) -> UpstreamResponse | None:
        """The response, once its head is in."""
        return self._response

    @property
    def error(self) -> UpstreamError | None:
        """Why the exchange failed, if it did."""
        return self._exc

    @property
    def retryable(self) -> bool:
        """Failed before any answer on a reused connection (the keep-alive race): the
        request may go again on a new connection if it is idempotent, or if nothing of
        it was written."""
        return (
            self._exc is not None
            and self._response is None
            and self._stale
            and (self._idempotent or self._write_failed)
        )

    def hold(self) -> None:
        """Stop reading the response: the client is behind."""
        if self._open and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def unhold(self) -> None:
        if self._paused and self._buffered <= _LOW_WATER:
            self._resume()

    # -- a request body written as it arrives (see UpstreamPool.open) -----------------

    def send_body(self, data: bytes) -> None:
        """Write request body bytes, framed as the head said. UpstreamError if the
        connection is gone; mind ``body_paused`` (``drain_body``)."""
        transport = self._transport
        if not self._open or transport is None or transport.is_closing():
            raise self._exc or UpstreamError(f"connection to {self._origin.key} closed")
        if self._chunked_body:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)

    @property
    def body_paused(self) -> bool:
        """Whether the backend is behind on the body (its buffer here is full)."""
        return self._write_paused

    async def drain_body(self) -> None:
        """Until the backend has taken enough of the body to send more; UpstreamError if
        the connection went meanwhile."""
        while self._write_paused and self._open:
            drain = self._drain = self._loop.create_future()
            try:
                await drain
            finally:
                self._drain = None
        if not self._open:
            raise self._exc or UpstreamError(f"connection to {self._origin.key} closed")

    def end_body(self) -> None:
        """The body has gone whole: the answer is owed from now (the read timeout runs),
        and the connection may serve again after it."""
        if self._open and self._transport is not None and self._chunked_body:
            self._transport.write(b"0\r\n\r\n")
        self._sending = False
        # Reusable once the body has left the transport's buffer too (see _sent).
        self._with_body = True
        # A response head that came before this already ruled the connection out.
        self._close_requested = False
        self._last_rx = self._loop.time()

    def cut(self, reason: str) -> None:
        """The body cannot go whole (the client failed): the exchange fails and the
        connection closes, so the backend never takes a part for the whole."""
        self._fail(UpstreamError(reason))

    async def response_head(self) -> UpstreamResponse:
        """The response once its head is in; UpstreamError (or its kinds) if none came.
        Cancelled, the connection closes."""
        while self._response is None and self._exc is None:
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            except BaseException:
                self._abort()
                raise
        response = self._response
        if response is None:
            self._abort()
            raise self._exc or UpstreamError(f"no response from {self._origin.key}")
        return response

    def abandon(self) -> None:
        """Give up the exchange: the connection closes, the sink hears no more."""
        self._sink = None
        response = self._response
        if response is not None:
            response.close()
        else:
            self._abort()

    # -- exchange -----------------------------------------------------------------------

    def _start(
        self, head: bytes, body: bytes, head_only: bool, close: bool
    ) -> asyncio.Future[None] | None:
        """Write the request; the future resolves once the head (or an error) is in."""
        self._uses += 1
        self._reset_exchange()
        self._head_only = head_only
        self._close_requested = close
        self._phase = _HEAD
        self._response = None
        self._exc = None
        self._violation = None
        self._reason = b""
        self._headers = []
        if not self._parser_clean:
            self._parser = httptools.HttpResponseParser(self)
        self._parser_clean = False
        transport = self._transport
        if not self._open or transport is None or transport.is_closing():
            self._stale = self._uses > 1
            self._write_failed = True
            self._set_error(UpstreamError(f"connection to {self._origin.key} closed"))
            return None
        if body and len(body) <= _COALESCE_BODY:
            transport.write(head + body)
        else:
            transport.write(head)
            if body:
                transport.write(body)
        self._with_body = bool(body)
        self._request_sent = True
        now = self._loop.time()
        self._last_rx = now
        self._arm(now + self._pool._read_timeout)
        if self._sink is not None:
            return None
        waiter = self._loop.create_future()
        self._waiter = waiter
        return waiter

    def _finish(self) -> None:
        self._phase = _DONE
        self._wake()
        if not self._keep_alive:
            self._abort()
        elif self._paused:
            # Nothing more is due; reading again lets an idle close be noticed.
            self._resume()

    def _resume(self) -> None:
        self._paused = False
        if self._open and self._transport is not None:
            self._last_rx = self._loop.time()
            self._transport.resume_reading()

    def _wake(self) -> None:
        sink = self._sink
        if sink is not None:
            if self._feeding:
                self._woken = True
            else:
                sink.upstream_ready(self)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _violate(self, message: str) -> UpstreamError:
        # Raised inside a parser callback, which httptools turns into a generic parser
        # error; data_received reports this one instead.
        self._violation = UpstreamError(message)
        return self._violation

    def _head_too_large(self) -> UpstreamError:
        limit = self._pool._max_head_bytes
        return UpstreamError(f"{self._origin.key} sent a response head over {limit} bytes")

    def _set_error(self, error: UpstreamError) -> None:
        if self._exc is None:
            self._exc = error
        self._keep_alive = False

    def _fail(self, error: UpstreamError) -> None:
        self._set_error(error)
        self._abort()
        self._wake()

    def _abort(self) -> None:
        """Close the connection at once; it is never reused."""
        self._keep_alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._open = False
            if self._transport is not None:
                self._transport.abort()
            self._pool._forget(self)
        elif self._slot:
            self._pool._forget(self)

    # -- timer --------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        # One timer per connection, moved only when a deadline comes earlier than the
        # armed one; a late timer re-arms itself when it fires. A busy keep-alive
        # connection thus schedules a timer about once per timeout, not per request.
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return
            timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._open:
            return
        now = self._loop.time()
        phase = self._phase
        if phase == _IDLE:
            if self._pooled:
                due = self._idle_since + self._pool._keepalive_timeout
                if now + _TIMER_SLACK >= due:
                    self._abort()
                else:
                    self._arm(due)
        elif phase in (_HEAD, _BODY):
            timeout = self._pool._read_timeout
            if self._paused or (self._sending and not self._write_paused):
                # The consumer is behind, or the server waits for a body still arriving
                # from our client: not the server's silence.
                self._arm(now + timeout)
                return
            due = self._last_rx + timeout
            if now + _TIMER_SLACK >= due:
                what = "response head" if phase == _HEAD else "next body bytes"
                self._fail(UpstreamTimeout(f"no {what} from {self._origin.key} within {timeout} s"))
            else:
                self._arm(due)

    def _park(self, now: float) -> None:
        """Enter the idle stack."""
        self._sink = None
        self._phase = _IDLE
        self._pooled = True
        self._idle_since = now
        self._response = None
        if not self._parser_clean:
            self._parser = None
        self._arm(now + self._pool._keepalive_timeout)


Origin = _Origin
parse_origin = _parse_origin
UpstreamConnection = _Connection
"""A connection as a sink of ``UpstreamPool.start`` sees it: ``response``, ``error``,
``retryable``, ``hold`` and ``unhold``."""


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to the backends, shared by all requests.

    ``request`` returns once the response head is in; the caller then streams the body
    and releases (or closes) the response. Create it anywhere; it binds to the running
    loop on first use.
    """

    def __init__(
        self,
        *,
        max_connections: int = 512,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        keepalive_timeout: float = 30.0,
        max_idle_per_origin: int = 256,
        max_head_bytes: int = 65536,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_timeout = keepalive_timeout
        self._max_idle = max_idle_per_origin
        self._max_head_bytes = max_head_bytes
        self._ssl_context = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._idle_total = 0
        self._connections = 0  # slots taken: opening or open
        self._waiters: deque[tuple[asyncio.Future[_Connection | None], str | None]] = deque()
        self._closed = False
        self._opened = 0
        self._reused = 0
        self._retried = 0
        self._discarded = 0

    @property
    def stats(self) -> PoolStats:
        return PoolStats(
            opened=self._opened,
            reused=self._reused,
            retried=self._retried,
            discarded=self._discarded,
            connections=self._connections,
            idle=self._idle_total,
            waiting=len(self._waiters),
        )

    @property
    def closed(self) -> bool:
        return self._closed

    async def request(
        self,
        origin: str,
        method: str,
        target: str | bytes,
        headers: Sequence[tuple[str, str]] | bytes,
        body: bytes = b"",
    ) -> UpstreamResponse:
        """Send one request to ``origin`` ("http://host:port") and return the response
        once its head is in.

        ``target`` and ``headers`` are sent verbatim (hop-by-hop headers must already be
        gone); the pool adds Host unless given and frames the body with Content-Length.
        ``headers`` as bytes: header lines (each ending CRLF) made from a parser's headers,
        as for ``start``, which saves the checks; so may ``target`` be (as ``start``).
        Raises ValueError for a request that cannot be written safely, UpstreamError
        (or its Unreachable and Timeout kinds) when the backend cannot answer.
        """
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        place = self._origins.get(origin)
        if place is None:
            place = self._origin(origin)
        if isinstance(headers, bytes):
            head, close = _block_request_head(place, method, target, headers, body), False
        else:
            text = target if isinstance(target, str) else from_wire(target)
            head, close = _request_head(place, method, text, headers, body)
        head_only = method == "HEAD"
        conn = self._pop_idle(place.key)
        if conn is None:
            conn = await self._acquire(place, fresh=False)
        try:
            return await self._exchange(conn, head, body, head_only, close)
        except UpstreamError:
            # The server closing an idle connection races with our next request on it;
            # nothing was answered, so an idempotent request (or one never written) can
            # safely go again on a new connection. Once.
            if not conn._stale or not (method in _IDEMPOTENT or conn._write_failed):
                raise
        self._retried += 1
        conn = await self._acquire(place, fresh=True)
        return await self._exchange(conn, head, body, head_only, close)

    def start(
        self,
        origin: str,
        method: str,
        target: str | bytes,
        header_block: bytes,
        body: bytes,
        sink: Sink,
    ) -> _Connection | None:
        """Start an exchange on an idle keep-alive connection, reported to ``sink`` by
        callbacks instead of awaited: ``sink.upstream_ready(connection)`` runs whenever
        the head, body bytes, the end or an error came (read them from the connection's
        ``response`` and ``error``); the sink releases or closes the response at the end.
        Returns the connection (``abandon`` it if the exchange is no longer wanted), or
        None, with nothing sent, when no idle connection to ``origin`` is at hand (use
        ``request``). ``header_block`` is the header lines (each ending CRLF) as a
        proxy made them from a parser's headers: no Host, Connection,
        Transfer-Encoding or Content-Length (see ``_block_request_head``); ValueError
        for a request that cannot be written safely. ``target`` as bytes is the target as
        a parser read it (printable ASCII, no space), sent as it is."""
        if self._closed:
            return None
        place = self._origins.get(origin)
        if place is None:
            return None
        stack = self._idle.get(place.key)
        if not stack:
            return None
        head = _block_request_head(place, method, target, header_block, body)
        close = False
        conn = self._pop_idle(place.key)
        if conn is None:
            return None
        self._reused += 1
        conn._sink = sink
        conn._idempotent = method in _IDEMPOTENT
        conn._start(head, body, method == "HEAD", close)
        if conn._exc is not None:
            conn._sink = None
            if conn._response is None:
                conn._abort()
            # Report it as any other failure, after the caller has its answer.
            self._loop_call(sink.upstream_ready, conn)
        return conn

    async def open(
        self,
        origin: str,
        method: str,
        target: str | bytes,
        header_block: bytes,
        length: int,
        *,
        fresh: bool = False,
    ) -> _Connection:
        """Start a request whose body is still arriving: the head goes now, framed by
        ``length`` (the body's Content-Length, or -1: chunked), on an idle connection or
        a new one (``fresh``: always a new one, for a retry, counted). The caller then
        streams the body (``send_body``, ``drain_body``, ``end_body``; ``cut`` if it
        cannot go whole) and awaits ``response_head``. ``header_block`` and ``target``
        as for ``start``; ValueError for a request that cannot be written safely,
        UpstreamError when no connection can be had."""
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        place = self._origins.get(origin)
        if place is None:
            place = self._origin(origin)
        framing = length_line(length) if length >= 0 else b"Transfer-Encoding: chunked\r\n"
        head = _block_request_head(place, method, target, header_block, b"", framing)
        conn = None if fresh else self._pop_idle(place.key)
        if conn is None:
            conn = await self._acquire(place, fresh=fresh)
        if fresh:
            self._retried += 1
        if conn._uses:
            self._reused += 1
        conn._idempotent = method in _IDEMPOTENT
        conn._chunked_body = length < 0
        # Not reusable until the whole body went (end_body): an answer that comes first
        # leaves the backend's reading of the rest unknown.
        conn._start(head, b"", method == "HEAD", True)
        conn._sending = True
        return conn

    def _loop_call(self, callback: Callable[[_Connection], None], conn: _Connection) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon(callback, conn)

    async def close(self) -> None:
        """Close idle connections and refuse new requests; connections in use close
        when their response is released."""
        self._closed = True
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("the upstream pool is closed"))
        closing = [conn for stack in self._idle.values() for conn in stack]
        lost: list[asyncio.Future[None]] = []
        for conn in closing:
            if self._loop is not None and conn._transport is not None:
                conn._lost = self._loop.create_future()
                lost.append(conn._lost)
            conn._abort()
        if lost:
            # Let the transports finish closing so no socket outlives the pool.
            await asyncio.wait(lost, timeout=1.0)

    # -- internals ------------------------------------------------------------------------

    def _origin(self, origin: str) -> _Origin:
        place = _parse_origin(origin)
        if place.tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        if len(self._origins) >= 1024:
            self._origins.clear()  # origins come from configuration; bound a misuse
        self._origins[origin] = place
        return place

    async def _exchange(
        self, conn: _Connection, head: bytes, body: bytes, head_only: bool, close: bool
    ) -> UpstreamResponse:
        if conn._uses:
            self._reused += 1
        waiter = conn._start(head, body, head_only, close)
        if waiter is not None:
            try:
                await waiter
            except BaseException:
                conn._abort()  # cancelled: a half-used connection never goes back
                raise
        response = conn._response
        if response is None:
            conn._abort()
            error = conn._exc or UpstreamError(f"no response from {conn._origin.key}")
            raise error
        return response

    def _pop_idle(self, key: str) -> _Connection | None:
        """The warmest idle connection to ``key`` that is clean to send on; the others
        met on the way are closed."""
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()  # LIFO: the warmest connection, and the cold ones expire
            conn._pooled = False
            self._idle_total -= 1
            if conn._clean():
                return conn
            conn._abort()
        return None

    def _put_idle(self, conn: _Connection) -> None:
        if self._closed:
            conn._abort()
            return
        key = conn._origin.key
        waiters = self._waiters
        while waiters:
            waiter, wanted = waiters[0]
            if waiter.done():
                waiters.popleft()
                continue
            if wanted == key:
                waiters.popleft()
                conn._phase = _IDLE
                conn._response = None
                waiter.set_result(conn)
            else:
                # First come, first served: its slot goes to the head of the queue.
                conn._abort()
            return
        stack = self._idle.get(key)
        if stack is None:
            stack = self._idle[key] = []
        if len(stack) >= self._max_idle:
            conn._abort()
            return
        assert self._loop is not None
        conn._park(self._loop.time())
        stack.append(conn)
        self._idle_total += 1

    def _forget(self, conn: _Connection) -> None:
        """A connection is closed: out of the idle stack, its slot to the next waiter."""
        if conn._pooled:
            conn._pooled = False
            stack = self._idle.get(conn._origin.key)
            if stack is not None and conn in stack:
                stack.remove(conn)
                self._idle_total -= 1
        if conn._slot:
            conn._slot = False
            self._free_slot()

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter, _ = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; the count stays
                return
        self._connections -= 1

    def _evict_idle(self) -> None:
        for stack in self._idle.values():
            if stack:
                conn = stack.pop(0)  # the oldest
                conn._pooled = False
                self._idle_total -= 1
                conn._abort()
                return

    async def _acquire(self, place: _Origin, *, fresh: bool) -> _Connection:
        """A connection to ``place``: a new one, or (unless ``fresh``) one handed over
        by a request that finished while this one waited for a slot."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                while True:
                    if self._closed:
                        raise UpstreamError("the upstream pool is closed")
                    if self._connections < self._max_connections and not self._waiters:
                        self._connections += 1
                        break
                    if self._idle_total:
                        self._evict_idle()  # another origin's idle connection gives way
                        continue
                    handed = await self._wait(None if fresh else place.key, loop)
                    if handed is not None:
                        if handed._clean():
                            return handed
                        handed._abort()  # its slot goes to the next in line
                        continue
                    if self._closed:
                        self._free_slot()
                        raise UpstreamError("the upstream pool is closed")
                    break
                conn = await self._connect(place, loop)
                if not conn._clean():
                    # Bytes, or the close, before the first request went out: an answer
                    # to nothing, which the request about to be written would take.
                    conn._abort()
                    raise UpstreamError(f"{place.key} sent bytes before the request")
                return conn
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"no connection to {place.key} within {self._connect_timeout} s"
            ) from exc

    async def _wait(self, key: str | None, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        entry = (waiter, key)
        self._waiters.append(entry)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Woken, then cancelled before running: pass on what it was given.
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                else:
                    handed._abort()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    async def _connect(self, place: _Origin, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = _Connection(self, place, loop)  # owns the slot taken by _acquire
        try:
            if place.tls:
                await loop.create_connection(
                    lambda: conn,
                    place.host,
                    place.port,
                    ssl=self._ssl_context,
                    server_hostname=place.host,
                    ssl_handshake_timeout=self._connect_timeout,
                )
            else:
                await loop.create_connection(lambda: conn, place.host, place.port)
        except BaseException as exc:
            conn._abort()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"connecting to {place.key} timed out") from exc
            if isinstance(exc, OSError):
                raise UpstreamUnreachable(f"cannot connect to {place.key}: {exc}") from exc
            raise
        self._opened += 1
        return conn
