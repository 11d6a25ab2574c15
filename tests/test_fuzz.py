"""A seeded, bounded fuzzer against a live proxy process with recording backends.

A real ``strangler run`` process serves five routes (JSON, NDJSON and SSE with every
exchange shadowed, a watched WebSocket route that shadows and a direct one that does
not) in front of two recording backends (``tests.fuzz_backends``). Thousands of mutated
request streams (``tests.fuzz_corpus``) and hundreds of mutated WebSocket frame
sequences are sent to it, each from its own loopback address so that what a backend
receives can be told apart per case. What must hold, whatever was sent:

- no worker dies: checked after every batch and at the end, by the supervisor's count of
  worker restarts on the admin ``/metrics`` (``strangler_worker_restarts_total``) and
  its log (``strangler run`` restarts a dead worker within tens of milliseconds, so
  the process staying up proves nothing), besides a known-good request that must be
  answered 200; at the end SIGTERM drains every worker and the supervisor exits 0;
- what a client receives reads as whole, well-formed HTTP/1.1 responses, followed by
  nothing or by the end of the connection; a WebSocket client receives well-formed frames
  and its session ends with a close frame or a close;
- every answer a client receives is the answer to one of its own requests, and every
  request relayed is answered (but the one in flight when a connection ends); a
  request the seeds hide in a body never reaches a backend as one of its own;
- every request a backend receives reads strictly, was framed by the proxy from what
  that client sent (its method, target, header values and body are the client's), and
  carries none of the client's ``X-Strangler-*`` or hop-by-hop headers; a WebSocket
  handshake reaches a backend only for a valid one from the client; every frame a
  backend receives obeys RFC 6455 and its messages are the client's; a shadow request
  repeats a primary one;
- a valid seed sent unmutated is served exactly: each of its requests reaches a backend
  as sent and its answer reaches the client.

``STRANGLER_TEST_FUZZ_SEED`` picks another run (the seed in use is printed);
``STRANGLER_TEST_FUZZ_HTTP_CASES`` and ``STRANGLER_TEST_FUZZ_WS_CASES`` make it longer
(case *n* is the same whatever the count, so a shorter count replays a failure's
start). A failure names the case, its seed and its mutations; a worker's death names
the batch it happened in and the supervisor's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fuzz_backends import Received, Record, RecordingBackend, client_of
from tests.fuzz_corpus import (
    MAX_BODY,
    MAX_WS_MESSAGE,
    HttpCase,
    WsCase,
    http_cases,
    ws_cases,
)
from tests.fuzz_wire import (
    FrameChecker,
    Malformed,
    NeedMore,
    build_frame,
    read_frame,
    read_request,
    read_responses,
)
from tests.proxy_harness import StranglerProcess, flags_document, strangler_process, write_flags

SEED = int(os.environ.get("STRANGLER_TEST_FUZZ_SEED", "1206"))
HTTP_CASES = int(os.environ.get("STRANGLER_TEST_FUZZ_HTTP_CASES", "4000"))
WS_CASES = int(os.environ.get("STRANGLER_TEST_FUZZ_WS_CASES", "500"))
# The whole run, proxy and backends started and stopped, is done within a minute at the
# default counts (longer counts get as much more).
RUN_WITHIN = 60.0 * max(1.0, HTTP_CASES / 4000, WS_CASES / 500)

HTTP_AT_ONCE = 96
WS_AT_ONCE = 32
BATCH = 500
# A connection quiet this long has said all it will say for now. Most cases end with a
# close long before; these bounds are generous so that a loaded machine does not pass
# for a proxy that stalls.
IDLE = 1.0
WS_IDLE = 2.0
CASE_LIMIT = 6.0  # no case takes longer than this, whatever the proxy does

# Headers the proxy sets or frames itself: their values need not be the client's bytes.
PROXY_SET = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"upgrade",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-strangler-shadow",
    b"x-request-id",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
}
HOP_BY_HOP = {
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
}
_VALID_HANDSHAKE = re.compile(
    rb"(?is)\A(?=.*\r\nsec-websocket-key:[ \t]*[A-Za-z0-9+/]{22}==\r\n)"
    rb"(?=.*\r\nsec-websocket-version:[ \t]*13\r\n)"
)
_CONNECTION_LINE = re.compile(rb"(?im)^connection:[ \t]*([^\r\n]*)\r\n")


def source_address(number: int, ws: bool = False) -> str:
    """A loopback address of the case's own (127.10.x.y for HTTP, 127.20.x.y for
    WebSocket): the proxy names it in X-Forwarded-For."""
    return f"127.{20 if ws else 10}.{number // 250}.{number % 250 + 1}"


# --- the proxy under test ------------------------------------------------------------


def write_config(tmp_path: Path, legacy: str, candidate: str) -> Path:
    write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    routes = ""
    for name, path, protocol, shadow in (
        ("json", "/fz/json", "json", 1.0),
        ("ndjson", "/fz/ndjson", "ndjson", 1.0),
        ("sse", "/fz/sse", "sse", 1.0),
        ("watched", "/fz/ws/watched", "websocket", 1.0),
        ("direct", "/fz/ws/direct", "websocket", 0.0),
    ):
        routes += f"""
