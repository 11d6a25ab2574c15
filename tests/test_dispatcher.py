"""The demo dispatchers, legacy and candidate, exercised as real loopback servers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import re
import time
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, WSMsgType, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.dispatcher import (
    DISPATCHER_KEY,
    HOLD_RELEASE_KEY,
    KNOBS_KEY,
    PROTOCOLS,
    STATS_KEY,
    Knobs,
    Stats,
    build_app,
    plan_turn,
    serve,
)

Client = TestClient[web.Request, web.Application]
Event = dict[str, Any]

GRAMMAR = re.compile(
    r"agent_started( agent_thinking)+(( agent_thinking)* tool_executing tool_completed){0,3}"
    r" agent_completed"
)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PATHS = {"ndjson": "/api/agent/stream", "sse": "/api/agent/sse", "json": "/api/agent/run"}
HTTP_PROTOCOLS = tuple(PATHS)
# Volatile by design: everything else about a turn must repeat for the same prompt.
VOLATILE = {"run_id", "tool_call_id", "timestamp", "duration_ms", "text"}

CANDIDATES = [f"plan my trip, take {i}" for i in range(200)]
TOOLFUL = next(p for p in CANDIDATES if len(plan_turn(p).tool_calls) >= 2)
TOOLLESS = next(p for p in CANDIDATES if not plan_turn(p).tool_calls)
WAIT = 2.0  # a safety net for awaits that should finish at once


@pytest.fixture
async def legacy(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(build_app("legacy", time_scale=0))


@pytest.fixture
async def candidate(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(build_app("candidate", time_scale=0))


def knobs_of(client: Client) -> Knobs:
    assert client.app is not None
    return client.app[KNOBS_KEY]


def stats_of(client: Client) -> Stats:
    assert client.app is not None
    return client.app[STATS_KEY]


async def reach(stats: Stats, predicate: Any) -> None:
    async with asyncio.timeout(WAIT):
        await stats.wait_until(predicate)


async def turn_over(
    client: Client,
    protocol: str,
    prompt: str = TOOLFUL,
    headers: dict[str, str] | None = None,
) -> list[Event]:
    """One turn's events as the client receives them on ``protocol``."""
    headers = {"X-User-Id": "alice", **(headers or {})}
    if protocol == "websocket":
        async with client.ws_connect("/ws/agent", headers=headers) as ws:
            await ws.send_json({"prompt": prompt})
            events: list[Event] = []
            while not events or events[-1]["type"] not in ("agent_completed", "error"):
                events.append(await ws.receive_json())
            return events
    async with client.post(PATHS[protocol], json={"prompt": prompt}, headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Dispatcher"] in ("legacy", "candidate")
        body = await response.text()
    if protocol == "ndjson":
        assert response.content_type == "application/x-ndjson"
        return [orjson.loads(line) for line in body.splitlines()]
    if protocol == "sse":
        assert response.content_type == "text/event-stream"
        return [sse_event(block) for block in body.split("\n\n") if block]
    document = orjson.loads(body)
    assert {event["run_id"] for event in document["events"]} == {document["run_id"]}
    assert document["user_id"] == headers["X-User-Id"]
    events = document["events"]
    return events


def sse_event(block: str) -> Event:
    fields = dict(line.split(": ", 1) for line in block.split("\n"))
    event: Event = orjson.loads(fields["data"])
    assert fields["event"] == event["type"]
    return event


def types_of(events: list[Event]) -> list[str]:
    return [event["type"] for event in events]


def structure(events: list[Event]) -> list[Event]:
    return [{k: v for k, v in event.items() if k not in VOLATILE} for event in events]


# --- the turn ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_turn_follows_the_event_grammar_on_every_protocol(
    legacy: Client, protocol: str
) -> None:
    events = await turn_over(legacy, protocol)

    assert GRAMMAR.fullmatch(" ".join(types_of(events)))
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert {event["run_id"] for event in events} == {events[0]["run_id"]}
    assert {event["user_id"] for event in events} == {"alice"}
    assert all(TIMESTAMP.fullmatch(event["timestamp"]) for event in events)
    assert all(event["text"] for event in events if event["type"] == "agent_thinking")
    executing = [event for event in events if event["type"] == "tool_executing"]
    completed = [event for event in events if event["type"] == "tool_completed"]
    assert [(e["tool_call_id"], e["tool"]) for e in executing] == [
        (e["tool_call_id"], e["tool"]) for e in completed
    ]
    assert all(isinstance(e["arguments"], dict) for e in executing)
    assert all(isinstance(e["result"], dict) and e["duration_ms"] >= 0 for e in completed)
    assert events[-1]["tool_calls"] == len(executing) == len(plan_turn(TOOLFUL).tool_calls)
    assert events[-1]["answer"]


