"""The admin listener: health, readiness and Prometheus metrics (I/O).

It listens apart from the proxied traffic so that operators and Prometheus reach it
while the proxy port is saturated, and so that no proxied path can shadow it.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.context import Proxy
from proxy.divergence_store import add_divergence_routes

PROXY_KEY = web.AppKey("strangler_proxy", Proxy)


def build_admin_app(proxy: Proxy) -> web.Application:
    app = web.Application()
    app[PROXY_KEY] = proxy
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if proxy.store is not None:
        add_divergence_routes(app, proxy.store)
    return app


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    reasons = []
    if not proxy.flags.ready:
        reasons.append("flags not loaded")
    if proxy.draining:
        reasons.append("shutting down")
    if reasons:
        return _json({"ready": False, "reasons": reasons}, status=503)
    return _json({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    refresh_rollout_gauges(proxy)
    body = generate_latest(proxy.metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def refresh_rollout_gauges(proxy: Proxy) -> None:
    if not proxy.flags.ready:
        return
    for route in proxy.routes.routes:
        proxy.metrics.rollout_percent.labels(route.name, route.flag).set(
            proxy.flags.rollout_percent(route.flag)
        )
