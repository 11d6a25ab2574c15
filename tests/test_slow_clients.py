"""Slow and stalled clients get bounded time and memory from the proxy listener.

A request head must be whole within ``server.header_timeout``, a request body may go no
longer than ``server.body_timeout`` without a byte, else 408 and the connection closes.
A body still arriving is streamed to the primary as it comes, so a stalled upload holds
a bounded buffer, not its size. Every test talks to a real proxy over loopback with the
raw client of ``tests.raw_http``; a real aiohttp backend records what reaches it whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.app import ProxyServer
from proxy.settings import ConfigError, load_settings
from tests.proxy_harness import (
    config_with,
    flags_document,
    make_settings,
    rss_bytes,
    running_proxy,
    strangler_process,
    write_flags,
)
from tests.raw_http import (
    Backend,
    Client,
    bounded,
    connect,
    proxy_for,
    read_response,
    request,
)

# The ``backend`` fixture: pytest finds it among this module's names.
from tests.raw_http import backend_fixture as backend_fixture

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
# The sweep meets a deadline within a quarter of the shortest timeout; the rest is room
# for a shared machine.
SLACK = 2.0


@asynccontextmanager
async def slow_proxy(
    backend: Backend, tmp_path: Path, **server: float
) -> AsyncIterator[ProxyServer]:
    timeouts = {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT, **server}
    async with proxy_for(backend.url, tmp_path, **timeouts) as proxy:
        yield proxy


async def timed_out_response(client: Client, deadline: float) -> tuple[float, bytes]:
    """How long the proxy took to answer and close, and all it sent meanwhile."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    sent = await bounded(client.reader.read(), deadline + SLACK)
    rest = await client.rest()
    return loop.time() - began, sent + rest


BackendHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_backend(handler: BackendHandler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def assert_408_json(raw: bytes) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), raw
    assert b"\r\nConnection: close" in head, raw
    assert b"\r\nContent-Type: application/json" in head, raw
    assert json.loads(body)["error"] == "request_timeout", raw


# --- configuration ---------------------------------------------------------------------


def test_the_header_and_body_timeouts_default_to_twenty_seconds_and_can_be_set(
    tmp_path: Path,
) -> None:
    server = load_settings(config_with(tmp_path, "server", ""), {}).server
    assert (server.header_timeout, server.body_timeout) == (20.0, 20.0)
    config = config_with(tmp_path, "server", "header_timeout = 5\nbody_timeout = 2.5")
    server = load_settings(config, {"STRANGLER_SERVER__BODY_TIMEOUT": "7"}).server
    assert (server.header_timeout, server.body_timeout) == (5.0, 7.0)


@pytest.mark.parametrize("key", ["header_timeout", "body_timeout"])
@pytest.mark.parametrize("value", ["0", "-1", '"soon"'])
def test_a_timeout_that_is_not_a_positive_number_is_refused_naming_key_and_file(
    tmp_path: Path, key: str, value: str
) -> None:
    config = config_with(tmp_path, "server", f"{key} = {value}")
    with pytest.raises(ConfigError) as info:
        load_settings(config, {})
    [problem] = info.value.problems
    assert str(problem).startswith(f"{config}: server.{key}: ")


# --- request heads ---------------------------------------------------------------------

HEAD_STALLS = [
    pytest.param(b"", id="no-bytes"),
    pytest.param(b"POST /echo/sta", id="half-a-request-line"),
    pytest.param(
        b"POST /echo/stall HTTP/1.1\r\nHost: proxy.test\r\nX-Half: ", id="half-the-headers"
    ),
    pytest.param(
        b"POST /echo/stall HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 5\r\n",
        id="a-content-length-and-no-end-of-head",
    ),
]


@pytest.mark.parametrize("sent", HEAD_STALLS)
async def test_a_head_that_stalls_gets_408_and_is_closed_within_the_header_timeout(
    backend: Backend, tmp_path: Path, sent: bytes
) -> None:
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        if sent:
            await client.send(sent)
        took, raw = await timed_out_response(client, HEADER_TIMEOUT)
    assert_408_json(raw)
    assert HEADER_TIMEOUT * 0.9 <= took <= HEADER_TIMEOUT + SLACK
    assert backend.seen == []