[[routes]]
name = "{name}"
path = "{path}"
protocol = "{protocol}"
flag = "ssot-dispatcher"
shadow = {shadow}
shadow_methods = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE"]
turn_idle_seconds = 0.5
"""
    config = tmp_path / "strangler.toml"
    config.write_text(
        f"""
[server]
port = 0
max_body_bytes = {MAX_BODY}
max_ws_message_bytes = {MAX_WS_MESSAGE}
read_timeout = 5
keepalive_timeout = 5
shutdown_grace = 1
[admin]
port = 0
[backends]
legacy = "{legacy}"
candidate = "{candidate}"
[flags]
file = "flags.json"
[shadow]
timeout = 3
breaker_failures = 0
[divergences]
path = "{tmp_path / "divergences.sqlite3"}"
{routes}
"""
    )
    return config


@dataclass
class Failure:
    invariant: str
    case: str
    detail: str


@dataclass
class Outcome:
    received: bytes = b""
    end: str = ""  # eof, reset, idle, refused, limit


@dataclass
class Run:
    """What was found, and the worker deaths already reported."""

    failures: list[Failure] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)

    def fail(self, invariant: str, case: HttpCase | WsCase | None, detail: str) -> None:
        self.failures.append(Failure(invariant, case.name if case is not None else "-", detail))


# --- clients ---------------------------------------------------------------------------


async def exchange(port: int, address: str, writes: list[bytes], *, idle: float = IDLE) -> Outcome:
    """Send ``writes`` from ``address`` (a little apart, so they arrive as separate
    reads), and take what comes back until the proxy closes or goes quiet."""
    loop = asyncio.get_running_loop()
    outcome = Outcome()
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((address, 0))
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
    except (ConnectionError, OSError, TimeoutError):
        sock.close()
        outcome.end = "refused"
        return outcome
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    deadline = loop.time() + CASE_LIMIT
    received = bytearray()
    try:
        with contextlib.suppress(ConnectionError, OSError):
            for i, part in enumerate(writes):
                if i:
                    await asyncio.sleep(0.002)
                writer.write(part)
                await asyncio.wait_for(writer.drain(), 5)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                outcome.end = "limit"
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), min(idle, left))
            except TimeoutError:
                outcome.end = "idle" if loop.time() < deadline else "limit"
                break
            except (ConnectionError, OSError):
                outcome.end = "reset"
                break
            if not data:
                outcome.end = "eof"
                break
            received += data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    outcome.received = bytes(received)
    return outcome


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def probe(port: int) -> str:
    """A known-good request; "" when it is answered 200, else what went wrong."""
    request = b"GET /fz/json/probe HTTP/1.1\r\nHost: proxy.test\r\nX-User-Id: probe\r\n"
    outcome = await exchange(port, "127.0.0.1", [request + b"Connection: close\r\n\r\n"], idle=5)
    run = read_responses(outcome.received, heads_possible=False, at_eof=True)
    if outcome.end == "refused":
        return "connection refused"
    if run.problem or len(run.responses) != 1 or run.responses[0].status != 200:
        return f"answered {outcome.received[:300]!r} ({outcome.end})"
    return ""


async def admin_metrics(proxy: StranglerProcess) -> tuple[str, str]:
    """The supervisor's ``/metrics`` page (the workers' values and its own), and "" or
    what went wrong asking for it."""
    request = b"GET /metrics HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n"
    outcome = await exchange(port_of(proxy.admin_url), "127.0.0.1", [request], idle=5)
    answer = read_responses(outcome.received, heads_possible=False, at_eof=True)
    if answer.problem or len(answer.responses) != 1 or answer.responses[0].status != 200:
        return "", f"answered {outcome.received[:200]!r} ({outcome.end})"
    return answer.responses[0].body.decode(), ""


_WORKER_DEATH = re.compile(
    r"(?:worker \d+|the fork server) \(pid \d+\) (?:killed by|exited with) .*"
)


def worker_deaths(metrics: str, log: list[str]) -> list[str]:
    """What tells that a worker died: a restart counted on ``/metrics`` (by its cause),
    or the supervisor's line about the death."""
    found = []
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "strangler_worker_restarts_total" and sample.value:
                found.append(f"{sample.name}{sample.labels} = {sample.value:g}")
    for line in log:
        if death := _WORKER_DEATH.search(line):
            found.append(death.group(0))
    return found


