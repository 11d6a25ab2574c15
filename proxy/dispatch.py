"""The proxy listener's one handler: route, decide, relay (compiled: it runs per request)."""

from __future__ import annotations

from collections.abc import Awaitable

from proxy.context import Proxy
from proxy.http_relay import relay_http, respond_error
from proxy.routing import UNROUTED, choose_backend
from proxy.server import Handler, Request
from proxy.websocket_direct import relay_websocket_direct
from proxy.websocket_relay import relay_websocket


def build_handler(proxy: Proxy) -> Handler:
    """The proxy listener's one handler: route, decide, relay.

    Every path is proxied, so there is no application router: the lean server of
    ``proxy.server`` calls this for each request. A WebSocket upgrade takes its
    connection away from the server: relayed frame by frame, and watched (turns, a
    shadow, isolation) on a route whose experiment asks for it.
    """
    routes = proxy.routes
    flags = proxy.flags
    metrics = proxy.metrics

    def handle(request: Request) -> Awaitable[None] | None:
        route = routes.match(request.path)
        user_id = request.key or None
        if request.key_invalid:
            # Not UTF-8: served as a request without a user id (legacy, relayed as it
            # came, never bucketed), and counted.
            label = route.name if route is not None else UNROUTED
            metrics.increment(metrics.invalid_user_ids, label)
        backend = choose_backend(route, user_id, flags.is_enabled)
        if not request.upgrade:
            return relay_http(request, proxy, route, backend, user_id)
        if proxy.draining:
            label = route.name if route is not None else UNROUTED
            respond_error(request, 503, "shutting_down", "the proxy is draining", backend, label)
            return None
        experiment = proxy.experiments.get(route.name) if route is not None else None
        if route is None or experiment is None or not experiment.watches:
            return relay_websocket_direct(request, proxy, route, backend)
        return relay_websocket(request, proxy, route, experiment, backend, user_id)

    return handle