async def test_the_same_prompt_has_the_same_structure_on_both_backends_and_every_run(
    legacy: Client, candidate: Client
) -> None:
    runs = [
        await turn_over(legacy, "json"),
        await turn_over(legacy, "ndjson"),
        await turn_over(candidate, "websocket"),
    ]

    assert structure(runs[0]) == structure(runs[1]) == structure(runs[2])
    assert len({run[0]["run_id"] for run in runs}) == len(runs)
    call_ids = [e["tool_call_id"] for run in runs for e in run if e["type"] == "tool_executing"]
    assert len(set(call_ids)) == len(call_ids)


def test_a_plan_is_a_function_of_the_prompt_and_prompts_vary_it() -> None:
    assert plan_turn(TOOLFUL) == plan_turn(TOOLFUL)
    assert {len(plan_turn(prompt).tool_calls) for prompt in CANDIDATES} == {0, 1, 2, 3}
    assert len({plan_turn(prompt).answer for prompt in CANDIDATES}) == len(CANDIDATES)


async def test_a_socket_without_a_user_header_belongs_to_anonymous(legacy: Client) -> None:
    async with legacy.ws_connect("/ws/agent") as ws:
        await ws.send_json({"prompt": TOOLLESS})
        event = await ws.receive_json()

    assert event["type"] == "agent_started"
    assert event["user_id"] == "anonymous"


@pytest.mark.parametrize("body", [b"not json", b'"just a string"', b'{"prompt": 3}'])
@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_a_malformed_http_turn_is_refused_with_a_json_400(
    legacy: Client, protocol: str, body: bytes
) -> None:
    async with legacy.post(PATHS[protocol], data=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]
        assert response.headers["X-Dispatcher"] == "legacy"
    assert stats_of(legacy).turns == 0


async def test_a_malformed_frame_gets_an_error_event_and_the_session_goes_on(
    legacy: Client,
) -> None:
    async with legacy.ws_connect("/ws/agent", headers={"X-User-Id": "alice"}) as ws:
        await ws.send_str("not json")
        assert await ws.receive_json() == {
            "type": "error",
            "error": "bad request",
            "user_id": "alice",
        }
        await ws.send_json({"prompt": TOOLLESS})
        assert (await ws.receive_json())["type"] == "agent_started"


async def test_stats_count_turns_per_protocol_and_every_tool_run(legacy: Client) -> None:
    for protocol in PROTOCOLS:
        await turn_over(legacy, protocol)

    async with legacy.get("/_stats") as response:
        stats = await response.json()

    assert stats["dispatcher"] == "legacy"
    assert stats["turns"] == len(PROTOCOLS)
    assert stats["protocols"] == dict.fromkeys(PROTOCOLS, 1)
    assert stats["side_effects"] == len(PROTOCOLS) * len(plan_turn(TOOLFUL).tool_calls)