async def check_serving(run: Run, proxy: StranglerProcess, when: str) -> None:
    """The proxy is up, answers a known-good request, and no worker died since the last
    check (each death is reported once)."""
    if proxy.proc.returncode is not None:
        last = "".join(proxy.log[-3:]).strip()
        detail = f"{when}: it exited with {proxy.proc.returncode}; its last words: {last[-300:]!r}"
        run.fail("the proxy stays up", None, detail)
        return
    if problem := await probe(port_of(proxy.proxy_url)):
        run.fail("the proxy serves between batches", None, f"{when}: {problem}")
    metrics, problem = await admin_metrics(proxy)
    if problem:
        run.fail("the admin /metrics answers", None, f"{when}: {problem}")
    for death in worker_deaths(metrics, proxy.log):
        if death not in run.deaths:
            run.deaths.append(death)
            run.fail("no worker dies", None, f"{when}: {death}")


# --- the verdicts ----------------------------------------------------------------------


def _subsequence(small: bytes, big: bytes) -> bool:
    if small in big:
        return True
    it = iter(big)
    return all(byte in it for byte in small)


def _connection_names(data: bytes) -> set[bytes]:
    return {
        token.strip().lower()
        for line in _CONNECTION_LINE.findall(data)
        for token in line.split(b",")
        if token.strip()
    }


def check_framed(run: Run, case: HttpCase | WsCase, got: Received, data: bytes) -> None:
    """A request a backend received was made from what the client sent."""
    request = got.request
    where = f"{got.backend} {'shadow' if got.shadow else 'primary'} {request.start[:100]!r}"
    if request.method not in data:
        run.fail("backend request not the client's", case, f"{where}: method")
    target = request.target
    if target not in data and target.lstrip(b"/") not in data:
        run.fail("backend request not the client's", case, f"{where}: target")
    named = _connection_names(data)
    websocket = b"websocket" in request.tokens(b"upgrade")
    if websocket and not _VALID_HANDSHAKE.search(data):
        run.fail(
            "a WebSocket handshake reaches a backend only for a valid one",
            case,
            f"{where}: the client sent no Sec-WebSocket-Key and Version 13",
        )
    for name, value in request.headers:
        lower = name.lower()
        if lower.startswith(b"x-strangler-") and not (
            lower == b"x-strangler-shadow" and value == b"1"
        ):
            run.fail("client's X-Strangler-* header passed on", case, f"{where}: {name!r}")
        elif lower in HOP_BY_HOP or (lower == b"upgrade" and not websocket):
            run.fail("hop-by-hop header passed on", case, f"{where}: {name!r}: {value[:60]!r}")
        elif lower in named and lower not in PROXY_SET:
            run.fail("header named in Connection passed on", case, f"{where}: {name!r}")
        elif lower == b"connection" and not request.tokens(b"connection") <= {
            b"keep-alive",
            b"close",
            b"upgrade",
        }:
            run.fail("hop-by-hop header passed on", case, f"{where}: Connection: {value!r}")
        elif lower not in PROXY_SET and (
            lower not in data.lower() or (value and value not in data)
        ):
            run.fail(
                "backend request not the client's",
                case,
                f"{where}: header {name!r}: {value[:60]!r} was not sent",
            )
    if request.body and not _subsequence(request.body, data):
        run.fail("backend request not the client's", case, f"{where}: body {request.body[:80]!r}")


