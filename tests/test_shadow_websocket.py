"""WebSocket shadows: same client messages, frames never delivered, turns compared."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from proxy.app import ProxyServer
from proxy.routing import Backend
from proxy.settings import RouteSettings, Settings
from proxy.shadow import session_shadow
from tests.proxy_harness import ADMIN_AUTH, ADMIN_TOKEN, flags_document, write_flags
from tests.shadow_harness import TOOL_PROMPT, ServerFactory, Stack, shadow_stack

TAGGED_CONTRACT = "agent_started agent_thinking agent_completed"


def tagged_backend(name: str) -> web.Application:
    """Each client message gets three frames naming this backend and the session's user."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        user = request.headers.get("X-User-Id", "")
        shadow = request.headers.get("X-Strangler-Shadow") == "1"
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            for n, kind in enumerate(("agent_started", "agent_thinking", "agent_completed")):
                frame = {"type": kind, "backend": name, "user_id": user, "n": n, "shadow": shadow}
                await ws.send_str(json.dumps(frame))
        return ws

    app = web.Application()
    app.router.add_get("/ws/agent", handle)
    return app


def tagged_settings(legacy: str, candidate: str, flags: Path, **route: object) -> Settings:
    """One shadowed WebSocket route over the tagged backends."""
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
            "backends": {"legacy": legacy, "candidate": candidate},
            "flags": {"provider": "file", "file": flags},
            "divergences": {"path": flags.parent / "divergences.sqlite3"},
            "routes": [
                {
                    "name": "agent",
                    "path": "/ws/agent",
                    "protocol": "websocket",
                    "flag": "ssot-dispatcher",
                    "shadow": 1.0,
                    "contract": TAGGED_CONTRACT,
                    **route,
                }
            ],
        }
    )


@asynccontextmanager
async def user_socket(
    stack: Stack, user: str = "user-1"
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(stack.url + "/ws/agent", headers={"X-User-Id": user}) as ws:
            yield ws


async def test_200_sessions_receive_only_their_primarys_frames_while_every_turn_is_compared(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    legacy = await aiohttp_server(tagged_backend("legacy"))
    candidate = await aiohttp_server(tagged_backend("candidate"))
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    settings = tagged_settings(
        f"http://127.0.0.1:{legacy.port}",
        f"http://127.0.0.1:{candidate.port}",
        flags,
        user_field="user_id",
        compare={"ignore": ["backend", "shadow"]},
    )
    server = ProxyServer(settings, registry=CollectorRegistry())
    await server.start()
    received: dict[str, list[dict[str, object]]] = {}
    served: dict[str, str] = {}
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def session(i: int) -> None:
                user = f"user-{i:03d}"
                async with client.ws_connect(
                    server.proxy_url + "/ws/agent", headers={"X-User-Id": user}
                ) as ws:
                    served[user] = ws._response.headers["X-Strangler-Backend"]
                    frames = received.setdefault(user, [])
                    for turn in range(2):
                        await ws.send_str(f"turn {turn}")
                        for _ in range(3):
                            frames.append(json.loads(await ws.receive_str(timeout=10)))

            await asyncio.gather(*(session(i) for i in range(200)))
        assert server.proxy is not None
        while server.proxy.shadows.tasks:
            await asyncio.gather(*list(server.proxy.shadows.tasks), return_exceptions=True)
    finally:
        await server.stop()

    assert set(served.values()) == {"legacy", "candidate"}
    for user, frames in received.items():
        assert len(frames) == 6
        assert all(f["backend"] == served[user] for f in frames), user
        assert all(f["user_id"] == user and f["shadow"] is False for f in frames), user
    registry = server.metrics.registry
    matches = registry.get_sample_value(
        "strangler_comparisons_total", {"route": "agent", "outcome": "match"}
    )
    assert matches == 400  # two turns in each of 200 sessions, each compared
    assert not registry.get_sample_value(
        "strangler_comparisons_total", {"route": "agent", "outcome": "mismatch"}
    )


async def test_websocket_turns_report_a_dropped_event_as_missing(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=0) as stack:
        async with user_socket(stack) as ws:
            for turn in range(3):
                if turn == 2:
                    stack.knobs("candidate").drop = {"tool_completed"}
                await ws.send_json({"prompt": TOOL_PROMPT})
                while json.loads(await ws.receive_str(timeout=10))["type"] != "agent_completed":
                    pass
        await stack.settle()
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="match") == 2
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="mismatch") == 1
        assert stack.sample("strangler_divergences_total", route="agent", kind="missing") >= 1
        assert (
            stack.sample("strangler_contract_violations_total", route="agent", backend="candidate")
            == 1
        )
        assert stack.stats("candidate").shadow_turns == 3
        assert stack.stats("candidate").side_effects == 0


