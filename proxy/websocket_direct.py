"""WebSocket sessions relayed frame by frame on raw transports (I/O).

A session needs no message objects: the proxy performs both handshakes itself, then
passes the frames through as the bytes they are. A client's frames are masked, as a
server expects them; a backend's are not, as a client expects them; so both directions
relay verbatim, every frame complete in one read going out in one write. The proxy
still reads every frame header and checks what RFC 6455 asks of each side: the message
size limit (1009), masking, reserved bits and opcodes, control frames, fragmentation,
close codes and close payloads (1002), UTF-8 in text messages, validated fragment by
fragment, and in close reasons (1007). The offender gets that code; the other side gets
1001 when the client broke the rules, 1011 when the backend did (to the client the
session failed on the server's side, as when the backend is lost). The proxy keeps the
turn timing for the first-event metric, takes part in the closing handshake (codes and
reasons pass through unchanged) and closes on its own account with 1014 (backend
unreachable or refusing), 1011 (backend timeout or gone) and 1001 (shutdown). A side
that cannot keep up stops the reading of the other.

This is the one frame reader of every session: a watched session
(``proxy.websocket_relay``) runs on the same legs and adds, through the ``Session``
hooks, its decoded messages, a shadow leg and the isolation check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import hashlib
import logging
import os
import socket
import ssl
from time import perf_counter
from typing import Final, cast

import httptools
from aiohttp import WSCloseCode
from aiohttp._websocket.helpers import websocket_mask

from proxy.context import Proxy
from proxy.headers import BACKEND_HEADER, to_wire, upstream_request_block
from proxy.metrics import Outcome
from proxy.routing import UNROUTED, Backend, Route
from proxy.server import Request
from proxy.upstream import parse_origin

log = logging.getLogger("strangler.relay")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HANDSHAKE = 64 * 1024

GOING_AWAY: Final = int(WSCloseCode.GOING_AWAY)
PROTOCOL_ERROR: Final = int(WSCloseCode.PROTOCOL_ERROR)
INVALID_TEXT: Final = int(WSCloseCode.INVALID_TEXT)
MESSAGE_TOO_BIG: Final = int(WSCloseCode.MESSAGE_TOO_BIG)
INTERNAL_ERROR: Final = int(WSCloseCode.INTERNAL_ERROR)
BAD_GATEWAY: Final = int(WSCloseCode.BAD_GATEWAY)

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


# -- the pure rules ----------------------------------------------------------------------


def close_code_valid(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 7.4): the defined codes but
    1004 (reserved) and 1005, 1006, 1015 (never on the wire), the registered 1012-1014,
    and 3000-4999 (libraries, frameworks, applications). 0-999 and 1016-2999 are not."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def sendable(code: int | None) -> int:
    """The code to pass on for a close that carried ``code`` (None: no code)."""
    if code is None or not close_code_valid(code):
        return 1000
    return code


def handshake_refusal(version: str | None, key: str | None) -> tuple[int, str] | None:
    """Why a client's upgrade request cannot be accepted, as (status, detail), or None.

    Another version than 13 (or none) gets 426, which names the one spoken; a missing
    key, or one that is not 16 bytes in base64, gets 400."""
    if version is None or version.strip() != "13":
        return 426, "only WebSocket version 13 is spoken"
    if key is None:
        return 400, "not a valid WebSocket handshake: no Sec-WebSocket-Key"
    try:
        if len(base64.b64decode(key.strip(), validate=True)) != 16:
            return 400, "not a valid WebSocket handshake: the key is not 16 bytes"
    except (binascii.Error, ValueError):
        return 400, "not a valid WebSocket handshake: the key is not base64"
    return None


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    payload = code.to_bytes(2, "big") + reason[:123]
    return control_frame(0x8, payload, masked=masked)


def control_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """A control frame (payload at most 125 bytes), masked as a client sends it or not."""
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + _unmask(payload, mask)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """Masking and unmasking are the same XOR (aiohttp's, in C: a client's text
    message is unmasked on every turn to check its UTF-8, and XOR over Python ints
    cost half as much again as relaying the whole turn)."""
    if not payload:
        return payload
    data = bytearray(payload)
    websocket_mask(mask, data)
    return bytes(data)


# Most messages are JSON in ASCII: a scan that makes no str. Called through the method
# itself, held here: compiled, ``data.isascii()`` looks the method up by name each time.
_isascii: Final = bytes.isascii


def _utf8(data: bytes) -> bool:
    if _isascii(data):
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# -- the backend's handshake ---------------------------------------------------------------


class HandshakeFailed(Exception):
    def __init__(self, code: int, reason: str, outcome: Outcome) -> None:
        super().__init__(reason)
        self.code = code
        self.outcome = outcome


class _Handshake(asyncio.Protocol):
    """The backend's answer to the upgrade request: a 101 head, then frames."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.rest = b""
        self.fed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101:
                self.rest = data[exc.args[0] :]
                assert self.transport is not None
                self.transport.pause_reading()
                self.done.set_result(None)
                return
            self._fail(f"backend refused the handshake: {self.status}")
        except httptools.HttpParserError:
            self._fail("backend answered the handshake with garbage")
        else:
            if self.status and self.status != 101:
                self._fail(f"backend refused the handshake: {self.status}")
            elif self.fed > _MAX_HANDSHAKE:
                self._fail("backend's handshake answer is too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                HandshakeFailed(BAD_GATEWAY, "backend closed during the handshake", Outcome.BROKEN)
            )

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(HandshakeFailed(BAD_GATEWAY, reason, Outcome.BROKEN))

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