def check_http(run: Run, case: HttpCase, outcome: Outcome, mine: list[Received]) -> None:
    data = case.data
    at_eof = outcome.end in ("eof", "reset")
    responses = read_responses(outcome.received, heads_possible=b"HEAD" in data, at_eof=at_eof)
    if responses.rest and not responses.upgraded:
        if outcome.end in ("idle", "limit"):
            run.fail(
                "well-formed answer",
                case,
                f"a partial answer, then silence ({responses.problem}): {responses.rest[:200]!r}",
            )
        else:
            run.fail(
                "well-formed answer",
                case,
                f"bytes that are no whole response before the close ({responses.problem}): "
                f"{responses.rest[:200]!r}",
            )
    for response in responses.responses:
        if not response.start.startswith(b"HTTP/1.1 "):
            run.fail("answers in HTTP/1.1", case, f"an answer {response.start!r}")
    for i, response in enumerate(responses.responses[:-1]):
        if b"close" in response.tokens(b"connection"):
            run.fail(
                "well-formed answer",
                case,
                f"answer {i} says Connection: close, yet more follows",
            )
    if responses.upgraded:
        check_server_frames(run, case, responses.rest, outcome)
    primaries = [got for got in mine if not got.shadow]
    shadows = [got for got in mine if got.shadow]
    owned = {got.tag for got in primaries}
    tags = [t.decode() for response in responses.responses for t in response.values(b"x-tag")]
    for tag in tags:
        if tag not in owned:
            run.fail("no crossed answers", case, f"the client received the answer {tag}")
    unanswered = [
        got
        for got in primaries
        if got.tag not in tags and b"websocket" not in got.request.tokens(b"upgrade")
    ]
    for got in unanswered:
        if b"/SMUGGLED" in got.request.target:
            # The seeds hide this request in a body: a backend may see it only as a
            # request of its own that the proxy answered.
            run.fail("no smuggled request", case, f"{got.backend}: {got.request.start!r}")
    if len(unanswered) > 1:
        run.fail(
            "every relayed request answered",
            case,
            f"{len(unanswered)} requests reached a backend and their answers never came: "
            + ", ".join(repr(got.request.start[:80]) for got in unanswered),
        )
    for got in mine:
        check_framed(run, case, got, data)
    for got in shadows:
        twin = [
            p
            for p in primaries
            if (p.request.method, p.request.target, p.request.body)
            == (got.request.method, got.request.target, got.request.body)
        ]
        if not twin:
            run.fail(
                "a shadow repeats a primary",
                case,
                f"shadow {got.request.start[:100]!r} on {got.backend} has no primary",
            )
    if case.expected is not None:
        sent = [(e.method, e.target, e.body) for e in case.expected]
        seen = [(p.request.method, p.request.target, p.request.body) for p in primaries]
        if seen != sent:
            run.fail("valid input served exactly", case, f"backends received {seen!r}")
        elif tags != [p.tag for p in primaries] or any(
            r.status != 200 for r in responses.responses if r.status >= 200
        ):
            statuses = [r.status for r in responses.responses]
            run.fail(
                "valid input served exactly",
                case,
                f"answers {statuses} tagged {tags}, backend tags {[p.tag for p in primaries]}",
            )


def check_server_frames(run: Run, case: HttpCase | WsCase, data: bytes, outcome: Outcome) -> bool:
    """The frames a client received after a 101; True when they end with a close."""
    checker = FrameChecker(masked=False, max_message=1 << 24)
    pos = 0
    while pos < len(data):
        try:
            frame = read_frame(data, pos)
            checker.check(frame)
        except NeedMore:
            if outcome.end in ("eof", "reset"):
                run.fail(
                    "well-formed frames",
                    case,
                    f"a frame cut short by the close: {data[pos : pos + 60]!r}",
                )
            else:
                run.fail("well-formed frames", case, f"a frame cut short: {data[pos : pos + 60]!r}")
            return False
        except Malformed as exc:
            run.fail("well-formed frames", case, f"{exc}: {data[pos : pos + 60]!r}")
            return False
        pos += frame.size
    return checker.closed is not None


def client_payloads(case: WsCase) -> bytes:
    """The unmasked payloads of the frames a WebSocket case sent, as far as they read."""
    data, pos, out = case.data, 0, []
    while pos < len(data):
        try:
            frame = read_frame(data, pos, max_payload=1 << 62)
        except (NeedMore, Malformed):
            break
        out.append(frame.payload)
        pos += frame.size
    return b"".join(out)


def check_ws(
    run: Run, case: WsCase, outcome: Outcome, mine: list[Received], record: Record
) -> None:
    responses = read_responses(outcome.received, heads_possible=False, at_eof=False)
    if not responses.upgraded:
        if responses.rest and outcome.end not in ("eof", "reset"):
            run.fail("well-formed answer", case, f"handshake answer {outcome.received[:200]!r}")
        elif responses.rest:
            problem = responses.problem
            run.fail(
                "well-formed answer",
                case,
                f"handshake answer ({problem}) {outcome.received[:200]!r}",
            )
        return
    closed = check_server_frames(run, case, responses.rest, outcome)
    if case.complete and not closed and outcome.end in ("idle", "limit"):
        run.fail(
            "a session ends with a close",
            case,
            f"no close frame and no close {WS_IDLE} s after the client's last frame",
        )
    for got in mine:
        check_framed(run, case, got, case.handshake)
    address = source_address(case.number, ws=True)
    sent = client_payloads(case)
    for message in record.messages:
        if (
            message.client == address
            and message.opcode != 0x8
            and not _subsequence(message.payload, sent)
        ):
            run.fail(
                "backend frames are the client's",
                case,
                f"{message.backend} received a message the client did not send: "
                f"{message.payload[:80]!r}",
            )


