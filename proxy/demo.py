"""``strangler demo``: the whole product on loopback, no external service (I/O).

It starts a legacy and a candidate demo dispatcher, the proxy on the embedded flags file
with every route shadowed on the other backend and compared, and simulated users who run
agent turns over WebSocket, NDJSON, SSE and one-shot JSON. It steps the rollout through
0, 10, 50 and 100 %, rewriting the flags file as an operator would. Part-way through the
50 % step it injects a candidate defect through the dispatcher's knobs (lost
``tool_completed`` events, then thinking events stamped with another user's id) and
clears it again. The live terminal view draws the split per backend and the comparisons,
read from the proxy's own metrics; the summary adds the comparisons per step and what the
defect did. Automatic rollback is not part of it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from adapters.compare import DivergenceKind
from flags.file import FileFlagProvider
from proxy.app import ProxyServer
from proxy.context import Proxy
from proxy.dispatcher import KNOBS_KEY, Knobs, build_app, plan_turn
from proxy.divergence_store import DivergenceStore
from proxy.metrics import Metrics
from proxy.settings import Settings

FLAG = "ssot-dispatcher"
STEPS = (0, 10, 50, 100)
BACKENDS = ("legacy", "candidate")
PROTOCOLS = ("websocket", "ndjson", "sse", "json")
WS_PATH = "/ws/agent"
HTTP_PATHS = {"ndjson": "/api/agent/stream", "sse": "/api/agent/sse", "json": "/api/agent/run"}
WS_ROUTE = "agent"
OUTCOMES = ("match", "mismatch", "ignored", "error")
KINDS = tuple(kind.value for kind in DivergenceKind)
PROMPTS = (
    "What is 17 * 23?",
    "Weather in Oslo tomorrow?",
    "Find the refund policy",
    "Where is order 1042?",
    "Summarise the release notes",
    "Compare rate limits and tool timeouts",
    "Hello there",
)

# The grammar every dispatcher turn follows: one or more thinking chunks come first, and
# more may come before each tool pair, which the starred group allows in any mix.
CONTRACT = "agent_started (agent_thinking | tool_executing tool_completed)* agent_completed"
# What differs between two runs of one prompt on the demo dispatchers by design, and so
# is noise, not divergence. An undisturbed run compares with zero mismatches under these
# rules; the turn's structure, tools, arguments, results and final answer are planned
# from the prompt alone and are compared by value.
COMPARE: Mapping[str, list[str]] = {
    "ignore": [
        "timestamp",  # wall clock when the event left the dispatcher
        # Position among the events actually delivered: it differs anyway when thinking
        # chunks differ in number, and one lost event would shift it on every later one,
        # turning one ``missing`` into a payload difference per event.
        "seq",
        "duration_ms",  # how long the tool took on this run (tool_completed)
        "*.duration_ms",  # the same, should a payload nest it
    ],
    # uuid4 values minted per run and per tool call: compared by order of appearance.
    "canonical_ids": ["run_id", "tool_call_id"],
    # Thinking streams in chunks; how many is noise (the candidate thinks faster).
    "coalesce": ["agent_thinking"],
    # Thinking text is drawn at random per chunk: only that there is some is compared.
    "presence_only": ["text", "*.text"],
}

# The defect runs in the 50 % step, where half the users are served by each backend and
# every exchange involves the candidate either as primary or as shadow.
DEFECT_STEP = STEPS.index(50)
# A real user's id, as a cross-session leak would carry; for this user's own sessions the
# event is theirs and passes.
LEAKED_USER = "user-0000"


@dataclass(frozen=True, slots=True)
class Defect:
    """A candidate defect set through the dispatcher's knobs from ``start`` until the
    next defect or the clearing, as fractions of the defect step."""

    label: str
    knobs: Mapping[str, object]
    start: float


DEFECTS = (
    Defect("candidate drops every tool_completed event", {"drop": ["tool_completed"]}, 0.2),
    Defect(
        f"candidate stamps thinking events with another user's id ({LEAKED_USER})",
        {"leak_user": LEAKED_USER},
        0.5,
    ),
)
DEFECT_CLEARED_AT = 0.7
NO_DEFECT: Mapping[str, object] = {"drop": [], "leak_user": None}

# The demo dispatchers' turns for one prompt differ in length by up to about 1.1 s at
# time scale 1: the candidate thinks faster and each side draws its own tool latencies.
# A WebSocket user waits that long after its last answer before closing the session, so
# that the lagging shadow's last turn has ended too and is compared whole.
_SLOWEST_SHADOW_LAG = 1.2
# Plus room for the event loop, which runs users, proxy and both dispatchers alike.
_SCHEDULING_ROOM = 0.2


def _planned_events(prompt: str) -> int:
    """How many events the dispatcher's turn for ``prompt`` emits when nothing is lost:
    started, one per thinking chunk, a pair per tool call, completed."""
    plan = plan_turn(prompt)
    return 2 + len(plan.steps) + len(plan.tool_calls)


@dataclass(slots=True)
class Received:
    """What one user got back from one exchange or WebSocket turn."""

    user: str
    planned: int
    started: float = field(default_factory=time.perf_counter)
    events: int = 0
    first: float | None = None
    completed: bool = False
    # Events with another user's id that reached this user: the proxy must withhold them.
    foreign: int = 0

    def event(self, event: object) -> None:
        self.events += 1
        if self.first is None:
            self.first = time.perf_counter() - self.started
        if isinstance(event, dict):
            if event.get("user_id", self.user) not in (self.user, None):
                self.foreign += 1
            if event.get("type") == "agent_completed":
                self.completed = True


@dataclass
class Tally:
    """What the users saw in one rollout step, per backend, counted where an exchange or
    turn began."""

    turns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    # Completed turns with fewer events than planned: lost, or withheld by the proxy.
    short: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    foreign: int = 0
    first_event: dict[str, list[float]] = field(default_factory=lambda: {b: [] for b in BACKENDS})
    by_protocol: dict[str, dict[str, int]] = field(
        default_factory=lambda: {p: dict.fromkeys(BACKENDS, 0) for p in PROTOCOLS}
    )
    users: dict[str, str] = field(default_factory=dict)

    def record(self, protocol: str, backend: str, received: Received, ok: bool) -> None:
        self.users[received.user] = backend
        self.foreign += received.foreign
        if not ok:
            self.errors[backend] += 1
            return
        self.turns[backend] += 1
        self.events[backend] += received.events
        self.short[backend] += received.events < received.planned
        self.by_protocol[protocol][backend] += 1
        if received.first is not None:
            self.first_event[backend].append(received.first)

    def share(self) -> float:
        total = sum(self.turns.values())
        return 100.0 * self.turns["candidate"] / total if total else 0.0

    def users_on_candidate(self) -> tuple[int, int]:
        values = list(self.users.values())
        return values.count("candidate"), len(values)


def _totals(counter: Counter, label: str) -> dict[str, int]:
    """A counter's values summed over every label but ``label``."""
    totals: dict[str, int] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels[label]
                totals[key] = totals.get(key, 0) + int(sample.value)
    return totals


