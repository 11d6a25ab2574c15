"""Strict request heads: Host, target and version, as RFC 9110/9112 and nginx have them.

The rules are pure functions (``proxy.request_head``), tested table by table; then each
class of bad head is sent byte for byte to a real proxy over loopback, as a plain request
and as a WebSocket upgrade: refused ones get their 400 or 505, close the connection and
never reach the backend; accepted ones carry a checked ``X-Forwarded-Host``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.app import ProxyServer
from proxy.request_head import (
    BadHead,
    absolute_target,
    check_version,
    host_of,
    routing_path,
    valid_authority,
)
from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags
from tests.raw_http import Backend, bounded, connect, read_head

# The ``backend`` and ``proxy`` fixtures: pytest finds them among this module's names.
from tests.raw_http import backend_fixture as backend_fixture
from tests.raw_http import proxy_fixture as proxy_fixture

# --- the rules --------------------------------------------------------------------------

AUTHORITIES = [
    ("example.test", True),
    ("example.test:8080", True),
    ("EXAMPLE.test:80", True),
    ("example.test:", True),  # RFC 3986: port = *DIGIT
    ("localhost:65535", True),
    ("127.0.0.1", True),
    ("127.0.0.1:9", True),
    ("[::1]", True),
    ("[::1]:8443", True),
    ("[2001:db8::ffff:192.0.2.1]", True),
    ("[v7.fe80::a+en1]", True),  # IPvFuture
    ("xn--bcher-kva.example", True),
    ("a%2Db.test", True),
    ("sub_delims!$&'()*+,;=.test", True),
    ("", False),  # an http URI with an empty host is invalid
    (":80", False),
    ("example.test:65536", False),
    ("example.test:080808", False),
    ("example.test:8x", False),
    ("example.test:-1", False),
    ("user@example.test", False),
    ("user:pw@example.test", False),
    ("a b.test", False),
    ("a\tb.test", False),
    ("bücher.example", False),  # raw non-ASCII: not a reg-name
    ("a%zz.test", False),
    ("example.test/path", False),
    ("example.test?q", False),
    ("example.test#f", False),
    ("a\\b.test", False),
    ("[::1", False),
    ("::1", False),
    ("[zz::1]", False),
    ("[1:2:3:4:5:6:7:8:9]", False),
    ("[fe80::1%25eth0]", False),  # a zone id is not for Host
    ("[::1]x", False),
    ("a:1:2", False),
]


@pytest.mark.parametrize(("authority", "valid"), AUTHORITIES)
def test_an_authority_is_a_host_and_an_optional_port_of_digits(authority: str, valid: bool) -> None:
    assert valid_authority(authority) is valid


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"example.test:8080", "example.test:8080"),
        (b"[::1]", "[::1]"),
        (b"a\x80.test", None),
        (b"", None),
        (b"a,b.test", "a,b.test"),  # sub-delims are reg-name characters
        (b"a b", None),
        (b"example.test \t ", "example.test"),  # whitespace after a value is not in it
    ],
)
def test_a_host_header_value_is_its_text_only_when_valid(
    value: bytes, expected: str | None
) -> None:
    if expected is None:
        with pytest.raises(BadHead) as refused:
            host_of(value)
        assert refused.value.status == 400
    else:
        assert host_of(value) == expected


TARGETS = [
    ("GET", "http://example.test/a?b=1", ("example.test", "/a?b=1")),
    ("GET", "https://example.test:8443/", ("example.test:8443", "/")),
    ("GET", "HTTP://Example.test/a", ("Example.test", "/a")),  # schemes ignore case
    ("GET", "http://example.test", ("example.test", "/")),
    ("GET", "http://example.test?q=1", ("example.test", "/?q=1")),
    ("GET", "http://[::1]:8080/x", ("[::1]:8080", "/x")),
    ("OPTIONS", "*", (None, "*")),
    ("GET", "*", 400),
    ("POST", "*", 400),
    ("GET", "ftp://example.test/x", 400),
    ("GET", "ws://example.test/x", 400),
    ("GET", "file:///etc/passwd", 400),
    ("GET", "httpx://example.test/", 400),
    ("GET", "example.test/x", 400),
    ("GET", "http:///x", 400),
    ("GET", "http://user@example.test/x", 400),
    ("GET", "http://example.test:99999/x", 400),
    ("GET", "http://exa mple.test/x", 400),
    ("GET", "http://example.test#frag", 400),
]


@pytest.mark.parametrize(("method", "target", "expected"), TARGETS)
def test_a_target_that_is_not_a_path_is_an_absolute_http_uri_or_the_asterisk_of_options(
    method: str, target: str, expected: tuple[str | None, str] | int
) -> None:
    if isinstance(expected, int):
        with pytest.raises(BadHead) as refused:
            absolute_target(target, method)
        assert refused.value.status == expected
    else:
        assert absolute_target(target, method) == expected


@pytest.mark.parametrize(
    ("version", "served"),
    [("1.1", True), ("1.0", True), ("0.9", False), ("2.0", False), ("3.0", False)],
)
def test_only_http_1_1_and_1_0_are_served(version: str, served: bool) -> None:
    if served:
        check_version(version)
    else:
        with pytest.raises(BadHead) as refused:
            check_version(version)
        assert refused.value.status == 505


# --- over loopback, byte for byte ------------------------------------------------------

UPGRADE = [
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]
KINDS = ["http", "websocket"]


def head(
    kind: str, *headers: str, method: str = "GET", target: str = "", version: str = "1.1"
) -> bytes:
    """A request head as raw bytes: no header is added but the upgrade's own."""
    path = target or ("/ws/agent/h" if kind == "websocket" else "/echo/h")
    lines = [f"{method} {path} HTTP/{version}", *headers]
    if kind == "websocket":
        lines += UPGRADE
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def served(kind: str) -> int:
    return 101 if kind == "websocket" else 200