# --- the run ---------------------------------------------------------------------------


@asynccontextmanager
async def backends() -> AsyncIterator[tuple[Record, str, str]]:
    record = Record()
    legacy = RecordingBackend("legacy", record, MAX_WS_MESSAGE)
    candidate = RecordingBackend("candidate", record, MAX_WS_MESSAGE)
    try:
        yield record, await legacy.start(), await candidate.start()
    finally:
        await legacy.stop()
        await candidate.stop()


async def settle(record: Record) -> None:
    """Wait until the backends have been quiet for a moment (shadows come late)."""
    loop = asyncio.get_running_loop()
    for _ in range(100):  # at most 5 s
        if loop.time() - record.last_activity >= 0.3:
            return
        await asyncio.sleep(0.05)


async def run_batch(
    port: int, cases: list[HttpCase] | list[WsCase], at_once: int
) -> dict[int, Outcome]:
    gate = asyncio.Semaphore(at_once)
    outcomes: dict[int, Outcome] = {}

    async def one(case: HttpCase | WsCase) -> None:
        async with gate:
            if isinstance(case, HttpCase):
                address = source_address(case.number)
                outcome = await exchange(port, address, case.writes)
            else:
                address = source_address(case.number, ws=True)
                writes = [case.handshake, *case.frames]
                outcome = await exchange(port, address, writes, idle=WS_IDLE)
            outcomes[case.number] = outcome

    await asyncio.gather(*(one(case) for case in cases))
    return outcomes


async def batches(
    run: Run, proxy: StranglerProcess, cases: list[HttpCase] | list[WsCase], at_once: int
) -> dict[int, Outcome]:
    """Run ``cases`` in batches; after each, the proxy must serve and no worker have died
    (a death names the batch: the cases that were in flight)."""
    outcomes: dict[int, Outcome] = {}
    for start in range(0, len(cases), BATCH):
        batch = cases[start : start + BATCH]
        outcomes.update(await run_batch(port_of(proxy.proxy_url), batch, at_once))
        kind = "http" if isinstance(batch[0], HttpCase) else "ws"
        await check_serving(
            run, proxy, f"after {kind} cases {batch[0].number} to {batch[-1].number}"
        )
    return outcomes


def report(run: Run, counts: str) -> str:
    grouped: dict[str, list[Failure]] = defaultdict(list)
    for failure in run.failures:
        grouped[failure.invariant].append(failure)
    lines = [f"fuzz seed {SEED} ({counts}): {len(run.failures)} failures"]
    for invariant, failures in sorted(grouped.items(), key=lambda item: -len(item[1])):
        lines.append(f"- {invariant}: {len(failures)}")
        for failure in failures[:6]:
            lines.append(f"    {failure.case}: {failure.detail[:400]}")
    return "\n".join(lines)


@pytest.mark.slow
async def test_a_fuzzed_proxy_stays_up_answers_well_formed_and_frames_every_request(
    tmp_path: Path,
) -> None:
    http = http_cases(SEED, HTTP_CASES)
    ws = ws_cases(SEED, WS_CASES)
    counts = f"{len(http)} request streams, {len(ws)} WebSocket sequences"
    print(f"fuzz seed {SEED}: {counts}")
    started = time.monotonic()
    async with backends() as (record, legacy, candidate):
        run = Run()
        async with strangler_process(write_config(tmp_path, legacy, candidate)) as proxy:
            http_outcomes = await batches(run, proxy, http, HTTP_AT_ONCE)
            ws_outcomes = await batches(run, proxy, ws, WS_AT_ONCE)
            await settle(record)
            await check_serving(run, proxy, "at the end")
        if proxy.proc.returncode != 0:
            # SIGTERM drains every worker; the supervisor exits 0 only if each did.
            last = "".join(proxy.log[-3:]).strip()
            detail = f"exited with {proxy.proc.returncode}: {last[-300:]!r}"
            run.fail("the proxy stops cleanly", None, detail)
        mine: dict[str, list[Received]] = defaultdict(list)
        for got in record.received:
            mine[got.client].append(got)
        addresses = {source_address(c.number) for c in http} | {
            source_address(c.number, ws=True) for c in ws
        }
        for address, received in mine.items():
            if address not in addresses and address != "127.0.0.1":
                for got in received:
                    run.fail(
                        "every backend request names its client",
                        None,
                        f"{got.backend} received {got.request.start[:100]!r} from {address!r}",
                    )
        for violation in record.violations:
            # Grouped by the kind of violation (numbers apart), each named in full.
            kind = re.sub(r"(?<![-\w])(0x[0-9a-f]+|\d+)", "N", violation.what)
            run.fail(
                f"backends receive well-formed input ({kind})",
                _case_at(violation.client, http, ws),
                f"{violation.what}, on {violation.backend}: {violation.data[:300]!r}",
            )
        for case in http:
            if case.number in http_outcomes:
                outcome = http_outcomes[case.number]
                check_http(run, case, outcome, mine.get(source_address(case.number), []))
        for ws_case in ws:
            if ws_case.number in ws_outcomes:
                ws_mine = mine.get(source_address(ws_case.number, ws=True), [])
                check_ws(run, ws_case, ws_outcomes[ws_case.number], ws_mine, record)
    elapsed = time.monotonic() - started
    counts += f", {len(record.received)} backend requests, {elapsed:.1f} s"
    if elapsed >= RUN_WITHIN:
        run.fail(f"the run ends within {RUN_WITHIN:g} s", None, f"it took {elapsed:.1f} s")
    if run.failures:
        pytest.fail(report(run, counts), pytrace=False)
    print(report(run, counts))


