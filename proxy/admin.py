"""The admin listener: health, readiness and Prometheus metrics (I/O).

It listens apart from the proxied traffic so that operators and Prometheus reach it
while the proxy port is saturated, and so that no proxied path can shadow it.

Only ``/healthz``, ``/readyz`` and ``/metrics`` are open: every other path (the
divergences, which carry event payloads and user ids, and whatever joins them) needs
``Authorization: Bearer <[admin] token>``. Without a configured token they stay closed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from proxy.context import Proxy
from proxy.divergence_store import add_divergence_routes

PROXY_KEY = web.AppKey("strangler_proxy", Proxy)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""The admin paths served without the token: what probes and Prometheus read."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorized(path: str, authorization: str | None, token: str | None) -> str | None:
    """Why a request for ``path`` with this Authorization header may not be served, or
    None when it may. Open paths need nothing; any other needs the bearer token, which
    is compared in constant time (how much of a guess was right must not show)."""
    if path in OPEN_PATHS:
        return None
    if not token:
        return "no admin token is configured ([admin] token): this view stays closed"
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return "this view needs Authorization: Bearer <admin token>"
    given = credentials.strip().encode("utf-8", "surrogateescape")  # as aiohttp decoded it
    if not hmac.compare_digest(given, token.encode()):
        return "the bearer token is not the admin token"
    return None


def token_guard(secret: SecretStr | None) -> Middleware:
    """An aiohttp middleware that answers 401 to what ``authorized`` refuses, with the
    ``[admin] token`` (the multi-worker supervisor's admin listener uses it too)."""
    token = secret.get_secret_value() if secret is not None else None

    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        refused = authorized(request.path, request.headers.get("Authorization"), token)
        if refused is not None:
            response = _json({"error": "unauthorized", "detail": refused}, status=401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="strangler admin"'
            return response
        return await handler(request)

    return guard


def build_admin_app(proxy: Proxy) -> web.Application:
    app = web.Application(middlewares=[token_guard(proxy.settings.admin.token)])
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