async def test_another_users_event_never_reaches_a_websocket_client(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=100) as stack:
        stack.knobs("candidate").leak_user = "someone-else"
        async with user_socket(stack) as ws:
            await ws.send_json({"prompt": TOOL_PROMPT})
            frames = []
            while not frames or frames[-1]["type"] != "agent_completed":
                frames.append(json.loads(await ws.receive_str(timeout=10)))
        await stack.settle()
        assert all(frame["user_id"] == "user-1" for frame in frames)
        assert "agent_thinking" not in [frame["type"] for frame in frames]
        assert (
            stack.sample("strangler_isolation_violations_total", route="agent", backend="candidate")
            >= 1
        )


async def test_a_shadow_connection_that_fails_is_counted_and_leaves_the_session_alone(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    legacy = await aiohttp_server(tagged_backend("legacy"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = tagged_settings(f"http://127.0.0.1:{legacy.port}", dead, flags)
    server = ProxyServer(settings, registry=CollectorRegistry())
    await server.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(
                server.proxy_url + "/ws/agent", headers={"X-User-Id": "u"}
            ) as ws:
                for turn in range(3):
                    await ws.send_str(f"turn {turn}")
                    frames = [json.loads(await ws.receive_str(timeout=10)) for _ in range(3)]
                    assert [f["backend"] for f in frames] == ["legacy"] * 3
    finally:
        await server.stop()
    registry = server.metrics.registry
    assert (
        registry.get_sample_value(
            "strangler_shadow_dropped_total", {"route": "agent", "reason": "unreachable"}
        )
        == 1
    )
    assert not registry.get_sample_value(
        "strangler_contract_violations_total", {"route": "agent", "backend": "legacy"}
    )


async def test_a_websocket_aa_baseline_over_many_turns_finds_no_mismatch(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    overrides = {"shadow_target": "legacy"}
    async with shadow_stack(aiohttp_server, tmp_path, route_overrides=overrides) as stack:
        async with aiohttp.ClientSession() as client:
            for session in range(3):
                async with client.ws_connect(
                    stack.url + "/ws/agent", headers={"X-User-Id": f"user-{session}"}
                ) as ws:
                    for turn in range(4):
                        await ws.send_json({"prompt": f"question {session}-{turn}"})
                        while (
                            json.loads(await ws.receive_str(timeout=10))["type"]
                            != "agent_completed"
                        ):
                            pass
        await stack.settle()
        assert stack.stats("legacy").shadow_turns == 12
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="match") == 12
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="mismatch") == 0


async def turn(ws: aiohttp.ClientWebSocketResponse, prompt: str = TOOL_PROMPT) -> None:
    await ws.send_json({"prompt": prompt})
    while json.loads(await ws.receive_str(timeout=10))["type"] != "agent_completed":
        pass


async def test_a_lagging_shadow_finishes_its_last_turn_after_the_client_leaves(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=100) as stack:
        stack.knobs("legacy").latency_ms = 30  # the shadow answers well after the primary
        async with user_socket(stack) as ws:
            await turn(ws)
            await turn(ws)
        await stack.settle()
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="match") == 2
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="mismatch") == 0
        assert stack.sample("strangler_shadow_dropped_total", route="agent", reason="shutdown") == 0