async def open_upstream(
    proxy: Proxy,
    backend: Backend,
    target: str,
    block: bytes,
    offered: list[str],
) -> tuple[asyncio.Transport, bytes, str | None]:
    """Connect to the backend and complete its handshake: its transport (reading
    paused), the bytes that came after its 101, and the subprotocol it chose;
    HandshakeFailed if not."""
    settings = proxy.settings.server
    origin = parse_origin(proxy.backend_urls[backend])
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16)).decode()
    # The target, the offered subprotocols and ``block`` come from the client's head,
    # which llhttp checked: no line breaks, no NUL.
    lines = [
        f"GET {target} HTTP/1.1\r\n",
        origin.host_line,
        "Upgrade: websocket\r\nConnection: Upgrade\r\n",
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
    ]
    if offered:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(offered)}\r\n")
    head = to_wire("".join(lines)) + block + b"\r\n"
    transport: asyncio.Transport | None = None
    try:
        try:
            async with asyncio.timeout(settings.connect_timeout):
                transport, handshake = await loop.create_connection(
                    lambda: _Handshake(loop),
                    origin.host,
                    origin.port,
                    ssl=ssl.create_default_context() if origin.tls else None,
                )
        except TimeoutError:
            raise HandshakeFailed(INTERNAL_ERROR, "backend timeout", Outcome.TIMEOUT) from None
        except OSError:
            raise HandshakeFailed(BAD_GATEWAY, "backend unreachable", Outcome.UNREACHABLE) from None
        transport.write(head)
        try:
            async with asyncio.timeout(settings.read_timeout):
                await handshake.done
        except TimeoutError:
            raise HandshakeFailed(INTERNAL_ERROR, "backend timeout", Outcome.TIMEOUT) from None
        if handshake.header(b"sec-websocket-accept") != accept_key(key):
            raise HandshakeFailed(BAD_GATEWAY, "backend's handshake is invalid", Outcome.BROKEN)
        if (handshake.header(b"sec-websocket-extensions") or "").strip():
            raise HandshakeFailed(BAD_GATEWAY, "backend chose an extension", Outcome.BROKEN)
        chosen = (handshake.header(b"sec-websocket-protocol") or "").strip() or None
        if chosen is not None and chosen not in offered:
            raise HandshakeFailed(BAD_GATEWAY, "backend chose no offered protocol", Outcome.BROKEN)
        return transport, handshake.rest, chosen
    except BaseException:
        if transport is not None:
            transport.abort()
        raise