@pytest.mark.parametrize("protocol", ["ndjson", "websocket"])
async def test_a_shadow_turn_runs_the_same_but_counts_no_side_effects(
    legacy: Client, protocol: str
) -> None:
    shadow = await turn_over(legacy, protocol, headers={"X-Strangler-Shadow": "1"})
    stats = stats_of(legacy)
    assert (stats.turns, stats.shadow_turns, stats.side_effects) == (1, 1, 0)

    primary = await turn_over(legacy, protocol)

    assert structure(shadow) == structure(primary)
    tools = len(plan_turn(TOOLFUL).tool_calls)
    assert (stats.turns, stats.shadow_turns, stats.side_effects) == (2, 1, tools)


# --- knobs ------------------------------------------------------------------------------


async def test_dropped_event_types_are_never_emitted_and_seq_stays_contiguous(
    legacy: Client,
) -> None:
    knobs_of(legacy).drop = {"agent_thinking", "tool_completed"}

    events = await turn_over(legacy, "ndjson")

    assert not {"agent_thinking", "tool_completed"} & set(types_of(events))
    assert "tool_executing" in types_of(events)
    assert [event["seq"] for event in events] == list(range(len(events)))


async def test_reorder_delivers_a_tool_completion_before_its_execution(legacy: Client) -> None:
    knobs_of(legacy).reorder = True

    events = await turn_over(legacy, "sse")

    completed = types_of(events).index("tool_completed")
    assert events[completed + 1]["type"] == "tool_executing"
    assert events[completed]["tool_call_id"] == events[completed + 1]["tool_call_id"]


async def test_reorder_without_tools_swaps_the_opening_events(legacy: Client) -> None:
    knobs_of(legacy).reorder = True

    events = await turn_over(legacy, "json", prompt=TOOLLESS)

    assert types_of(events)[:2] == ["agent_thinking", "agent_started"]


async def test_latency_is_added_before_every_event(legacy: Client) -> None:
    knobs_of(legacy).latency_ms = 10
    started = time.monotonic()

    events = await turn_over(legacy, "ndjson")

    assert time.monotonic() - started >= len(events) * 0.010


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_an_error_rate_of_one_answers_every_http_turn_with_a_500(
    legacy: Client, protocol: str
) -> None:
    knobs_of(legacy).error_rate = 1.0

    async with legacy.post(PATHS[protocol], json={"prompt": TOOLFUL}) as response:
        assert response.status == 500
        assert (await response.json())["error"] == "injected failure"

    assert (stats_of(legacy).errors, stats_of(legacy).side_effects) == (1, 0)


async def test_an_error_rate_of_one_sends_an_error_event_then_closes_with_1011(
    legacy: Client,
) -> None:
    knobs_of(legacy).error_rate = 1.0
    async with legacy.ws_connect("/ws/agent", headers={"X-User-Id": "alice"}) as ws:
        await ws.send_json({"prompt": TOOLFUL})
        event = await ws.receive_json()
        closing = await ws.receive()

    assert (event["type"], event["error"], event["user_id"]) == (
        "error",
        "injected failure",
        "alice",
    )
    assert closing.type is WSMsgType.CLOSE
    assert ws.close_code == 1011


async def test_a_leaked_user_id_rides_on_thinking_events_only(legacy: Client) -> None:
    knobs_of(legacy).leak_user = "mallory"

    events = await turn_over(legacy, "websocket")

    for event in events:
        expected = "mallory" if event["type"] == "agent_thinking" else "alice"
        assert event["user_id"] == expected


async def test_a_hanging_turn_is_accepted_and_answered_once_the_hang_is_cleared(
    legacy: Client,
) -> None:
    knobs_of(legacy).hang = True
    answer = asyncio.create_task(turn_over(legacy, "json"))
    await reach(stats_of(legacy), lambda s: s.turns == 1)

    done, _ = await asyncio.wait({answer}, timeout=0.05)
    assert not done
    knobs_of(legacy).hang = False

    async with asyncio.timeout(WAIT):
        assert GRAMMAR.fullmatch(" ".join(types_of(await answer)))


