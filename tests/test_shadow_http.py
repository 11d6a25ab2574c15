"""Shadow runs on HTTP exchanges and streams: direction, marking, comparison, contract,
isolation, and divergences kept."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.proxy_harness import ADMIN_AUTH
from tests.shadow_harness import TOOL_PROMPT, ServerFactory, shadow_stack

PATHS = {"stream": "/api/agent/stream", "sse": "/api/agent/sse", "run": "/api/agent/run"}


async def post_turn(
    client: aiohttp.ClientSession, url: str, user: str, prompt: str = TOOL_PROMPT
) -> tuple[int, str, bytes]:
    async with client.post(url, json={"prompt": prompt}, headers={"X-User-Id": user}) as resp:
        return resp.status, resp.headers["X-Strangler-Backend"], await resp.read()


@pytest.mark.parametrize(
    ("rollout", "serving", "shadowed"), [(0, "legacy", "candidate"), (100, "candidate", "legacy")]
)
async def test_the_shadow_runs_on_the_other_backend_marked_so_it_skips_side_effects(
    aiohttp_server: ServerFactory, tmp_path: Path, rollout: float, serving: str, shadowed: str
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=rollout) as stack:
        async with aiohttp.ClientSession() as client:
            status, backend, _ = await post_turn(client, stack.url + PATHS["stream"], "user-1")
        await stack.settle()
        assert (status, backend) == (200, serving)
        assert stack.stats(serving).turns == 1 and stack.stats(serving).shadow_turns == 0
        assert stack.stats(shadowed).shadow_turns == 1
        assert stack.stats(shadowed).side_effects == 0  # the marker header was honoured
        assert stack.sample("strangler_comparisons_total", route="stream", outcome="match") == 1
        assert (
            stack.sample(
                "strangler_requests_total",
                route="stream",
                backend=shadowed,
                role="shadow",
                outcome="success",
            )
            == 1
        )


@pytest.mark.parametrize("route", ["stream", "sse", "run"])
async def test_an_aa_baseline_finds_no_mismatch_although_ids_text_and_timestamps_differ(
    aiohttp_server: ServerFactory, tmp_path: Path, route: str
) -> None:
    overrides = {"shadow_target": "legacy"}
    async with shadow_stack(aiohttp_server, tmp_path, route_overrides=overrides) as stack:
        async with aiohttp.ClientSession() as client:
            bodies = set()
            for i in range(20):
                _, backend, body = await post_turn(
                    client, stack.url + PATHS[route], f"user-{i}", f"question {i}"
                )
                assert backend == "legacy"
                bodies.add(body)
        await stack.settle()
        assert stack.stats("legacy").shadow_turns == 20
        assert stack.sample("strangler_comparisons_total", route=route, outcome="match") == 20
        assert stack.sample("strangler_comparisons_total", route=route, outcome="mismatch") == 0
        assert (
            stack.sample("strangler_contract_violations_total", route=route, backend="legacy") == 0
        )
    assert len(bodies) == 20  # every run differed in ids, timestamps or text


async def test_unsafe_methods_are_shadowed_only_on_routes_that_opt_in(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    overrides = {"shadow_methods": ["GET", "HEAD", "OPTIONS"]}
    async with shadow_stack(aiohttp_server, tmp_path, route_overrides=overrides) as stack:
        async with aiohttp.ClientSession() as client:
            await post_turn(client, stack.url + PATHS["stream"], "user-1")
        await stack.settle()
        assert stack.stats("candidate").shadow_turns == 0
        assert stack.sample("strangler_shadow_dropped_total", route="stream", reason="method") == 1
        assert stack.sample("strangler_comparisons_total", route="stream", outcome="match") == 0


async def test_a_request_body_over_the_shadow_cap_is_not_shadowed_and_is_counted(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, shadow={"max_body_bytes": 64}) as stack:
        async with aiohttp.ClientSession() as client:
            status, _, _ = await post_turn(client, stack.url + PATHS["stream"], "u", "x" * 200)
        await stack.settle()
        assert status == 200
        assert stack.stats("candidate").shadow_turns == 0
        assert (
            stack.sample("strangler_shadow_dropped_total", route="stream", reason="body_too_large")
            == 1
        )


@pytest.mark.parametrize("route", ["stream", "sse", "run"])
async def test_a_dropped_event_is_reported_as_missing_and_breaks_the_contract(
    aiohttp_server: ServerFactory, tmp_path: Path, route: str
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path) as stack:
        stack.knobs("candidate").drop = {"tool_completed"}
        async with aiohttp.ClientSession() as client:
            status, backend, _ = await post_turn(client, stack.url + PATHS[route], "user-1")
            await stack.settle()
            await stack.proxy.store.flush()  # type: ignore[union-attr]
            async with client.get(
                stack.server.admin_url + f"/api/divergences?route={route}&limit=5",
                headers=ADMIN_AUTH,
            ) as resp:
                stored = (await resp.json())["divergences"]
        assert (status, backend) == (200, "legacy")
        assert stack.sample("strangler_comparisons_total", route=route, outcome="mismatch") == 1
        assert stack.sample("strangler_divergences_total", route=route, kind="missing") >= 1
        assert (
            stack.sample("strangler_contract_violations_total", route=route, backend="candidate")
            == 1
        )
        assert (
            stack.sample("strangler_contract_violations_total", route=route, backend="legacy") == 0
        )
    (record,) = stored
    assert record["primary"] == "legacy" and record["shadow"] == "candidate"
    assert "missing" in record["kinds"]
    reference_types = [e["type"] for e in record["reference"]]
    subject_types = [e["type"] for e in record["subject"]]
    assert "tool_completed" in reference_types and "tool_completed" not in subject_types


@pytest.mark.parametrize("route", ["stream", "sse"])
async def test_another_users_event_in_a_stream_is_withheld_and_counted(
    aiohttp_server: ServerFactory, tmp_path: Path, route: str
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=100) as stack:
        stack.knobs("candidate").leak_user = "someone-else"
        async with aiohttp.ClientSession() as client:
            status, backend, body = await post_turn(client, stack.url + PATHS[route], "user-1")
        await stack.settle()
    assert (status, backend) == (200, "candidate")
    text = body.decode()
    assert "someone-else" not in text
    assert "agent_thinking" not in text  # the leaking events never reached the client
    assert "agent_started" in text and "agent_completed" in text
    assert (
        stack.sample("strangler_isolation_violations_total", route=route, backend="candidate") >= 1
    )
    assert stack.sample("strangler_isolation_violations_total", route=route, backend="legacy") == 0


async def test_a_json_answer_with_another_users_event_is_replaced_by_a_502(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=100) as stack:
        stack.knobs("candidate").leak_user = "someone-else"
        async with aiohttp.ClientSession() as client:
            status, backend, body = await post_turn(client, stack.url + PATHS["run"], "user-1")
        await stack.settle()
    assert (status, backend) == (502, "candidate")
    assert json.loads(body)["error"] == "isolation_violation"
    assert b"someone-else" not in body
    assert (
        stack.sample("strangler_isolation_violations_total", route="run", backend="candidate") >= 1
    )


async def test_a_leak_in_the_shadow_is_counted_on_the_shadow_backend(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, rollout=0) as stack:
        stack.knobs("candidate").leak_user = "someone-else"
        async with aiohttp.ClientSession() as client:
            status, backend, body = await post_turn(client, stack.url + PATHS["stream"], "user-1")
        await stack.settle()
    assert (status, backend) == (200, "legacy")
    assert b"agent_thinking" in body
    assert stack.sample("strangler_comparisons_total", route="stream", outcome="mismatch") == 1
    leaks = stack.sample(
        "strangler_isolation_violations_total", route="stream", backend="candidate"
    )
    assert leaks >= 1  # caught while it only runs in the shadow
    assert (
        stack.sample("strangler_isolation_violations_total", route="stream", backend="legacy") == 0
    )


async def test_a_shadow_on_a_warm_connection_runs_by_callbacks_and_is_compared(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path) as stack:
        shadows = stack.proxy.shadows
        async with aiohttp.ClientSession() as client:
            url = stack.url + PATHS["stream"]
            await post_turn(client, url, "user-1")  # no idle shadow connection yet: a task
            await stack.settle()
            stack.knobs("candidate").hang = True
            status, backend, _ = await post_turn(client, url, "user-1")
            assert (status, backend) == (200, "legacy")  # the primary never waits
            assert not shadows.tasks and len(shadows.callbacks) == 1
            stack.knobs("candidate").hang = False
            await stack.settle()
        assert stack.sample("strangler_comparisons_total", route="stream", outcome="match") == 2
        assert stack.stats("candidate").shadow_turns == 2


async def test_a_callback_shadow_past_its_deadline_is_cut_counted_and_compared_as_a_timeout(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async with shadow_stack(aiohttp_server, tmp_path, shadow={"timeout": 0.3}) as stack:
        shadows = stack.proxy.shadows
        async with aiohttp.ClientSession() as client:
            url = stack.url + PATHS["stream"]
            await post_turn(client, url, "user-1")
            await stack.settle()
            stack.knobs("candidate").hang = True
            status, _, _ = await post_turn(client, url, "user-1")
            assert status == 200 and len(shadows.callbacks) == 1
            await stack.settle()  # the deadline ends it
            stack.knobs("candidate").hang = False
        assert stack.sample("strangler_shadow_dropped_total", route="stream", reason="timeout") == 1
        assert stack.sample("strangler_divergences_total", route="stream", kind="timeout") == 1
        assert stack.sample("strangler_comparisons_total", route="stream", outcome="mismatch") == 1


async def test_a_callback_shadow_still_running_at_shutdown_is_cut_after_the_drain(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    settings = {"timeout": 30.0, "drain_seconds": 0.2}
    async with shadow_stack(aiohttp_server, tmp_path, shadow=settings) as stack:
        async with aiohttp.ClientSession() as client:
            url = stack.url + PATHS["stream"]
            await post_turn(client, url, "user-1")
            await stack.settle()
            stack.knobs("candidate").hang = True
            await post_turn(client, url, "user-1")
            assert len(stack.proxy.shadows.callbacks) == 1
        await stack.server.stop()
        assert not stack.proxy.shadows.callbacks
        stack.knobs("candidate").hang = False
    assert stack.sample("strangler_shadow_dropped_total", route="stream", reason="shutdown") == 1
    assert stack.sample("strangler_comparisons_total", route="stream", outcome="match") == 1
