"""WebSocket sessions nobody watches, relayed frame by frame on raw transports (I/O).

On a route that neither shadows nor checks anything, a session needs no message
objects: the proxy performs both handshakes itself, then passes the frames through as
the bytes they are. A client's frames are masked, as a server expects them; a
backend's are not, as a client expects them; so both directions relay verbatim, every
frame complete in one read going out in one write. The proxy still reads every frame
header: it enforces the message size limit (1009), refuses what RFC 6455 forbids
(1002 to the offender), keeps the turn timing for the first-event metric, takes part
in the closing handshake (codes and reasons pass through unchanged) and closes on its
own account with 1014 (backend unreachable or refusing), 1011 (backend timeout or
gone) and 1001 (shutdown), as ``proxy.websocket_relay`` does for watched sessions.
A side that cannot keep up stops the reading of the other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import socket
import ssl
from time import perf_counter
from typing import cast

import httptools
from aiohttp import WSCloseCode

from proxy.context import Proxy
from proxy.headers import BACKEND_HEADER, to_wire, upstream_request_block
from proxy.metrics import Outcome
from proxy.routing import UNROUTED, Backend, Route
from proxy.server import Request
from proxy.upstream import parse_origin
from proxy.websocket_relay import sendable

log = logging.getLogger("strangler.relay")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HANDSHAKE = 64 * 1024

GOING_AWAY = WSCloseCode.GOING_AWAY
PROTOCOL_ERROR = WSCloseCode.PROTOCOL_ERROR
MESSAGE_TOO_BIG = WSCloseCode.MESSAGE_TOO_BIG
INTERNAL_ERROR = WSCloseCode.INTERNAL_ERROR
BAD_GATEWAY = WSCloseCode.BAD_GATEWAY


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    payload = code.to_bytes(2, "big") + reason[:123]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    mask = os.urandom(4)
    body = int.from_bytes(payload, "big") ^ int.from_bytes((mask * 32)[: len(payload)], "big")
    return bytes((0x88, 0x80 | len(payload))) + mask + body.to_bytes(len(payload), "big")


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(len(payload), "big")


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


async def _open_upstream(
    proxy: Proxy,
    backend: Backend,
    target: str,
    block: bytes,
    offered: list[str],
) -> tuple[asyncio.Transport, _Handshake, str | None]:
    """Connect to the backend and complete its handshake; HandshakeFailed if not."""
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
        return transport, handshake, chosen
    except BaseException:
        if transport is not None:
            transport.abort()
        raise


def _client_key(request: Request) -> str | None:
    key = request.header("sec-websocket-key")
    if key is None or request.header("sec-websocket-version") != "13":
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return key


async def relay_websocket_direct(
    request: Request, proxy: Proxy, route: Route | None, backend: Backend
) -> None:
    """Both handshakes, then the session runs by callbacks (see ``Session``)."""
    label = route.name if route is not None else UNROUTED
    key = _client_key(request)
    if key is None:
        request.respond(
            400,
            "",
            [("Content-Type", "application/json"), (BACKEND_HEADER, backend)],
            b'{"error": "bad_request", "detail": "not a valid WebSocket handshake"}',
        )
        return
    offered = [
        token.strip()
        for name, value in request.headers
        if name.lower() == "sec-websocket-protocol"
        for token in value.split(",")
        if token.strip()
    ]
    block = upstream_request_block(
        request.raw_headers,
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
        websocket=True,
    )
    session = Session(proxy, label, backend)
    try:
        upstream, handshake, chosen = await _open_upstream(
            proxy, backend, request.target, block, offered
        )
    except HandshakeFailed as failure:
        log.warning("route %s backend %s: websocket %s", label, backend, failure)
        session.outcome = failure.outcome
        transport, rest = request.detach()
        transport.write(_switching(key, None, backend))
        session.attach(transport, rest, None, b"")
        # Every reason starts "backend ...": told by role, never by address.
        session.close_now(failure.code, f"{backend.value} {failure}".encode()[:120])
        return
    transport, rest = request.detach()
    transport.write(_switching(key, chosen, backend))
    session.attach(transport, rest, upstream, handshake.rest)
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


class _Leg(asyncio.Protocol):
    """One side of a session: the client's connection or the backend's."""

    __slots__ = (
        "close_received",
        "close_sent",
        "closed",
        "deaf",
        "fragmented",
        "is_client",
        "message_size",
        "other",
        "pending",
        "session",
        "transport",
    )

    def __init__(self, session: Session, is_client: bool) -> None:
        self.session = session
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.other: _Leg | None = None
        self.pending = bytearray()  # an incomplete frame
        self.fragmented = False
        self.message_size = 0
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
                session.violation(self, "reserved bits or wrong masking")
                return
            # The header is checked as soon as it is in (an oversized message is refused
            # before its payload arrives); the message state changes only once the whole
            # frame is, since an incomplete frame is parsed again with the next read.
            size = length
            if opcode >= 8:
                if length > 125 or not fin or opcode > 10:
                    self._forward(view, start, pos)
                    session.violation(self, "malformed control frame")
                    return
            elif opcode == 0:
                if not self.fragmented:
                    self._forward(view, start, pos)
                    session.violation(self, "continuation without a message")
                    return
                size = self.message_size + length
            elif opcode <= 2:
                if self.fragmented:
                    self._forward(view, start, pos)
                    session.violation(self, "new message inside a fragmented one")
                    return
            else:
                self._forward(view, start, pos)
                session.violation(self, f"reserved opcode {opcode}")
                return
            if size > limit and opcode < 8:
                self._forward(view, start, pos)
                session.too_big(self)
                return
            end = pos + head + length
            if end > n:
                break
            if opcode == 8:
                self._forward(view, start, pos)
                payload = view[pos + head : end]
                if masked:
                    payload = _unmask(payload, view[pos + head - 4 : pos + head])
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                session.close_received(self, view[pos:end], code)
                pending.clear()
                return
            if opcode < 8:
                self.message_size = size
                self.fragmented = not fin
                # A turn starts when a client message is complete; its first event is
                # the backend's first data frame after that.
                if is_client:
                    if fin and session.turn_started is None:
                        session.turn_started = perf_counter()
                elif session.turn_started is not None:
                    session.first_event()
            pos = end
        self._forward(view, start, pos)
        if pos == n:
            pending.clear()
        elif held:
            del pending[:pos]
        else:
            pending += view[pos:]

    def _forward(self, view: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        other = self.other
        if other is None or other.close_sent or other.closed or other.transport is None:
            return
        if start == 0 and end == len(view):
            other.transport.write(view)
        else:
            other.transport.write(view[start:end])

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


class Session:
    """A relayed session: two legs, one closing handshake, its metrics."""

    def __init__(self, proxy: Proxy, route: str, backend: Backend) -> None:
        self.proxy = proxy
        self.route = route
        self.backend = backend
        self.limit = proxy.settings.server.max_ws_message_bytes
        self.outcome = Outcome.SUCCESS
        self.turn_started: float | None = None
        self.batch = proxy.metrics.batch(route, backend, "primary")
        self.client = _Leg(self, True)
        self.upstream = _Leg(self, False)
        self.client.other, self.upstream.other = self.upstream, self.client
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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

    # -- closing

    def close_received(self, leg: _Leg, frame: bytes, code: int) -> None:
        """A close frame came from ``leg``: it began the closing handshake, or it
        answers a close the proxy sent or passed on to it."""
        leg.close_received = True
        leg.deaf = True
        other = leg.other
        assert other is not None
        if not leg.close_sent:
            if not leg.is_client and 1011 <= code < 3000:
                self.outcome = Outcome.SERVER_ERROR
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
        self.client.send_close(code, reason)
        self.upstream.send_close(GOING_AWAY if code in (BAD_GATEWAY, INTERNAL_ERROR) else code, b"")
        self._arm()
        self._settle()

    async def close(self, *, code: int = GOING_AWAY, message: bytes = b"") -> bool:
        """Close on the proxy's account and wait for the closing handshakes (shutdown)."""
        self.close_now(code, message)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.proxy.settings.server.connect_timeout + 1):
                await asyncio.shield(self.finished)
        return True

    def violation(self, leg: _Leg, what: str) -> None:
        leg.deaf = True
        leg.close_received = True  # an offender's answer is not waited for
        if leg.is_client:
            log.info("route %s: client broke the WebSocket protocol: %s", self.route, what)
            self.outcome = Outcome.CLIENT_CLOSED
            self.client.send_close(PROTOCOL_ERROR, b"")
            self.upstream.send_close(GOING_AWAY, b"")
        else:
            log.warning(
                "route %s backend %s broke the WebSocket protocol: %s",
                self.route,
                self.backend,
                what,
            )
            self.outcome = Outcome.BROKEN
            self.client.send_close(INTERNAL_ERROR, b"backend connection lost")
            self.upstream.send_close(PROTOCOL_ERROR, b"")
        self._arm()
        self._settle()

    def too_big(self, leg: _Leg) -> None:
        leg.deaf = True
        leg.close_received = True  # an offender's answer is not waited for
        self.outcome = Outcome.TOO_LARGE
        self.client.send_close(MESSAGE_TOO_BIG, b"")
        self.upstream.send_close(GOING_AWAY if leg.is_client else MESSAGE_TOO_BIG, b"")
        self._arm()
        self._settle()

    def lost(self, leg: _Leg) -> None:
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
                other.send_close(GOING_AWAY, b"")
            else:
                if self.outcome is Outcome.SUCCESS:
                    self.outcome = Outcome.BROKEN
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proxy = self.proxy
        proxy.websockets.discard(self)
        proxy.metrics.websocket_sessions.labels(self.route, self.backend).dec()
        proxy.metrics.count_request(self.route, self.backend, "primary", self.outcome)
        if not self.finished.done():
            self.finished.set_result(None)
