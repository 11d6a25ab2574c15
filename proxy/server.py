"""The proxy listener's HTTP/1.1 server: a lean protocol on httptools (I/O).

A proxy's server side does little with each request: parse the head, hand it on, write
back what the backend says. aiohttp's server does much more per request (a request
object with lazy URL parsing, a payload stream, a response object, a task per
connection), which made up most of the proxy's CPU per exchange. This server keeps the
part a proxy needs: llhttp's strict parsing through httptools (the parser uvicorn
uses), keep-alive and pipelining (answered in order, one at a time), request bodies
with a limit, ``Expect: 100-continue``, responses of known length, chunked or
close-delimited, back-pressure on writes, cancellation of the handler when the client
goes away, an idle timeout, and a graceful shutdown.

A client is given bounded time and memory: a request head must be whole within
``header_timeout`` of its start (a new connection's first head: of the connection), a
body may go no longer than ``body_timeout`` without a byte, else 408 and the connection
closes. One sweep over the connections checks these deadlines and the idle timeout, so
an exchange arms no timer of its own. A body is read as the handler takes it
(``next_body``): reading from the client pauses while more than ``BODY_HIGH`` bytes of it
wait, and a client held back this way is not timed.

A request is handed to the handler once the read that completed its head is parsed (so
a body that came with it is whole). The handler answers with an awaitable, run as the
request's task, or with None when it serves the request by callbacks (``on_events``:
the client lost, its buffer drained) and ends it with ``respond``/``end``; ``run`` turns
such a request into a task after all. Headers stay the bytes the client sent
(``raw_headers``) until someone asks for them as text.

A WebSocket upgrade is the handler's to take: ``detach`` takes the connection away (the
proxy's own frame relay). CONNECT is refused (405); any other upgrade offer (``h2c``) is
ignored and the request served as HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Final, Protocol, cast
from urllib.parse import unquote

import httptools
import orjson

from proxy.headers import COMMON_METHODS, as_text, from_wire, http_version, length_line, to_wire
from proxy.request_head import (
    LLHTTP_BAD_VERSION,
    BadHead,
    absolute_target,
    check_version,
    host_of,
    routing_path,
)

log = logging.getLogger("strangler.server")

Headers = list[tuple[str, str]]
RawHeaders = list[tuple[bytes, bytes]]
# A handler answers with an awaitable to run as the request's task, or None when it
# has answered already or serves the request by callbacks (see Request.on_events): an
# awaitable is only for a request it has not answered yet.
Handler = Callable[["Request"], Awaitable[None] | None]


class ClientWatcher(Protocol):
    """What an exchange served by callbacks hears of its client (``Request.on_events``)."""

    def client_lost(self) -> None: ...

    def client_writable(self) -> None: ...


MAX_HEAD_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 256
LINGER_SECONDS: Final = 5.0
# Body bytes waiting for the handler beyond this: reading from the client pauses.
BODY_HIGH: Final = 64 * 1024
_WRITE_HIGH: Final = 64 * 1024
_NO_BODY_STATUS: Final = frozenset({204, 304})
# The error name of a refusal's JSON body by its status; any other (431, 405) is
# "bad_request", as is 400.
_ERRORS: Final[dict[int, str]] = {408: "request_timeout", 505: "http_version_not_supported"}
# What a request header's name is to the parser callbacks, as bits (see HttpServer.field).
_KEY: Final = 1  # the key header (the user id)
_HOST: Final = 2
_EXPECT: Final = 4
_LENGTH: Final = 8  # Content-Length
_CONNECTION: Final = 16  # Connection or Proxy-Connection (llhttp reads both)
_UPGRADE: Final = 32
_FIELDS_MAX: Final = 4096  # header names are the client's to choose: the cache stops growing
# The parser's method bytes to the str every request carries, without a decode each time.
_METHODS: Final[dict[bytes, str]] = {m.encode(): m for m in (*COMMON_METHODS, "CONNECT")}


class BodyTooLarge(Exception):
    """The request body is over the limit the handler asked for."""


class BadBody(Exception):
    """The request body cannot be parsed (its framing is broken)."""


class ClientGone(Exception):
    """The client closed the connection."""


class BodyTimeout(Exception):
    """The client sent no body bytes for the body timeout (answer 408)."""


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


# A Host header's value -> its text, for values found valid (a client sends one value
# on every request of a connection, and few clients are many hosts): up to a bound.
_HOSTS: Final[dict[bytes, str]] = {}
_HOSTS_MAX: Final = 1024


def _checked_host(value: bytes) -> str:
    """A Host value as text, checked (see request_head.host_of), or _Refused (400)."""
    try:
        host = host_of(value)
    except BadHead as bad:
        raise _Refused(bad.status, str(bad)) from None
    if len(_HOSTS) < _HOSTS_MAX:
        _HOSTS[value] = host
    return host


# Status -> (reason, status line) of the last reason seen with it: keyed by the int alone,
# which hashes for nothing (a backend sends one reason per status, nearly always).
_STATUS_LINES: Final[dict[int, tuple[str, bytes]]] = {}


def _header_block(headers: Sequence[tuple[str, str]]) -> tuple[bytes, bytes | None]:
    """Header lines as bytes without the framing headers, and the Content-Length given."""
    length = None
    lines = []
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length":
            length = to_wire(value)
        elif lower != "transfer-encoding":
            lines.append(f"{name}: {value}\r\n")
    text = "".join(lines)
    # One line break per line, none inside a name or value.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("a line break in a header")
    return to_wire(text), length


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing with an answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Request:
    """One request, and the one response it gets.

    ``target`` is the request-target as sent (path and query, percent-encoding kept);
    ``path`` is its path, percent-decoded, for routing. ``headers`` keep the client's
    order, spelling and duplicates. Answer with ``respond`` (a whole body) or with
    ``start``, ``write`` and ``finish`` (streamed); ``abort`` cuts the connection, the
    only honest signal once a streamed response cannot be finished.
    """

    __slots__ = (
        "_bad",
        "_body",
        "_body_done",
        "_body_size",
        "_conn",
        "_continue",
        "_framing",
        "_head_only",
        "_headers",
        "_limit",
        "_pending",
        "_remaining",
        "_timed_out",
        "_waiter",
        "_watcher",
        "finished",
        "host",
        "keep_alive",
        "key",
        "key_invalid",
        "length",
        "method",
        "path",
        "raw_headers",
        "remote",
        "rest",
        "scheme",
        "started",
        "target",
        "upgrade",
        "version",
        "wire_target",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        raw_target: bytes,
        version: str,
        raw_headers: RawHeaders,
        keep_alive: bool,
        host: str | None,
        expect_continue: bool,
        length: int,
    ) -> None:
        self._conn = conn
        self.method = method
        self.version = version
        self.raw_headers = raw_headers
        self._headers: Headers | None = None
        self.keep_alive = keep_alive
        self.remote = conn.remote
        self.scheme = "http"
        self.upgrade = False
        self.rest = b""
        self.started = False
        self.finished = False
        self._head_only = method == "HEAD"
        self._framing = 0  # 0 length or none, 1 chunked, 2 until close
        self._remaining = -1
        self._body: list[bytes] = []
        self._body_size = 0
        self._pending = 0  # of the body size: what waits in _body
        self._timed_out = False  # the body stalled (see _Connection.check)
        self._body_done = False
        self._bad: str | None = None
        self._watcher: ClientWatcher | None = None
        self._limit = -1
        self._waiter: asyncio.Future[None] | None = None
        self._continue = expect_continue
        self.length = length  # the Content-Length, -1 without one
        self.key: str | None = None  # the server's key header (see HttpServer)
        # The key header's first value was not UTF-8: no key (see HttpServer).
        self.key_invalid = False
        target = from_wire(raw_target)
        # The target for an upstream request line: the client's own bytes, which llhttp
        # checked (see UpstreamPool.start), or, from an absolute-form target, its path
        # and query as text.
        self.wire_target: str | bytes = raw_target
        if target[0] != "/":
            # Absolute form (its authority names the host, valid or refused) or "*";
            # anything else is refused (a parser callback: the answer is a 400).
            try:
                authority, target = absolute_target(target, method)
            except BadHead as bad:
                raise _Refused(bad.status, str(bad)) from None
            if authority is not None:
                host = authority
                self.wire_target = target
        self.host = host
        self.target = target
        path = target.partition("?")[0]
        if "%" in path:
            path = unquote(path)
        # Routed by the path a backend serves, dot-segments resolved (request_head).
        self.path = routing_path(path) if "/." in path else path

    @property
    def headers(self) -> Headers:
        """The headers as text (decoded as aiohttp decodes them, bytes kept through
        surrogate escapes), in the client's order, spelling and duplicates."""
        headers = self._headers
        if headers is None:
            headers = self._headers = as_text(self.raw_headers)
        return headers

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        wanted = name.encode("latin-1")
        for key, value in self.raw_headers:
            if key.lower() == wanted:
                return from_wire(value)
        return None

    # --- the body -------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._limit < 0 or self._body_size <= self._limit:
            self._body.append(data)
            self._pending += len(data)
            if self._pending > BODY_HIGH:
                self._conn.hold_body()
        self._wake()

    def _end(self) -> None:
        self._body_done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def body_at_hand(self, limit: int) -> bytes | None:
        """The whole body if it has arrived and is within ``limit`` bytes, else None
        (also once ``next_body`` took some of it)."""
        if (
            not self._body_done
            or self._body_size > limit
            or self._continue
            or self._pending != self._body_size
        ):
            return None
        body = self._body
        if len(body) == 1:
            return body[0]
        return b"".join(body)

    async def next_body(self, limit: int) -> bytes:
        """The body bytes that came since the last call (waiting for some), b"" once the
        whole body has come. Nothing is kept here: while more than ``BODY_HIGH`` bytes
        wait for the caller, reading from the client pauses, so a caller that passes the
        bytes on at its own pace holds the client back. BodyTooLarge once the body
        passes ``limit`` bytes (at once for a Content-Length over it), BadBody if its
        framing breaks, BodyTimeout if the client stalled, ClientGone."""
        if self.length > limit:
            raise BodyTooLarge
        self._limit = limit
        self._ask_for_body()
        while True:
            if self._body_size > limit:
                raise BodyTooLarge
            body = self._body
            if body:
                data = body[0] if len(body) == 1 else b"".join(body)
                self._body = []
                self._pending = 0
                self._conn.release_body()
                return data
            if self._body_done:
                return b""
            if self._bad is not None:
                raise BadBody(self._bad)
            if self._timed_out:
                raise BodyTimeout("no request body bytes within the body timeout")
            if self._conn.lost:
                raise ClientGone("the client closed the connection")
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def check_body(self, limit: int) -> None:
        """Raise now what reading the body would raise for what is known already: a
        Content-Length (or a body) over ``limit`` bytes, broken framing."""
        if self.length > limit or self._body_size > limit:
            raise BodyTooLarge
        if self._bad is not None:
            raise BadBody(self._bad)

    def _ask_for_body(self) -> None:
        # A client that sent Expect: 100-continue waits for this before its body.
        if self._continue and not self._body_done:
            self._continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # --- the response ---------------------------------------------------------------

    def respond(
        self, status: int, reason: str, headers: Sequence[tuple[str, str]], body: bytes = b""
    ) -> None:
        """Answer with a whole body (its length is set here)."""
        block, length = _header_block(headers)
        self.respond_block(status, reason, block, body, length)

    def respond_block(
        self, status: int, reason: str, block: bytes, body: bytes, length: bytes | None
    ) -> None:
        """``respond`` with the header lines as bytes (each ending CRLF, no framing
        headers; their names and values already checked), and the Content-Length given
        with them, which only an answer without a body keeps (HEAD, 1xx, 204, 304: it
        describes the representation); any other gets its body's own."""
        if self.started:
            raise RuntimeError("the response has started")
        self.started = True
        no_body = status in _NO_BODY_STATUS or status < 200 or self._head_only
        if no_body:
            framing = b"" if length is None else b"Content-Length: %b\r\n" % length
            body = b""
        else:
            framing = length_line(len(body))
        conn = self._conn
        conn.write(self._head(status, reason, block, framing, body))
        self.finished = True
        conn.finished(self)

    def start(
        self, status: int, reason: str, headers: Sequence[tuple[str, str]], body: bytes = b""
    ) -> None:
        """Send the head of a streamed response, with the first ``body`` bytes if there
        are some at hand (one write). With a Content-Length among the headers the body
        must be exactly that long; without one it is chunked for HTTP/1.1 clients and
        delimited by closing the connection for HTTP/1.0 ones."""
        block, length = _header_block(headers)
        self.start_block(status, reason, block, length, body)

    def start_block(
        self, status: int, reason: str, block: bytes, length: bytes | None, body: bytes = b""
    ) -> None:
        """``start`` with the header lines as bytes, as for ``respond_block``."""
        if self.started:
            raise RuntimeError("the response has started")
        self.started = True
        no_body = status in _NO_BODY_STATUS or status < 200 or self._head_only
        if no_body:
            self._framing = 0
            self._remaining = 0
            framing = b"" if length is None else b"Content-Length: %b\r\n" % length
        elif length is not None and length.strip().isdigit():
            self._framing = 0
            self._remaining = int(length)
            framing = b"Content-Length: %b\r\n" % length.strip()
        elif self.version == "1.1":
            self._framing = 1
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            self._framing = 2
            self.keep_alive = False
            framing = b""
        data = self._frame(body) if body and not no_body else b""
        self._conn.write(self._head(status, reason, block, framing, data))

    def _frame(self, data: bytes) -> bytes:
        framing = self._framing
        if framing == 1:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if framing == 0 and self._remaining >= 0:
            if len(data) > self._remaining:
                raise ValueError("more body than the Content-Length said")
            self._remaining -= len(data)
        return data

    async def write(self, data: bytes) -> None:
        """Send body bytes, waiting while the client's buffer is full."""
        conn = self._conn
        if conn.lost:
            raise ClientGone("the client closed the connection")
        self.send(data)
        if conn.write_paused:
            await conn.drain()

    def send(self, data: bytes) -> None:
        """Send body bytes now (the caller minds ``write_paused``)."""
        if data and not (self._remaining == 0 and self._framing == 0):
            self._conn.write(self._frame(data))

    @property
    def write_paused(self) -> bool:
        """Whether the client's buffer is full (see ``on_writable``)."""
        return self._conn.write_paused

    async def finish(self) -> None:
        """End the streamed response."""
        conn = self._conn
        if self.end() and conn.write_paused:
            await conn.drain()

    def end(self) -> bool:
        """End the streamed response now; False if it was cut instead (shorter than
        its Content-Length said)."""
        if self.finished:
            return True
        conn = self._conn
        if self._framing == 1 and not conn.lost:
            conn.write(b"0\r\n\r\n")
        elif self._framing == 0 and self._remaining > 0:
            # Shorter than announced: the client must not wait for the rest.
            self.abort()
            return False
        self.finished = True
        conn.finished(self)
        return True

    def on_events(self, watcher: ClientWatcher | None) -> None:
        """For an exchange served by callbacks (the handler returned None): the
        watcher's ``client_lost`` runs if the client goes away before the answer is
        finished, its ``client_writable`` when the client's full buffer has drained.
        (One object rather than two bound methods: binding costs more than the call.)"""
        self._watcher = watcher

    def run(self, work: Awaitable[None]) -> None:
        """Go on serving this request as a task (after a handler returned None)."""
        self._watcher = None
        self._conn.run(self, work)

    def abort(self) -> None:
        """Cut the connection at once."""
        self._conn.abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Take the connection of an unanswered upgrade request away from the server:
        its transport (reading paused) and the bytes that came after the head."""
        if self.started or not self.upgrade:
            raise RuntimeError("only an unanswered upgrade request can be detached")
        self.started = self.finished = True
        return self._conn.detach(self), self.rest

    def _head(self, status: int, reason: str, block: bytes, framing: bytes, data: bytes) -> bytes:
        """The response head (``block`` and ``framing`` its header lines) and ``data``
        after it, as one bytes object (one copy)."""
        conn = self._conn
        if not self.keep_alive or conn.closing or not self._body_done:
            # (An answer before the whole body came ends the connection: see finished.)
            self.keep_alive = False
            connection = b"Connection: close\r\n"
        elif self.version == "1.0":
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        cached = _STATUS_LINES.get(status)
        line = cached[1] if cached is not None and cached[0] == reason else None
        if line is None:
            text = f"HTTP/1.1 {status} {reason or _reason(status)}\r\n"
            if text.count("\n") != 1 or text.count("\r") != 1:
                raise ValueError("a line break in the reason phrase")
            line = to_wire(text)
            if len(_STATUS_LINES) < 512:
                _STATUS_LINES[status] = (reason, line)
        return b"".join((line, block, framing, connection, b"\r\n", data))


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    __slots__ = (
        "_active",
        "_body_held",
        "_discarding",
        "_drain",
        "_eof",
        "_expect",
        "_fields",
        "_head_fed",
        "_headers",
        "_host",
        "_idle_reads",
        "_idle_since",
        "_in_head",
        "_key",
        "_key_invalid",
        "_length",
        "_named_connection",
        "_named_upgrade",
        "_parser",
        "_queue",
        "_read_size",
        "_reading_paused",
        "_reads",
        "_request",
        "_server",
        "_task",
        "_timer",
        "_transport",
        "_url",
        "_watch",
        "_watch_since",
        "closing",
        "loop",
        "lost",
        "remote",
        "write_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self.loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._url: list[bytes] = []
        self._headers: RawHeaders = []
        self._head_fed = 0
        self._in_head = False
        self._host: str | None = None
        self._expect = False
        self._length = -1
        self._named_connection = False
        self._named_upgrade = False
        self._key: str | None = None
        self._key_invalid = False
        self._fields = server.fields
        self._read_size = 0
        # Reads so far, and at the end of the last exchange: the sweep tells an idle
        # connection from one sending a head, and a body that moves from one that
        # stalls, by these, without a clock read per request. -1: a new connection,
        # whose first head is due from the start.
        self._reads = 0
        self._idle_reads = -1
        self._idle_since = self.loop.time()
        # What the sweep saw last (a read count, or a head's idle period as -2 - reads)
        # and since when.
        self._watch = -1
        self._watch_since = 0.0
        self._body_held = False  # reading paused while the handler is behind on a body
        self._request: Request | None = None  # being parsed
        self._queue: deque[Request] = deque()  # parsed, waiting their turn
        self._active: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._eof = False
        self._discarding = False
        self.write_paused = False
        self.closing = False
        self.lost = False

    # --- transport callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        self._server.connections.add(self)
        if self._server.closing:
            self.closing = True
            transport.close()
            return

    def data_received(self, data: bytes) -> None:
        if self._discarding or (self.closing and self._active is None):
            return
        self._read_size = len(data)
        self._reads += 1
        try:
            self._parser.feed_data(data)
            # Requests are served once the read is parsed, so that a body that came
            # with its head is complete when the handler first sees the request.
            if self._active is None and self._queue and not self.closing:
                self._next()
            if self._in_head:
                # llhttp holds a header line until it ends: bound what it may hold.
                self._head_fed += len(data)
                if self._head_fed > MAX_HEAD_BYTES:
                    self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, str(refused))
            else:
                log.exception("request parsing failed", exc_info=refused)
                self._refuse(400, "malformed request")
        except httptools.HttpParserError as exc:
            if str(exc) == LLHTTP_BAD_VERSION:
                self._refuse(505, "only HTTP/1.1 and HTTP/1.0 are served here")
            else:
                self._refuse(400, f"malformed request: {exc}")

    def eof_received(self) -> bool | None:
        # A client that closes its side has gone away as far as a proxy can tell (a
        # half-close cannot be told from a close until a write fails): the transport
        # closes, and connection_lost cancels the exchange under way.
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._server.connections.discard(self)
        self._disarm()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        active = self._active
        if active is not None and active._watcher is not None:
            watcher, active._watcher = active._watcher, None
            watcher.client_lost()
        for request in (self._active, *self._queue, self._request):
            if request is not None:
                request._wake()
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._server.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        active = self._active
        if active is not None and active._watcher is not None:
            active._watcher.client_writable()

    # --- parser callbacks -----------------------------------------------------------

    # Per-message state starts fresh after each head (no on_message_begin: one call
    # less per request); the request line's first span marks a head under way.

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._in_head = True

    def on_chunk_header(self) -> None:
        # A chunk's size line, or the last one's and its trailer section: bounded like
        # a head while llhttp holds it (see data_received).
        self._in_head = True

    def on_chunk_complete(self) -> None:
        self._in_head = False
        self._head_fed = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._url:
            return  # a chunked body's trailer field: not relayed, never a header
        # One lookup per name, instead of lower() (a method call) on each.
        kind = self._fields.get(name)
        if kind is None:
            kind = self._server.field(name)
        if kind:
            if kind & _KEY and self._key is None and not self._key_invalid:
                # Only UTF-8 is an id: any other bytes count as no id at all (see
                # Request.key_invalid), never as text that carries them as surrogates.
                try:
                    self._key = value.decode()
                except UnicodeDecodeError:
                    self._key_invalid = True
            if kind & _HOST:
                if self._host is not None:
                    raise _Refused(400, "more than one Host header")
                host = _HOSTS.get(value)
                if host is None:
                    host = _checked_host(value)
                self._host = host
            elif kind & _EXPECT:
                self._expect = value.strip().lower() == b"100-continue"
            elif kind & _LENGTH:
                if value.isdigit():
                    self._length = int(value)
                else:
                    # llhttp keeps whitespace after a value (and checked the digits):
                    # the length is still the length, for the early 413 and the framing.
                    digits = value.strip(b" \t")
                    if digits.isdigit():
                        self._length = int(digits)
            elif kind & _CONNECTION:
                self._named_connection = True
            elif kind & _UPGRADE:
                self._named_upgrade = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers, urls = self._headers, self._url
        if self._head_fed + self._read_size > MAX_HEAD_BYTES:
            # The head may be that large: measure it.
            size = sum(map(len, urls)) + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > MAX_HEAD_BYTES:
                raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")
        if len(headers) > MAX_HEADERS:
            raise _Refused(431, f"more than {MAX_HEADERS} header fields")
        parser = self._parser
        url = urls[0] if len(urls) == 1 else b"".join(urls)
        raw_method: bytes = parser.get_method()
        # The two usual methods by comparison: a lookup would hash the new bytes first.
        if raw_method == b"GET":
            method = "GET"
        elif raw_method == b"POST":
            method = "POST"
        else:
            method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        if method == "CONNECT":
            raise _Refused(405, "CONNECT is not served here")
        keep_alive = parser.should_keep_alive()
        version = http_version(parser, keep_alive, self._named_connection)
        if version != "1.1":
            try:
                check_version(version)  # llhttp reads HTTP/0.9 and HTTP/2.0 heads too
            except BadHead as bad:
                raise _Refused(bad.status, str(bad)) from None
        elif self._host is None:
            raise _Refused(400, "an HTTP/1.1 request needs a Host header")
        request = Request(
            self,
            method,
            url,
            version,
            headers,
            keep_alive,
            self._host,
            self._expect,
            self._length,
        )
        request.key = self._key
        request.key_invalid = self._key_invalid
        self._url = []
        self._headers = []
        self._in_head = False
        self._head_fed = 0
        self._host = self._key = None
        self._key_invalid = False
        self._expect = False
        self._length = -1
        self._named_connection = False
        # llhttp upgrades a request (CONNECT aside, refused above) only on an Upgrade
        # header: without one, no call to ask.
        request.upgrade = self._named_upgrade and parser.should_upgrade()
        self._named_upgrade = False
        if self.closing:
            # The connection ends after the answer under way (an early 413, shutdown):
            # a request behind it is read past, never served.
            request._limit = 0
            self._request = request
            return
        self._request = request
        if request.upgrade:
            # Answered once the parser has stopped at the upgrade (see _upgraded).
            return
        self._queue.append(request)
        if self._active is not None:
            self._hold_pipeline()

    def _hold_pipeline(self) -> None:
        # Pipelined: one request waits its turn, the rest wait in the socket.
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        request = self._request
        if request is not None:
            request._feed(body)

    def on_message_complete(self) -> None:
        self._in_head = False
        self._head_fed = 0
        request = self._request
        if request is not None and not request.upgrade:
            self._request = None
            request._end()

    # --- requests -------------------------------------------------------------------

    def _upgraded(self, rest: bytes) -> None:
        request = self._request
        self._request = None
        if request is None:
            self._refuse(400, "malformed upgrade")
            return
        if self._transport is not None and not self._reading_paused:
            # Nothing more is parsed on this connection until it is answered.
            self._reading_paused = True
            self._transport.pause_reading()
        websocket = request.method == "GET" and (request.header("upgrade") or "").lower() == (
            "websocket"
        )
        if websocket and request.version != "1.1":
            # RFC 6455 section 4.1: a handshake is HTTP/1.1 (which also makes its Host
            # required, the one X-Forwarded-Host comes from).
            self._refuse(400, "a WebSocket handshake is an HTTP/1.1 request")
            return
        if websocket:
            request.rest = rest
            request._end()
            # The parser stops at an upgrade: answered instead of switched (refused,
            # a 503 while draining), the connection cannot go on as HTTP and closes.
            request.keep_alive = False
        else:
            # Not ours to switch to (h2c): served as HTTP/1.1, the offer ignored. The
            # parser skipped any body of such a request, so one with a body is refused.
            if request.header("content-length") not in (None, "0") or request.header(
                "transfer-encoding"
            ):
                self._refuse(400, "an upgrade request with a body is not served")
                return
            request.upgrade = False
            request._end()
            self._parser = httptools.HttpRequestParser(self)
            if rest:
                request.rest = rest
        self._queue.append(request)
        if self._active is None:
            self._next()

    def _next(self) -> None:
        queue = self._queue
        if not queue:
            if self._reading_paused and self._transport is not None and not self.closing:
                self._reading_paused = False
                self._transport.resume_reading()
            self._idle_since = self.loop.time()
            self._idle_reads = self._reads
            return
        request = queue.popleft()
        self._active = request
        if queue:
            self._hold_pipeline()
        elif (
            self._reading_paused
            and not request.upgrade
            and not request.rest
            and not self.closing
            and self._transport is not None
        ):
            # Its body (or what follows it) may still be on the way: read again.
            self._reading_paused = False
            self._transport.resume_reading()
        try:
            work = self._server.handler(request)
        except Exception:
            log.exception("request %s %s failed", request.method, request.target)
            self._failed(request)
            return
        if work is not None:
            self.run(request, work)

    def run(self, request: Request, work: Awaitable[None]) -> None:
        self._task = self.loop.create_task(self._serve(request, work))

    def _failed(self, request: Request) -> None:
        if request.started:
            self.abort()
        elif not self.lost:
            request.respond(
                500, "", [("Content-Type", "application/json")], b'{"error":"internal"}'
            )

    async def _serve(self, request: Request, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            if not self.lost:
                self.abort()
            raise
        except ClientGone:
            return
        except Exception:
            log.exception("request %s %s failed", request.method, request.target)
            self._failed(request)
            return
        if not request.finished and not self.lost:
            if request.started:
                self.abort()
            else:
                request.respond(500, "", [], b"")

    def finished(self, request: Request) -> None:
        """The response to the active request is written."""
        if request is not self._active:
            return
        request._watcher = None
        self._active = None
        self._task = None
        transport = self._transport
        if self.lost or transport is None:
            return
        if (not request._body_done or self._discarding) and not self._eof:
            # Answered before its body was read (413, a broken body) or after a
            # malformed request behind it: the client may still be sending.
            self._linger()
            self._server.connection_gone()
            return
        if not request.keep_alive or not request._body_done or self.closing or self._eof:
            self.closing = True
            self._queue.clear()
            transport.close()
            self._server.connection_gone()
            return
        rest = request.rest
        if rest:
            request.rest = b""
            self.data_received(rest)
            if self._active is not None or self.closing:
                return
        self._next()

    def detach(self, request: Request) -> asyncio.Transport:
        transport = self._transport
        assert transport is not None
        request._watcher = None
        self._active = None
        self._disarm()
        self.lost = True  # for this protocol: the connection is someone else's now
        self._server.connections.discard(self)
        self._server.connection_gone()
        return transport

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request that cannot be parsed, or a head that did not come whole in
        time (408), then close."""
        self._request = None
        self._queue.clear()
        transport = self._transport
        if transport is None or self.lost:
            return
        self.closing = True
        self._discarding = True  # nothing more is parsed on this connection
        active = self._active
        if active is not None:
            # An exchange is under way: let it finish, then close. If it is still
            # reading its body, that body is what broke.
            if not active._body_done:
                active._bad = detail
                active._wake()
            return
        error = _ERRORS.get(status, "bad_request")
        body = orjson.dumps({"error": error, "detail": detail})
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        transport.write(head + body)
        self._linger()

    def _linger(self) -> None:
        """Close after the answer, reading and dropping what the client still sends for
        a while first: closing with bytes unread resets the connection, and the client
        could lose the answer with it (a 413 while it still sends its body)."""
        self.closing = True
        self._discarding = True
        self._request = None
        self._queue.clear()
        transport = self._transport
        if transport is None or self.lost:
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        self._disarm()
        self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    # --- writing --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.lost and self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ClientGone("the client closed the connection")
        if self.write_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
            if self.lost:
                raise ClientGone("the client closed the connection")

    def abort(self) -> None:
        if self._transport is not None and not self.lost:
            self._transport.abort()

    # --- idle connections and shutdown ----------------------------------------------

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def hold_body(self) -> None:
        """Stop reading: the handler is behind on the request body."""
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._body_held = True
            self._transport.pause_reading()

    def release_body(self) -> None:
        """Read again after ``hold_body``: the handler took the body bytes waiting."""
        if self._body_held:
            self._body_held = False
            if (
                self._reading_paused
                and not self._queue
                and not self._discarding
                and self._transport is not None
            ):
                self._reading_paused = False
                self._transport.resume_reading()

    def check(self, now: float) -> None:
        """The sweep's look at this connection (see HttpServer._sweep): close it when
        idle past the keep-alive timeout; answer 408 and close when a request head is
        not whole ``header_timeout`` after it began, or a request body has had no byte
        for ``body_timeout``. Each deadline is met between one timeout and one timeout
        plus a sweep period after it began."""
        transport = self._transport
        if transport is None or self.lost or self._discarding:
            return
        server = self._server
        active = self._active
        if active is not None:
            if (
                active._body_done
                or active._continue  # not asked for its body yet
                or active._timed_out
                or self._reading_paused  # held back by the proxy, not stalled
            ):
                self._watch = -1
            elif self._watch != self._reads:
                self._watch = self._reads
                self._watch_since = now
            elif now - self._watch_since >= server.body_timeout:
                # The handler answers (408, or a cut once its response has started).
                active._timed_out = True
                active._wake()
            return
        if self._queue:
            return
        if self.closing:
            self._close()
            return
        if self._reads == self._idle_reads and not self._url:
            # Nothing came since the last exchange ended: an idle keep-alive connection.
            if now - self._idle_since >= server.keepalive_timeout:
                self._close()
            return
        if self._idle_reads < 0:
            since = self._idle_since  # a new connection: its first head is due from the start
        else:
            token = -2 - self._idle_reads
            if self._watch != token:
                self._watch = token
                self._watch_since = now
                return
            since = self._watch_since
        if now - since >= server.header_timeout:
            # Lingering, as after any early answer, so that bytes still on their way
            # cannot reset the connection before the client has read the answer.
            self._refuse(408, f"request head not complete within {server.header_timeout:g} s")

    def _close(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue)

    def shut(self) -> None:
        """Close once the exchange under way (if any) is answered."""
        self.closing = True
        if not self.busy and self._transport is not None and not self.lost:
            self._transport.close()

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.abort()


