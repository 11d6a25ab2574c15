"""No crossed responses, ever: a proxy in front of a backend that misbehaves at random on
every shape a pooled connection can go wrong in, driven by many clients at once."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.settings import Settings
from tests.misbehaving_backend import IN_EXCHANGE, WHILE_IDLE, Faults, MisbehavingBackend
from tests.proxy_harness import flags_document, running_proxy, strangler_process, write_flags
from tests.raw_http import Client, bounded, request


def config(backend: MisbehavingBackend, tmp_path: Path) -> Path:
    """``strangler run`` as deployed (uvloop, its own process), every user to the backend."""
    write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    path = tmp_path / "strangler.toml"
    path.write_text(
        f"""
[server]
port = 0
read_timeout = 5
[admin]
port = 0
[backends]
legacy = "{backend.origin}"
candidate = "{backend.origin}"
[flags]
file = "flags.json"
"""
    )
    return path


CLIENTS = 50
REQUESTS = 2000
ROUNDS = REQUESTS // CLIENTS


class Caller:
    """One client: a request a round, each with an id of its own, on a keep-alive
    connection to the proxy (a new one whenever the proxy closed the last)."""

    def __init__(self, port: int, number: int, seen: Counter[str]) -> None:
        self.port = port
        self.number = number
        self.seen = seen
        self.rng = random.Random(number)
        self.client: Client | None = None
        self.own = ""
        self.method = ""

    async def connect(self) -> None:
        if self.client is None:
            self.client = Client(*await bounded(asyncio.open_connection("127.0.0.1", self.port)))

    def send(self, turn: int) -> None:
        """Write the request at once, so that every request of a round follows what the
        backend sent between rounds."""
        assert self.client is not None
        self.own = f"c{self.number}-{turn}"
        self.method = self.rng.choice(("GET", "GET", "HEAD", "POST"))
        self.seen[self.method] += 1
        body = self.own.encode() * 3 if self.method == "POST" else b""
        target = f"/plain/{self.own}"
        self.client.writer.write(
            request(self.method, target, f"X-Request-Id: {self.own}", body=body)
        )

    async def receive(self) -> None:
        assert self.client is not None
        seen, own = self.seen, self.own
        try:
            answer = await self.client.response(head=self.method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError):
            seen["cut"] += 1
            answer = None
        if answer is None:
            pass
        elif answer.status == 502:
            seen["502"] += 1
        elif answer.status == 200:
            got = answer.get("X-Request-Id")
            if self.method != "HEAD":
                try:
                    got = json.loads(answer.body)["id"]
                except (ValueError, KeyError, TypeError):
                    got = repr(answer.body)
            seen["own" if got == own else "crossed"] += 1
            if got != own:
                seen[f"crossed: {own} got {got}"] += 1
        else:
            seen[f"status {answer.status}"] += 1
        if answer is None or "close" in answer.tokens("Connection"):
            self.close()
        seen["answered"] += 1

    def close(self) -> None:
        if self.client is not None:
            self.client.writer.close()
            self.client = None


async def drive(
    port: int,
    backend: MisbehavingBackend,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> Counter[str]:
    """Rounds of one request per client. Between rounds, when the proxy has no request
    outstanding, the backend babbles on some of its connections, and the next round's
    requests go right after: the babble reaches the proxy first, though maybe not its
    parser before it picks a connection for a request. (Babble while a request may be on
    its way would be a race no HTTP/1.1 client can win: a response names no request.)
    ``settle`` waits for the work a round leaves running (its shadows)."""
    seen: Counter[str] = Counter()
    callers = [Caller(port, number, seen) for number in range(CLIENTS)]
    try:
        for turn in range(ROUNDS):
            await asyncio.gather(*(caller.connect() for caller in callers))
            if settle is not None:
                await settle()
            if turn:
                backend.babble(0.3)
            for caller in callers:
                caller.send(turn)
            await bounded(asyncio.gather(*(caller.receive() for caller in callers)))
    finally:
        for caller in callers:
            caller.close()
    return seen


def proxy_process(backend: MisbehavingBackend, tmp_path: Path) -> Any:
    return strangler_process(config(backend, tmp_path))


async def test_every_client_gets_its_own_answer_or_a_502_from_a_backend_that_misbehaves(
    tmp_path: Path,
) -> None:
    faults = Faults(random.Random(12))
    async with MisbehavingBackend(faults) as backend, proxy_process(backend, tmp_path) as proxy:
        port = urlsplit(proxy.proxy_url).port
        assert port is not None
        seen = await bounded(drive(port, backend), 25)
    crossed = sorted(key for key in seen if key.startswith("crossed:"))
    assert seen["crossed"] == 0, crossed[:10]
    assert seen["answered"] == REQUESTS
    assert seen["own"] + seen["502"] == REQUESTS, seen
    # The heads that cannot be an answer were 502s, not a later response taken instead.
    assert (
        seen["502"]
        >= faults.injected["switching protocols"] + faults.injected["length and chunked"]
    )
    assert faults.pipelined == 0
    # Every fault happened, many times over, and was survived.
    for fault in (*IN_EXCHANGE, *WHILE_IDLE):
        assert faults.injected[fault] >= 5, (fault, faults.injected)


async def test_a_shadow_is_compared_only_with_its_own_answer_from_a_backend_that_misbehaves(
    tmp_path: Path,
) -> None:
    """The same rounds with every GET and HEAD shadowed to the misbehaving backend (the
    primary behaves): a shadow that took another exchange's answer would differ from
    its primary's."""
    faults = Faults(random.Random(13))
    write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with (
        MisbehavingBackend(Faults(random.Random(1), in_exchange=0.0)) as legacy,
        MisbehavingBackend(faults) as candidate,
    ):
        route = {"name": "plain", "path": "/plain", "protocol": "json", "flag": "ssot-dispatcher"}
        settings = Settings(
            server={"host": "127.0.0.1", "port": 0},
            admin={"host": "127.0.0.1", "port": 0},
            backends={"legacy": legacy.origin, "candidate": candidate.origin},
            flags={"provider": "file", "file": tmp_path / "flags.json"},
            routes=[{**route, "shadow": 1.0}],
            shadow={"breaker_failures": 0},  # every shadow runs, however many fail
            divergences={"path": tmp_path / "divergences.sqlite3"},
        )
        async with running_proxy(settings) as server:
            assert server.proxy is not None
            seen = await bounded(
                drive(server.proxy_port, candidate, server.proxy.shadows.settle), 25
            )
            await server.proxy.shadows.settle()

            def sample(name: str, **labels: str) -> float:
                value = server.metrics.registry.get_sample_value(name, {"route": "plain", **labels})
                return value or 0.0

            compared = {
                outcome: sample("strangler_comparisons_total", outcome=outcome)
                for outcome in ("match", "mismatch", "error", "ignored")
            }
            differences = {
                kind: sample("strangler_divergences_total", kind=kind)
                for kind in ("missing", "extra", "order", "payload", "status", "error", "timeout")
            }
    assert seen["own"] == REQUESTS, seen  # the primary behaves
    assert legacy.faults.requests == REQUESTS
    # Every GET and HEAD was shadowed (POST is not), each shadow was compared, and none
    # was compared with an answer that was not its own: the only differences are the
    # shadows that failed (an error where the primary answered), one per head that
    # could not be an answer.
    shadows = seen["GET"] + seen["HEAD"]
    assert faults.requests == shadows
    assert compared["match"] + compared["mismatch"] == shadows, compared
    failed = faults.injected["switching protocols"] + faults.injected["length and chunked"]
    assert compared["mismatch"] == differences["error"] == differences["missing"] == failed
    assert differences["payload"] == differences["status"] == differences["extra"] == 0
    assert faults.pipelined == 0
    for fault in ("extra response", "garbage after", "head with a body", *WHILE_IDLE):
        assert faults.injected[fault] >= 5, (fault, faults.injected)