@pytest.mark.parametrize("sent", [p for p in HEAD_STALLS if p.id != "no-bytes"])
async def test_a_head_that_stalls_after_a_served_request_gets_408_too(
    backend: Backend, tmp_path: Path, sent: object
) -> None:
    # The keep-alive timeout is long: it is the header timeout that ends the stall.
    assert isinstance(sent, bytes)
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        response = await client.exchange(request("GET", "/echo/first"))
        assert (response.status, response.body) == (200, b"/echo/first")
        await client.send(sent)
        took, raw = await timed_out_response(client, HEADER_TIMEOUT)
    assert_408_json(raw)
    assert took <= HEADER_TIMEOUT + SLACK
    assert backend.paths == ["/echo/first"]


async def test_an_idle_keep_alive_connection_is_not_cut_by_the_header_timeout(
    backend: Backend, tmp_path: Path
) -> None:
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        assert (await client.exchange(request("GET", "/echo/1"))).status == 200
        await asyncio.sleep(HEADER_TIMEOUT * 3)
        response = await client.exchange(request("GET", "/echo/2"))
        assert (response.status, response.body) == (200, b"/echo/2")


async def test_a_head_sent_a_byte_at_a_time_within_the_header_timeout_is_served(
    backend: Backend, tmp_path: Path
) -> None:
    raw = request("GET", "/echo/slowloris")
    async with slow_proxy(backend, tmp_path, header_timeout=3.0) as proxy, connect(proxy) as client:
        for i in range(0, len(raw), 8):
            await client.send(raw[i : i + 8])
            await asyncio.sleep(0.02)
        response = await client.response()
    assert (response.status, response.body) == (200, b"/echo/slowloris")


async def test_a_head_trickled_past_the_header_timeout_gets_408(
    backend: Backend, tmp_path: Path
) -> None:
    # The header timeout is for the whole head: bytes that keep coming do not reset it.
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await client.send(b"GET /echo/trickle HTTP/1.1\r\nHost: proxy.test\r\n")
        first = b""
        for n in range(40):  # up to 4 s, eight header timeouts, or until the answer
            await client.send(b"X-%d: y\r\n" % n)
            try:
                first = await asyncio.wait_for(client.reader.read(1), 0.1)
                break
            except TimeoutError:
                continue
        took = loop.time() - began
        raw = first + await bounded(client.reader.read())
    assert_408_json(raw)
    assert HEADER_TIMEOUT * 0.9 <= took <= HEADER_TIMEOUT + SLACK / 2
    assert backend.seen == []


# --- request bodies --------------------------------------------------------------------

BODY_STALLS = [
    pytest.param(("Content-Length: 100",), b"x" * 40, id="content-length"),
    pytest.param(("Transfer-Encoding: chunked",), b"5\r\nhello\r\n", id="chunked"),
    pytest.param(("Transfer-Encoding: chunked",), b"a\r\nhel", id="mid-chunk"),
    pytest.param(("Transfer-Encoding: chunked",), b"5\r\nhello\r\n0\r\nX-Trailer: ", id="trailer"),
    pytest.param(("Content-Length: 100",), b"", id="content-length-and-no-body"),
    pytest.param(
        ("Content-Length: 100", "Expect: 100-continue"), b"x" * 40, id="after-100-continue"
    ),
]


@pytest.mark.parametrize(("headers", "part"), BODY_STALLS)
async def test_a_body_that_stalls_gets_408_and_is_closed_and_never_reaches_the_backend_whole(
    backend: Backend, tmp_path: Path, headers: tuple[str, ...], part: bytes
) -> None:
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        await client.send(request("POST", "/echo/upload", *headers))
        if "Expect: 100-continue" in headers:
            interim = await client.response()
            assert interim.status == 100
        await asyncio.sleep(0.05)  # the head alone first: the body is still arriving
        if part:
            await client.send(part)
        took, raw = await timed_out_response(client, BODY_TIMEOUT)
    assert_408_json(raw)
    assert BODY_TIMEOUT * 0.9 <= took <= BODY_TIMEOUT + SLACK
    assert backend.seen == []


