"""Recording backends for the fuzzer: raw asyncio servers on loopback (I/O).

Each backend keeps every byte the proxy sends it, per connection, and reads it with the
strict readers of ``tests.fuzz_wire``: a request that does not read strictly, a frame
that breaks RFC 6455, a message over the proxy's limit are ``Violation``s, kept with the
bytes that showed them. Every request read whole is kept as a ``Received`` and answered
by its path: ``/fz/json`` with a JSON body, ``/fz/ndjson`` and ``/fz/sse`` with a
chunked stream, ``/fz/ws/`` with a WebSocket handshake and then an echo of each message,
anything else with a short text. Each answer carries ``X-Tag``, a name for that one
request (``legacy-17``), so a test can tell which request an answer a client received
belongs to.

The client a request came from is the last address in its ``X-Forwarded-For``: the
fuzzer gives each case its own loopback source address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
from dataclasses import dataclass, field

from tests.fuzz_wire import (
    Frame,
    FrameChecker,
    Malformed,
    Message,
    NeedMore,
    WsMessage,
    build_frame,
    read_frame,
    read_request,
)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class Received:
    """A request a backend read whole."""

    backend: str
    tag: str
    client: str  # the address the proxy named in X-Forwarded-For, "" if none
    request: Message
    shadow: bool  # it carried X-Strangler-Shadow: 1
    connection: int  # the backend connection it came on


@dataclass(frozen=True)
class Violation:
    backend: str
    client: str
    what: str
    data: bytes  # the bytes that showed it (cut short)


@dataclass(frozen=True)
class WsReceived:
    """A WebSocket message (or close frame) a backend read after a handshake."""

    backend: str
    client: str
    shadow: bool
    opcode: int
    payload: bytes


@dataclass
class Record:
    received: list[Received] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    messages: list[WsReceived] = field(default_factory=list)
    last_activity: float = 0.0


def client_of(request: Message) -> str:
    """The last X-Forwarded-For address: the one the proxy added."""
    values = request.values(b"x-forwarded-for")
    if not values:
        return ""
    return values[-1].split(b",")[-1].strip().decode("latin-1")


def _answer(request: Message, tag: str) -> bytes:
    path = request.target
    head_only = request.method == b"HEAD"
    common = b"X-Tag: %b\r\n" % tag.encode()
    if path.startswith(b"/fz/ndjson"):
        body = b'{"type": "agent_started", "tag": "%b"}\n{"type": "agent_completed"}\n' % (
            tag.encode()
        )
        kind = b"application/x-ndjson"
    elif path.startswith(b"/fz/sse"):
        body = b'data: {"type": "agent_started", "tag": "%b"}\n\ndata: {"type": "end"}\n\n' % (
            tag.encode()
        )
        kind = b"text/event-stream"
    elif path.startswith(b"/fz/json"):
        body = b'{"tag": "%b", "size": %d}' % (tag.encode(), len(request.body))
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n\r\n"
        return head % (common, len(body)) + (b"" if head_only else body)
    else:
        body = tag.encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%bContent-Length: %d\r\n\r\n"
        return head % (common, len(body)) + (b"" if head_only else body)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\n%bTransfer-Encoding: chunked\r\n\r\n" % (
        kind,
        common,
    )
    if head_only:
        return head
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in body.splitlines(True))
    return head + chunks + b"0\r\n\r\n"


def _handshake(request: Message) -> bytes | None:
    """The 101 answer to a WebSocket handshake, None if it is not a valid one."""
    key = request.value(b"sec-websocket-key")
    if (
        request.method != b"GET"
        or b"websocket" not in request.tokens(b"upgrade")
        or b"upgrade" not in request.tokens(b"connection")
        or request.value(b"sec-websocket-version") != b"13"
        or key is None
    ):
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    protocol = request.value(b"sec-websocket-protocol")
    chosen = b""
    if protocol:
        chosen = b"Sec-WebSocket-Protocol: %b\r\n" % protocol.split(b",")[0].strip()
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %b\r\n%b\r\n" % (accept, chosen)
    )


class _BackendConnection(asyncio.Protocol):
    def __init__(self, backend: RecordingBackend, number: int) -> None:
        self.backend = backend
        self.number = number
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.websocket: FrameChecker | None = None
        self.client = ""
        self.shadow = False
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.backend.open.add(self)

    def data_received(self, data: bytes) -> None:
        record = self.backend.record
        record.last_activity = asyncio.get_running_loop().time()
        if self.broken:
            return
        self.buffer += data
        try:
            if self.websocket is not None:
                self._frames()
            else:
                self._requests()
        except Malformed as exc:
            self._violation(str(exc), self.buffer)

    def _violation(self, what: str, data: bytes) -> None:
        self.broken = True
        self.backend.record.violations.append(
            Violation(self.backend.name, self.client, what, data[:2000])
        )
        assert self.transport is not None
        if self.websocket is not None:
            self.transport.write(build_frame(0x8, struct.pack("!H", 1002)))
        else:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.close()

    def _requests(self) -> None:
        assert self.transport is not None
        while self.buffer and self.websocket is None:
            try:
                request = read_request(self.buffer)
            except NeedMore:
                return
            self.buffer = self.buffer[request.size :]
            self.client = client_of(request)
            self.shadow = request.value(b"x-strangler-shadow") is not None
            tag = self.backend.next_tag()
            self.backend.record.received.append(
                Received(self.backend.name, tag, self.client, request, self.shadow, self.number)
            )
            if request.target.startswith(b"/fz/ws/") and request.tokens(b"upgrade"):
                answer = _handshake(request)
                if answer is None:
                    self.transport.write(
                        b"HTTP/1.1 400 Bad Request\r\nX-Tag: %b\r\nContent-Length: 0\r\n\r\n"
                        % tag.encode()
                    )
                    continue
                self.transport.write(answer)
                self.websocket = FrameChecker(masked=True, max_message=self.backend.max_message)
                if self.buffer:
                    self._frames()
                return
            self.transport.write(_answer(request, tag))

    def _frames(self) -> None:
        assert self.transport is not None and self.websocket is not None
        while self.buffer and not self.broken:
            try:
                frame = read_frame(self.buffer, max_payload=self.backend.max_message)
            except NeedMore:
                return
            raw, self.buffer = self.buffer[: frame.size], self.buffer[frame.size :]
            try:
                checked = self.websocket.check(frame)
            except Malformed as exc:
                self._violation(str(exc), raw)
                return
            self._echo(frame, checked)

    def _echo(self, frame: Frame, checked: WsMessage | Frame | None) -> None:
        assert self.transport is not None
        record = self.backend.record
        if isinstance(checked, WsMessage):
            record.messages.append(
                WsReceived(
                    self.backend.name, self.client, self.shadow, checked.opcode, checked.payload
                )
            )
            self.transport.write(build_frame(checked.opcode, checked.payload))
        elif isinstance(checked, Frame):
            if checked.opcode == 0x9:
                self.transport.write(build_frame(0xA, checked.payload))
            elif checked.opcode == 0x8:
                record.messages.append(
                    WsReceived(self.backend.name, self.client, self.shadow, 0x8, frame.payload)
                )
                self.transport.write(build_frame(0x8, frame.payload[:2]))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.open.discard(self)
        if self.broken or not self.buffer:
            return
        # What came before the close must still be the start of something well-formed.
        try:
            if self.websocket is not None:
                read_frame(self.buffer, max_payload=self.backend.max_message)
            else:
                read_request(self.buffer)
        except NeedMore:
            return
        except Malformed as exc:
            self.backend.record.violations.append(
                Violation(self.backend.name, self.client, str(exc), self.buffer[:2000])
            )


class RecordingBackend:
    """One backend (``legacy`` or ``candidate``) listening on 127.0.0.1."""

    def __init__(self, name: str, record: Record, max_message: int) -> None:
        self.name = name
        self.record = record
        self.max_message = max_message
        self.server: asyncio.Server | None = None
        self._tags = 0
        self._connections = 0
        self.open: set[_BackendConnection] = set()

    def next_tag(self) -> str:
        self._tags += 1
        return f"{self.name}-{self._tags}"

    def _protocol(self) -> _BackendConnection:
        self._connections += 1
        return _BackendConnection(self, self._connections)

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for connection in list(self.open):
                if connection.transport is not None:
                    connection.transport.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)
