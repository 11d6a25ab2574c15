"""No crossed responses, ever: a proxy in front of a backend that misbehaves at random on
every shape a pooled connection can go wrong in, driven by many clients at once."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.misbehaving_backend import IN_EXCHANGE, WHILE_IDLE, Faults, MisbehavingBackend
from tests.proxy_harness import flags_document, strangler_process, write_flags
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
_BODY_ID = re.compile(rb"id=(\S*)")


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
            found = _BODY_ID.fullmatch(answer.body)
            got = answer.get("X-Request-Id")
            if self.method != "HEAD":
                got = found.group(1).decode() if found else repr(answer.body)
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


async def drive(port: int, backend: MisbehavingBackend) -> Counter[str]:
    """Rounds of one request per client. Between rounds, when the proxy has no request
    outstanding, the backend babbles on some of its connections, and the next round's
    requests go right after: the babble reaches the proxy first, though maybe not its
    parser before it picks a connection for a request. (Babble while a request may be on
    its way would be a race no HTTP/1.1 client can win: a response names no request.)"""
    seen: Counter[str] = Counter()
    callers = [Caller(port, number, seen) for number in range(CLIENTS)]
    try:
        for turn in range(ROUNDS):
            await asyncio.gather(*(caller.connect() for caller in callers))
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
