"""A real Prometheus scrapes the admin listener and sees the proxy's traffic."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags
from tests.services_fixtures import PrometheusLauncher

ServerFactory = Callable[..., Awaitable[TestServer]]
pytestmark = pytest.mark.services


def scalar(result: list[dict[str, Any]]) -> float:
    return float(result[0]["value"][1]) if result else 0.0


async def test_prometheus_scrapes_request_counts_and_rollout_percent(
    aiohttp_server: ServerFactory, tmp_path: Path, prometheus: PrometheusLauncher
) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    backend = await aiohttp_server(app)
    url = f"http://127.0.0.1:{backend.port}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    async with running_proxy(make_settings(url, url, flags, routes=ROUTES)) as proxy:
        async with aiohttp.ClientSession() as client:
            for i in range(60):
                headers = {"X-User-Id": f"user-{i}"}
                async with client.get(proxy.proxy_url + "/echo/x", headers=headers) as resp:
                    assert resp.status == 200
        server = prometheus([f"127.0.0.1:{proxy.admin_port}"])
        total = 'sum(strangler_requests_total{route="echo",role="primary",outcome="success"})'
        result = await server.wait_for_async(total, lambda r: scalar(r) == 60)
        assert scalar(result) == 60
        by_backend = await server.query_async(
            'sum by (backend) (strangler_requests_total{route="echo"})'
        )
        assert {r["metric"]["backend"] for r in by_backend} == {"legacy", "candidate"}
        percent = await server.query_async('strangler_rollout_percent{route="echo"}')
        assert scalar(percent) == 50
        p50 = await server.query_async(
            "histogram_quantile(0.5, sum by (le) "
            '(strangler_request_duration_seconds_bucket{route="echo"}))'
        )
        assert 0 < scalar(p50) < 1  # the histogram is usable by dashboards
        series = await server.query_async('{__name__=~"strangler_.+"}')
        labels = {v for r in series for k, v in r["metric"].items() if k != "__name__"}
        assert not any(value.startswith("user-") for value in labels)