async def test_a_body_that_trickles_slowly_but_steadily_within_the_body_timeout_is_relayed_whole(
    backend: Backend, tmp_path: Path
) -> None:
    pieces = [os.urandom(1000) for _ in range(8)]
    body = b"".join(pieces)
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        await client.send(request("POST", "/echo/trickle", f"Content-Length: {len(body)}"))
        for piece in pieces:  # 1.6 s in all: three body timeouts
            await asyncio.sleep(BODY_TIMEOUT * 0.4)
            await client.send(piece)
        response = await client.response()
    assert (response.status, response.body) == (200, b"/echo/trickle")
    [seen] = backend.seen
    assert seen.body == body


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_streamed_body_reaches_the_backend_byte_identical(
    backend: Backend, tmp_path: Path, framing: str
) -> None:
    pieces = [os.urandom(size) for size in (1, 70_000, 300_000, 600_000, 5)]  # aiohttp takes 1 MiB
    body = b"".join(pieces)
    if framing == "chunked":
        head, wire = request("PUT", "/echo/big", "Transfer-Encoding: chunked"), chunked(pieces)
    else:
        head, wire = request("PUT", "/echo/big", f"Content-Length: {len(body)}"), body
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        await client.send(head)
        for i in range(0, len(wire), 100_000):
            await asyncio.sleep(0.01)
            await client.send(wire[i : i + 100_000])
        response = await client.response()
        assert (response.status, response.body) == (200, b"/echo/big")
        # The connection serves on.
        response = await client.exchange(request("GET", "/echo/next"))
        assert response.status == 200
    seen = backend.seen[0]
    assert seen.body == body
    if framing == "chunked":
        assert seen.headers.get("Transfer-Encoding") == "chunked"
    else:
        assert seen.headers.get("Content-Length") == str(len(body))


async def test_expect_100_continue_is_answered_and_the_body_then_streams_to_the_backend(
    backend: Backend, tmp_path: Path
) -> None:
    body = os.urandom(500_000)
    async with slow_proxy(backend, tmp_path) as proxy, connect(proxy) as client:
        head = request(
            "POST", "/echo/expect", f"Content-Length: {len(body)}", "Expect: 100-continue"
        )
        interim = await client.exchange(head)
        assert interim.raw.startswith(b"HTTP/1.1 100 Continue\r\n")
        await client.send(body[:200_000])
        await asyncio.sleep(0.05)
        response = await client.exchange(body[200_000:])
        assert (response.status, response.body) == (200, b"/echo/expect")
    assert [(seen.path_qs, seen.body) for seen in backend.seen] == [("/echo/expect", body)]


# llhttp keeps whitespace after a value (and checks the digits): the length is the same.
@pytest.mark.parametrize("length", ["1001", "1001 ", "1001\t", "1001 \t "])
async def test_a_content_length_over_the_limit_is_a_413_before_any_backend_sees_it(
    backend: Backend, tmp_path: Path, length: str
) -> None:
    async with slow_proxy(backend, tmp_path, max_body_bytes=1000) as proxy:
        async with connect(proxy) as client:
            await client.send(request("POST", "/echo/big", f"Content-Length: {length}"))
            response = await client.response()
            assert response.status == 413
            assert json.loads(response.body)["error"] == "request_too_large"
        async with connect(proxy) as client:
            response = await client.exchange(request("GET", "/echo/after"))
            assert response.status == 200
    assert backend.paths == ["/echo/after"]


async def test_a_chunked_body_passing_the_limit_mid_way_is_a_413_and_the_backend_never_gets_it(
    backend: Backend, tmp_path: Path
) -> None:
    async with slow_proxy(backend, tmp_path, max_body_bytes=1000) as proxy:
        async with connect(proxy) as client:
            await client.send(request("POST", "/echo/big", "Transfer-Encoding: chunked"))
            await asyncio.sleep(0.05)
            await client.send(chunked([b"x" * 600])[:-5])  # one chunk, not the last
            await asyncio.sleep(0.05)
            await client.send(b"258\r\n" + b"y" * 600 + b"\r\n")
            response = await client.response()
            assert response.status == 413
            assert json.loads(response.body)["error"] == "request_too_large"
        async with connect(proxy) as client:
            response = await client.exchange(request("GET", "/echo/after"))
            assert response.status == 200
    assert backend.paths == ["/echo/after"]


