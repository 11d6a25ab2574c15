"""``strangler run`` is a supervisor: workers share the port, and one that dies serves again
within a second, logged and counted, whether there is one worker or several."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy_harness import StranglerProcess, flags_document, strangler_process, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def backend_url(aiohttp_server: ServerFactory) -> str:
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
    return f"http://127.0.0.1:{backend.port}"


@asynccontextmanager
async def strangler(
    tmp_path: Path, backend_url: str, *, workers: int, rollout: int = 50
) -> AsyncIterator[StranglerProcess]:
    write_flags(tmp_path / "flags.json", flags_document(rollout=rollout))
    config = tmp_path / "strangler.toml"
    config.write_text(
        f"""
[server]
port = 0
workers = {workers}
shutdown_grace = 3
[admin]
port = 0
[backends]
legacy = "{backend_url}"
candidate = "{backend_url}"
[flags]
file = "flags.json"
poll_interval = 0.05
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


async def metric(running: StranglerProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    async with aiohttp.ClientSession() as client:
        async with client.get(running.admin_url + "/metrics") as resp:
            return values(await resp.text(), name)


async def ready_status(running: StranglerProcess) -> int:
    async with aiohttp.ClientSession() as client:
        async with client.get(running.admin_url + "/readyz") as resp:
            return resp.status


async def until(check: Callable[[], bool], within: float = 15.0) -> None:
    """Wait, boundedly, for what another process brings about."""
    for _ in range(int(within / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    assert check(), f"not true within {within} s"


def serving(running: StranglerProcess) -> dict[int, int]:
    """Worker index -> pid of the worker serving in that slot, as the supervisor logged it."""
    slots: dict[int, int] = {}
    for line in running.log:
        match = re.search(r"worker (\d+) \(pid (\d+)\) serving", line)
        if match:
            slots[int(match.group(1))] = int(match.group(2))
    return slots


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def fresh_get(url: str, user: str) -> tuple[int, str]:
    # A connection of its own, so the kernel picks a worker's socket for it anew.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as client:
        async with client.get(url + "/api/x", headers={"X-User-Id": user}) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Strangler-Backend", "")


async def test_two_workers_share_the_port_and_the_supervisor_sums_their_metrics(
    tmp_path: Path, backend_url: str
) -> None:
    async with strangler(tmp_path, backend_url, workers=2) as running:
        assert await ready_status(running) == 200
        assert len(serving(running)) == 2
        for i in range(60):
            status, _ = await fresh_get(running.proxy_url, f"user-{i}")
            assert status == 200
        async with aiohttp.ClientSession() as client:
            sock = await client.ws_connect(
                running.proxy_url + "/ws/agent", headers={"X-User-Id": "user-ws"}
            )
            await sock.send_str("hi")
            assert await sock.receive_str() == "hi"
            # Workers flush their batched request counts every second.
            served = 0.0
            for _ in range(100):
                requests = await metric(running, "strangler_requests_total")
                served = sum(v for labels, v in requests.items() if ("route", "api") in labels)
                if served >= 60:
                    break
                await asyncio.sleep(0.05)
            assert served == 60
            sessions = await metric(running, "strangler_websocket_sessions")
            assert sum(sessions.values()) == 1
            assert all("pid" not in dict(labels) for labels in sessions)

            running.proc.send_signal(signal.SIGTERM)
            msg = await asyncio.wait_for(sock.receive(), 10)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
        assert await asyncio.wait_for(running.proc.wait(), 15) == 0


@pytest.mark.parametrize(
    ("workers", "sig"),
    [(1, signal.SIGSEGV), (1, signal.SIGKILL), (2, signal.SIGSEGV), (2, signal.SIGKILL)],
)
async def test_a_worker_killed_by_a_signal_serves_again_within_a_second_logged_and_counted(
    tmp_path: Path, backend_url: str, workers: int, sig: signal.Signals
) -> None:
    async with strangler(tmp_path, backend_url, workers=workers) as running:
        victim = serving(running)[0]
        os.kill(victim, sig)
        killed = time.monotonic()
        # Connections made while the worker is down wait in its socket's backlog (the
        # supervisor keeps it open): each gets its answer once the new worker accepts.
        answers = await asyncio.gather(*(fresh_get(running.proxy_url, f"u{i}") for i in range(20)))
        elapsed = time.monotonic() - killed
        assert [status for status, _ in answers] == [200] * 20
        assert elapsed < 1.0, f"answered {elapsed:.2f} s after the kill"
        await until(lambda: serving(running).get(0) not in (None, victim))
        log = "".join(running.log)
        assert f"worker 0 (pid {victim}) killed by {sig.name}" in log
        assert "starting it again now" in log
        gap = re.search(r"worker 0 \(pid \d+\) serving again, (\d+) ms after", log)
        assert gap is not None and int(gap.group(1)) < 1000
        restarts = await metric(running, "strangler_worker_restarts_total")
        assert restarts == {(("cause", sig.name),): 1.0}
        assert await ready_status(running) == 200
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), 15) == 0


async def test_a_worker_that_keeps_dying_is_started_again_after_growing_delays(
    tmp_path: Path, backend_url: str
) -> None:
    async with strangler(tmp_path, backend_url, workers=1) as running:
        killed: list[int] = []
        for _ in range(4):
            pid = serving(running)[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            await until(lambda: serving(running)[0] not in killed)
        log = "".join(running.log)
        delays = re.findall(
            r"killed by SIGKILL after [\d.]+ s; starting it again (now|in [\d.]+ s)", log
        )
        assert delays == ["now", "in 0.25 s", "in 0.50 s", "in 1.00 s"]
        restarts = await metric(running, "strangler_worker_restarts_total")
        assert restarts == {(("cause", "SIGKILL"),): 4.0}
        assert (await fresh_get(running.proxy_url, "u"))[0] == 200


async def test_an_unsound_flags_file_keeps_the_last_good_flags_through_a_worker_restart(
    tmp_path: Path, backend_url: str
) -> None:
    async with strangler(tmp_path, backend_url, workers=1, rollout=100) as running:
        assert await fresh_get(running.proxy_url, "u") == (200, "candidate")
        write_flags(tmp_path / "flags.json", flags_document(rollout="fifty"))  # type: ignore[arg-type]
        await until(lambda: any("refused" in line for line in running.log))
        [refused] = [line for line in running.log if "refused" in line]
        assert "ERROR" in refused
        assert 'features[0] "ssot-dispatcher": strategies[0].parameters.rollout: "fifty"' in refused
        assert await metric(running, "strangler_flags_invalid_total") == {(): 1.0}
        # Routed by the last good flags (100 %), not by "fifty" read as 0 %; still ready.
        for i in range(10):
            assert await fresh_get(running.proxy_url, f"user-{i}") == (200, "candidate")
        assert await ready_status(running) == 200
        # A worker started again while the file is unsound starts from the last good flags.
        victim = serving(running)[0]
        os.kill(victim, signal.SIGSEGV)
        await until(lambda: serving(running)[0] != victim)
        for i in range(10):
            assert await fresh_get(running.proxy_url, f"user-{i}") == (200, "candidate")
        assert await ready_status(running) == 200
        write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        await until(lambda: any("flags reloaded" in line for line in running.log), 5)
        assert await fresh_get(running.proxy_url, "u") == (200, "legacy")


async def test_the_supervisors_admin_listener_keeps_divergences_behind_the_token(
    tmp_path: Path, backend_url: str
) -> None:
    # This configuration sets no [admin] token: the divergences stay closed to everyone.
    async with strangler(tmp_path, backend_url, workers=2) as running:
        assert await ready_status(running) == 200
        async with aiohttp.ClientSession() as client:
            for sent in ({}, {"Authorization": "Bearer guess"}):
                url = running.admin_url + "/api/divergences"
                async with client.get(url, headers=sent) as resp:
                    assert resp.status == 401
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await resp.json())["error"] == "unauthorized"
            for path in ("/healthz", "/readyz", "/metrics"):
                async with client.get(running.admin_url + path) as resp:
                    assert resp.status == 200, path


async def test_a_fork_server_that_dies_is_started_again_and_workers_go_on_serving(
    tmp_path: Path, backend_url: str
) -> None:
    async with strangler(tmp_path, backend_url, workers=1) as running:
        worker = serving(running)[0]
        [forkserver] = [child for child in children(running.proc.pid) if child != worker]
        os.kill(forkserver, signal.SIGKILL)
        await until(lambda: any("the fork server" in line for line in running.log))
        assert f"the fork server (pid {forkserver}) killed by SIGKILL" in "".join(running.log)
        assert (await fresh_get(running.proxy_url, "u"))[0] == 200
        # The next worker comes from the new fork server.
        os.kill(worker, signal.SIGSEGV)
        await until(lambda: serving(running)[0] != worker)
        assert (await fresh_get(running.proxy_url, "u"))[0] == 200
        assert await ready_status(running) == 200
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), 15) == 0