def _case_at(address: str, http: list[HttpCase], ws: list[WsCase]) -> HttpCase | WsCase | None:
    for case in http:
        if source_address(case.number) == address:
            return case
    for ws_case in ws:
        if source_address(ws_case.number, ws=True) == address:
            return ws_case
    return None


# --- the oracles themselves ---------------------------------------------------------


def test_the_cases_are_the_same_for_the_same_seed_and_differ_for_another() -> None:
    assert [c.writes for c in http_cases(7, 200)] == [c.writes for c in http_cases(7, 200)]
    assert [c.frames for c in ws_cases(7, 50)] == [c.frames for c in ws_cases(7, 50)]
    assert [c.writes for c in http_cases(7, 200)] != [c.writes for c in http_cases(8, 200)]


def test_every_seed_kind_and_mutation_kind_comes_up_in_a_run() -> None:
    cases = http_cases(SEED, HTTP_CASES)
    seeds = {c.seed for c in cases}
    assert {"pipelined", "smuggling", "expect-continue", "non-utf8-user-id"} <= seeds
    done = " ".join(m for c in cases for m in c.mutations)
    for word in ("flip", "insert", "delete", "splice", "duplicate", "add", "line end", "truncate"):
        assert word in done
    assert sum(1 for c in cases if c.expected is not None) > HTTP_CASES // 20
    assert sum(1 for c in cases if len(c.writes) > 1) > HTTP_CASES // 5
    frames = " ".join(m for c in ws_cases(SEED, WS_CASES) for m in c.mutations)
    for word in ("unmasked", "rsv", "opcode", "fragmented ping", "oversize", "UTF-8", "close code"):
        assert word in frames


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET * HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n",
    ],
)
def test_the_backends_reader_refuses_what_a_proxy_must_not_send(request_bytes: bytes) -> None:
    with pytest.raises(Malformed):
        read_request(request_bytes)


def test_the_backends_reader_takes_requests_one_at_a_time_and_waits_for_the_rest() -> None:
    two = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nxy"
    )
    first = read_request(two)
    second = read_request(two, first.size)
    assert (first.target, first.body, second.target, second.body) == (b"/a", b"abc", b"/b", b"xy")
    assert first.size + second.size == len(two)
    for cut in range(first.size):
        with pytest.raises(NeedMore):
            read_request(two[:cut])


@pytest.mark.parametrize(
    ("received", "at_eof", "whole"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no", True, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200", True, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", True, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", True, False),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            True,
            False,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True, True),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", False, False),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", True, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", True, False),
        (b"garbage", True, False),
        (b"", True, True),
    ],
)
def test_the_clients_reader_takes_only_whole_well_formed_responses(
    received: bytes, at_eof: bool, whole: bool
) -> None:
    run = read_responses(received, heads_possible=False, at_eof=at_eof)
    assert (not run.rest) == whole, run


def test_an_answer_to_head_is_read_without_its_body_only_when_a_head_was_sent() -> None:
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    two = head_answer + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert len(read_responses(two, heads_possible=True, at_eof=True).responses) == 2
    assert read_responses(two, heads_possible=False, at_eof=True).rest


MASK = b"\x01\x02\x03\x04"


