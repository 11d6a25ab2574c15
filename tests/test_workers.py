"""``server.workers = 2``: two processes on one port under a supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy_harness import StranglerProcess, flags_document, strangler_process, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def supervisor(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[StranglerProcess]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/ws/agent", ws)
    app.router.add_route("*", "/{tail:.*}", ok)
    backend = await aiohttp_server(app)
    url = f"http://127.0.0.1:{backend.port}"
    write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    config = tmp_path / "strangler.toml"
    config.write_text(
        f"""
[server]
port = 0
workers = 2
shutdown_grace = 3
[admin]
port = 0
[backends]
legacy = "{url}"
candidate = "{url}"
[flags]
file = "flags.json"
[[routes]]
name = "agent"
path = "/ws/agent"
protocol = "websocket"
flag = "ssot-dispatcher"
[[routes]]
name = "api"
path = "/api"
protocol = "json"
flag = "ssot-dispatcher"
"""
    )
    async with strangler_process(config) as running:
        yield running


def values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def wait_ready(client: aiohttp.ClientSession, admin_url: str) -> None:
    # Worker processes start on their own schedule; readiness is the supervisor's word.
    for _ in range(300):
        async with client.get(admin_url + "/readyz") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("not ready within 15 s")


def worker_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text()
    return [int(pid) for pid in children.split()]


async def test_two_workers_share_the_port_and_the_supervisor_sums_their_metrics(
    supervisor: StranglerProcess,
) -> None:
    async with aiohttp.ClientSession() as client:
        await wait_ready(client, supervisor.admin_url)
        assert len(worker_pids(supervisor.proc.pid)) == 2
        for i in range(60):
            # A connection per request, so the kernel spreads them across the workers.
            async with aiohttp.ClientSession() as fresh:
                headers = {"X-User-Id": f"user-{i}"}
                async with fresh.get(supervisor.proxy_url + "/api/x", headers=headers) as resp:
                    assert resp.status == 200
        sock = await client.ws_connect(
            supervisor.proxy_url + "/ws/agent", headers={"X-User-Id": "user-ws"}
        )
        await sock.send_str("hi")
        assert await sock.receive_str() == "hi"
        # Workers flush their batched request counts every half second.
        for _ in range(100):
            async with client.get(supervisor.admin_url + "/metrics") as resp:
                text = await resp.text()
            requests = values(text, "strangler_requests_total")
            served = sum(v for labels, v in requests.items() if ("route", "api") in labels)
            if served >= 60:
                break
            await asyncio.sleep(0.05)
        assert served == 60
        sessions = values(text, "strangler_websocket_sessions")
        assert sum(sessions.values()) == 1
        assert all("pid" not in dict(labels) for labels in sessions)

        supervisor.proc.send_signal(signal.SIGTERM)
        msg = await asyncio.wait_for(sock.receive(), 10)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1001
    assert await asyncio.wait_for(supervisor.proc.wait(), 15) == 0


async def test_a_worker_that_dies_is_started_again(supervisor: StranglerProcess) -> None:
    async with aiohttp.ClientSession() as client:
        await wait_ready(client, supervisor.admin_url)
        victim = worker_pids(supervisor.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(300):
            pids = worker_pids(supervisor.proc.pid)
            if len(pids) == 2 and victim not in pids:
                break
            await asyncio.sleep(0.05)
        await wait_ready(client, supervisor.admin_url)
        assert victim not in worker_pids(supervisor.proc.pid)
        async with client.get(supervisor.proxy_url + "/api/x") as resp:
            assert resp.status == 200
    assert any("exited with -9; starting it again" in line for line in supervisor.log)


async def test_the_supervisors_admin_listener_keeps_divergences_behind_the_token(
    supervisor: StranglerProcess,
) -> None:
    # This configuration sets no [admin] token: the divergences stay closed to everyone.
    async with aiohttp.ClientSession() as client:
        await wait_ready(client, supervisor.admin_url)
        for sent in ({}, {"Authorization": "Bearer guess"}):
            async with client.get(supervisor.admin_url + "/api/divergences", headers=sent) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await resp.json())["error"] == "unauthorized"
        for path in ("/healthz", "/readyz", "/metrics"):
            async with client.get(supervisor.admin_url + path) as resp:
                assert resp.status == 200, path
