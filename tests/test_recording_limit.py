"""What one side of one exchange or WebSocket turn records is bounded, whatever a backend
sends and for however long.

Past ``[shadow] max_recorded_events`` or ``max_recorded_bytes`` a recorder lets go of
its events and keeps nothing more; the relay goes on untouched; the comparison is
counted as ignored (a sequence too long to hold is no mismatch of the candidate) and
the side is counted in ``strangler_recording_limit_total``. The recorder and the turns
are tested on values; the bound on a real ``strangler run`` over loopback, with a
backend that streams 100 MiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from adapters.events import Event
from proxy.experiment import RouteExperiment
from proxy.metrics import Metrics
from proxy.observation import Observation, Recorder
from proxy.routing import Backend, Route, RouteTable
from proxy.settings import ConfigError, RouteSettings, load_settings
from proxy.turns import TurnTracker
from tests.proxy_harness import (
    config_with,
    flags_document,
    rss_bytes,
    strangler_process,
    write_flags,
)

MIB = 1024 * 1024


def line(n: int, kind: str = "tick", pad: int = 80) -> bytes:
    return b'{"type":"%s","user_id":"u1","n":%d,"pad":"%s"}\n' % (kind.encode(), n, b"x" * pad)


def recorder(max_events: int = 10, max_bytes: int = 10_000, protocol: str = "ndjson") -> Recorder:
    observation = Observation(Backend.LEGACY, "primary", 0.0)
    return Recorder(observation, protocol, "type", max_events, max_bytes)


# --- the recorder ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "pad", "max_events", "max_bytes", "over"),
    [
        (10, 4, 10, 10_000, False),  # exactly the events allowed
        (11, 4, 10, 10_000, True),  # one event too many
        (5, 4, 10, 5 * 50, False),  # the bytes allowed, to the byte (lines of 50 bytes)
        (5, 4, 10, 5 * 50 - 1, True),  # one byte too many
        (2, 2000, 1000, 3000, True),  # few events, too many bytes
    ],
)
def test_a_recorder_keeps_a_side_whole_up_to_its_limits_and_nothing_past_them(
    lines: int, pad: int, max_events: int, max_bytes: int, over: bool
) -> None:
    rec = recorder(max_events, max_bytes)
    data = b"".join(line(n, pad=pad) for n in range(lines))
    assert pad != 4 or len(line(0, pad=4)) == 50
    for i in range(0, len(data), 7):
        rec.feed(data[i : i + 7], 1.0)
    observation = rec.finish(2.0)
    assert observation.over_limit is over
    assert len(observation.events) == (0 if over else lines)
    assert observation.duration == 2.0


def test_past_the_limit_a_recorder_stops_decoding_unless_the_relay_still_needs_the_events() -> None:
    quiet, needed = recorder(max_events=3), recorder(max_events=3)
    needed.decodes_past_limit = True
    for n in range(3):
        assert len(quiet.feed(line(n), 1.0)) == len(needed.feed(line(n), 1.0)) == 1
    assert quiet.feed(line(3), 1.0) == [] or quiet.observation.over_limit
    needed.feed(line(3), 1.0)
    for n in range(4, 1000):
        assert quiet.feed(line(n), 1.0) == []
        assert [e.data["n"] for e in needed.feed(line(n), 1.0)] == [n]
    for rec in (quiet, needed):
        assert rec.observation.over_limit
        assert rec.observation.events == []
    # A last line without its newline is decoded only for whoever still needs it.
    quiet.feed(line(1000)[:-1], 1.0)
    needed.feed(line(1000)[:-1], 1.0)
    assert quiet.close() == []
    assert [e.data["n"] for e in needed.close()] == [1000]


def test_a_whole_json_body_over_the_byte_limit_is_not_kept() -> None:
    rec = recorder(max_bytes=1024, protocol="json")
    rec.begin(200)
    body = json.dumps({"type": "answer", "pad": "x" * 2000}).encode()
    events = rec.feed_last(body, 1.0)
    assert events == []  # nothing decoded: nobody needs it
    assert rec.observation.over_limit and rec.observation.events == []


# --- the comparison ----------------------------------------------------------------------


def route(**settings: object) -> Route:
    table = RouteTable(
        [
            RouteSettings.model_validate(
                {"name": "stream", "path": "/s", "protocol": "ndjson", "flag": "f", **settings}
            )
        ]
    )
    return table.routes[0]


def observed(role: str, backend: Backend, over: bool) -> Observation:
    observation = Observation(backend, role, 0.0)
    observation.status = 200
    observation.duration = 1.0
    if over:
        observation.over_limit = True
    else:
        observation.events = [Event("start", {}), Event("end", {})]
    return observation


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("primary_over", "shadow_over", "outcome"),
    [
        (False, False, "match"),
        (True, False, "ignored"),
        (False, True, "ignored"),
        (True, True, "ignored"),
    ],
)
def test_a_side_past_the_limit_makes_the_comparison_ignored_and_is_counted_per_side(
    primary_over: bool, shadow_over: bool, outcome: str
) -> None:
    metrics = Metrics(CollectorRegistry())
    experiment = RouteExperiment(route(shadow=1.0, contract="start tick* end"), metrics, None)
    primary = observed("primary", Backend.LEGACY, primary_over)
    shadow = observed("shadow", Backend.CANDIDATE, shadow_over)
    experiment.conclude(primary, shadow)
    assert sample(metrics, "strangler_comparisons_total", route="stream", outcome=outcome) == 1
    for role, backend, over in (
        ("primary", "legacy", primary_over),
        ("shadow", "candidate", shadow_over),
    ):
        labels = {"route": "stream", "backend": backend, "role": role}
        assert sample(metrics, "strangler_recording_limit_total", **labels) == int(over)
    # A sequence let go of says nothing about the grammar: no violation either way.
    for backend in ("legacy", "candidate"):
        labels = {"route": "stream", "backend": backend}
        assert sample(metrics, "strangler_contract_violations_total", **labels) == 0


# --- WebSocket turns ---------------------------------------------------------------------


def test_a_chatty_websocket_turn_holds_at_most_its_limit_and_still_ends_at_its_end_type() -> None:
    metrics = Metrics(CollectorRegistry())
    contract = "start tick* end"
    websocket = RouteSettings.model_validate(
        {"name": "ws", "path": "/ws", "protocol": "websocket", "flag": "f", "shadow": 1.0}
        | {"contract": contract}
    )
    ws_route = RouteTable([websocket]).routes[0]
    experiment = RouteExperiment(ws_route, metrics, None)
    tracker = TurnTracker(
        ws_route, experiment, Backend.LEGACY, Backend.CANDIDATE, max_events=100, max_bytes=MIB
    )

    def message(kind: str, n: int) -> str:
        return json.dumps({"type": kind, "n": n})

    tracker.client_message(0.0)
    for frame in (tracker.primary_frame, tracker.shadow_frame):
        frame(message("start", 0), 0.1)
        for n in range(1, 50_000):
            frame(message("tick", n), 0.1)
    turn = tracker.open[0]
    for side in (turn.primary, turn.shadow):
        assert side is not None
        assert side.observation.over_limit and side.observation.events == []
        assert not side.ended  # the turn goes on: its frames do not spill into the next
    tracker.primary_frame(message("end", 0), 0.2)
    tracker.shadow_frame(message("end", 0), 0.2)
    assert tracker.settled
    tracker.client_message(1.0)  # the next turn is recorded and compared as usual
    for frame in (tracker.primary_frame, tracker.shadow_frame):
        for kind in ("start", "tick", "end"):
            frame(message(kind, 1), 1.1)
    assert tracker.settled
    compared = {
        outcome: sample(metrics, "strangler_comparisons_total", route="ws", outcome=outcome)
        for outcome in ("match", "ignored")
    }
    assert compared == {"match": 1, "ignored": 1}
    for role, backend in (("primary", "legacy"), ("shadow", "candidate")):
        labels = {"route": "ws", "backend": backend, "role": role}
        assert sample(metrics, "strangler_recording_limit_total", **labels) == 1


# --- configuration -----------------------------------------------------------------------


def test_the_recording_limits_default_to_4096_events_and_1_mib_and_can_be_set(
    tmp_path: Path,
) -> None:
    shadow = load_settings(config_with(tmp_path, "shadow", ""), {}).shadow
    assert (shadow.max_recorded_events, shadow.max_recorded_bytes) == (4096, MIB)
    config = config_with(
        tmp_path, "shadow", "max_recorded_events = 100\nmax_recorded_bytes = 65536"
    )
    shadow = load_settings(config, {"STRANGLER_SHADOW__MAX_RECORDED_BYTES": "2048"}).shadow
    assert (shadow.max_recorded_events, shadow.max_recorded_bytes) == (100, 2048)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_recorded_events", "0"),
        ("max_recorded_events", "-1"),
        ("max_recorded_events", '"many"'),
        ("max_recorded_bytes", "1023"),
        ("max_recorded_bytes", "1.5"),
    ],
)
def test_a_recording_limit_that_is_not_a_sound_count_is_refused_naming_key_and_file(
    tmp_path: Path, key: str, value: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(config_with(tmp_path, "shadow", f"{key} = {value}"), {})
    message = str(refused.value)
    assert f"shadow.{key}" in message and "strangler.toml" in message


# --- over real loopback --------------------------------------------------------------------

STREAM_BYTES = 100 * MIB
BLOCK_LINES = 1024  # lines of about 1 KiB per block the backend writes


def ndjson_block(start: int) -> bytes:
    return b"".join(line(start + i, pad=960) for i in range(BLOCK_LINES))


def sse_block(start: int) -> bytes:
    return b"".join(b"data: " + line(start + i, pad=960) + b"\n" for i in range(BLOCK_LINES))


def the_stream(block: Callable[[int], bytes]) -> list[bytes]:
    """The body a backend sends: the contract's start, ~100 MiB of ticks, its end."""
    tick, start, end = b'"type":"tick"', b'"type":"start"', b'"type":"end"'
    blocks = [block(0).replace(tick, start, 1)]
    size = len(blocks[0])
    while size < STREAM_BYTES:
        blocks.append(block(len(blocks) * BLOCK_LINES))
        size += len(blocks[-1])
    before, _, after = blocks[-1].rpartition(tick)
    blocks[-1] = before + end + after
    return blocks


