"""Header hygiene for relayed exchanges (pure).

Hop-by-hop headers (RFC 9110 section 7.6.1), and every header a ``Connection`` header
names, belong to one connection and are removed in both directions. A client may not
speak for the proxy: its ``X-Strangler-*`` headers are dropped. The proxy adds the
``X-Forwarded-*`` headers on the way in and ``X-Strangler-Backend`` on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

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


def http_version(parser: Any, keep_alive: bool, connection_named: bool) -> str:
    """The version of the message an httptools parser just read the head of.

    llhttp keeps an HTTP/1.0 connection alive only when a Connection (or
    Proxy-Connection) header asks, and accepts no other 1.x above 1.0: alive
    (``keep_alive``, the parser's verdict) without such a header is HTTP/1.1. That
    spares ``get_http_version``, which formats a string, on nearly every message."""
    if keep_alive and not connection_named:
        return "1.1"
    version: str = parser.get_http_version()
    return version


def from_wire(raw: bytes) -> str:
    """Bytes from the wire as text: UTF-8, any other byte kept as a surrogate escape (as
    aiohttp decodes headers), so that ``to_wire(from_wire(raw)) == raw``. Valid UTF-8, nearly
    every header, takes the strict decoder, which compiled code calls directly; the
    surrogate-escaping one looks its codec up by name on every call."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def to_wire(text: str) -> bytes:
    """``text`` as the bytes it was decoded from (the inverse of ``from_wire``)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def as_text(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A parser's raw headers as text: UTF-8, any other byte kept as a surrogate escape
    (as aiohttp decodes them), so that encoding them back gives the same bytes."""
    return [(from_wire(name), from_wire(value)) for name, value in headers]


def _b(names: frozenset[str]) -> frozenset[bytes]:
    return frozenset(name.encode() for name in names)


# What a header name is to the hygiene, as bits: the drop sets it is in, and the names
# handled apart. Computed once per spelling of a name, from its lower case.
_HOP: Final = 1  # in HOP_BY_HOP
_REQUEST: Final = 2  # in the request drop set
_WEBSOCKET: Final = 4  # in the WebSocket handshake drop set
_CONNECTION: Final = 8
_OWNED: Final = 16  # X-Strangler-*
_FORWARDED_FOR: Final = 32
_KINDS_MAX: Final = 4096  # header names are the client's to choose: the cache stops growing


# The names the hygiene matches, as the parsers give them (bytes), in lower case.
_HOP_BY_HOP: Final = _b(HOP_BY_HOP)
_REQUEST_DROP_B: Final = _b(_REQUEST_DROP)
_WEBSOCKET_DROP_B: Final = _b(_WEBSOCKET_DROP)
_PREFIX: Final = PROXY_OWNED_PREFIX.encode()
# The X-Forwarded-Proto line of each scheme, made once.
_PROTO_LINES: Final = {p: b"X-Forwarded-Proto: %b\r\n" % p.encode() for p in ("http", "https")}
# The methods most requests carry: the listener and the upstream client each derive
# their lookup table (bytes to text, text to bytes) from this one list.
COMMON_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
# Body length -> its Content-Length line, for the lengths most messages have.
_LENGTH_LINES: Final[dict[int, bytes]] = {}
_LENGTH_LINES_MAX: Final = 4096


def length_line(size: int) -> bytes:
    """The ``Content-Length`` header line (ending CRLF) of a body of ``size`` bytes, made
    once per length (up to a bound: a body's length is the peer's to choose)."""
    line = _LENGTH_LINES.get(size)
    if line is None:
        line = b"Content-Length: %d\r\n" % size
        if len(_LENGTH_LINES) < _LENGTH_LINES_MAX:
            _LENGTH_LINES[size] = line
    return line


# Header name (as spelt) -> its kind bits.
_KINDS: Final[dict[bytes, int]] = {}


def _kind(name: bytes) -> int:
    lower = name.lower()
    kind = 0
    if lower in _HOP_BY_HOP:
        kind |= _HOP
    if lower in _REQUEST_DROP_B:
        kind |= _REQUEST
    if lower in _WEBSOCKET_DROP_B:
        kind |= _WEBSOCKET
    if lower == b"connection":
        kind |= _CONNECTION
    if lower.startswith(_PREFIX):
        kind |= _OWNED
    if lower == b"x-forwarded-for":
        kind |= _FORWARDED_FOR
    if len(_KINDS) < _KINDS_MAX:
        _KINDS[name] = kind
    return kind


def _clean(
    headers: Iterable[tuple[bytes, bytes]], drop: int
) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The headers without those of the ``drop`` kind, those a Connection header names
    and the proxy's own; and the X-Forwarded-For values, taken out (unless Connection
    names it)."""
    out: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    named: set[bytes] | None = None
    kinds = _KINDS
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if kind == 0:
            out.append((name, value))
        elif kind & drop:
            if kind & _CONNECTION:
                tokens = {token.strip().lower() for token in value.split(b",")}
                named = tokens if named is None else named | tokens
        elif kind & _FORWARDED_FOR:
            forwarded_for.append(value)
        elif not kind & _OWNED:
            out.append((name, value))
    if named:
        # Most often it names only what goes anyway (keep-alive, close, upgrade).
        named = {token for token in named if token and not _kind(token) & drop}
    if named:
        out = [(name, value) for name, value in out if name.lower() not in named]
        if b"x-forwarded-for" in named:
            forwarded_for = []
    return out, forwarded_for


def upstream_request_block(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    proto: str,
    host: str | None,
    websocket: bool = False,
) -> bytes:
    """The client's request headers (a parser's raw headers) as the backend should see
    them, as the header lines of the upstream request (each ending CRLF).

    ``host`` becomes ``X-Forwarded-Host``: the listener's checked authority (see
    ``proxy.request_head``), never a client's header copied unchecked (the client's own
    ``X-Forwarded-Host`` is dropped with the other forwarding headers).

    Content-Length goes too: the body is framed anew. With ``websocket`` the handshake
    headers go as well: the proxy performs its own handshake with the backend; only
    the subprotocol offer is carried over (separately), never the client's key or
    extensions.
    """
    out, forwarded_for = _clean(headers, _WEBSOCKET if websocket else _REQUEST)
    lines = [b"%b: %b\r\n" % (name, value) for name, value in out]
    if client_ip:
        forwarded_for.append(client_ip.encode())
    if forwarded_for:
        lines.append(b"X-Forwarded-For: %b\r\n" % b", ".join(forwarded_for))
    proto_line = _PROTO_LINES.get(proto)
    lines.append(
        b"X-Forwarded-Proto: %b\r\n" % proto.encode() if proto_line is None else proto_line
    )
    if host:
        lines.append(b"X-Forwarded-Host: %b\r\n" % to_wire(host))
    return b"".join(lines)


def downstream_response_block(
    headers: Iterable[tuple[bytes, bytes]], backend: str
) -> tuple[bytes, bytes | None]:
    """The backend's response headers as the client should see them: hop-by-hop
    headers, those a Connection header names and the proxy's own dropped,
    ``X-Strangler-Backend`` added; as header lines without Content-Length, and the
    Content-Length value, if there was one."""
    out, forwarded_for = _clean(headers, _HOP)
    length = None
    lines = []
    for name, value in out:
        if len(name) == 14 and name.lower() == b"content-length":
            length = value
        else:
            lines.append(b"%b: %b\r\n" % (name, value))
    lines.extend(b"X-Forwarded-For: %b\r\n" % value for value in forwarded_for)
    lines.append(b"X-Strangler-Backend: %b\r\n" % backend.encode())
    return b"".join(lines), length