async def test_a_turn_that_breaks_the_contract_ends_and_later_turns_compare_cleanly(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=0) as stack:
        async with user_socket(stack) as ws:
            stack.knobs("candidate").drop = {"tool_completed"}
            await turn(ws)
            # Knobs apply when a turn starts: wait for the shadow's turn to start.
            await stack.stats("candidate").wait_until(lambda s: s.shadow_turns >= 1)
            stack.knobs("candidate").drop = set()
            await turn(ws)
            await turn(ws)
        await stack.settle()
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="mismatch") == 1
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="match") == 2
        assert stack.sample("strangler_divergences_total", route="agent", kind="timeout") == 0


def sessions_open(stack: Stack) -> float:
    return sum(
        stack.sample("strangler_websocket_sessions", route="agent", backend=backend)
        for backend in ("legacy", "candidate")
    )


async def leave(ws: aiohttp.ClientWebSocketResponse, how: str) -> None:
    if how == "close":
        await ws.close()
    else:
        ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize(
    ("when", "how", "outcome"),
    [
        ("mid-turn", "close", "ignored"),
        ("mid-turn", "vanish", "ignored"),
        ("after a turn", "vanish", "match"),
    ],
)
async def test_a_client_that_leaves_mid_turn_is_ignored_after_a_turn_compared_never_a_divergence(
    aiohttp_server: ServerFactory, tmp_path: Path, when: str, how: str, outcome: str
) -> None:
    mid_turn = when == "mid-turn"
    # Legacy is slow: mid-turn, it serves and the client leaves during its turn; after a
    # turn, it is the lagging shadow, which still finishes the turn after the client left.
    async with shadow_stack(aiohttp_server, tmp_path, rollout=0 if mid_turn else 100) as stack:
        stack.knobs("legacy").latency_ms = 200 if mid_turn else 30
        async with user_socket(stack) as ws:
            if mid_turn:
                await ws.send_json({"prompt": TOOL_PROMPT})
                assert json.loads(await ws.receive_str(timeout=10))["type"] == "agent_started"
            else:
                await turn(ws)
            await leave(ws, how)
        await stack.settle()
        assert stack.sample("strangler_comparisons_total", route="agent", outcome=outcome) == 1
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="mismatch") == 0
        assert stack.sample("strangler_divergences_total", route="agent", kind="timeout") == 0
        assert sessions_open(stack) == 0


async def test_a_backend_that_fails_mid_turn_has_the_turn_compared_as_an_error_at_once(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    # The route's turns time out after an hour: only the backend's close can end this one.
    overrides = {"turn_idle_seconds": 3600.0}
    async with shadow_stack(aiohttp_server, tmp_path, route_overrides=overrides) as stack:
        stack.knobs("legacy").error_rate = 1.0  # an error event, then close 1011
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(
                stack.url + "/ws/agent", headers={"X-User-Id": "user-1"}
            ) as ws:
                await ws.send_json({"prompt": TOOL_PROMPT})
                assert json.loads(await ws.receive_str(timeout=10))["type"] == "error"
                closing = await ws.receive(timeout=10)
                assert closing.type is WSMsgType.CLOSE and closing.data == 1011
            await stack.settle()
            await stack.proxy.store.flush()  # type: ignore[union-attr]
            async with client.get(
                stack.server.admin_url + "/api/divergences?route=agent", headers=ADMIN_AUTH
            ) as resp:
                (record,) = (await resp.json())["divergences"]
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="mismatch") == 1
        assert stack.sample("strangler_divergences_total", route="agent", kind="error") == 1
        assert stack.sample("strangler_divergences_total", route="agent", kind="timeout") == 0
        assert record["primary"] == "legacy"
        assert record["reference"][-1]["error"] == "the backend closed the session with 1011"