class HttpServer:
    """The listener: a protocol factory for ``loop.create_server`` and its shutdown."""

    def __init__(
        self,
        handler: Handler,
        *,
        keepalive_timeout: float = 75.0,
        header_timeout: float = 20.0,
        body_timeout: float = 20.0,
        key_header: str | None = None,
    ) -> None:
        """``key_header``: a header whose first value every request carries as ``key``
        (the user id, for a proxy that routes by it), picked up while parsing; a value
        that is not UTF-8 is no key (None), and sets the request's ``key_invalid``."""
        self.handler = handler
        self.key_header = key_header.lower().encode("latin-1") if key_header else b""
        # Request header name, as spelt -> what it is to the parser callbacks (_KEY...).
        self.fields: dict[bytes, int] = {}
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Future[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> _Connection:
        return _Connection(self)

    def field(self, name: bytes) -> int:
        """What a request header's name is to the parser callbacks (see ``fields``)."""
        lower = name.lower()
        kind = 0
        if lower == self.key_header:
            kind |= _KEY
        if lower == b"host":
            kind |= _HOST
        elif lower == b"expect":
            kind |= _EXPECT
        elif lower == b"content-length":
            kind |= _LENGTH
        elif lower == b"connection" or lower == b"proxy-connection":
            kind |= _CONNECTION
        elif lower == b"upgrade":
            kind |= _UPGRADE
        if len(self.fields) < _FIELDS_MAX:
            self.fields[name] = kind
        return kind

    async def start(self, sock: socket.socket) -> None:
        self._server = await self.loop.create_server(self, sock=sock, backlog=1024)
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        # One sweep over the connections now and then instead of a timer per request:
        # each deadline is met within a quarter of the shortest timeout after it passed
        # (at most 5 s, at least 50 ms).
        shortest = min(self.keepalive_timeout, self.header_timeout, self.body_timeout)
        period = min(max(shortest / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check(now)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def connection_gone(self) -> None:
        idle = self._idle
        if idle is not None and not idle.done() and not any(c.busy for c in self.connections):
            idle.set_result(None)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle connections, give the busy ones ``grace``
        seconds to finish their exchange, then cut what is left."""
        self.closing = True
        self.stop_accepting()
        for conn in list(self.connections):
            conn.shut()
        if any(conn.busy for conn in self.connections):
            self._idle = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle, grace)
        for conn in list(self.connections):
            conn.cancel()
        # Let cancelled handlers run their clean-up.
        await asyncio.sleep(0)
