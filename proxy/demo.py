"""``strangler demo``: the whole product on loopback, no external service (I/O).

It starts a legacy and a candidate demo dispatcher, the proxy on the embedded flags
file, and simulated users who run agent turns over WebSocket, NDJSON and SSE. It steps
the rollout through 0, 10, 50 and 100 %, rewriting the flags file as an operator would,
draws the live split per backend in the terminal, and ends with a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TextIO

import aiohttp
from aiohttp import web

from flags.file import FileFlagProvider
from proxy.app import ProxyServer
from proxy.dispatcher import build_app
from proxy.settings import Settings

FLAG = "ssot-dispatcher"
STEPS = (0, 10, 50, 100)
BACKENDS = ("legacy", "candidate")
PROTOCOLS = ("websocket", "ndjson", "sse")
PROMPTS = (
    "What is 17 * 23?",
    "Weather in Oslo tomorrow?",
    "Find the refund policy",
    "Where is order 1042?",
    "Summarise the release notes",
    "Compare rate limits and tool timeouts",
    "Hello there",
)


@dataclass
class Tally:
    """Counts for one rollout step, per backend."""

    turns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    first_event: dict[str, list[float]] = field(default_factory=lambda: {b: [] for b in BACKENDS})
    by_protocol: dict[str, dict[str, int]] = field(
        default_factory=lambda: {p: dict.fromkeys(BACKENDS, 0) for p in PROTOCOLS}
    )
    users: dict[str, str] = field(default_factory=dict)

    def record(
        self, user: str, protocol: str, backend: str, events: int, first: float | None, ok: bool
    ) -> None:
        self.users[user] = backend
        if not ok:
            self.errors[backend] += 1
            return
        self.turns[backend] += 1
        self.events[backend] += events
        self.by_protocol[protocol][backend] += 1
        if first is not None:
            self.first_event[backend].append(first)

    def share(self) -> float:
        total = sum(self.turns.values())
        return 100.0 * self.turns["candidate"] / total if total else 0.0

    def users_on_candidate(self) -> tuple[int, int]:
        values = list(self.users.values())
        return values.count("candidate"), len(values)


class Demo:
    def __init__(self, proxy_url: str, users: int, out: TextIO) -> None:
        self.proxy_url = proxy_url
        self.user_ids = [f"user-{i:04d}" for i in range(users)]
        self.out = out
        self.step_index = 0
        self.tallies = [Tally() for _ in STEPS]
        self.ws_sessions = dict.fromkeys(BACKENDS, 0)
        self.stop = asyncio.Event()
        self.routed = 0  # users the flag sends to the candidate at this step

    @property
    def tally(self) -> Tally:
        return self.tallies[self.step_index]

    async def user(self, session: aiohttp.ClientSession, index: int, user: str) -> None:
        rng = random.Random(index)
        protocol = PROTOCOLS[index % len(PROTOCOLS)]
        while not self.stop.is_set():
            try:
                if protocol == "websocket":
                    await self.websocket_user(session, user, rng)
                else:
                    await self.http_turn(session, user, protocol, rng)
                    await self.think(rng)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                self.tally.record(user, protocol, "legacy", 0, None, ok=False)
                await self.think(rng)

    async def think(self, rng: random.Random) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), rng.uniform(0.2, 0.8))

    async def http_turn(
        self, session: aiohttp.ClientSession, user: str, protocol: str, rng: random.Random
    ) -> None:
        path = "/api/agent/stream" if protocol == "ndjson" else "/api/agent/sse"
        started = time.perf_counter()
        first: float | None = None
        events = 0
        async with session.post(
            self.proxy_url + path,
            json={"prompt": rng.choice(PROMPTS)},
            headers={"X-User-Id": user},
        ) as resp:
            backend = resp.headers.get("X-Strangler-Backend", "legacy")
            async for line in resp.content:
                if (protocol == "ndjson" and line.strip()) or line.startswith(b"data:"):
                    events += 1
                    if first is None:
                        first = time.perf_counter() - started
            ok = resp.status == 200 and events > 0
        self.tally.record(user, protocol, backend, events, first, ok)

    async def websocket_user(
        self, session: aiohttp.ClientSession, user: str, rng: random.Random
    ) -> None:
        # A session keeps its backend, so users reconnect now and then, as clients do.
        async with session.ws_connect(
            self.proxy_url + "/ws/agent", headers={"X-User-Id": user}
        ) as ws:
            backend = ws._response.headers.get("X-Strangler-Backend", "legacy")
            self.ws_sessions[backend] += 1
            try:
                for _ in range(rng.randint(2, 5)):
                    if self.stop.is_set():
                        return
                    started = time.perf_counter()
                    first: float | None = None
                    events = 0
                    await ws.send_json({"prompt": rng.choice(PROMPTS)})
                    while True:
                        event = json.loads(await ws.receive_str(timeout=10))
                        events += 1
                        if first is None:
                            first = time.perf_counter() - started
                        if event.get("type") in ("agent_completed", "error"):
                            break
                    ok = event.get("type") == "agent_completed"
                    self.tally.record(user, "websocket", backend, events, first, ok)
                    await self.think(rng)
            finally:
                self.ws_sessions[backend] -= 1

    def render(self, rollout: int, step_started: float, step_seconds: float) -> str:
        tally = self.tally
        on_candidate, seen = tally.users_on_candidate()
        elapsed = min(step_seconds, time.monotonic() - step_started)
        lines = [
            f"strangler demo  -  proxy {self.proxy_url}",
            "",
            f"rollout of flag {FLAG!r}: {rollout:>3} %   "
            f"(step {self.step_index + 1}/{len(STEPS)}, {elapsed:4.1f}/{step_seconds:.0f} s)",
            f"users the flag sends to candidate: {self.routed}/{len(self.user_ids)}   "
            f"users served by candidate: {on_candidate}/{seen}",
            f"share of turns on candidate: {tally.share():5.1f} %   "
            "(WebSocket sessions keep their backend until they reconnect)",
            "",
            f"{'backend':<10} {'turns':>6} {'events':>7} {'errors':>6} "
            f"{'ws open':>7} {'first event p50':>16}  split",
        ]
        total = sum(tally.turns.values()) or 1
        for backend in BACKENDS:
            firsts = tally.first_event[backend]
            p50 = f"{statistics.median(firsts) * 1000:7.1f} ms" if firsts else "      -"
            bar = "#" * round(40 * tally.turns[backend] / total)
            lines.append(
                f"{backend:<10} {tally.turns[backend]:>6} {tally.events[backend]:>7} "
                f"{tally.errors[backend]:>6} {self.ws_sessions[backend]:>7} {p50:>16}  {bar}"
            )
        lines.append("")
        for protocol in PROTOCOLS:
            counts = tally.by_protocol[protocol]
            legacy, candidate = counts["legacy"], counts["candidate"]
            lines.append(f"  {protocol:<10} legacy {legacy:>5}   candidate {candidate:>5}")
        return "\n".join(lines)

    def summary(self) -> str:
        lines = [
            "",
            "summary",
            f"{'rollout':>8} {'users on candidate':>19} {'turns':>7} {'on candidate':>13} "
            f"{'events':>8} {'errors':>7}",
        ]
        for rollout, tally in zip(STEPS, self.tallies, strict=True):
            on_candidate, seen = tally.users_on_candidate()
            users_pct = 100.0 * on_candidate / seen if seen else 0.0
            lines.append(
                f"{rollout:>7} % {on_candidate:>8}/{seen:<4} ({users_pct:3.0f} %)"
                f" {sum(tally.turns.values()):>7} {tally.share():>11.1f} % "
                f"{sum(tally.events.values()):>8} {sum(tally.errors.values()):>7}"
            )
        return "\n".join(lines)


def _free_socket() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _start_dispatcher(name: str, time_scale: float) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(
        build_app(name, time_scale=time_scale),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    sock = _free_socket()
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _write_rollout(path: Path, percent: int) -> None:
    doc = json.loads(path.read_text())
    doc["features"][0]["strategies"][0]["parameters"]["rollout"] = str(percent)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)  # atomic: the proxy never sees half a file


async def run_demo(
    duration: float = 40.0,
    *,
    live: bool = True,
    users: int = 60,
    time_scale: float = 1.0,
    out: TextIO = sys.stdout,
) -> int:
    # The live view owns the terminal: keep routine log lines (flag reloads) out of it.
    logging.getLogger("strangler").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="strangler-demo-"))
    flags_path = workdir / "flags.json"
    with resources.as_file(resources.files("proxy") / "demo_flags.json") as embedded:
        shutil.copyfile(embedded, flags_path)
    runners = []
    try:
        legacy_runner, legacy_url = await _start_dispatcher("legacy", time_scale)
        runners.append(legacy_runner)
        candidate_runner, candidate_url = await _start_dispatcher("candidate", time_scale)
        runners.append(candidate_runner)
        settings = Settings.model_validate(
            dict(
                server={"host": "127.0.0.1", "port": 0, "shutdown_grace": 2.0},
                admin={"host": "127.0.0.1", "port": 0},
                backends={"legacy": legacy_url, "candidate": candidate_url},
                flags={"provider": "file", "file": flags_path, "poll_interval": 0.2},
                routes=[
                    {"name": "agent", "path": "/ws/agent", "protocol": "websocket", "flag": FLAG},
                    {
                        "name": "stream",
                        "path": "/api/agent/stream",
                        "protocol": "ndjson",
                        "flag": FLAG,
                    },
                    {"name": "sse", "path": "/api/agent/sse", "protocol": "sse", "flag": FLAG},
                ],
            )
        )
        async with ProxyServer(settings) as server:
            print(f"legacy dispatcher    {legacy_url}", file=out)
            print(f"candidate dispatcher {candidate_url}", file=out)
            print(f"proxy                {server.proxy_url}", file=out)
            print(f"admin                {server.admin_url}", file=out)
            print(f"metrics              {server.admin_url}/metrics", file=out)
            print(f"flags file           {flags_path}", file=out)
            demo = Demo(server.proxy_url, users, out)
            await _drive(demo, server, flags_path, duration, live, out)
            print(demo.summary(), file=out)
            errors = sum(sum(t.errors.values()) for t in demo.tallies)
            print(f"\n{errors} failed exchange(s); rollout stepped {STEPS} without a restart.")
    finally:
        for runner in runners:
            await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def _drive(
    demo: Demo, server: ProxyServer, flags_path: Path, duration: float, live: bool, out: TextIO
) -> None:
    step_seconds = duration / len(STEPS)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [
            asyncio.create_task(demo.user(session, i, user)) for i, user in enumerate(demo.user_ids)
        ]
        interactive = live and out.isatty()
        flags = server.flags
        assert isinstance(flags, FileFlagProvider)
        try:
            for index, rollout in enumerate(STEPS):
                reloaded = asyncio.create_task(flags.wait_for_reload())
                _write_rollout(flags_path, rollout)
                await reloaded  # the file watcher picks the change up
                demo.routed = sum(flags.is_enabled(FLAG, u) for u in demo.user_ids)
                demo.step_index = index
                started = time.monotonic()
                while time.monotonic() - started < step_seconds:
                    if interactive:
                        out.write(
                            "\x1b[H\x1b[J" + demo.render(rollout, started, step_seconds) + "\n"
                        )
                        out.flush()
                    await asyncio.sleep(0.25)
                if not interactive:
                    print(demo.render(rollout, started, step_seconds), file=out)
        finally:
            demo.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
