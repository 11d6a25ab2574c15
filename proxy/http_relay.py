"""Relay one HTTP exchange to the chosen backend and stream the answer back (I/O).

The request body is read once, up to the configured limit (413 beyond it), before the
backend is contacted, so an oversized upload never reaches a backend half-sent. The
response is relayed as raw bytes (compressed bodies stay compressed) chunk by chunk as
the backend sends them, through the lean upstream pool of ``proxy.upstream``; ``write``
waits for the client to drain, and the upstream reader pauses when its buffer is full,
so a slow reader holds back the backend instead of growing the proxy's memory. A client
that goes away cancels the handler (``handler_cancellation``), which closes the upstream
exchange at once.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.context import Proxy
from proxy.headers import downstream_response_headers, upstream_request_headers
from proxy.metrics import Outcome
from proxy.routing import Backend
from proxy.upstream import UpstreamError, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger("strangler.relay")


class BodyTooLarge(Exception):
    pass


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole request body, or BodyTooLarge once it passes ``limit`` bytes."""
    if not request.body_exists:
        return b""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    return b"".join(parts)


def error_response(
    status: int, error: str, detail: str, backend: Backend, route: str
) -> web.Response:
    body = orjson.dumps(
        {"error": error, "detail": detail, "backend": backend.value, "route": route}
    )
    return web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={"X-Strangler-Backend": backend.value},
    )


def outcome_of_status(status: int) -> Outcome:
    if status >= 500:
        return Outcome.SERVER_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.SUCCESS


async def relay_http(
    request: web.BaseRequest, proxy: Proxy, route: str, backend: Backend
) -> web.StreamResponse:
    metrics = proxy.metrics
    started = time.perf_counter()
    outcome = Outcome.CLIENT_CLOSED
    try:
        try:
            body = await read_body(request, proxy.settings.server.max_body_bytes)
        except BodyTooLarge:
            outcome = Outcome.TOO_LARGE
            limit = proxy.settings.server.max_body_bytes
            return error_response(
                413, "request_too_large", f"request body over {limit} bytes", backend, route
            )
        response, outcome = await _exchange(request, proxy, route, backend, body, started)
        return response
    finally:
        metrics.count_request(route, backend.value, "primary", outcome.value)
        if outcome not in (Outcome.TOO_LARGE, Outcome.CLIENT_CLOSED):
            metrics.observe_duration(route, backend.value, "primary", time.perf_counter() - started)


async def _exchange(
    request: web.BaseRequest,
    proxy: Proxy,
    route: str,
    backend: Backend,
    body: bytes,
    started: float,
) -> tuple[web.StreamResponse, Outcome]:
    headers = upstream_request_headers(
        request.headers.items(),
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
    )
    try:
        upstream = await proxy.pool.request(
            proxy.backend_urls[backend], request.method, request.raw_path, headers, body
        )
    except UpstreamUnreachable as exc:
        return _failure(502, "backend_unreachable", str(exc), backend, route, Outcome.UNREACHABLE)
    except UpstreamTimeout as exc:
        detail = str(exc) or "no response within the backend timeout"
        return _failure(504, "backend_timeout", detail, backend, route, Outcome.TIMEOUT)
    except UpstreamError as exc:
        return _failure(502, "backend_error", str(exc), backend, route, Outcome.BROKEN)
    except ValueError as exc:
        # A header the upstream client refuses to send (a control character, a
        # conflicting length): the request itself is malformed.
        return error_response(400, "bad_request", str(exc), backend, route), Outcome.CLIENT_ERROR

    metrics = proxy.metrics
    outcome = outcome_of_status(upstream.status)
    response_headers = CIMultiDict(downstream_response_headers(upstream.headers, backend.value))
    async with upstream:
        if upstream.complete:
            # The whole body came with the head: answer in one write, nothing to stream.
            parts = [chunk async for chunk in upstream]
            metrics.observe_first_event(
                route, backend.value, "primary", time.perf_counter() - started
            )
            response = web.Response(
                status=upstream.status,
                reason=upstream.reason,
                headers=response_headers,
                body=b"".join(parts) if parts else None,
            )
            return response, outcome
        stream = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=response_headers
        )
        await stream.prepare(request)
        first = True
        try:
            async for chunk in upstream:
                if first:
                    metrics.observe_first_event(
                        route, backend.value, "primary", time.perf_counter() - started
                    )
                    first = False
                await stream.write(chunk)
        except UpstreamError as exc:
            # The status line is gone already: the only honest signal left is to cut
            # the client's connection so it cannot mistake a truncated body for a whole one.
            log.warning("backend %s failed mid-response on route %s: %s", backend, route, exc)
            if request.transport is not None:
                request.transport.close()
            return stream, Outcome.BROKEN
        if first:
            metrics.observe_first_event(
                route, backend.value, "primary", time.perf_counter() - started
            )
        await stream.write_eof()
    return stream, outcome


def _failure(
    status: int, error: str, detail: str, backend: Backend, route: str, outcome: Outcome
) -> tuple[web.StreamResponse, Outcome]:
    log.warning("route %s backend %s: %s (%s)", route, backend, error, detail)
    return error_response(status, error, detail, backend, route), outcome
