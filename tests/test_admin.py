"""The admin listener: health, readiness, and the Prometheus metrics of real traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from flags.file import FileFlagProvider
from proxy.admin import authorized
from proxy.app import ProxyServer
from proxy.settings import Settings
from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]


class HeldFlags:
    """A file provider whose first load waits until the test lets it finish."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.inner = FileFlagProvider(path)
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self) -> None:
        self.called.set()
        await self.release.wait()
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def ready(self) -> bool:
        return self.inner.ready

    def is_enabled(self, flag: str, user_id: str) -> bool:
        return self.inner.is_enabled(flag, user_id)

    def rollout_percent(self, flag: str) -> float:
        return self.inner.rollout_percent(flag)


async def test_the_proxy_is_not_ready_until_the_flags_are_loaded(tmp_path: Path) -> None:
    path = write_flags(tmp_path / "flags.json", flags_document())
    settings = make_settings("http://127.0.0.1:9", "http://127.0.0.1:9", path)
    flags = HeldFlags(path)
    server = ProxyServer(settings, registry=CollectorRegistry(), flags=flags)
    starting = asyncio.create_task(server.start())
    try:
        await flags.called.wait()
        async with aiohttp.ClientSession() as client:
            async with client.get(server.admin_url + "/healthz") as resp:
                assert resp.status == 200
            async with client.get(server.admin_url + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["reasons"] == ["flags not loaded"]
            flags.release.set()
            await starting
            async with client.get(server.admin_url + "/readyz") as resp:
                assert resp.status == 200
    finally:
        flags.release.set()
        await starting
        await server.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_real_traffic_without_user_ids_in_labels(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    async def http(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/echo/fail"):
            return web.Response(status=503)
        return web.Response(text="ok")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str("event:" + msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/ws/agent", ws)
    app.router.add_route("*", "/{tail:.*}", http)
    backend = await aiohttp_server(app)
    url = f"http://127.0.0.1:{backend.port}"
    path = write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    async with running_proxy(make_settings(url, url, path, routes=ROUTES)) as proxy:
        async with aiohttp.ClientSession() as client:
            for i in range(40):
                headers = {"X-User-Id": f"user-{i}"}
                async with client.get(proxy.proxy_url + "/echo/x", headers=headers) as resp:
                    assert resp.status == 200
            async with client.get(proxy.proxy_url + "/echo/fail") as resp:
                assert resp.status == 503
            async with client.get(proxy.proxy_url + "/unrouted") as resp:
                assert resp.status == 200
            sock = await client.ws_connect(
                proxy.proxy_url + "/ws/agent", headers={"X-User-Id": "user-ws"}
            )
            await sock.send_str("hi")
            assert await sock.receive_str() == "event:hi"
            async with client.get(proxy.admin_url + "/metrics") as resp:
                assert resp.headers["Content-Type"].startswith("text/plain")
                during = samples(await resp.text())
            await sock.close()
            async with client.get(proxy.admin_url + "/metrics") as resp:
                after_text = await resp.text()
                after = samples(after_text)

    legacy = value(
        during,
        "strangler_requests_total",
        route="echo",
        backend="legacy",
        role="primary",
        outcome="success",
    )
    candidate = value(
        during,
        "strangler_requests_total",
        route="echo",
        backend="candidate",
        role="primary",
        outcome="success",
    )
    assert legacy + candidate == 40 and legacy > 0 and candidate > 0
    assert (
        value(
            during,
            "strangler_requests_total",
            route="echo",
            backend="legacy",
            role="primary",
            outcome="server_error",
        )
        == 1
    )
    assert (
        value(
            during,
            "strangler_requests_total",
            route="_unrouted",
            backend="legacy",
            role="primary",
            outcome="success",
        )
        == 1
    )
    assert (
        value(
            during,
            "strangler_request_duration_seconds_count",
            route="echo",
            backend="legacy",
            role="primary",
        )
        == legacy + 1
    )
    assert (
        value(
            during,
            "strangler_first_event_seconds_count",
            route="echo",
            backend="candidate",
            role="primary",
        )
        == candidate
    )
    ws_backend = (
        "candidate"
        if any(
            v
            for (n, labels), v in during.items()
            if n == "strangler_websocket_sessions" and ("backend", "candidate") in labels
        )
        else "legacy"
    )
    assert value(during, "strangler_websocket_sessions", route="agent", backend=ws_backend) == 1
    assert (
        value(
            during,
            "strangler_first_event_seconds_count",
            route="agent",
            backend=ws_backend,
            role="primary",
        )
        == 1
    )
    assert value(during, "strangler_rollout_percent", route="agent", flag="ssot-dispatcher") == 50
    assert value(after, "strangler_websocket_sessions", route="agent", backend=ws_backend) == 0
    assert (
        value(
            after,
            "strangler_requests_total",
            route="agent",
            backend=ws_backend,
            role="primary",
            outcome="success",
        )
        == 1
    )
    assert "user-" not in after_text, after_text


# --- the token ---------------------------------------------------------------------------

TOKEN = "s3cret-admin-token"


@pytest.mark.parametrize(
    ("path", "authorization", "token", "allowed"),
    [
        ("/healthz", None, TOKEN, True),
        ("/readyz", None, TOKEN, True),
        ("/metrics", None, None, True),
        ("/api/divergences", f"Bearer {TOKEN}", TOKEN, True),
        ("/api/divergences", f"bearer  {TOKEN} ", TOKEN, True),  # the scheme ignores case
        ("/api/divergences", None, TOKEN, False),
        ("/api/divergences", "", TOKEN, False),
        ("/api/divergences", "Bearer", TOKEN, False),
        ("/api/divergences", f"Basic {TOKEN}", TOKEN, False),
        ("/api/divergences", "Bearer wrong", TOKEN, False),
        ("/api/divergences", f"Bearer {TOKEN}x", TOKEN, False),
        ("/api/divergences", f"Bearer {TOKEN[:-1]}", TOKEN, False),
        ("/api/divergences", "Bearer \udcff", TOKEN, False),  # not UTF-8 on the wire
        ("/api/divergences", "Bearer anything", None, False),  # no token: closed
        ("/api/divergences", "Bearer ", "", False),
        ("/api/audit", f"Bearer {TOKEN}", TOKEN, True),  # every other path: the token
        ("/api/routes", None, TOKEN, False),
        ("/healthz/", None, TOKEN, False),
        ("/HEALTHZ", None, TOKEN, False),
    ],
)
def test_only_health_readiness_and_metrics_are_open_without_the_bearer_token(
    path: str, authorization: str | None, token: str | None, allowed: bool
) -> None:
    assert (authorized(path, authorization, token) is None) is allowed


def settings_with_store(url: str, flags: Path, tmp_path: Path, token: str | None) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": 0},
        admin={"host": "127.0.0.1", "port": 0, **({"token": token} if token else {})},
        backends={"legacy": url, "candidate": url},
        flags={"provider": "file", "file": flags},
        divergences={"path": tmp_path / "divergences.sqlite3"},
        # A route that compares: the divergences have a store to be read from.
        routes=[*ROUTES, {**ROUTES[2], "name": "shadowed", "path": "/shadowed", "shadow": 1.0}],
    )


@pytest.mark.parametrize(
    ("configured", "sent", "status"),
    [
        pytest.param(TOKEN, {}, 401, id="no-header"),
        pytest.param(TOKEN, {"Authorization": "Bearer nope"}, 401, id="wrong-token"),
        pytest.param(TOKEN, {"Authorization": f"Basic {TOKEN}"}, 401, id="wrong-scheme"),
        pytest.param(None, {"Authorization": "Bearer x"}, 401, id="none-configured"),
        pytest.param(TOKEN, {"Authorization": f"Bearer {TOKEN}"}, 200, id="the-token"),
    ],
)
async def test_divergences_need_the_admin_token_and_health_readiness_metrics_do_not(
    tmp_path: Path, configured: str | None, sent: dict[str, str], status: int
) -> None:
    flags = write_flags(tmp_path / "flags.json", flags_document())
    settings = settings_with_store("http://127.0.0.1:9", flags, tmp_path, configured)
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.admin_url + "/api/divergences", headers=sent) as resp:
            assert resp.status == status
            body = await resp.json()
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert body["error"] == "unauthorized" and body["detail"]
                assert TOKEN not in str(body)
            else:
                assert body == {"divergences": []}
        for path in ("/healthz", "/readyz", "/metrics"):
            async with client.get(proxy.admin_url + path) as resp:
                assert resp.status == 200, path