async def test_a_body_passing_the_limit_after_the_response_started_cuts_both_connections(
    tmp_path: Path,
) -> None:
    backend_cut = asyncio.Event()

    async def answers_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        backend_cut.set()
        writer.close()

    async with raw_backend(answers_at_once) as url:
        flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        settings = make_settings(url, url, flags, server={"max_body_bytes": 1000})
        async with running_proxy(settings) as proxy, connect(proxy) as client:
            await client.send(request("POST", "/up", "Transfer-Encoding: chunked"))
            await asyncio.sleep(0.05)
            await client.send(chunked([b"x" * 600])[:-5])
            head = await bounded(client.reader.readuntil(b"\r\n\r\n"))
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await bounded(client.reader.readuntil(b"first\r\n")) == b"5\r\nfirst\r\n"
            await client.send(chunked([b"y" * 600])[:-5])
            # Cut: the last chunk never comes, so the client cannot take the answer as whole.
            assert b"0\r\n\r\n" not in await client.rest()
            await bounded(backend_cut.wait())


# --- shadowed routes -------------------------------------------------------------------


@asynccontextmanager
async def shadowed_proxy(backend: Backend, tmp_path: Path, cap: int) -> AsyncIterator[ProxyServer]:
    """Every POST to /echo also runs in the shadow (on the same recording backend)."""
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    route = {
        "name": "echo",
        "path": "/echo",
        "protocol": "json",
        "flag": "ssot-dispatcher",
        "shadow": 1.0,
        "shadow_methods": ["POST"],
    }
    settings = make_settings(backend.url, backend.url, flags, routes=[route])
    settings = settings.model_copy(
        update={"shadow": settings.shadow.model_copy(update={"max_body_bytes": cap})}
    )
    async with running_proxy(settings) as proxy:
        yield proxy


def dropped(proxy: ProxyServer, reason: str) -> float:
    labels = {"route": "echo", "reason": reason}
    return proxy.metrics.registry.get_sample_value("strangler_shadow_dropped_total", labels) or 0


@pytest.mark.parametrize(("size", "shadowed"), [(50_000, True), (300_000, False)])
async def test_a_streamed_body_is_shadowed_within_the_cap_and_over_it_still_reaches_the_primary(
    backend: Backend, tmp_path: Path, size: int, shadowed: bool
) -> None:
    body = os.urandom(size)
    async with shadowed_proxy(backend, tmp_path, cap=100_000) as proxy:
        async with connect(proxy) as client:
            await client.send(request("POST", "/echo/up", "Transfer-Encoding: chunked"))
            for i in range(0, size, 25_000):
                await asyncio.sleep(0.01)
                await client.send(chunked([body[i : i + 25_000]])[:-5])
            response = await client.exchange(b"0\r\n\r\n")
            assert (response.status, response.body) == (200, b"/echo/up")
        await proxy.proxy.shadows.settle()
        assert dropped(proxy, "body_too_large") == (0 if shadowed else 1)
    primaries = [s for s in backend.seen if "X-Strangler-Shadow" not in s.headers]
    shadows = [s for s in backend.seen if "X-Strangler-Shadow" in s.headers]
    assert [s.body for s in primaries] == [body]
    assert [s.body for s in shadows] == ([body] if shadowed else [])


# --- a stale pooled connection ---------------------------------------------------------