async def test_a_shadow_that_owes_a_turn_never_holds_up_the_clients_closing_handshake(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    # The shadow never answers and turns only time out after an hour: were the session
    # to wait for the shadow before closing, the client's close would wait that long.
    overrides = {"turn_idle_seconds": 3600.0}
    async with shadow_stack(
        aiohttp_server, tmp_path, rollout=100, route_overrides=overrides
    ) as stack:
        stack.knobs("legacy").hang = True
        async with user_socket(stack) as ws:
            await turn(ws)
            async with asyncio.timeout(10):
                await ws.close()
            assert ws.close_code == 1000
        assert sessions_open(stack) == 0
        assert stack.proxy.shadows.running() == 1  # the shadow still owes its turn, alone
        assert stack.sample("strangler_comparisons_total", route="agent", outcome="match") == 0
    # Shutdown cut it: one shadow, one drop; its turn concluded (as a timeout).
    assert stack.sample("strangler_shadow_dropped_total", route="agent", reason="shutdown") == 1
    assert stack.sample("strangler_divergences_total", route="agent", kind="timeout") == 1
    assert (
        stack.sample(
            "strangler_requests_total",
            route="agent",
            backend="legacy",
            role="shadow",
            outcome="success",
        )
        == 1
    )


async def test_a_shadow_backend_that_never_answers_its_handshake_never_delays_the_session(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    legacy = await aiohttp_server(tagged_backend("legacy"))
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads the upgrade request and never answers

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent_server.sockets[0].getsockname()[1]}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = tagged_settings(f"http://127.0.0.1:{legacy.port}", silent_url, flags)
    settings = settings.model_copy(
        update={"server": settings.server.model_copy(update={"read_timeout": 1.0})}
    )
    server = ProxyServer(settings, registry=CollectorRegistry())
    await server.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(
                server.proxy_url + "/ws/agent", headers={"X-User-Id": "u"}
            ) as ws:
                async with asyncio.timeout(0.5):  # well before the shadow's handshake gives up
                    for turn in range(3):
                        await ws.send_str(f"turn {turn}")
                        frames = [json.loads(await ws.receive_str()) for _ in range(3)]
                        assert [f["backend"] for f in frames] == ["legacy"] * 3
                assert accepted  # the shadow's connection is there, its handshake unanswered
                await asyncio.sleep(1.0)
    finally:
        await server.stop()
        for writer in accepted:
            writer.close()
        silent_server.close()
        await silent_server.wait_closed()
    registry = server.metrics.registry
    assert (
        registry.get_sample_value(
            "strangler_shadow_dropped_total", {"route": "agent", "reason": "unreachable"}
        )
        == 1
    )


LEGACY = Backend.LEGACY


@pytest.mark.parametrize(
    ("route", "serving", "draw", "room", "decision"),
    [
        ({"shadow": 1.0}, Backend.LEGACY, 0.5, True, (Backend.CANDIDATE, None)),
        ({"shadow": 1.0}, Backend.CANDIDATE, 0.5, True, (Backend.LEGACY, None)),
        ({"shadow": 1.0, "shadow_target": "legacy"}, Backend.LEGACY, 0.5, True, (LEGACY, None)),
        ({"shadow": 0.25}, Backend.LEGACY, 0.5, True, (None, None)),
        ({"shadow": 0.0}, Backend.LEGACY, 0.0, False, (None, None)),
        ({"shadow": 1.0}, Backend.LEGACY, 0.5, False, (None, "concurrency")),
        ({"shadow": 1.0, "shadow_methods": ["POST"]}, Backend.LEGACY, 0.5, True, (None, "method")),
    ],
)
def test_a_session_is_shadowed_when_sampled_and_there_is_room_else_unshadowed_and_counted(
    route: dict[str, object],
    serving: Backend,
    draw: float,
    room: bool,
    decision: tuple[Backend | None, str | None],
) -> None:
    settings = RouteSettings.model_validate(
        {"name": "agent", "path": "/ws/agent", "protocol": "websocket", "flag": "f", **route}
    )
    assert session_shadow(settings, serving, draw, room) == decision