@asynccontextmanager
async def streaming_backend(blocks: list[bytes], content_type: bytes) -> AsyncIterator[str]:
    """Answers every request with ``blocks`` as one chunked body, as fast as it is taken."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            for block in blocks:
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def read_chunked(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read a chunked body as it comes: its size and SHA-256, nothing of it kept."""
    digest = hashlib.sha256()
    size = 0
    while True:
        length = int((await reader.readline()).split(b";")[0], 16)
        if length == 0:
            await reader.readline()
            return size, digest.hexdigest()
        data = await reader.readexactly(length)
        digest.update(data)
        size += length
        await reader.readexactly(2)


async def metric(admin_url: str, name: str, **labels: str) -> float:
    """A sample from a running proxy's /metrics (0 when absent)."""
    host, port = admin_url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        text = (await reader.read()).decode()
    finally:
        writer.close()
    for found in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(found.group(2))
    return 0.0


@pytest.mark.parametrize(
    ("protocol", "route_keys", "block", "content_type"),
    [
        (
            "ndjson",
            'contract = "start tick* end"\nuser_field = "user_id"\n',
            ndjson_block,
            b"application/x-ndjson",
        ),
        ("sse", "", sse_block, b"text/event-stream"),
    ],
)
async def test_a_shadowed_stream_of_100_mib_reaches_the_client_whole_in_bounded_memory(
    tmp_path: Path,
    protocol: str,
    route_keys: str,
    block: Callable[[int], bytes],
    content_type: bytes,
) -> None:
    blocks = the_stream(block)
    body = b"".join(blocks)
    expected = (len(body), hashlib.sha256(body).hexdigest())
    del body
    async with streaming_backend(blocks, content_type) as url:
        write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        config = tmp_path / "strangler.toml"
        config.write_text(
            f'[admin]\nport = 0\n[backends]\nlegacy = "{url}"\ncandidate = "{url}"\n'
            '[flags]\nfile = "flags.json"\n'
            "[[routes]]\n"
            f'name = "stream"\npath = "/stream"\nprotocol = "{protocol}"\n'
            'flag = "ssot-dispatcher"\nshadow = 1.0\n' + route_keys
        )
        async with strangler_process(config) as running:
            port = int(running.proxy_url.rsplit(":", 1)[1])
            baseline = rss_bytes(running.proc.pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            peak = baseline
            try:
                writer.write(b"GET /stream/x HTTP/1.1\r\nHost: proxy.test\r\nX-User-Id: u1\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert b"transfer-encoding: chunked" in head.lower(), head
                reading = asyncio.create_task(read_chunked(reader))
                while not reading.done():
                    peak = max(peak, rss_bytes(running.proc.pid))
                    await asyncio.wait({reading}, timeout=0.05)
                received = await asyncio.wait_for(reading, 60)
            finally:
                writer.close()
            assert received == expected
            assert peak - baseline < 50 * MIB, f"grew {(peak - baseline) / MIB:.1f} MiB"

            async def counted() -> tuple[float, float, float, float]:
                admin = running.admin_url
                return (
                    await metric(admin, "strangler_comparisons_total", outcome="ignored"),
                    await metric(admin, "strangler_comparisons_total", outcome="match"),
                    await metric(admin, "strangler_recording_limit_total", role="primary"),
                    await metric(admin, "strangler_recording_limit_total", role="shadow"),
                )

            for _ in range(100):  # the workers write their metrics out once a second
                seen = await counted()
                if seen == (1, 0, 1, 1):
                    break
                await asyncio.sleep(0.1)
            assert seen == (1, 0, 1, 1)