async def read_one(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length body, from a raw backend's side: its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return await reader.readexactly(int(length.group(1)) if length else 0)


@pytest.mark.parametrize(
    ("first_part", "shadowed", "retried"),
    [
        pytest.param(b"", False, True, id="nothing-sent-yet"),
        pytest.param(b"abc", False, False, id="part-sent"),
        pytest.param(b"abc", True, True, id="part-sent-and-kept-for-the-shadow"),
    ],
)
async def test_a_streamed_body_is_retried_on_a_stale_connection_only_if_it_can_be_replayed(
    tmp_path: Path, first_part: bytes, shadowed: bool, retried: bool
) -> None:
    # Each connection answers its first request and closes on the second without a word
    # (a backend closing an idle keep-alive connection as the proxy reuses it).
    bodies: list[bytes] = []

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            bodies.append(await read_one(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.transport.abort()

    shadow_bodies: list[bytes] = []

    async def answers_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                shadow_bodies.append(await read_one(reader))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    route = {"name": "up", "path": "/up", "protocol": "json", "flag": "ssot-dispatcher"}
    if shadowed:  # a copy of the body is kept for the shadow (on the candidate)
        route |= {"shadow": 1.0, "shadow_methods": ["PUT"]}
    async with raw_backend(one_per_connection) as url, raw_backend(answers_all) as other:
        flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        settings = make_settings(url, other, flags, routes=[route])
        async with running_proxy(settings) as proxy:
            async with connect(proxy) as client:
                assert (await client.exchange(request("GET", "/warm"))).status == 200
                # PUT: idempotent, so only the body decides whether it may go again.
                await client.send(request("PUT", "/up", "Content-Length: 6") + first_part)
                await asyncio.sleep(0.2)  # the proxy found the pooled connection dead
                await client.send(b"abcdef"[len(first_part) :])
                response = await read_response(client.reader)
            await proxy.proxy.shadows.settle()
    assert response.status == (200 if retried else 502)
    assert bodies == ([b"", b"abcdef"] if retried else [b""])
    assert shadow_bodies == ([b"abcdef"] if shadowed else [])


# --- memory, in a proxy of its own -----------------------------------------------------


async def discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that reads whatever comes and never answers."""
    try:
        while await reader.read(1 << 20):
            pass
    except ConnectionError:
        pass
    writer.transport.abort()


MIB = 1024 * 1024
UPLOADS = 50
STALL_BODY_TIMEOUT = 2.0
# The sweep runs every quarter of the shortest timeout (here the body timeout): a stall
# is answered within 1.25 body timeouts of the last byte; the slack is for scheduling.
STALL_ANSWERED_WITHIN = STALL_BODY_TIMEOUT * 1.25 + 1.5
# A route whose POSTs also run in the shadow, which keeps a copy of each body up to its
# cap ([shadow] max_body_bytes, 1 MiB by default) and drops the run past it.
SHADOWED_UPLOADS = (
    '[[routes]]\nname = "upload"\npath = "/upload"\nprotocol = "json"\n'
    'flag = "ssot-dispatcher"\nshadow = 1.0\nshadow_methods = ["POST"]\n'
)


@pytest.mark.parametrize(
    "routes", [pytest.param("", id="unrouted"), pytest.param(SHADOWED_UPLOADS, id="shadowed")]
)
async def test_fifty_uploads_stalling_after_9_mib_cost_under_50_mib_and_all_get_408_in_time(
    tmp_path: Path, routes: str
) -> None:
    async with raw_backend(discard) as url:
        write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        config = tmp_path / "strangler.toml"
        config.write_text(
            f"[server]\nport = 0\nbody_timeout = {STALL_BODY_TIMEOUT}\n"
            f'[admin]\nport = 0\n[backends]\nlegacy = "{url}"\ncandidate = "{url}"\n'
            '[flags]\nfile = "flags.json"\n'
            f'[divergences]\npath = "{tmp_path / "divergences.sqlite3"}"\n{routes}'
        )
        async with strangler_process(config) as running:
            port = int(running.proxy_url.rsplit(":", 1)[1])
            piece = os.urandom(MIB)
            loop = asyncio.get_running_loop()

            async def stalled_upload(n: int) -> tuple[float, bytes]:
                reader, writer = await bounded(asyncio.open_connection("127.0.0.1", port))
                try:
                    writer.write(
                        b"POST /upload/%d HTTP/1.1\r\nHost: proxy.test\r\n"
                        b"Content-Length: %d\r\n\r\n" % (n, 10 * MIB)
                    )
                    for _ in range(9):
                        writer.write(piece)
                        await bounded(writer.drain(), 60)
                    stalled_at = loop.time()
                    answer = await bounded(reader.read(), STALL_BODY_TIMEOUT + 30)
                    return loop.time() - stalled_at, answer
                finally:
                    writer.close()

            baseline = rss_bytes(running.proc.pid)
            uploads = [asyncio.create_task(stalled_upload(n)) for n in range(UPLOADS)]
            peak = baseline
            while not all(upload.done() for upload in uploads):
                peak = max(peak, rss_bytes(running.proc.pid))
                await asyncio.sleep(0.05)
            results = [await upload for upload in uploads]
    assert peak - baseline < 50 * MIB, f"grew {(peak - baseline) / MIB:.1f} MiB"
    for took, answer in results:
        assert_408_json(answer)
        assert took <= STALL_ANSWERED_WITHIN, f"answered {took:.2f} s after the stall"