async def answer(proxy: ProxyServer, raw: bytes) -> tuple[int, bytes]:
    """The status the proxy answers ``raw`` with, and what it sent after that answer's
    body when it closes the connection (a refusal does: nothing must follow)."""
    async with connect(proxy) as client:
        await client.send(raw)
        response = await read_head(client.reader)
        if response.get("Connection") == "close":
            length = int(response.get("Content-Length") or 0)
            await bounded(client.reader.readexactly(length))
            return response.status, await bounded(client.reader.read())
        return response.status, b""


async def assert_refused(proxy: ProxyServer, backend: Backend, raw: bytes, status: int) -> None:
    got, after = await answer(proxy, raw)
    assert got == status, raw
    assert after == b"", "the connection goes on after a refused head"
    assert backend.seen == [], "a refused head reached the backend"


HOSTS = [
    pytest.param(["Host: proxy.test"], "proxy.test", id="a-name"),
    pytest.param(["Host: proxy.test:8080"], "proxy.test:8080", id="a-name-and-port"),
    pytest.param(["Host: 127.0.0.1:80"], "127.0.0.1:80", id="ipv4"),
    pytest.param(["Host: [::1]:8080"], "[::1]:8080", id="ipv6"),
    pytest.param(["Host: proxy.test \t"], "proxy.test", id="trailing-whitespace"),
    pytest.param([], 400, id="missing"),
    pytest.param(["Host: a.test", "Host: a.test"], 400, id="twice-the-same"),
    pytest.param(["Host: a.test", "X: y", "host: b.test"], 400, id="twice-different"),
    pytest.param(["Host:"], 400, id="empty"),
    pytest.param(["Host: a b.test"], 400, id="a-space"),
    pytest.param(["Host: a.test, b.test"], 400, id="a-list"),
    pytest.param(["Host: user@a.test"], 400, id="user-info"),
    pytest.param(["Host: a.test:99999"], 400, id="port-out-of-range"),
    pytest.param(["Host: a.test:http"], 400, id="port-not-digits"),
    pytest.param(["Host: a.test/x"], 400, id="a-path"),
    pytest.param(["Host: [::1"], 400, id="unclosed-bracket"),
    pytest.param(["Host: [::g]"], 400, id="not-ipv6"),
    pytest.param(["Host: a\x80.test"], 400, id="not-ascii"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("headers", "expected"), HOSTS)
async def test_a_missing_repeated_or_invalid_host_is_a_400_and_a_valid_one_is_forwarded(
    proxy: ProxyServer, backend: Backend, kind: str, headers: list[str], expected: str | int
) -> None:
    raw = head(kind, *headers)
    if isinstance(expected, int):
        await assert_refused(proxy, backend, raw, expected)
        return
    status, _ = await answer(proxy, raw)
    assert status == served(kind)
    (seen,) = backend.seen
    assert seen.headers.getall("X-Forwarded-Host") == [expected]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_http_1_0_request_without_host_is_served_without_x_forwarded_host(
    proxy: ProxyServer, backend: Backend, kind: str
) -> None:
    raw = head(kind, version="1.0")
    if kind == "websocket":
        # A WebSocket handshake is HTTP/1.1 (RFC 6455 section 4.1).
        await assert_refused(proxy, backend, raw, 400)
        return
    status, _ = await answer(proxy, raw)
    assert status == 200
    (seen,) = backend.seen
    assert "X-Forwarded-Host" not in seen.headers


TARGET_ROWS = [
    pytest.param("GET", "*", 400, None, id="asterisk-with-get"),
    pytest.param("POST", "*", 400, None, id="asterisk-with-post"),
    pytest.param("GET", "ftp://proxy.test/echo/x", 400, None, id="ftp-scheme"),
    pytest.param("GET", "ws://proxy.test/echo/x", 400, None, id="ws-scheme"),
    pytest.param("GET", "http://user@proxy.test/echo/x", 400, None, id="user-info"),
    pytest.param("GET", "http://proxy.test:99999/echo/x", 400, None, id="authority-port"),
    pytest.param("GET", "http://a%zz/echo/x", 400, None, id="authority-bad-escape"),
    pytest.param("GET", "http://other.test/echo/x", "/echo/x", "other.test", id="authority-wins"),
    pytest.param(
        "GET", "HTTPS://other.test:8443/echo/x?q", "/echo/x?q", "other.test:8443", id="https"
    ),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "target", "expected", "forwarded_host"), TARGET_ROWS)