@dataclass(frozen=True, slots=True)
class Counts:
    """The proxy's comparison counters summed over routes: one reading of the metrics,
    or the difference between two readings."""

    outcomes: Mapping[str, int] = field(default_factory=dict)
    kinds: Mapping[str, int] = field(default_factory=dict)
    contract: Mapping[str, int] = field(default_factory=dict)  # by backend
    isolation: Mapping[str, int] = field(default_factory=dict)  # by backend
    dropped: Mapping[str, int] = field(default_factory=dict)  # shadows, by reason

    @classmethod
    def read(cls, metrics: Metrics) -> Counts:
        metrics.flush()
        return cls(
            outcomes=_totals(metrics.comparisons, "outcome"),
            kinds=_totals(metrics.divergences, "kind"),
            contract=_totals(metrics.contract_violations, "backend"),
            isolation=_totals(metrics.isolation_violations, "backend"),
            dropped=_totals(metrics.shadow_dropped, "reason"),
        )

    def __sub__(self, earlier: Counts) -> Counts:
        def minus(now: Mapping[str, int], then: Mapping[str, int]) -> dict[str, int]:
            return {key: now.get(key, 0) - then.get(key, 0) for key in now.keys() | then.keys()}

        return Counts(
            **{
                f.name: minus(getattr(self, f.name), getattr(earlier, f.name))
                for f in dataclasses.fields(self)
            }
        )

    @property
    def compared(self) -> int:
        return sum(self.outcomes.values())

    @property
    def mismatches(self) -> int:
        return self.outcomes.get("mismatch", 0)

    def kinds_text(self) -> str:
        """The divergence kinds that occurred, most frequent first, or "-"."""
        return _listing(self.kinds, KINDS)