# -- the session's start -------------------------------------------------------------------


def refuse_handshake(request: Request, backend: Backend) -> bool:
    """Answer a client's upgrade request that cannot be accepted (426 or 400); whether
    it was refused."""
    refusal = handshake_refusal(
        request.header("sec-websocket-version"), request.header("sec-websocket-key")
    )
    if refusal is None:
        return False
    status, detail = refusal
    headers = [("Content-Type", "application/json"), (BACKEND_HEADER, backend)]
    if status == 426:
        headers.append(("Sec-WebSocket-Version", "13"))
        error = "upgrade_required"
    else:
        error = "bad_request"
    body = b'{"error": "%s", "detail": "%s"}' % (error.encode(), detail.encode())
    request.respond(status, "", headers, body)
    return True


def offered_protocols(request: Request) -> list[str]:
    return [
        token.strip()
        for name, value in request.headers
        if name.lower() == "sec-websocket-protocol"
        for token in value.split(",")
        if token.strip()
    ]


async def relay_websocket_direct(
    request: Request, proxy: Proxy, route: Route | None, backend: Backend
) -> None:
    """A session nobody watches: both handshakes, then it runs by callbacks."""
    label = route.name if route is not None else UNROUTED
    await start_session(request, proxy, Session(proxy, label, backend))


async def start_session(request: Request, proxy: Proxy, session: Session) -> None:
    """Both handshakes for ``session``, then it runs by callbacks (see ``Session``).

    The backend's is done first, so that the client's 101 carries the subprotocol the
    backend chose; a backend that cannot be had still gets the client a 101, then the
    close code that says why."""
    backend = session.backend
    if refuse_handshake(request, backend):
        return
    key = request.header("sec-websocket-key")
    assert key is not None
    key = key.strip()
    offered = offered_protocols(request)
    block = upstream_request_block(
        request.raw_headers,
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
        websocket=True,
    )
    try:
        upstream, upstream_rest, chosen = await open_upstream(
            proxy, backend, request.target, block, offered
        )
    except HandshakeFailed as failure:
        log.warning("route %s backend %s: websocket %s", session.route, backend, failure)
        session.outcome = failure.outcome
        transport, rest = request.detach()
        transport.write(_switching(key, None, backend))
        session.attach(transport, rest, None, b"")
        # Every reason starts "backend ...": told by role, never by address.
        session.close_now(failure.code, f"{backend.value} {failure}".encode()[:120])
        return
    transport, rest = request.detach()
    transport.write(_switching(key, chosen, backend))
    session.opened(request.target, block, chosen)
    session.attach(transport, rest, upstream, upstream_rest)
    if proxy.draining:
        session.close_now(GOING_AWAY, b"proxy shutting down")


def _switching(key: str, protocol: str | None, backend: Backend) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}\r\n")
    lines.append(f"{BACKEND_HEADER}: {backend}\r\n\r\n")
    return "".join(lines).encode()


# -- the legs --------------------------------------------------------------------------------


