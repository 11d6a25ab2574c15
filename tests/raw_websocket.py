"""WebSocket peers for the tests: frames built and read by hand, a raw client that writes
its handshake itself (and the fixture that opens them), a raw backend whose handshake the
test answers, and an aiohttp backend that echoes and reports what it saw."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from proxy.app import ProxyServer

ServerFactory = Callable[..., Awaitable[TestServer]]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- frames ------------------------------------------------------------------------------


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def xor(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One frame; masked (as a client sends) unless ``mask`` is False."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = bytes((b0, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + xor(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


class Frame(NamedTuple):
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes  # unmasked

    @property
    def close(self) -> tuple[int, str]:
        assert self.opcode == CLOSE, f"expected a close frame, got opcode {self.opcode}"
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode()


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    b0, b1 = await reader.readexactly(2)
    length = b1 & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    masked = bool(b1 & 0x80)
    key = await reader.readexactly(4) if masked else b""
    payload = await reader.readexactly(length)
    if masked:
        payload = xor(payload, key)
    return Frame(bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, masked, payload)


async def next_frame(reader: asyncio.StreamReader) -> Frame:
    return await asyncio.wait_for(read_frame(reader), 5)


async def at_eof(reader: asyncio.StreamReader) -> bool:
    """Whether the peer ends the connection (within 5 s): EOF or a reset."""
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return True
    return rest == b""


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    for _ in range(int(within / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


# -- a raw client ------------------------------------------------------------------------


class WsClient:
    """A client on a plain socket: it writes the handshake and the frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> WsClient:
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            return cls(reader, writer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def send_head(self, lines: list[str]) -> None:
        self.writer.write(("".join(f"{line}\r\n" for line in lines) + "\r\n").encode())
        await self.writer.drain()

    async def read_head(self) -> int:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        return self.status

    async def handshake(self, port: int, *, protocols: str | None = None) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws/agent HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            "X-User-Id: user-1",
        ]
        if protocols is not None:
            lines.append(f"Sec-WebSocket-Protocol: {protocols}")
        await self.send_head(lines)
        assert await self.read_head() == 101
        assert self.headers["sec-websocket-accept"] == accept_for(key)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(
        self, opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
    ) -> None:
        await self.send(frame(opcode, payload, fin=fin, mask=mask, rsv=rsv))

    async def send_bytewise(self, data: bytes) -> None:
        """One byte per write, with a pause so that the proxy reads each on its own."""
        for i in range(len(data)):
            self.writer.write(data[i : i + 1])
            await self.writer.drain()
            await asyncio.sleep(0.001)

    async def recv(self) -> Frame:
        got = await next_frame(self.reader)
        assert not got.masked, "a frame to the client must not be masked"
        return got

    async def recv_close(self) -> tuple[int, str]:
        return (await self.recv()).close

    async def close_handshake(self, code: int = 1000, reason: bytes = b"") -> tuple[int, str]:
        """Send a close, return the answer, and expect the proxy to end the connection."""
        await self.send_frame(CLOSE, close_payload(code, reason))
        answer = await self.recv_close()
        assert await at_eof(self.reader)
        return answer

    async def aclose(self) -> None:
        await close_writer(self.writer)


Connect = Callable[..., Coroutine[Any, Any, WsClient]]


class RawBackend:
    """A backend on plain sockets: the test answers the handshake and writes the frames."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter, str]] = (
            asyncio.Queue()
        )
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        key = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip()
        await self.accepted.put((reader, writer, key))

    async def next(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        return await asyncio.wait_for(self.accepted.get(), 5)

    async def close(self) -> None:
        for writer in self.writers:
            await close_writer(writer)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def switching(key: str, extra: str = "") -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_for(key)}\r\n{extra}\r\n"
    ).encode()


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open raw clients to a proxy (handshake done unless ``handshake=False``)."""
    opened: list[WsClient] = []

    async def open_client(
        server: ProxyServer,
        *,
        handshake: bool = True,
        protocols: str | None = None,
        rcvbuf: int | None = None,
    ) -> WsClient:
        client = await WsClient.open(server.proxy_port, rcvbuf=rcvbuf)
        opened.append(client)
        if handshake:
            await client.handshake(server.proxy_port, protocols=protocols)
        return client

    yield open_client
    for client in opened:
        await client.aclose()


class EchoBackend:
    """An aiohttp WebSocket backend that echoes and reports what it saw."""

    def __init__(self) -> None:
        self.connections = 0
        self.messages: asyncio.Queue[tuple[str, str | bytes]] = asyncio.Queue()
        self.closes: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.ended: asyncio.Queue[None] = asyncio.Queue()
        self.answer = (1000, b"")  # the close it answers a client's close with

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws/agent", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        ws = web.WebSocketResponse(autoclose=False, max_msg_size=0)
        await ws.prepare(request)
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    await self.messages.put(("text", msg.data))
                    if msg.data == "ping-then-answer":
                        await ws.ping(b"heartbeat")
                        await asyncio.sleep(0.2)
                        await ws.send_str("answer")
                    else:
                        await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await self.messages.put(("binary", msg.data))
                    await ws.send_bytes(msg.data)
                elif msg.type is WSMsgType.CLOSE:
                    await self.closes.put((msg.data, msg.extra))
                    await ws.close(code=self.answer[0], message=self.answer[1])
                    break
                else:
                    await self.closes.put((None, msg.type.name))
                    break
        finally:
            self.ended.put_nowait(None)
        return ws


def url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"
