"""Loopback backend for the benchmark: one process serves JSON, NDJSON and WebSocket on one port.

Why this shape: the ratios the benchmark reports (strangler/nginx, strangler/direct) only mean
something if the backend is not what limits the proxied paths, and on a 2-core machine every
microsecond it spends is taken from the proxy under test. A bare ``asyncio.Protocol`` on uvloop
with ``httptools`` (the llhttp parser uvicorn uses) writes every response synchronously from
the parser callback, with no task, no request object and no middleware per request. Measured
here with wrk at 50 connections it answered about 110 000 small JSON requests per second
against about 36 000 for the same endpoint as an aiohttp application. The WebSocket endpoint
lives on the same port (the proxy has one URL per backend), so it is a minimal RFC 6455 server
inside the same protocol: handshake, unmasking of client frames, ping/pong and close. It
carried about 1.3 times the events per second of an aiohttp ``WebSocketResponse`` handler.
It declines permessage-deflate
by not answering the offer, which RFC 6455 allows. One process per backend: a second
``SO_REUSEPORT`` process (``--processes 2``) lowered the direct path here, since it takes CPU
from the load generator on the same two cores.

Endpoints (any path outside these answers 404):

- ``GET|POST /api/json``: one small JSON object naming the backend and the user, with a
  request id that differs per backend and per request.
- ``GET|POST /api/stream``: chunked ``application/x-ndjson``, five agent events, each line
  written with its own ``write`` so the proxy sees a stream, not one buffer.
- ``GET /ws/agent`` (WebSocket): every client data message is answered by five JSON event
  frames, again one ``write`` each.
- ``GET /healthz``: ``ok``; ``GET /_stats``: requests answered so far, and how many of them
  carried ``X-Strangler-Shadow`` (a shadow or a mirror), so the benchmark can check that a
  proxy really sent the shadow traffic it claims.

Legacy and candidate answer one request with the same events except for what legitimately
differs between two runs: ``run_id``, ``tool_call_id`` and the JSON ``request_id`` (named
after the backend and its run counter), ``timestamp``, ``duration_ms`` and the
thinking ``text``. A route normalised with the demo's rules (ignore ``timestamp`` and
``duration_ms``, canonical ``run_id`` and ``tool_call_id``, ``text`` by presence) therefore
sees every shadowed exchange match, after real normalisation work.

``--hang`` starts a backend that accepts connections, reads whatever is sent and never
answers: the shadow backend of the "hanging shadow" benchmark.

Run: ``python bench/backend.py --name legacy --port 19001``. Pure I/O; no state beyond counters.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import signal
from typing import Any, cast

import httptools
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the project
    uvloop = None  # type: ignore[assignment]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENT_TYPES = (
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
)
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


THOUGHTS = {
    "legacy": b"Let me check which tool fits.",
    "candidate": b"First I'll look at the request.",
}


def agent_events(backend: str, user: str, run: int) -> list[bytes]:
    """The five events of one agent run, serialised, in the order the contract expects.

    Ids, timestamp, duration and thinking text differ between backends and between runs;
    the rest is the same, so that a normalised comparison matches."""
    run_id = f"run-{backend}-{run}"
    tool_call_id = f"call-{backend}-{run}"
    timestamp = 1_767_225_600_000 + run  # a stand-in for a clock reading (ms)
    text = THOUGHTS.get(backend, b"thinking").decode()
    return [
        orjson.dumps(
            {"type": "agent_started", "run_id": run_id, "user_id": user, "timestamp": timestamp}
        ),
        orjson.dumps(
            {
                "type": "agent_thinking",
                "run_id": run_id,
                "user_id": user,
                "timestamp": timestamp,
                "text": text,
            }
        ),
        orjson.dumps(
            {
                "type": "tool_executing",
                "run_id": run_id,
                "user_id": user,
                "timestamp": timestamp,
                "tool": "search",
                "tool_call_id": tool_call_id,
                "arguments": {"query": "refund policy", "limit": 2},
            }
        ),
        orjson.dumps(
            {
                "type": "tool_completed",
                "run_id": run_id,
                "user_id": user,
                "timestamp": timestamp,
                "tool_call_id": tool_call_id,
                "result": {"hits": 2},
                "duration_ms": run % 300,
            }
        ),
        orjson.dumps(
            {
                "type": "agent_completed",
                "run_id": run_id,
                "user_id": user,
                "timestamp": timestamp,
                "answer": "2 results for 'refund policy'.",
            }
        ),
    ]


def ws_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """An unmasked, final server frame."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte mask as one big integer: fast for the small frames used here."""
    size = len(payload)
    if not size:
        return payload
    stream = (key * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return value.to_bytes(size, "big")


class Backend:
    """What every connection of one backend shares: its name and its counters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs = 0
        self.requests = 0
        self.shadow_requests = 0

    def next_run(self) -> int:
        self.runs += 1
        return self.runs


class BackendProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, which may turn into a WebSocket."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.user = ""
        self.ws_key = b""
        self.body_size = 0
        self.shadow = False
        self.ws_buffer: bytearray | None = None

    # asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.ws_buffer is not None:
            self.ws_buffer += data
            self.ws_process()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self.accept_websocket(data[offset:])
        except httptools.HttpParserError:
            self.respond(400, b"text/plain", b"bad request", keep_alive=False)

    # httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.user = ""
        self.ws_key = b""
        self.body_size = 0
        self.shadow = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"x-user-id":
            self.user = value.decode("latin-1")
        elif lowered == b"sec-websocket-key":
            self.ws_key = value
        elif lowered == b"x-strangler-shadow":
            self.shadow = True

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # answered from the HttpParserUpgrade handler
        path = self.url.split(b"?", 1)[0]
        keep_alive = self.parser.should_keep_alive()
        backend = self.backend
        if path == b"/api/json":
            body = orjson.dumps(
                {
                    "backend": backend.name,
                    "request_id": f"req-{backend.name}-{backend.next_run()}",
                    "user_id": self.user,
                    "ok": True,
                    "received": self.body_size,
                }
            )
            self.respond(200, b"application/json", body, keep_alive)
        elif path == b"/api/stream":
            self.stream(keep_alive)
        elif path == b"/healthz":
            self.respond(200, b"text/plain", b"ok", keep_alive)
            return
        elif path == b"/_stats":
            stats = {"requests": backend.requests, "shadow_requests": backend.shadow_requests}
            self.respond(200, b"application/json", orjson.dumps(stats), keep_alive)
            return
        else:
            self.respond(404, b"application/json", b'{"error":"not found"}', keep_alive)
        backend.requests += 1
        backend.shadow_requests += self.shadow

    # HTTP responses -----------------------------------------------------------------------

    def respond(self, status: int, content_type: bytes, body: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status,
            reason,
            content_type,
            len(body),
            b"" if keep_alive else b"connection: close\r\n",
        )
        transport.write(head + body)
        if not keep_alive:
            transport.close()

    def stream(self, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        events = agent_events(self.backend.name, self.user, self.backend.next_run())
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
            b"transfer-encoding: chunked\r\n%s\r\n"
            % (b"" if keep_alive else b"connection: close\r\n")
        )
        last = len(events) - 1
        for index, event in enumerate(events):
            chunk = b"%x\r\n%s\n\r\n" % (len(event) + 1, event)
            if index == 0:
                chunk = head + chunk
            if index == last:
                chunk += b"0\r\n\r\n"
            transport.write(chunk)
        if not keep_alive:
            transport.close()

    # WebSocket ----------------------------------------------------------------------------

    def accept_websocket(self, rest: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.url.split(b"?", 1)[0] != b"/ws/agent" or not self.ws_key:
            self.respond(404, b"application/json", b'{"error":"not found"}', keep_alive=False)
            return
        accept = base64.b64encode(hashlib.sha1(self.ws_key + WS_GUID).digest())
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
            b"connection: Upgrade\r\nsec-websocket-accept: %s\r\n\r\n" % accept
        )
        self.ws_buffer = bytearray(rest)
        if rest:
            self.ws_process()

    def ws_process(self) -> None:
        buffer = self.ws_buffer
        transport = self.transport
        assert buffer is not None and transport is not None
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            size = second & 0x7F
            start = 2
            if size == 126:
                if len(buffer) < 4:
                    return
                size = int.from_bytes(buffer[2:4], "big")
                start = 4
            elif size == 127:
                if len(buffer) < 10:
                    return
                size = int.from_bytes(buffer[2:10], "big")
                start = 10
            masked = second & 0x80
            key = b""
            if masked:
                if len(buffer) < start + 4:
                    return
                key = bytes(buffer[start : start + 4])
                start += 4
            end = start + size
            if len(buffer) < end:
                return
            payload = bytes(buffer[start:end])
            del buffer[:end]
            if masked:
                payload = unmask(payload, key)
            self.ws_message(first & 0x80, first & 0x0F, payload)
            if transport.is_closing():
                return

    def ws_message(self, fin: int, opcode: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if fin:
                events = agent_events(self.backend.name, self.user, self.backend.next_run())
                for event in events:
                    transport.write(ws_frame(event))
        elif opcode == OP_PING:
            transport.write(ws_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            transport.write(ws_frame(payload[:2] or b"\x03\xe8", OP_CLOSE))
            transport.close()


class HangingProtocol(asyncio.Protocol):
    """Accepts a connection, reads what comes and never answers: a backend that hangs.

    It keeps the transport open until the client gives up, the way a wedged server behind
    a live socket does, so that only the proxy's own limits and timeouts end the wait."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours too


async def serve(name: str, host: str, port: int, hang: bool = False) -> None:
    loop = asyncio.get_running_loop()
    backend = Backend(name)

    def protocol() -> asyncio.Protocol:
        return HangingProtocol() if hang else BackendProtocol(backend)

    server = await loop.create_server(protocol, host, port, backlog=4096, reuse_port=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="legacy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--processes", type=int, default=1, help="listeners sharing the port (SO_REUSEPORT)"
    )
    parser.add_argument("--hang", action="store_true", help="accept, read, never answer")
    args: Any = parser.parse_args(argv)
    # Fork before any event loop exists; every process binds its own SO_REUSEPORT socket
    # and the kernel spreads connections across them.
    children = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            run(args.name, args.host, args.port, args.hang)
            os._exit(0)
        children.append(pid)
    try:
        run(args.name, args.host, args.port, args.hang)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def run(name: str, host: str, port: int, hang: bool = False) -> None:
    if uvloop is not None:
        uvloop.run(serve(name, host, port, hang))
    else:
        asyncio.run(serve(name, host, port, hang))


if __name__ == "__main__":
    main()
