"""A backend on raw asyncio sockets that answers each request with its own id and, as
told, misbehaves on the wire: a second response after the first, garbage after it, an
answer while the connection is idle, interim and switching responses, framing that lies.

Every response names the request it answers (``X-Request-Id`` in the head, and a JSON
body ``{"id": ...}``), so whoever receives it can tell whether it got its own answer. A forged
response names another request this backend served (the latest one on another
connection), so a response crossed over to the wrong client shows as someone else's id.
The backend also notes whether a request ever arrived while the one before it on the same
connection was unanswered (pipelining, which the pool must never do).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

# Faults that ride in the same write as the real response (so they reach the proxy no
# later than its last byte) or replace it; each is a name the test can count.
IN_EXCHANGE: Final = (
    "extra response",  # the response, then a whole second one naming another request
    "garbage after",  # the response, then bytes that are no response at all
    "continue first",  # a 100 Continue, then the response: legitimate
    "early hints first",  # a 103 Early Hints, then the response: legitimate
    "switching protocols",  # a 101 to a request that asked for no upgrade
    "length and chunked",  # Content-Length and Transfer-Encoding both
    "keep-alive but close-framed",  # no length, no close, the body ends with the connection
    "answer then close",  # the answer, then the connection closes unannounced
    "head with a body",  # a HEAD answered with a body (only for HEAD)
    "answer before the body",  # answered from the head, the body never read (only for POST)
)
# Faults sent while a connection is idle, between the proxy's requests.
WHILE_IDLE: Final = ("unsolicited response", "unsolicited garbage")

_ID: Final = re.compile(rb"\r\nx-request-id: *([^\r\n]*)", re.IGNORECASE)
_LENGTH: Final = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def answer_body(request_id: bytes) -> bytes:
    return b'{"id": "%b"}' % request_id


def response(request_id: bytes, *, head_only: bool = False, extra: bytes = b"") -> bytes:
    body = answer_body(request_id)
    head = b"HTTP/1.1 200 OK\r\nX-Request-Id: %b\r\n%bContent-Length: %d\r\n\r\n" % (
        request_id,
        extra,
        len(body),
    )
    return head if head_only else head + body


@dataclass
class Faults:
    """What to do and what happened: the odds of each fault, and the counts."""

    rng: random.Random
    in_exchange: float = 0.3  # the share of exchanges that misbehave
    injected: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    pipelined: int = 0
    last_id: bytes = b"nobody"


class Connection(asyncio.Protocol):
    def __init__(self, backend: MisbehavingBackend) -> None:
        self.backend = backend
        self.faults = backend.faults
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.number = backend.accepted
        backend.accepted += 1

    @property
    def idle(self) -> bool:
        return not self.closed and not self.buffer and self.transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.backend.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.backend.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[: end + 4]
            length = _LENGTH.search(head)
            size = end + 4 + (int(length.group(1)) if length else 0)
            fault = self._choose(head)
            if fault == "answer before the body":
                self._answer(head, fault)
                return
            if len(self.buffer) < size:
                return
            self.buffer = self.buffer[size:]
            if self.buffer:
                # The next request came before this one was answered.
                self.faults.pipelined += 1
            self._answer(head, fault)

    def _choose(self, head: bytes) -> str | None:
        faults = self.faults
        if faults.rng.random() >= faults.in_exchange:
            return None
        fault = faults.rng.choice(IN_EXCHANGE)
        if fault == "head with a body" and not head.startswith(b"HEAD "):
            return None
        if fault == "answer before the body" and not head.startswith(b"POST "):
            return None
        return fault

    def _answer(self, head: bytes, fault: str | None) -> None:
        transport = self.transport
        assert transport is not None
        faults = self.faults
        faults.requests += 1
        found = _ID.search(head)
        request_id = found.group(1) if found else b"none"
        head_only = head.startswith(b"HEAD ")
        other, faults.last_id = faults.last_id, request_id
        if fault is not None:
            faults.injected[fault] += 1
        if fault is None:
            transport.write(response(request_id, head_only=head_only))
        elif fault == "extra response":
            transport.write(response(request_id, head_only=head_only) + response(other))
        elif fault == "garbage after":
            junk = bytes(faults.rng.randrange(256) for _ in range(faults.rng.randrange(1, 40)))
            transport.write(response(request_id, head_only=head_only) + junk)
        elif fault == "continue first":
            transport.write(
                b"HTTP/1.1 100 Continue\r\n\r\n" + response(request_id, head_only=head_only)
            )
        elif fault == "early hints first":
            transport.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                + response(request_id, head_only=head_only)
            )
        elif fault == "switching protocols":
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
                + response(other)
            )
        elif fault == "length and chunked":
            body = answer_body(request_id)
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), len(body), body) + response(other)
            )
        elif fault == "keep-alive but close-framed":
            body = b"" if head_only else answer_body(request_id)
            transport.write(b"HTTP/1.1 200 OK\r\nX-Request-Id: %b\r\n\r\n%b" % (request_id, body))
            self._close()
        elif fault == "answer then close":
            transport.write(response(request_id, head_only=head_only))
            self._close()
        elif fault == "head with a body":
            transport.write(response(request_id))
        elif fault == "answer before the body":
            transport.write(response(request_id, extra=b"Connection: close\r\n"))
            self._close()

    def _close(self) -> None:
        """Close at once: the FIN follows the response now, not a turn of the loop later."""
        self.closed = True
        self.buffer = b""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        self.transport.close()

    def babble(self) -> str:
        """Send something nobody asked for; the fault's name."""
        assert self.transport is not None
        faults = self.faults
        fault = faults.rng.choice(WHILE_IDLE)
        if fault == "unsolicited response":
            self.transport.write(response(faults.last_id))
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        faults.injected[fault] += 1
        return fault


class MisbehavingBackend:
    """The server: ``async with`` it, point the proxy at ``origin``, call ``babble`` when
    the proxy's connections to it should be idle."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.connections: set[Connection] = set()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> MisbehavingBackend:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()

    def babble(self, share: float) -> int:
        """Send unsolicited bytes on about ``share`` of the idle connections."""
        rng = self.faults.rng
        idle = sorted((c for c in self.connections if c.idle), key=lambda c: c.number)
        chosen = [c for c in idle if rng.random() < share]
        for conn in chosen:
            conn.babble()
        return len(chosen)