async def test_a_target_is_a_path_an_absolute_http_uri_or_the_asterisk_of_options(
    proxy: ProxyServer,
    backend: Backend,
    kind: str,
    method: str,
    target: str,
    expected: str | int,
    forwarded_host: str | None,
) -> None:
    if kind == "websocket" and target.startswith(("http", "HTTP")):
        target = target.replace("/echo/", "/ws/agent/")
        if isinstance(expected, str):
            expected = expected.replace("/echo/", "/ws/agent/")
    raw = head(kind, "Host: proxy.test", method=method, target=target)
    if isinstance(expected, int):
        await assert_refused(proxy, backend, raw, expected)
        return
    status, _ = await answer(proxy, raw)
    assert status == served(kind)
    (seen,) = backend.seen
    assert seen.path_qs == expected
    # RFC 9112 section 3.2.2: the absolute-form's authority, not Host, names the host.
    assert seen.headers.getall("X-Forwarded-Host") == [forwarded_host]


async def test_options_asterisk_is_relayed_as_it_came(proxy: ProxyServer, backend: Backend) -> None:
    status, _ = await answer(proxy, head("http", "Host: proxy.test", method="OPTIONS", target="*"))
    assert status == 404  # the test backend routes paths only: it got the request
    (seen,) = backend.seen
    assert (seen.method, seen.path_qs) == ("OPTIONS", "*")


