"""RFC 6455 on every WebSocket path: each class of bad input, from the client and from the
backend, on a direct session and on a watched one (turns, a shadow leg, isolation), with
raw frames over loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import ProxyServer
from proxy.settings import Settings
from proxy.websocket_direct import close_code_valid, handshake_refusal
from tests.proxy_harness import flags_document, running_proxy, write_flags
from tests.raw_websocket import (
    CLOSE,
    CONT,
    PING,
    TEXT,
    Connect,
    EchoBackend,
    RawBackend,
    ServerFactory,
    WsClient,
    at_eof,
    close_payload,
    frame,
    next_frame,
    switching,
    url_of,
)

PATHS = ["direct", "watched"]
KEY = base64.b64encode(b"0123456789abcdef").decode()


def routes(path: str) -> list[dict[str, Any]]:
    """The one WebSocket route: nothing watched, or shadowed with an isolation check."""
    route: dict[str, Any] = {
        "name": "agent",
        "path": "/ws/agent",
        "protocol": "websocket",
        "flag": "ssot-dispatcher",
    }
    if path == "watched":
        route |= {"shadow": 1.0, "user_field": "user_id", "turn_idle_seconds": 0.5}
    return [route]


def proxy_for(
    legacy: str, candidate: str, flags: Path, path: str
) -> contextlib.AbstractAsyncContextManager[ProxyServer]:
    settings = Settings.model_validate(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "max_ws_message_bytes": 64 * 1024,
                "connect_timeout": 2,
            },
            "admin": {"host": "127.0.0.1", "port": 0},
            "backends": {"legacy": legacy, "candidate": candidate},
            "flags": {"provider": "file", "file": flags},
            "shadow": {"drain_seconds": 0.5},
            "divergences": {"path": flags.parent / "divergences.sqlite3"},
            "routes": routes(path),
        }
    )
    return running_proxy(settings)


@pytest.fixture
async def flags_path(tmp_path: Path) -> Path:
    return write_flags(tmp_path / "flags.json", flags_document(rollout=100))


@pytest.fixture(params=PATHS)
async def echo_proxy(
    request: pytest.FixtureRequest, aiohttp_server: ServerFactory, flags_path: Path
) -> AsyncIterator[tuple[ProxyServer, EchoBackend, EchoBackend]]:
    """A proxy whose candidate serves (rollout 100 %) and whose legacy is the shadow
    on the watched path; both echo."""
    legacy, candidate = EchoBackend(), EchoBackend()
    legacy_url = url_of(await aiohttp_server(legacy.app()))
    candidate_url = url_of(await aiohttp_server(candidate.app()))
    async with proxy_for(legacy_url, candidate_url, flags_path, request.param) as server:
        yield server, candidate, legacy


async def backend_close(backend: EchoBackend) -> int | None:
    return (await asyncio.wait_for(backend.closes.get(), 5))[0]


async def echoed(client: WsClient, backend: EchoBackend, text: bytes) -> None:
    await client.send_frame(TEXT, text)
    assert await asyncio.wait_for(backend.messages.get(), 5) == ("text", text.decode())
    assert (await client.recv()).payload == text


# -- the rules, without sockets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "valid"),
    [
        (range(0, 1000), False),
        ([1000, 1001, 1002, 1003], True),
        ([1004, 1005, 1006], False),
        (range(1007, 1015), True),
        ([1015], False),
        (range(1016, 3000), False),
        (range(3000, 5000), True),
        ([5000, 65535], False),
    ],
)
def test_close_codes_on_the_wire_are_those_rfc_6455_allows(codes: range, valid: bool) -> None:
    assert all(close_code_valid(code) is valid for code in codes)


@pytest.mark.parametrize(
    ("version", "key", "status"),
    [
        ("13", KEY, None),
        (" 13 ", KEY, None),
        ("8", KEY, 426),
        ("13, 8", KEY, 426),
        ("", KEY, 426),
        (None, KEY, 426),
        ("8", None, 426),
        ("13", None, 400),
        ("13", "", 400),
        ("13", base64.b64encode(b"x" * 15).decode(), 400),
        ("13", base64.b64encode(b"x" * 17).decode(), 400),
        ("13", "%%%%%%%%%%%%%%%%%%%%%%==", 400),
    ],
)
def test_a_handshake_is_refused_426_for_the_version_then_400_for_the_key(
    version: str | None, key: str | None, status: int | None
) -> None:
    refusal = handshake_refusal(version, key)
    assert (refusal[0] if refusal is not None else None) == status


# -- the client's handshake --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "version", "status"),
    [
        pytest.param(KEY, "8", 426, id="version-8"),
        pytest.param(KEY, "14", 426, id="version-14"),
        pytest.param(KEY, None, 426, id="no-version"),
        pytest.param(None, "8", 426, id="version-8-no-key"),
        pytest.param(None, "13", 400, id="no-key"),
        pytest.param(base64.b64encode(os.urandom(15)).decode(), "13", 400, id="key-of-15-bytes"),
        pytest.param("not a base64 key!!!!!!==", "13", 400, id="key-not-base64"),
    ],
)
async def test_an_upgrade_in_another_version_gets_426_and_a_bad_key_400_never_reaching_a_backend(
    echo_proxy: tuple[ProxyServer, EchoBackend, EchoBackend],
    connect: Connect,
    key: str | None,
    version: str | None,
    status: int,
) -> None:
    server, candidate, legacy = echo_proxy
    client = await connect(server, handshake=False)
    lines = [
        "GET /ws/agent HTTP/1.1",
        f"Host: 127.0.0.1:{server.proxy_port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "X-User-Id: user-1",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    await client.send_head(lines)
    assert await client.read_head() == status
    if status == 426:
        assert client.headers["sec-websocket-version"] == "13"
    else:
        assert "sec-websocket-version" not in client.headers
    body = await asyncio.wait_for(
        client.reader.readexactly(int(client.headers["content-length"])), 5
    )
    assert (b"upgrade_required" if status == 426 else b"bad_request") in body
    assert client.headers["connection"] == "close"
    assert await at_eof(client.reader)
    await asyncio.sleep(0.1)
    assert candidate.connections == legacy.connections == 0


# -- a client breaking the rules ---------------------------------------------------------------


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, close_payload(code, reason))


CLIENT_VIOLATIONS = [
    pytest.param(frame(TEXT, b"not masked", mask=False), 1002, id="unmasked-text"),
    pytest.param(frame(PING, b"not masked", mask=False), 1002, id="unmasked-ping"),
    pytest.param(frame(CLOSE, close_payload(1000), mask=False), 1002, id="unmasked-close"),
    pytest.param(frame(TEXT, b"rsv1", rsv=0x40), 1002, id="rsv1"),
    pytest.param(frame(0x3, b"reserved"), 1002, id="reserved-opcode"),
    pytest.param(frame(CONT, b"orphan"), 1002, id="continuation-without-message"),
    pytest.param(frame(PING, b"part", fin=False), 1002, id="fragmented-ping"),
    *(
        pytest.param(close(code), 1002, id=f"close-code-{code}")
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)
    ),
    pytest.param(frame(CLOSE, b"\x03"), 1002, id="close-payload-of-one-byte"),
    pytest.param(close(1000, b"bad \xff reason"), 1007, id="close-reason-not-utf8"),
    pytest.param(frame(TEXT, b"\xff"), 1007, id="text-0xff"),
    pytest.param(frame(TEXT, b"caf\xc3"), 1007, id="text-truncated-code-point"),
    pytest.param(frame(TEXT, b"\xed\xa0\x80"), 1007, id="text-surrogate"),
    pytest.param(frame(TEXT, b"\xc0\xaf"), 1007, id="text-overlong"),
    pytest.param(frame(TEXT, b"\xf4\x90\x80\x80"), 1007, id="text-past-u10ffff"),
    pytest.param(
        frame(TEXT, b"fine ", fin=False) + frame(CONT, b"then \xff"),
        1007,
        id="fragmented-text-bad-in-second",
    ),
    pytest.param(
        frame(TEXT, b"ends ", fin=False) + frame(CONT, b"\xe2\x82", fin=False) + frame(CONT, b""),
        1007,
        id="fragmented-text-ends-mid-code-point",
    ),
    pytest.param(
        frame(TEXT, b"a\xe2", fin=False) + frame(CONT, b"\x28\xa1"),
        1007,
        id="fragmented-text-bad-continuation-byte",
    ),
]


@pytest.mark.parametrize(("bad", "code"), CLIENT_VIOLATIONS)
async def test_a_client_breaking_the_rules_gets_its_code_and_the_backend_1001(
    echo_proxy: tuple[ProxyServer, EchoBackend, EchoBackend],
    connect: Connect,
    bad: bytes,
    code: int,
) -> None:
    server, candidate, _ = echo_proxy
    client = await connect(server)
    await echoed(client, candidate, b'{"user_id": "user-1"}')
    await client.send(bad)
    assert (await client.recv_close())[0] == code
    assert await backend_close(candidate) == 1001
    assert candidate.messages.empty()  # nothing of the bad message reached the backend
    await client.send(close(code))
    assert await at_eof(client.reader)


VALID_TEXT = [
    pytest.param([b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"], id="one-frame"),
    pytest.param([b"caf\xc3", b"\xa9"], id="two-byte-code-point-split"),
    pytest.param([b"\xe2", b"\x82", b"\xac"], id="three-byte-code-point-in-three"),
    pytest.param([b"\xf0\x9f", b"", b"\x98\x80"], id="four-byte-code-point-around-empty"),
]


@pytest.mark.parametrize("parts", VALID_TEXT)
async def test_valid_utf8_split_anywhere_across_fragments_reaches_the_backend_whole(
    echo_proxy: tuple[ProxyServer, EchoBackend, EchoBackend],
    connect: Connect,
    parts: list[bytes],
) -> None:
    server, candidate, _ = echo_proxy
    client = await connect(server)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        await client.send_frame(TEXT if i == 0 else CONT, part, fin=last)
    whole = b"".join(parts).decode()
    assert await asyncio.wait_for(candidate.messages.get(), 5) == ("text", whole)
    got = await client.recv()
    assert got.payload.decode() == whole


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1008, 1011, 1014, 3000, 4999])
async def test_a_valid_close_code_passes_through_with_its_reason(
    echo_proxy: tuple[ProxyServer, EchoBackend, EchoBackend], connect: Connect, code: int
) -> None:
    server, candidate, _ = echo_proxy
    client = await connect(server)
    await client.send(close(code, "ça va".encode()))
    assert await asyncio.wait_for(candidate.closes.get(), 5) == (code, "ça va")
    assert (await client.recv_close())[0] == 1000  # the backend's answer
    assert await at_eof(client.reader)


# -- a backend breaking the rules ----------------------------------------------------------------


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = RawBackend()
    await backend.start()
    yield backend
    await backend.close()


BACKEND_VIOLATIONS = [
    pytest.param(frame(TEXT, b"masked", mask=True), 1002, id="masked-text"),
    pytest.param(frame(TEXT, b"\xff", mask=False), 1007, id="text-not-utf8"),
    pytest.param(
        frame(TEXT, b"a\xc3", fin=False, mask=False) + frame(CONT, b"(", mask=False),
        1007,
        id="fragmented-text-not-utf8",
    ),
    *(
        pytest.param(frame(CLOSE, close_payload(code), mask=False), 1002, id=f"close-code-{code}")
        for code in (999, 1005, 1015, 2999)
    ),
    pytest.param(frame(CLOSE, b"\x03", mask=False), 1002, id="close-payload-of-one-byte"),
    pytest.param(
        frame(CLOSE, close_payload(1000, b"\xc3("), mask=False), 1007, id="close-reason-not-utf8"
    ),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("bad", "code"), BACKEND_VIOLATIONS)
async def test_a_backend_breaking_the_rules_gets_its_code_and_the_client_1011(
    raw_backend: RawBackend,
    flags_path: Path,
    connect: Connect,
    path: str,
    bad: bytes,
    code: int,
) -> None:
    async with proxy_for(raw_backend.url, raw_backend.url, flags_path, path) as server:
        opening = asyncio.create_task(connect(server))
        reader, writer, key = await raw_backend.next()
        writer.write(switching(key))
        client = await asyncio.wait_for(opening, 5)
        if path == "watched":
            _, shadow_writer, shadow_key = await raw_backend.next()
            shadow_writer.write(switching(shadow_key))
        writer.write(bad)
        got = await client.recv()
        while got.opcode != CLOSE:
            # A fragmented message is relayed as it comes: only its valid start, cut.
            assert not got.fin
            got = await client.recv()
        assert got.close == (1011, "backend connection lost")
        to_backend = await next_frame(reader)
        assert to_backend.masked
        assert to_backend.close[0] == code
        await client.send(close(1011))
        assert await at_eof(client.reader)
        assert (
            server.metrics.registry.get_sample_value(
                "strangler_requests_total",
                {"route": "agent", "backend": "candidate", "role": "primary", "outcome": "broken"},
            )
            == 1
        )