@pytest.mark.parametrize(
    ("frames", "masked"),
    [
        ([build_frame(0x1, b"hi")], True),
        ([build_frame(0x1, b"hi", mask=MASK)], False),
        ([build_frame(0x1, b"hi", mask=MASK, rsv=4)], True),
        ([build_frame(0x3, b"hi", mask=MASK)], True),
        ([build_frame(0x9, b"p", fin=False, mask=MASK)], True),
        ([build_frame(0x9, b"p" * 126, mask=MASK)], True),
        ([build_frame(0x1, b"\xff", mask=MASK)], True),
        ([build_frame(0x8, b"\x03\xe8\xff", mask=MASK)], True),
        ([build_frame(0x8, b"\x03", mask=MASK)], True),
        ([build_frame(0x8, b"\x03\xed", mask=MASK)], True),  # 1005
        ([build_frame(0x0, b"x", mask=MASK)], True),
        ([build_frame(0x1, b"a", fin=False, mask=MASK), build_frame(0x1, b"b", mask=MASK)], True),
        ([build_frame(0x2, b"b" * (MAX_WS_MESSAGE + 1), mask=MASK)], True),
        ([build_frame(0x8, b"", mask=MASK), build_frame(0x1, b"late", mask=MASK)], True),
    ],
)
def test_the_frame_checker_refuses_each_broken_rule(frames: list[bytes], masked: bool) -> None:
    checker = FrameChecker(masked=masked, max_message=MAX_WS_MESSAGE)
    data, pos = b"".join(frames), 0
    with pytest.raises(Malformed):
        while pos < len(data):
            frame = read_frame(data, pos)
            checker.check(frame)
            pos += frame.size


def test_the_frame_checker_takes_a_valid_fragmented_conversation() -> None:
    frames = [
        build_frame(0x1, "hé".encode()[:2], fin=False, mask=MASK),
        build_frame(0x9, b"ping", mask=MASK),
        build_frame(0x0, "hé".encode()[2:], mask=MASK),
        build_frame(0x8, b"\x03\xe8bye", mask=MASK),
    ]
    checker = FrameChecker(masked=True, max_message=MAX_WS_MESSAGE)
    data, pos, results = b"".join(frames), 0, []
    while pos < len(data):
        frame = read_frame(data, pos)
        results.append(checker.check(frame))
        pos += frame.size
    assert any(getattr(r, "payload", None) == "hé".encode() for r in results)
    assert checker.closed is not None


def test_a_backend_names_the_client_by_the_address_the_proxy_added_last() -> None:
    request = read_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1, 2\r\n\r\n")
    assert client_of(request) == "2"


# --- the verdicts can fail ------------------------------------------------------------

GET = b"GET /fz/json/1 HTTP/1.1\r\nHost: proxy.test\r\nX-User-Id: u\r\nConnection: close\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nX-Tag: %b\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def received(head: bytes, *, tag: str = "legacy-1", shadow: bool = False) -> Received:
    request = read_request(head)
    return Received("legacy", tag, "127.10.0.1", request, shadow, 1)


def upstream(*lines: bytes, target: bytes = b"/fz/json/1") -> bytes:
    common = b"Host: b\r\nX-User-Id: u\r\nX-Forwarded-For: 127.10.0.1\r\n"
    return b"GET %b HTTP/1.1\r\n%b%b\r\n" % (target, common, b"".join(lines))


def verdicts(backend: list[Received], answer: bytes, *, end: str = "eof") -> list[str]:
    run = Run()
    case = HttpCase(1, "get", [GET])
    check_http(run, case, Outcome(received=answer, end=end), backend)
    return [failure.invariant for failure in run.failures]


def test_a_faithful_exchange_passes_every_verdict() -> None:
    assert verdicts([received(upstream())], ANSWER % b"legacy-1") == []