async def test_a_client_leaving_a_hanging_turn_is_counted_as_cancelled(legacy: Client) -> None:
    knobs_of(legacy).hang = True
    request = asyncio.create_task(legacy.post(PATHS["ndjson"], json={"prompt": TOOLFUL}))
    await reach(stats_of(legacy), lambda s: s.turns == 1)

    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request

    await reach(stats_of(legacy), lambda s: s.cancelled == 1)
    assert stats_of(legacy).side_effects == 0


async def test_a_socket_keeps_answering_pings_and_closes_cleanly_while_its_turn_hangs(
    legacy: Client,
) -> None:
    knobs_of(legacy).hang = True
    async with legacy.ws_connect("/ws/agent", autoping=False) as ws:
        await ws.send_json({"prompt": TOOLFUL})
        await reach(stats_of(legacy), lambda s: s.turns == 1)
        await ws.ping(b"still there?")
        pong = await ws.receive()
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"still there?")

    await reach(stats_of(legacy), lambda s: s.cancelled == 1)


async def test_knobs_change_over_http_while_running(legacy: Client) -> None:
    async with legacy.put("/_knobs", json={"drop": ["agent_thinking"], "latency_ms": 1}) as put:
        assert put.status == 200
        changed = await put.json()

    events = await turn_over(legacy, "ndjson")
    async with legacy.get("/_knobs") as get:
        assert await get.json() == changed

    assert changed["drop"] == ["agent_thinking"]
    assert changed["latency_ms"] == 1
    assert knobs_of(legacy).drop == {"agent_thinking"}
    assert "agent_thinking" not in types_of(events)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"error_rate": 1.5}',
        b'{"latency_ms": -1}',
        b'{"reorder": "yes"}',
        b'{"hang": 1}',
        b'{"drop": ["agent_sleeping"]}',
        b'{"leak_user": 7}',
        b'{"colour": "red"}',
        b'{"reorder": true, "error_rate": 2}',
    ],
)
async def test_bad_knob_values_are_refused_with_400_and_change_nothing(
    legacy: Client, body: bytes
) -> None:
    before = knobs_of(legacy).as_json()

    async with legacy.put("/_knobs", data=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]

    assert knobs_of(legacy).as_json() == before


# --- WebSocket control frames -------------------------------------------------------------


async def test_a_close_frame_request_closes_the_socket_with_that_code(legacy: Client) -> None:
    async with legacy.ws_connect("/ws/agent") as ws:
        await ws.send_json({"close": 4001})
        closing = await ws.receive()

    assert closing.type is WSMsgType.CLOSE
    assert ws.close_code == 4001


async def test_a_close_code_that_cannot_be_sent_is_a_bad_request(legacy: Client) -> None:
    async with legacy.ws_connect("/ws/agent") as ws:
        await ws.send_json({"close": 1005})
        assert (await ws.receive_json())["error"] == "bad request"


async def test_binary_frames_are_echoed_back_as_binary(legacy: Client) -> None:
    payload = bytes(range(256))
    async with legacy.ws_connect("/ws/agent") as ws:
        await ws.send_bytes(payload)
        echoed = await ws.receive()

    assert (echoed.type, echoed.data) == (WSMsgType.BINARY, payload)


# --- relay fixtures -------------------------------------------------------------------------


async def test_the_echo_reflects_the_request_and_obeys_status_and_set_header(
    legacy: Client,
) -> None:
    url = "/echo/some/path?status=201&set_header=X-Extra:one&set_header=X-Extra:two"
    async with legacy.post(url, data=b"\x00payload", headers={"X-Probe": "yes"}) as response:
        assert response.status == 201
        assert response.headers.getall("X-Extra") == ["one", "two"]
        assert response.headers["X-Dispatcher"] == "legacy"
        echoed = await response.json()

    assert echoed["backend"] == "legacy"
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo/some/path"
    assert echoed["query"] == url.partition("?")[2]
    assert ["X-Probe", "yes"] in echoed["headers"]
    assert base64.b64decode(echoed["body"]) == b"\x00payload"


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/anything/else"), ("GET", "/api/agent/stream"), ("PATCH", "/")],
)
async def test_any_other_path_or_method_is_echoed(legacy: Client, method: str, path: str) -> None:
    async with legacy.request(method, path) as response:
        assert response.status == 200
        echoed = await response.json()

    assert (echoed["method"], echoed["path"]) == (method, path)


