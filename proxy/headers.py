"""Header hygiene for relayed exchanges (pure).

Hop-by-hop headers (RFC 9110 section 7.6.1), and every header a ``Connection`` header
names, belong to one connection and are removed in both directions. A client may not
speak for the proxy: its ``X-Strangler-*`` headers are dropped. The proxy adds the
``X-Forwarded-*`` headers on the way in and ``X-Strangler-Backend`` on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)
PROXY_OWNED_PREFIX = "x-strangler-"
BACKEND_HEADER = "X-Strangler-Backend"
SHADOW_HEADER = "X-Strangler-Shadow"

Headers = list[tuple[str, str]]


def connection_named(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in Connection headers, lower-cased."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(named)


def upstream_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client_ip: str | None,
    proto: str,
    host: str | None,
    websocket: bool = False,
) -> Headers:
    """The client's request headers as the backend should see them."""
    items = list(headers)
    drop = HOP_BY_HOP | connection_named(items) | {"host", "x-forwarded-proto", "x-forwarded-host"}
    if websocket:
        # The upstream client performs its own handshake; only the subprotocol offer
        # is carried over (separately), never the client's key or extensions.
        drop = drop | WEBSOCKET_HANDSHAKE
    out: Headers = []
    forwarded_for: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in drop or lower.startswith(PROXY_OWNED_PREFIX):
            continue
        if lower == "x-forwarded-for":
            forwarded_for.append(value)
            continue
        out.append((name, value))
    if client_ip:
        forwarded_for.append(client_ip)
    if forwarded_for:
        out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", proto))
    if host:
        out.append(("X-Forwarded-Host", host))
    return out


def downstream_response_headers(headers: Iterable[tuple[str, str]], backend: str) -> Headers:
    """The backend's response headers as the client should see them."""
    items = list(headers)
    drop = HOP_BY_HOP | connection_named(items)
    out = [
        (name, value)
        for name, value in items
        if name.lower() not in drop and not name.lower().startswith(PROXY_OWNED_PREFIX)
    ]
    out.append((BACKEND_HEADER, backend))
    return out