@pytest.mark.parametrize(
    ("backend", "answer", "end", "invariant"),
    [
        ([received(upstream())], ANSWER % b"candidate-7", "eof", "no crossed answers"),
        ([received(upstream())], (ANSWER % b"legacy-1")[:-3], "eof", "well-formed answer"),
        ([received(upstream())], (ANSWER % b"legacy-1")[:20], "idle", "well-formed answer"),
        (
            [received(upstream())],
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            "eof",
            "answers in HTTP/1.1",
        ),
        (
            [received(upstream(b"X-Injected: 1\r\n"))],
            ANSWER % b"legacy-1",
            "eof",
            "backend request not the client's",
        ),
        (
            [received(upstream(target=b"/fz/json/SMUGGLED"))],
            ANSWER % b"legacy-1",
            "eof",
            "backend request not the client's",
        ),
        (
            [received(upstream(b"X-Strangler-Backend: candidate\r\n"))],
            ANSWER % b"legacy-1",
            "eof",
            "client's X-Strangler-* header passed on",
        ),
        (
            [received(upstream(b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))],
            ANSWER % b"legacy-1",
            "eof",
            "a WebSocket handshake reaches a backend only for a valid one",
        ),
        (
            [received(upstream(b"Keep-Alive: 5\r\n"))],
            ANSWER % b"legacy-1",
            "eof",
            "hop-by-hop header passed on",
        ),
        (
            [
                received(upstream()),
                received(upstream(), tag="legacy-2"),
                received(upstream(), tag="legacy-3"),
            ],
            ANSWER % b"legacy-1",
            "eof",
            "every relayed request answered",
        ),
        (
            [received(upstream(target=b"/fz/json/SMUGGLED")), received(upstream(), tag="legacy-2")],
            ANSWER % b"legacy-2",
            "eof",
            "no smuggled request",
        ),
        (
            [received(upstream(b"X-Strangler-Shadow: 1\r\n"), shadow=True)],
            b"",
            "eof",
            "a shadow repeats a primary",
        ),
    ],
)
def test_each_verdict_fails_on_the_fault_it_names(
    backend: list[Received], answer: bytes, end: str, invariant: str
) -> None:
    assert invariant in verdicts(backend, answer, end=end)


SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "end", "invariants"),
    [
        (SWITCHED + build_frame(0x8, b"\x03\xe8"), "eof", []),
        (SWITCHED, "eof", []),
        (SWITCHED, "idle", ["a session ends with a close"]),
        (
            SWITCHED + build_frame(0x1, b"\xff") + build_frame(0x8, b""),
            "eof",
            ["well-formed frames"],
        ),
        (SWITCHED + build_frame(0x1, b"hi", mask=MASK), "eof", ["well-formed frames"]),
        (SWITCHED + build_frame(0x8, b"\x03\xe8")[:3], "eof", ["well-formed frames"]),
    ],
)
def test_a_websocket_session_must_end_with_a_close_and_well_formed_frames(
    answer: bytes, end: str, invariants: list[str]
) -> None:
    run = Run()
    case = WsCase(1, "text", b"/fz/ws/direct", b"", [build_frame(0x8, b"", mask=MASK)])
    check_ws(run, case, Outcome(received=answer, end=end), [], Record())
    assert [failure.invariant for failure in run.failures] == invariants


RESTARTS = (
    "# HELP strangler_worker_restarts_total Worker processes started again after they died.\n"
    "# TYPE strangler_worker_restarts_total counter\n"
)


@pytest.mark.parametrize(
    ("metrics", "log", "deaths"),
    [
        (RESTARTS, ["worker 0 (pid 7) serving\n"], 0),
        (RESTARTS + 'strangler_worker_restarts_total{cause="SIGSEGV"} 0.0\n', [], 0),
        (RESTARTS + 'strangler_worker_restarts_total{cause="SIGSEGV"} 1.0\n', [], 1),
        (RESTARTS + 'strangler_worker_restarts_total{cause="exit 1"} 2.0\n', [], 1),
        (RESTARTS, ["worker 0 (pid 7) killed by SIGSEGV after 3.1 s; starting it again now\n"], 1),
        (RESTARTS, ["worker 1 (pid 9) exited with 1 after 0.2 s; starting it again now\n"], 1),
        (RESTARTS, ["the fork server (pid 5) killed by SIGKILL; starting it again in 0 s\n"], 1),
    ],
)
def test_a_worker_death_is_told_by_the_restart_count_or_the_supervisors_log(
    metrics: str, log: list[str], deaths: int
) -> None:
    assert len(worker_deaths(metrics, log)) == deaths


async def test_a_worker_killed_during_a_run_fails_it_once_though_the_proxy_serves_on(
    tmp_path: Path,
) -> None:
    async with backends() as (_, legacy, candidate):
        async with strangler_process(write_config(tmp_path, legacy, candidate)) as proxy:
            run = Run()
            await check_serving(run, proxy, "before")
            assert run.failures == []
            victim = int(re.findall(r"worker 0 \(pid (\d+)\) serving", "".join(proxy.log))[-1])
            os.kill(victim, signal.SIGKILL)
            for _ in range(500):  # at most 5 s for the supervisor to start it again
                if "serving again" in "".join(proxy.log):
                    break
                await asyncio.sleep(0.01)
            await check_serving(run, proxy, "after the kill")
            await check_serving(run, proxy, "later")
    assert proxy.proc.returncode is not None
    assert [(f.invariant, f.detail.split(":")[0]) for f in run.failures] == [
        ("no worker dies", "after the kill"),
        ("no worker dies", "after the kill"),
    ]
    assert f"worker 0 (pid {victim}) killed by SIGKILL" in run.failures[1].detail