async def test_a_bad_echo_status_is_refused(legacy: Client) -> None:
    async with legacy.get("/echo/x?status=teapot") as response:
        assert response.status == 400


async def test_gzip_arrives_compressed_and_labelled(legacy: Client) -> None:
    async with legacy.get("/gzip", auto_decompress=False) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        raw = await response.read()

    assert orjson.loads(gzip.decompress(raw))["backend"] == "legacy"


async def test_a_slow_stream_sends_n_lines_with_a_gap(legacy: Client) -> None:
    started = time.monotonic()
    async with legacy.get("/slow-stream?n=3&gap_ms=20") as response:
        lines = (await response.text()).splitlines()

    assert [orjson.loads(line)["line"] for line in lines] == [0, 1, 2]
    assert time.monotonic() - started >= 0.040


async def test_hold_sends_its_first_line_then_waits_for_release(legacy: Client) -> None:
    assert legacy.app is not None
    async with legacy.get("/hold") as response:
        first = orjson.loads(await response.content.readline())
        legacy.app[HOLD_RELEASE_KEY].set()
        rest = await response.read()

    assert first == {"backend": "legacy", "held": True}
    assert orjson.loads(rest) == {"backend": "legacy", "released": True}
    assert stats_of(legacy).cancelled == 0


async def test_a_client_leaving_a_hold_is_counted_as_cancelled(legacy: Client) -> None:
    response = await legacy.get("/hold")
    await response.content.readline()

    response.close()

    await reach(stats_of(legacy), lambda s: s.cancelled == 1)


async def test_health_is_ok_and_names_the_dispatcher(candidate: Client) -> None:
    async with candidate.get("/healthz") as response:
        assert response.status == 200
        assert response.headers["X-Dispatcher"] == "candidate"


# --- life cycle -----------------------------------------------------------------------------


def test_only_legacy_and_candidate_with_a_sane_time_scale_can_be_built() -> None:
    assert build_app("candidate")[DISPATCHER_KEY].name == "candidate"
    with pytest.raises(ValueError, match="name"):
        build_app("experimental")
    with pytest.raises(ValueError, match="time_scale"):
        build_app("legacy", time_scale=-1)


async def test_stopping_the_server_closes_sockets_and_releases_hanging_turns(
    aiohttp_server: AiohttpServer,
) -> None:
    app = build_app("candidate", knobs=Knobs(hang=True), time_scale=0)
    server = await aiohttp_server(app)
    async with ClientSession() as session, session.ws_connect(server.make_url("/ws/agent")) as ws:
        hanging = asyncio.create_task(
            session.post(server.make_url(PATHS["json"]), json={"prompt": TOOLFUL})
        )
        await reach(app[STATS_KEY], lambda s: s.turns == 1)

        async with asyncio.timeout(WAIT):
            closing = asyncio.create_task(server.close())
            goodbye = await ws.receive()
            response = await hanging
            await closing

        assert goodbye.type is WSMsgType.CLOSE
        assert ws.close_code == 1001
        assert response.status == 503
        response.release()


async def test_serve_answers_until_cancelled(unused_tcp_port: int) -> None:
    port = unused_tcp_port
    ready = asyncio.Event()
    serving = asyncio.create_task(serve("legacy", "127.0.0.1", port, time_scale=0, ready=ready))
    async with asyncio.timeout(WAIT):
        await ready.wait()

    async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as r:
        assert r.status == 200
        assert r.headers["X-Dispatcher"] == "legacy"

    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
