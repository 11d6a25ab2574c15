"""WebSocket load generator: N sessions, each looping "send one message, receive five events".

It is a bare ``asyncio.Protocol`` on uvloop rather than aiohttp's client, for the same reason
the backend is: on two cores the load generator competes with the proxy under test, so every
microsecond it spends per frame lowers the ceiling of the direct path and flatters the
proxies' ratios. A session does its whole loop in protocol callbacks (no task, no await per
frame): on the terminal ``agent_completed`` frame it records the turn's latency and sends the
next message at once. Client frames are masked as RFC 6455 requires; each session's message
is constant, so it is masked once. Every event frame is checked for the session's own user id
(a cheap isolation check: a foreign event is counted, never silently accepted).

Timeline: connect all sessions, run ``--warmup`` seconds, then count events over a fixed
``--duration`` window. It prints ``MEASURE_START`` and ``MEASURE_END`` lines at the window's
edges (so a supervisor can sample other processes' CPU over exactly that window) and then one
``BENCH_JSON {...}`` line: events/s, turns/s, turn latency p50/p99 (send to the fifth event),
errors, isolation violations and this process's CPU use over the window.

Run: ``python bench/wsload.py --url ws://127.0.0.1:19001/ws/agent --sessions 200``; with
``--url`` given several times, sessions take the URLs in turn. Pure I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the project
    uvloop = None  # type: ignore[assignment]

TERMINAL = b'"agent_completed"'
EVENTS_PER_TURN = 5
CLOSE_FRAME = bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + (1000).to_bytes(2, "big")


@dataclass
class Stats:
    """Counters shared by all sessions; ``measuring`` gates what the window counts."""

    measuring: bool = False
    events: int = 0
    turns: int = 0
    latencies: list[float] = field(default_factory=list)
    short_turns: int = 0
    isolation_violations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    upgraded: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def masked_text_frame(payload: bytes, key: bytes) -> bytes:
    """A final, masked client text frame (payloads under 64 KiB)."""
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    else:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    return head + key + body


class Session(asyncio.Protocol):
    """One WebSocket session doing turns back to back."""

    def __init__(self, stats: Stats, host: str, path: str, user: str, done: asyncio.Future[None]):
        self.stats = stats
        self.user_marker = b'"user_id":"%s"' % user.encode()
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"
            f"\r\nSec-WebSocket-Version: 13\r\nX-User-Id: {user}\r\n\r\n"
        ).encode()
        message = orjson.dumps({"type": "user_message", "user_id": user, "text": "run the tool"})
        self.frame = masked_text_frame(message, os.urandom(4))
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.turn_started = 0.0
        self.turn_events = 0
        self.done = done
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.stats.error("connection_lost")
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            if b" 101 " not in status_line:
                self.stats.error("handshake_" + status_line.decode("latin-1")[9:12])
                self.stop()
                return
            del self.buffer[: end + 4]
            self.upgraded = True
            self.stats.upgraded += 1
            self.send_turn()
        self.read_frames()

    def send_turn(self) -> None:
        assert self.transport is not None
        self.turn_events = 0
        self.turn_started = time.perf_counter()
        self.transport.write(self.frame)

    def read_frames(self) -> None:
        buffer = self.buffer
        stats = self.stats
        while len(buffer) >= 2:
            first, size = buffer[0], buffer[1] & 0x7F
            start = 2
            if size == 126:
                if len(buffer) < 4:
                    return
                size, start = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                if len(buffer) < 10:
                    return
                size, start = int.from_bytes(buffer[2:10], "big"), 10
            end = start + size
            if len(buffer) < end:
                return
            opcode = first & 0x0F
            payload = bytes(buffer[start:end])
            del buffer[:end]
            if opcode == 0x8:
                if not self.closing:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    stats.error(f"closed_{code}")
                self.stop()
                return
            if opcode not in (0x1, 0x2):
                continue
            self.turn_events += 1
            if stats.measuring:
                stats.events += 1
                if self.user_marker not in payload:
                    stats.isolation_violations += 1
            if TERMINAL in payload and not self.closing:
                if stats.measuring:
                    stats.turns += 1
                    stats.latencies.append(time.perf_counter() - self.turn_started)
                    if self.turn_events != EVENTS_PER_TURN:
                        stats.short_turns += 1
                self.send_turn()

    def stop(self) -> None:
        """Abort at once (used on protocol errors)."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def close(self) -> None:
        """Start a clean close handshake; the peer's close frame or EOF ends the session."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(
    urls: list[str], sessions: int, warmup: float, duration: float, users: int
) -> dict[str, Any]:
    targets = []
    for url in urls:
        parsed = urllib.parse.urlsplit(url)
        targets.append((parsed.hostname or "127.0.0.1", parsed.port or 80, parsed.path or "/"))
    loop = asyncio.get_running_loop()
    stats = Stats()
    protocols: list[Session] = []
    waiters: list[asyncio.Future[None]] = []

    async def connect(index: int) -> None:
        # Several URLs: sessions take them in turn (the direct path, one per backend).
        host, port, path = targets[index % len(targets)]
        done: asyncio.Future[None] = loop.create_future()
        user = f"ws-user-{index % users}"
        try:
            _, protocol = await loop.create_connection(
                lambda: Session(stats, f"{host}:{port}", path, user, done), host, port
            )
        except OSError:
            stats.error("connect")
            return
        protocols.append(protocol)
        waiters.append(done)

    # Connect in batches so a listener's accept backlog is never the thing being measured.
    for first in range(0, sessions, 50):
        await asyncio.gather(*(connect(i) for i in range(first, min(first + 50, sessions))))
    await asyncio.sleep(warmup)

    stats.measuring = True
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    print("MEASURE_START", flush=True)
    await asyncio.sleep(duration)
    stats.measuring = False
    wall = time.perf_counter() - wall_start
    cpu = cpu_seconds() - cpu_start
    print("MEASURE_END", flush=True)

    for protocol in protocols:
        protocol.close()
    if waiters:
        await asyncio.wait(waiters, timeout=2)
    for protocol in protocols:
        protocol.stop()
    return {
        "sessions": sessions,
        "upgraded": stats.upgraded,
        "window_s": wall,
        "events": stats.events,
        "events_per_s": stats.events / wall,
        "turns_per_s": stats.turns / wall,
        "p50_us": percentile(stats.latencies, 0.50) * 1e6,
        "p99_us": percentile(stats.latencies, 0.99) * 1e6,
        "short_turns": stats.short_turns,
        "isolation_violations": stats.isolation_violations,
        "errors": stats.errors,
        "cpu_percent": 100.0 * cpu / wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", required=True, action="append", help="ws://host:port/path (repeatable)"
    )
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--users", type=int, default=10_000, help="distinct X-User-Id values")
    args = parser.parse_args(argv)
    coro = run(args.url, args.sessions, args.warmup, args.duration, args.users)
    result = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    sys.stdout.write("BENCH_JSON " + orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