VERSIONS = [
    pytest.param("0.9", 505, id="0.9"),
    pytest.param("1.2", 505, id="1.2"),  # llhttp refuses it: answered as not spoken
    pytest.param("2.0", 505, id="2.0"),
    pytest.param("3.0", 505, id="3.0"),
    pytest.param("9.9", 505, id="9.9"),
    pytest.param("1.10", 400, id="1.10-malformed"),
    pytest.param("11.1", 400, id="11.1-malformed"),
]


@pytest.mark.parametrize("connection", [[], ["Connection: keep-alive"]], ids=["", "keep-alive"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("version", "expected"), VERSIONS)
async def test_an_http_version_the_proxy_does_not_speak_is_a_505(
    proxy: ProxyServer,
    backend: Backend,
    kind: str,
    version: str,
    expected: int,
    connection: list[str],
) -> None:
    raw = head(kind, "Host: proxy.test", *connection, version=version)
    await assert_refused(proxy, backend, raw, expected)


async def test_a_watched_websocket_session_gets_the_absolute_form_authority_as_its_host(
    backend: Backend, tmp_path: Path
) -> None:
    # A watched session is handed to aiohttp's server with its head: the head it gets
    # carries the authority that won as its Host.
    watched = {**ROUTES[0], "name": "watched", "path": "/ws/watched", "shadow": 1.0}
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(backend.url, backend.url, flags, routes=[watched])
    raw = head("websocket", "Host: proxy.test", target="http://other.test:8080/ws/watched/x")
    async with running_proxy(settings) as proxy:
        status, _ = await answer(proxy, raw)
    assert status == 101
    (seen,) = [s for s in backend.seen if "X-Strangler-Shadow" not in s.headers]
    assert seen.path_qs == "/ws/watched/x"
    assert seen.headers.getall("X-Forwarded-Host") == ["other.test:8080"]


@pytest.mark.parametrize(
    ("path", "routed"),
    [
        ("/echo/x", "/echo/x"),
        ("/echo/../internal/admin", "/internal/admin"),
        ("/echo/./x", "/echo/x"),
        ("/echo/x/..", "/echo/"),
        ("/echo/.", "/echo/"),
        ("/..", "/"),
        ("/echo/../../..", "/"),
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 section 5.2.4's own example
        ("/echo/.hidden", "/echo/.hidden"),
        ("/echo/..x", "/echo/..x"),
        ("*", "*"),
    ],
)
def test_a_path_is_routed_with_its_dot_segments_resolved(path: str, routed: str) -> None:
    assert routing_path(path) == routed


@pytest.mark.parametrize(
    "target",
    [
        "/echo/../internal/admin",
        "/echo/%2e%2e/internal/admin",
        "/echo%2f..%2finternal/admin",
        "/echo/./../internal/admin",
    ],
)
async def test_a_path_that_leaves_a_route_through_dot_segments_is_not_served_by_that_route(
    backend: Backend, tmp_path: Path, target: str
) -> None:
    # The flag sends every user to the candidate on its routes: what leaves the route is
    # unrouted, so legacy serves it, as it serves the same path asked for plainly.
    write_flags(tmp_path / "flags.json", flags_document(rollout=100))
    settings = make_settings(backend.url, backend.url, tmp_path / "flags.json", routes=ROUTES)
    async with running_proxy(settings) as proxy:
        served_by = []
        for path in (target, "/echo/x"):
            async with connect(proxy) as client:
                await client.send(
                    f"POST {path} HTTP/1.1\r\nHost: proxy.test\r\nX-User-Id: u1\r\n"
                    "Content-Length: 2\r\n\r\n{}".encode()
                )
                response = await read_head(client.reader)
                served_by.append((response.status, response.get("X-Strangler-Backend")))
    assert served_by == [(200, "legacy"), (200, "candidate")]