class Leg(asyncio.Protocol):
    """One side of a session: the client's connection, the backend's, or a watched
    session's shadow connection (whose frames are read, never passed on).

    A leg that ``collects`` hands each complete data message to its session
    (``Session.message``); one that also ``holds`` keeps a message's frames back until
    the session has seen the whole message and decided to deliver it."""

    __slots__ = (
        "close_received",
        "close_sent",
        "closed",
        "collects",
        "deaf",
        "fragmented",
        "held",
        "holds",
        "is_client",
        "is_shadow",
        "message",
        "message_size",
        "mirrors",
        "other",
        "pending",
        "session",
        "text",
        "transport",
        "utf8",
    )

    def __init__(self, session: Session, is_client: bool, is_shadow: bool = False) -> None:
        self.session = session
        self.is_client = is_client
        self.is_shadow = is_shadow
        self.transport: asyncio.Transport | None = None
        self.other: Leg | None = None
        self.pending = bytearray()  # an incomplete frame
        self.fragmented = False
        self.message_size = 0
        self.text = False  # the message under way is text
        self.utf8: codecs.IncrementalDecoder | None = None  # a fragmented text message's
        self.collects = False
        self.holds = False
        self.mirrors = False  # what it passes on goes to the session's shadow too
        self.message: bytearray | None = None  # a fragmented message collected so far
        self.held: bytearray | None = None  # the frames of a message held back
        self.close_sent = False
        self.close_received = False
        self.deaf = False  # what it sends is no longer read
        self.closed = False

    @property
    def done(self) -> bool:
        return self.closed or (self.close_sent and self.close_received)

    # -- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.session.lost(self)

    def pause_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.closed:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.closed:
            other.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None

    # -- frames

    def data_received(self, data: bytes) -> None:
        if self.deaf or self.closed:
            return
        pending = self.pending
        # Parsed as bytes, never bytearray: compiled, indexing bytes is a primitive, and
        # indexing a value that may be either is a generic call (several per frame).
        held = bool(pending)
        if held:
            pending += data
            view = bytes(pending)
        else:
            view = data
        session = self.session
        is_client = self.is_client
        limit = session.limit
        n = len(view)
        pos = start = 0
        while n - pos >= 2:
            b0 = view[pos]
            b1 = view[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length >= 126:
                if length == 126:
                    if n - pos < 4:
                        break
                    length = (view[pos + 2] << 8) | view[pos + 3]
                    head = 4
                else:
                    if n - pos < 10:
                        break
                    length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                    head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if b0 & 0x70 or bool(masked) != is_client:
                self._forward(view, start, pos)
                session.violation(self, "reserved bits or wrong masking", PROTOCOL_ERROR)
                return
            # The header is checked as soon as it is in (an oversized message is refused
            # before its payload arrives); the message state changes only once the whole
            # frame is, since an incomplete frame is parsed again with the next read.
            size = length
            if opcode >= 8:
                if length > 125 or not fin or opcode > 10:
                    self._forward(view, start, pos)
                    session.violation(self, "malformed control frame", PROTOCOL_ERROR)
                    return
            elif opcode == 0:
                if not self.fragmented:
                    self._forward(view, start, pos)
                    session.violation(self, "continuation without a message", PROTOCOL_ERROR)
                    return
                size = self.message_size + length
            elif opcode <= 2:
                if self.fragmented:
                    self._forward(view, start, pos)
                    session.violation(self, "new message inside a fragmented one", PROTOCOL_ERROR)
                    return
            else:
                self._forward(view, start, pos)
                session.violation(self, f"reserved opcode {opcode}", PROTOCOL_ERROR)
                return
            if size > limit and opcode < 8:
                self._forward(view, start, pos)
                session.too_big(self)
                return
            end = pos + head + length
            if end > n:
                break
            if opcode >= 8:
                if opcode == 8:
                    self._forward(view, start, pos)
                    self._close_frame(view, pos, head, end, masked != 0)
                    pending.clear()
                    return
                if opcode == 9 and self.is_shadow:
                    self._pong(view, pos, head, end)
                pos = end
                continue
            if opcode != 0:
                self.text = opcode == 1
            text = self.text
            if text or self.collects:
                payload = view[pos + head : end]
                if masked:
                    payload = _unmask(payload, view[pos + head - 4 : pos + head])
                # A message in one frame, in ASCII, the common case: nothing more to check.
                if (
                    text
                    and not (fin and self.utf8 is None and _isascii(payload))
                    and not self._valid_text(payload, fin != 0)
                ):
                    self._forward(view, start, pos)
                    session.violation(self, "a text message that is not UTF-8", INVALID_TEXT)
                    return
                if self.collects:
                    if self.holds:
                        # Its frames wait for the session's verdict on the whole message;
                        # what came before them goes on now.
                        self._forward(view, start, pos)
                        start = end
                        kept = self.held
                        if kept is None:
                            kept = self.held = bytearray()
                        kept += view[pos:end]
                    self.message_size = size
                    self.fragmented = not fin
                    self._collect(payload, fin != 0, text)
                    pos = end
                    continue
            self.message_size = size
            self.fragmented = not fin
            # A turn starts when a client message is complete; its first event is
            # the backend's first data frame after that.
            if is_client:
                if fin:
                    if session.turn_started is None:
                        session.turn_started = perf_counter()
                    if session.watched:
                        session.client_message()
            elif session.turn_started is not None and not self.is_shadow:
                session.first_event()
            pos = end
        self._forward(view, start, pos)
        if pos == n:
            pending.clear()
        elif held:
            del pending[:pos]
        else:
            pending += view[pos:]

    def _valid_text(self, payload: bytes, fin: bool) -> bool:
        """Whether a text message's frame keeps it valid UTF-8 so far: a message in one
        frame is checked whole; a fragmented one incrementally, so that a code point may
        be split across frames and an invalid sequence is found in the frame it is in."""
        decoder = self.utf8
        if decoder is None:
            if fin:
                return _utf8(payload)
            decoder = self.utf8 = _Utf8Decoder()
        try:
            decoder.decode(payload, fin)
        except UnicodeDecodeError:
            return False
        if fin:
            self.utf8 = None
        return True

    def _collect(self, payload: bytes, fin: bool, text: bool) -> None:
        session = self.session
        collected = self.message
        if fin and collected is None:
            data = payload
        else:
            if collected is None:
                collected = self.message = bytearray()
            collected += payload
            if not fin:
                return
            data = bytes(collected)
            self.message = None
        deliver = session.message(self, data, text)
        kept = self.held
        if kept is not None:
            self.held = None
            if deliver:
                self._send_on(bytes(kept))
        if not self.is_shadow and session.turn_started is not None:
            session.first_event()

    def _close_frame(self, view: bytes, pos: int, head: int, end: int, masked: bool) -> None:
        payload = view[pos + head : end]
        if masked:
            payload = _unmask(payload, view[pos + head - 4 : pos + head])
        session = self.session
        if len(payload) == 1:
            session.violation(self, "a close frame with a one-byte payload", PROTOCOL_ERROR)
            return
        code = 1005
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not close_code_valid(code):
                session.violation(self, f"close code {code}", PROTOCOL_ERROR)
                return
            if not _utf8(payload[2:]):
                session.violation(self, "a close reason that is not UTF-8", INVALID_TEXT)
                return
        session.close_received(self, view[pos:end], code)

    def _pong(self, view: bytes, pos: int, head: int, end: int) -> None:
        """A shadow backend's ping is answered here: its frames reach no one."""
        if self.close_sent or self.closed or self.transport is None:
            return
        self.transport.write(control_frame(0xA, view[pos + head : end], masked=True))

    def _forward(self, view: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        if start == 0 and end == len(view):
            self._send_on(view)
        else:
            self._send_on(view[start:end])

    def _send_on(self, data: bytes) -> None:
        if self.mirrors:
            self.session.mirror(data)
        other = self.other
        if other is None or other.close_sent or other.closed or other.transport is None:
            return
        other.transport.write(data)

    def send_close(self, code: int, reason: bytes) -> None:
        self.send_close_frame(close_frame(code, reason, masked=not self.is_client))

    def send_close_frame(self, frame: bytes) -> None:
        if self.close_sent or self.closed or self.transport is None:
            return
        self.close_sent = True
        self.transport.write(frame)

    def shut(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()


# -- the session ------------------------------------------------------------------------------


class Session:
    """A relayed session: two legs, one closing handshake, its metrics.

    The hooks (``opened``, ``client_message``, ``message``, ``mirror``, ``ending``,
    ``ended`` and the shadow leg's ``shadow_*``) do nothing here: a watched session
    (``proxy.websocket_relay.WatchedSession``) fills them in."""

    def __init__(self, proxy: Proxy, route: str, backend: Backend) -> None:
        self.proxy = proxy
        self.route = route
        self.backend = backend
        self.limit = proxy.settings.server.max_ws_message_bytes
        self.outcome = Outcome.SUCCESS
        self.turn_started: float | None = None
        self.batch = proxy.metrics.batch(route, backend, "primary")
        self.watched = False  # the hooks below do something
        self.client = Leg(self, True)
        self.upstream = Leg(self, False)
        self.client.other, self.upstream.other = self.upstream, self.client
        self._timer: asyncio.TimerHandle | None = None
        self.closing = False  # the closing handshake has begun (``ending`` was called)
        self._ended = False
        self.finished: asyncio.Future[None] | None = None  # made when someone waits

    def attach(
        self,
        client: asyncio.Transport,
        client_rest: bytes,
        upstream: asyncio.Transport | None,
        upstream_rest: bytes,
    ) -> None:
        proxy = self.proxy
        proxy.metrics.websocket_sessions.labels(self.route, self.backend).inc()
        proxy.websockets.add(self)
        client.set_protocol(self.client)
        self.client.connection_made(client)
        if upstream is None:
            self.upstream.closed = True
        else:
            upstream.set_protocol(self.upstream)
            self.upstream.connection_made(upstream)
            if upstream_rest:
                self.upstream.data_received(upstream_rest)
            upstream.resume_reading()
        if client_rest:
            self.client.data_received(client_rest)
        client.resume_reading()

    def first_event(self) -> None:
        started = self.turn_started
        if started is not None:
            self.turn_started = None
            self.proxy.metrics.first_event_in(self.batch, perf_counter() - started)

    # -- hooks of a watched session

    def opened(self, target: str, block: bytes, protocol: str | None) -> None:
        """The backend accepted the session (``block``: the headers it was sent)."""

    def client_message(self) -> None:
        """A client message is complete (a watched session's turn starts)."""

    def message(self, leg: Leg, data: bytes, text: bool) -> bool:
        """A complete data message from ``leg``: whether to deliver it (if held)."""
        return True

    def mirror(self, data: bytes) -> None:
        """Client frames passed on to the backend, for a shadow (a leg that mirrors)."""

    def ending(self, backend_ended: bool, failure: str | None) -> None:
        """The session starts to close: ended by the backend (``failure`` if it
        failed), or by the client or the proxy. Called once."""

    def ended(self) -> None:
        """Both legs are closed."""

    def shadow_closed(self, leg: Leg, code: int) -> None:
        """The shadow leg sent a close frame."""

    def shadow_failed(self, leg: Leg, what: str) -> None:
        """The shadow leg broke the protocol, sent too much, or was lost."""

    # -- closing

    def _begin_ending(self, backend_ended: bool, failure: str | None) -> None:
        if not self.closing:
            self.closing = True
            self.ending(backend_ended, failure)

    def close_received(self, leg: Leg, frame: bytes, code: int) -> None:
        """A close frame came from ``leg``: it began the closing handshake, or it
        answers a close the proxy sent or passed on to it."""
        if leg.is_shadow:
            self.shadow_closed(leg, code)
            return
        leg.close_received = True
        leg.deaf = True
        other = leg.other
        assert other is not None
        if not leg.close_sent:
            failure: str | None = None
            if not leg.is_client and 1011 <= code < 3000:
                self.outcome = Outcome.SERVER_ERROR
                failure = f"the backend closed the session with {code}"
            self._begin_ending(not leg.is_client, failure)
            if other.closed or other.close_sent:
                # Nobody to pass it on to: the proxy answers itself.
                leg.send_close(sendable(code), b"")
            else:
                other.send_close_frame(frame)  # its answer comes back to ``leg`` in turn
            self._arm()
        elif other.close_received and not other.close_sent and not other.closed:
            # The answer to the close ``other`` began: it goes back as it came.
            other.send_close_frame(frame)
        self._settle()

    def close_now(self, code: int, reason: bytes) -> None:
        """Close the session on the proxy's account (both legs)."""
        self._begin_ending(False, None)
        self.client.send_close(code, reason)
        self.upstream.send_close(GOING_AWAY if code in (BAD_GATEWAY, INTERNAL_ERROR) else code, b"")
        self._arm()
        self._settle()

    async def close(self, *, code: int = GOING_AWAY, message: bytes = b"") -> bool:
        """Close on the proxy's account and wait for the closing handshakes (shutdown)."""
        self.close_now(code, message)
        if not self._ended:
            if self.finished is None:
                self.finished = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.proxy.settings.server.connect_timeout + 1):
                    await asyncio.shield(self.finished)
        return True

    def violation(self, leg: Leg, what: str, code: int) -> None:
        """``leg`` broke the protocol: it gets ``code`` (1002, 1007), the other side
        1001 if the client did, 1011 if the backend did."""
        leg.deaf = True
        leg.close_received = True  # an offender's answer is not waited for
        if leg.is_shadow:
            leg.send_close(code, b"")
            self.shadow_failed(leg, f"the shadow backend broke the WebSocket protocol: {what}")
            return
        if leg.is_client:
            log.info("route %s: client broke the WebSocket protocol: %s", self.route, what)
            self.outcome = Outcome.CLIENT_CLOSED
            self._begin_ending(False, None)
            self.client.send_close(code, b"")
            self.upstream.send_close(GOING_AWAY, b"")
        else:
            log.warning(
                "route %s backend %s broke the WebSocket protocol: %s",
                self.route,
                self.backend,
                what,
            )
            self.outcome = Outcome.BROKEN
            self._begin_ending(True, "the backend broke the WebSocket protocol")
            self.client.send_close(INTERNAL_ERROR, b"backend connection lost")
            self.upstream.send_close(code, b"")
        self._arm()
        self._settle()

    def too_big(self, leg: Leg) -> None:
        leg.deaf = True
        leg.close_received = True  # an offender's answer is not waited for
        if leg.is_shadow:
            leg.send_close(MESSAGE_TOO_BIG, b"")
            self.shadow_failed(leg, "a shadow message over the size limit")
            return
        self.outcome = Outcome.TOO_LARGE
        self._begin_ending(
            not leg.is_client, None if leg.is_client else "a backend message over the size limit"
        )
        self.client.send_close(MESSAGE_TOO_BIG, b"")
        self.upstream.send_close(GOING_AWAY if leg.is_client else MESSAGE_TOO_BIG, b"")
        self._arm()
        self._settle()

    def lost(self, leg: Leg) -> None:
        if leg.is_shadow:
            self.shadow_failed(leg, "the shadow backend closed the connection")
            return
        if self._ended:
            return
        other = leg.other
        assert other is not None
        if not other.closed and other.transport is not None:
            # It may have been held back for this leg's sake: its close must be read.
            other.transport.resume_reading()
        if not leg.close_received:
            if leg.is_client:
                if self.outcome is Outcome.SUCCESS:
                    self.outcome = Outcome.CLIENT_CLOSED
                self._begin_ending(False, None)
                other.send_close(GOING_AWAY, b"")
            else:
                if self.outcome is Outcome.SUCCESS:
                    self.outcome = Outcome.BROKEN
                self._begin_ending(True, "the backend connection was lost")
                other.send_close(INTERNAL_ERROR, b"backend connection lost")
            self._arm()
        self._settle()

    def _arm(self) -> None:
        if self._timer is None and not self._ended:
            loop = asyncio.get_running_loop()
            wait = self.proxy.settings.server.connect_timeout
            self._timer = loop.call_later(wait, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.client.abort()
        self.upstream.abort()
        self.client.closed = self.upstream.closed = True
        self._settle()

    def _settle(self) -> None:
        """Close each leg whose handshake is done; end the session when both are."""
        client, upstream = self.client, self.upstream
        if client.done:
            client.shut()
        if upstream.done:
            upstream.shut()
        if not (client.done and upstream.done) or self._ended:
            return
        self._ended = True
        self._begin_ending(False, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proxy = self.proxy
        proxy.websockets.discard(self)
        proxy.metrics.websocket_sessions.labels(self.route, self.backend).dec()
        proxy.metrics.count_request(self.route, self.backend, "primary", self.outcome)
        self.ended()
        finished = self.finished
        if finished is not None and not finished.done():
            finished.set_result(None)
