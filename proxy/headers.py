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


_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-forwarded-proto", "x-forwarded-host"}
_WEBSOCKET_DROP = _REQUEST_DROP | WEBSOCKET_HANDSHAKE


def upstream_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client_ip: str | None,
    proto: str,
    host: str | None,
    websocket: bool = False,
) -> Headers:
    """The client's request headers as the backend should see them.

    Content-Length goes too: the body is relayed whole and framed anew. With
    ``websocket`` the handshake headers go as well: the upstream client performs its own
    handshake; only the subprotocol offer is carried over (separately), never the
    client's key or extensions.
    """
    drop = _WEBSOCKET_DROP if websocket else _REQUEST_DROP
    out: Headers = []
    forwarded_for: list[str] = []
    named: set[str] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                named = tokens if named is None else named | tokens
            continue
        if lower.startswith(PROXY_OWNED_PREFIX):
            continue
        if lower == "x-forwarded-for":
            forwarded_for.append(value)
            continue
        out.append((name, value))
    if named:
        out = [(name, value) for name, value in out if name.lower() not in named]
        if "x-forwarded-for" in named:
            forwarded_for = []
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
    out: Headers = []
    named: set[str] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                named = tokens if named is None else named | tokens
            continue
        if lower.startswith(PROXY_OWNED_PREFIX):
            continue
        out.append((name, value))
    if named:
        out = [(name, value) for name, value in out if name.lower() not in named]
    out.append((BACKEND_HEADER, backend))
    return out