def _listing(counts: Mapping[str, int], order: tuple[str, ...] = ()) -> str:
    found = [(key, n) for key, n in counts.items() if n]
    rank = {key: i for i, key in enumerate(order)}
    found.sort(key=lambda item: (-item[1], rank.get(item[0], len(rank)), item[0]))
    return ", ".join(f"{key} {n}" for key, n in found) or "-"


class Demo:
    def __init__(self, proxy: Proxy, proxy_url: str, admin_url: str, users: int) -> None:
        self.proxy = proxy
        self.metrics = proxy.metrics
        self.proxy_url = proxy_url
        self.admin_url = admin_url
        self.user_ids = [f"user-{i:04d}" for i in range(users)]
        self.step_index = 0
        self.tallies = [Tally() for _ in STEPS]
        self.ws_sessions = dict.fromkeys(BACKENDS, 0)
        self.stop = asyncio.Event()
        self.routed = 0  # users the flag sends to the candidate at this step
        self.answer_gap = 0.0  # see _SLOWEST_SHADOW_LAG
        # The comparisons: readings where the current step began and the last one ended,
        # and each step's difference.
        self.step_start = self.step_end = Counts()
        self.step_counts: list[Counts | None] = [None for _ in STEPS]
        # The defect: the users' phase (by the knobs at the start of each exchange), the
        # readings that bound it, and the failures users saw in each phase.
        self.phase = "before"
        self.defect: Defect | None = None
        self.defect_since = 0.0
        self.defect_on: Counts | None = None  # reading when the first defect was set
        # Reading at the defect step's end, once what the defect touched was compared.
        self.defect_off: Counts | None = None
        self.cleared = False
        self.client_errors = {"before": 0, "during": 0, "after": 0}
        self.final = Counts()
        self.last_divergence = ""
        self._divergence_read = -1.0

    @property
    def tally(self) -> Tally:
        return self.tallies[self.step_index]

    # --- the simulated users ----------------------------------------------------------

    async def user(self, session: aiohttp.ClientSession, index: int, user: str) -> None:
        rng = random.Random(index)
        protocol = PROTOCOLS[index % len(PROTOCOLS)]
        while not self.stop.is_set():
            if protocol == "websocket":
                try:
                    await self.websocket_user(session, user, rng)
                except (aiohttp.ClientError, TimeoutError):
                    # The handshake failed: no turn began, but the user saw an error.
                    self.record("websocket", "legacy", Received(user, 0), ok=False)
                    await self.think(rng)
            else:
                await self.http_turn(session, user, protocol, rng)
                await self.think(rng)

    async def think(self, rng: random.Random) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), rng.uniform(0.2, 0.8))

    def record(
        self,
        protocol: str,
        backend: str,
        received: Received,
        ok: bool,
        tally: Tally | None = None,
        phase: str | None = None,
    ) -> None:
        (self.tally if tally is None else tally).record(protocol, backend, received, ok)
        if not ok:
            self.client_errors[self.phase if phase is None else phase] += 1

    async def http_turn(
        self, session: aiohttp.ClientSession, user: str, protocol: str, rng: random.Random
    ) -> None:
        tally, phase = self.tally, self.phase
        prompt = rng.choice(PROMPTS)
        got = Received(user, _planned_events(prompt))
        backend, ok = "legacy", False
        try:
            async with session.post(
                self.proxy_url + HTTP_PATHS[protocol],
                json={"prompt": prompt},
                headers={"X-User-Id": user},
            ) as resp:
                backend = resp.headers.get("X-Strangler-Backend", "legacy")
                if protocol == "json":
                    # One body: a 502 when the proxy withheld an event of another user.
                    if resp.status == 200:
                        for event in json.loads(await resp.read())["events"]:
                            got.event(event)
                else:
                    # A stream: a withheld event is just not there; the stream ends as usual.
                    async for line in resp.content:
                        document = line.strip()
                        if protocol == "sse":
                            if not document.startswith(b"data:"):
                                continue
                            document = document[5:]
                        if document:
                            got.event(json.loads(document))
                ok = resp.status == 200 and got.completed
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            ok = False
        self.record(protocol, backend, got, ok, tally, phase)

    async def websocket_user(
        self, session: aiohttp.ClientSession, user: str, rng: random.Random
    ) -> None:
        # A session keeps its backend, so users reconnect now and then, as clients do.
        async with session.ws_connect(self.proxy_url + WS_PATH, headers={"X-User-Id": user}) as ws:
            backend = ws._response.headers.get("X-Strangler-Backend", "legacy")
            self.ws_sessions[backend] += 1
            try:
                for _ in range(rng.randint(2, 5)):
                    if self.stop.is_set():
                        break
                    if not await self.websocket_turn(ws, user, backend, rng):
                        return  # the session broke: reconnect
                    await self.think(rng)
                # Not cut short by the stop: see _SLOWEST_SHADOW_LAG.
                await asyncio.sleep(self.answer_gap)
            finally:
                self.ws_sessions[backend] -= 1

    async def websocket_turn(
        self, ws: aiohttp.ClientWebSocketResponse, user: str, backend: str, rng: random.Random
    ) -> bool:
        tally, phase = self.tally, self.phase
        prompt = rng.choice(PROMPTS)
        got = Received(user, _planned_events(prompt))
        try:
            await ws.send_json({"prompt": prompt})
            while not got.completed:
                event = json.loads(await ws.receive_str(timeout=10))
                got.event(event)
                if isinstance(event, dict) and event.get("type") == "error":
                    break
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
            pass  # TypeError: a close instead of a text frame
        self.record("websocket", backend, got, got.completed, tally, phase)
        return got.completed

    # --- the defect -----------------------------------------------------------------------

    def switch(self, defect: Defect | None, knobs: Knobs) -> None:
        """Set the candidate's knobs to ``defect``, or clear them (None)."""
        knobs.update({**NO_DEFECT, **(defect.knobs if defect is not None else {})})
        if defect is not None:
            if self.defect_on is None:
                self.defect_on = Counts.read(self.metrics)
            self.phase = "during"
            self.defect, self.defect_since = defect, time.monotonic()
        elif self.defect is not None:
            self.phase = "after"
            self.defect, self.cleared = None, True

    def defect_line(self) -> str:
        if self.defect is not None:
            since = time.monotonic() - self.defect_since
            return f">>> DEFECT ACTIVE ({since:4.1f} s): {self.defect.label}"
        if self.cleared:
            return "defect cleared: the candidate behaves again, the mismatch counts stop growing"
        step = STEPS[DEFECT_STEP]
        return f"no defect yet (one is injected into the candidate during the {step} % step)"

    # --- comparisons ----------------------------------------------------------------------

    def begin_step(self, index: int) -> None:
        # Each step starts where the last one ended, so that the steps add up to the total.
        self.step_index = index
        self.step_start = self.step_end

    def end_step(self, index: int) -> None:
        reading = self.step_end = Counts.read(self.metrics)
        self.step_counts[index] = reading - self.step_start
        if index == DEFECT_STEP:
            self.defect_off = reading

    async def refresh_last_divergence(self, store: DivergenceStore | None) -> None:
        """Read the newest divergence record, at most once a second."""
        now = time.monotonic()
        if store is None or now - self._divergence_read < 1.0:
            return
        self._divergence_read = now
        records = await store.recent(limit=1)
        if records:
            self.last_divergence = _describe(records[0])

    # --- drawing ----------------------------------------------------------------------------

    def render(self, rollout: int, step_started: float, step_seconds: float) -> str:
        tally = self.tally
        on_candidate, seen = tally.users_on_candidate()
        elapsed = min(step_seconds, time.monotonic() - step_started)
        lines = [
            f"strangler demo  -  proxy {self.proxy_url}   admin {self.admin_url}",
            f"metrics {self.admin_url}/metrics   divergences {self.admin_url}/api/divergences",
            "",
            f"rollout of flag {FLAG!r}: {rollout:>3} %   "
            f"(step {self.step_index + 1}/{len(STEPS)}, {elapsed:4.1f}/{step_seconds:.0f} s)",
            self.defect_line(),
            f"users the flag sends to candidate: {self.routed}/{len(self.user_ids)}   "
            f"users served by candidate: {on_candidate}/{seen}",
            f"share of turns on candidate: {tally.share():5.1f} %   "
            "(WebSocket sessions keep their backend until they reconnect)",
            "",
            f"{'backend':<10} {'turns':>6} {'events':>7} {'short':>6} {'errors':>6} "
            f"{'ws open':>7} {'first event p50':>16}  split",
        ]
        total = sum(tally.turns.values()) or 1
        for backend in BACKENDS:
            firsts = tally.first_event[backend]
            p50 = f"{statistics.median(firsts) * 1000:7.1f} ms" if firsts else "      -"
            bar = "#" * round(40 * tally.turns[backend] / total)
            lines.append(
                f"{backend:<10} {tally.turns[backend]:>6} {tally.events[backend]:>7} "
                f"{tally.short[backend]:>6} {tally.errors[backend]:>6} "
                f"{self.ws_sessions[backend]:>7} {p50:>16}  {bar}"
            )
        lines.append(
            "  short: turns that reached the user with fewer events than planned;"
            f" another user's events that reached a user: {tally.foreign}"
        )
        lines.append(
            "  turns by protocol, legacy/candidate:  "
            + "   ".join(
                f"{protocol} {counts['legacy']}/{counts['candidate']}"
                for protocol, counts in tally.by_protocol.items()
            )
        )
        lines.append("")
        lines.extend(self.render_comparisons())
        return "\n".join(lines)

    def render_comparisons(self) -> list[str]:
        total = Counts.read(self.metrics)
        step = total - self.step_start
        lines = [
            "comparisons: every exchange and WebSocket turn also runs on the other backend",
            f"{'':<36}{'this step':>10}{'total':>10}",
        ]

        def group(title: str, name: str, keys: tuple[str, ...], note: str = "") -> None:
            now, here = getattr(total, name), getattr(step, name)
            for i, key in enumerate(keys):
                label = f"  {title if i == 0 else '':<22}{key:<12}"
                tail = note if i == 0 else ""
                lines.append(f"{label}{here.get(key, 0):>10}{now.get(key, 0):>10}{tail}")

        group("comparisons", "outcomes", OUTCOMES)
        group("divergences", "kinds", KINDS)
        group("contract violations", "contract", BACKENDS)
        group("isolation violations", "isolation", BACKENDS, "   events withheld from clients")
        reasons = tuple(sorted(key for key, n in total.dropped.items() if n))
        if reasons:
            group("shadow runs dropped", "dropped", reasons)
        else:
            lines.append(f"  {'shadow runs dropped':<22}{'none':<12}")
        lines.append(f"  last divergence       {self.last_divergence or '-'}"[:119])
        return lines

    def summary(self) -> str:
        lines = [
            "",
            "summary",
            f"{'rollout':>8} {'users on candidate':>19} {'turns':>7} {'on candidate':>13} "
            f"{'events':>8} {'short':>6} {'errors':>7}",
        ]
        for rollout, tally in zip(STEPS, self.tallies, strict=True):
            on_candidate, seen = tally.users_on_candidate()
            users_pct = 100.0 * on_candidate / seen if seen else 0.0
            lines.append(
                f"{rollout:>7} % {on_candidate:>8}/{seen:<4} ({users_pct:3.0f} %)"
                f" {sum(tally.turns.values()):>7} {tally.share():>11.1f} % "
                f"{sum(tally.events.values()):>8} {sum(tally.short.values()):>6}"
                f" {sum(tally.errors.values()):>7}"
            )
        lines += [
            "",
            "comparisons per step (primary against shadow, after normalisation)",
            f"{'rollout':>8} {'compared':>9} {'match':>7} {'mismatch':>9} {'ignored':>8} "
            f"{'error':>6}   {'contract violations':<22}isolation violations",
        ]
        for rollout, counts in zip(STEPS, self.step_counts, strict=True):
            c = counts or Counts()
            lines.append(
                f"{rollout:>7} % {c.compared:>9} {c.outcomes.get('match', 0):>7} "
                f"{c.mismatches:>9} {c.outcomes.get('ignored', 0):>8} "
                f"{c.outcomes.get('error', 0):>6}   {_listing(c.contract, BACKENDS):<22}"
                f"{_listing(c.isolation, BACKENDS):<22}".rstrip()
            )
            if c.mismatches:
                lines.append(f"{'':>10}divergences by kind: {c.kinds_text()}")
        lines.append("")
        lines.extend(self.defect_summary())
        return "\n".join(lines)

    def defect_summary(self) -> list[str]:
        if self.defect_on is None:
            return ["the demo ended before the defect was injected"]
        before = self.defect_on
        during = (self.defect_off or self.final) - before
        foreign = sum(t.foreign for t in self.tallies)
        lines = [
            f"before the defect: {before.compared} comparisons, {before.mismatches} mismatches:"
            " the dispatchers' run-to-run noise",
            "  (ids, timestamps, durations, thinking chunks and text) is normalised away",
            "the defect, injected into the candidate during the "
            f"{STEPS[DEFECT_STEP]} % step, then cleared:",
            *(f"  {defect.label}" for defect in DEFECTS),
            f"during the defect: {during.compared} comparisons, {during.mismatches} mismatches"
            f" (from the first defect to the end of the {STEPS[DEFECT_STEP]} % step)",
            f"  divergences by kind: {during.kinds_text()}",
            f"  contract violations: {_both(during.contract)}",
            f"  isolation violations: {_both(during.isolation)}; withheld from clients",
            f"  failed exchanges users saw: {self.client_errors['during']}"
            " (a JSON answer carrying another user's event becomes a 502)",
            f"  another user's events that reached a user: {foreign}",
        ]
        if self.defect_off is not None:
            after = self.final - self.defect_off
            lines.append(
                f"after the defect, from the end of the {STEPS[DEFECT_STEP]} % step:"
                f" {after.compared} comparisons, {after.mismatches} mismatches"
            )
            if after.mismatches:
                lines.append(f"  divergences by kind: {after.kinds_text()}")
        lines.append(
            "failed exchanges users saw outside the defect window: "
            f"before {self.client_errors['before']}, after {self.client_errors['after']}"
        )
        return lines


def _both(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{backend} {counts.get(backend, 0)}" for backend in BACKENDS)


def _describe(record: Mapping[str, Any]) -> str:
    """One line about a stored divergence: where, who served, what differed."""
    seen: dict[str, int] = {}
    for divergence in record.get("divergences", []):
        text = str(divergence.get("kind"))
        if divergence.get("event_type"):
            text += f" {divergence['event_type']}"
        if divergence.get("paths"):
            text += " [" + ", ".join(map(str, divergence["paths"][:3])) + "]"
        seen[text] = seen.get(text, 0) + 1
    parts = [text if n == 1 else f"{text} x{n}" for text, n in seen.items()]
    return (
        f"route {record.get('route')} ({record.get('primary')} served, "
        f"{record.get('shadow')} shadow): " + "; ".join(parts)
    )


async def _settle(proxy: Proxy, *, websocket: bool = False) -> None:
    """Wait until the shadows in flight now have been compared. A WebSocket shadow lives
    as long as its session (its turns are compared as they end), so it is waited for
    only when asked, once every session is closed."""
    shadows = proxy.shadows
    pending = [
        task
        for task in shadows.tasks
        if websocket or task.get_name() != f"shadow-{WS_ROUTE}"  # ShadowRunner's task names
    ]
    quiet = asyncio.ensure_future(shadows.quiet())
    await asyncio.wait([*pending, quiet], timeout=shadows.timeout)
    quiet.cancel()


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


def _route(name: str, path: str, protocol: str) -> dict[str, object]:
    route: dict[str, object] = {
        "name": name,
        "path": path,
        "protocol": protocol,
        "flag": FLAG,
        "shadow": 1.0,
        "contract": CONTRACT,
        "user_field": "user_id",
        "compare": dict(COMPARE),
    }
    if protocol == "websocket":
        # A turn ends at its last event even when it breaks the contract: a lost event
        # must not make the rest of the session's frames count as that one turn.
        route["turn_end"] = ["agent_completed", "error"]
    else:
        # An agent turn is a POST. The demo dispatchers honour X-Strangler-Shadow: 1 by
        # not counting the tools a shadow turn runs as side effects, so it is safe here.
        route["shadow_methods"] = ["GET", "HEAD", "OPTIONS", "POST"]
    return route


def demo_settings(legacy_url: str, candidate_url: str, workdir: Path) -> Settings:
    return Settings.model_validate(
        dict(
            server={"host": "127.0.0.1", "port": 0, "shutdown_grace": 2.0},
            # The divergences carry payloads and user ids: even the demo's need a token,
            # one of its own, printed with their URL.
            admin={"host": "127.0.0.1", "port": 0, "token": secrets.token_urlsafe(16)},
            backends={"legacy": legacy_url, "candidate": candidate_url},
            flags={"provider": "file", "file": workdir / "flags.json", "poll_interval": 0.2},
            divergences={"path": workdir / "divergences.sqlite3"},
            routes=[
                _route(WS_ROUTE, WS_PATH, "websocket"),
                _route("stream", HTTP_PATHS["ndjson"], "ndjson"),
                _route("sse", HTTP_PATHS["sse"], "sse"),
                _route("run", HTTP_PATHS["json"], "json"),
            ],
        )
    )


async def run_demo(
    duration: float = 40.0,
    *,
    live: bool = True,
    users: int = 60,
    time_scale: float = 1.0,
    out: TextIO = sys.stdout,
) -> int:
    # The live view owns the terminal: keep the proxy's log lines (flag reloads, each
    # withheld event and contract violation the defect causes) out of it; the view
    # counts them instead.
    logger = logging.getLogger("strangler")
    saved_level = logger.level
    logger.setLevel(logging.ERROR)
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
        settings = demo_settings(legacy_url, candidate_url, workdir)
        async with ProxyServer(settings) as server:
            assert server.proxy is not None
            print(f"legacy dispatcher    {legacy_url}", file=out)
            print(f"candidate dispatcher {candidate_url}", file=out)
            print(f"proxy                {server.proxy_url}", file=out)
            print(f"admin                {server.admin_url}", file=out)
            print(f"metrics              {server.admin_url}/metrics", file=out)
            print(f"divergences          {server.admin_url}/api/divergences", file=out)
            token = settings.admin.token
            assert token is not None
            print(f"admin token          {token.get_secret_value()}", file=out)
            print(f"flags file           {flags_path}", file=out)
            demo = Demo(server.proxy, server.proxy_url, server.admin_url, users)
            demo.answer_gap = _SLOWEST_SHADOW_LAG * time_scale + _SCHEDULING_ROOM
            knobs = candidate_runner.app[KNOBS_KEY]
            await _drive(demo, server, flags_path, knobs, duration, live, out)
            print(demo.summary(), file=out)
            errors = sum(sum(t.errors.values()) for t in demo.tallies)
            print(
                f"\n{errors} failed exchange(s); rollout stepped {STEPS} without a restart.",
                file=out,
            )
    finally:
        for runner in runners:
            await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        logger.setLevel(saved_level)
    return 0


def _timeline(step_seconds: float) -> list[tuple[float, Defect | None]]:
    """When, in the defect step, each defect starts and when they are cleared (None)."""
    moments: list[tuple[float, Defect | None]] = [(d.start * step_seconds, d) for d in DEFECTS]
    moments.append((DEFECT_CLEARED_AT * step_seconds, None))
    return moments


async def _drive(
    demo: Demo,
    server: ProxyServer,
    flags_path: Path,
    knobs: Knobs,
    duration: float,
    live: bool,
    out: TextIO,
) -> None:
    step_seconds = duration / len(STEPS)
    proxy = demo.proxy
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
                demo.begin_step(index)
                started = time.monotonic()
                timeline = _timeline(step_seconds) if index == DEFECT_STEP else []
                while (elapsed := time.monotonic() - started) < step_seconds:
                    while timeline and timeline[0][0] <= elapsed:
                        demo.switch(timeline.pop(0)[1], knobs)
                    await demo.refresh_last_divergence(proxy.store)
                    if interactive:
                        out.write(
                            "\x1b[H\x1b[J" + demo.render(rollout, started, step_seconds) + "\n"
                        )
                        out.flush()
                    wake = min([step_seconds, *(at for at, _ in timeline)])
                    await asyncio.sleep(max(0.0, min(0.25, wake - elapsed)))
                for _, defect in timeline:  # a step too short for the whole defect
                    demo.switch(defect, knobs)
                if index < len(STEPS) - 1:  # the last one ends once the users have stopped
                    await _settle(proxy)
                    demo.end_step(index)
                if not interactive:
                    await demo.refresh_last_divergence(proxy.store)
                    print(demo.render(rollout, started, step_seconds), file=out)
        finally:
            demo.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    # Every session has closed: what is left in the shadow is compared now, and counts
    # in the last step.
    await _settle(proxy, websocket=True)
    demo.final = Counts.read(demo.metrics)
    demo.end_step(len(STEPS) - 1)
