"""HTTP relay through a real proxy to real loopback backends."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.app import ProxyServer
from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerFactory = Callable[..., Awaitable[TestServer]]


def backend_app(name: str, handler: Handler | None = None) -> web.Application:
    async def default(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response(
            {
                "backend": name,
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body.decode("latin-1"),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler or default)
    return app


def url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def pair(aiohttp_server: ServerFactory) -> tuple[TestServer, TestServer]:
    legacy = await aiohttp_server(backend_app("legacy"))
    candidate = await aiohttp_server(backend_app("candidate"))
    return legacy, candidate


@pytest.fixture
async def proxy(pair: tuple[TestServer, TestServer], tmp_path: Path) -> AsyncIterator[ProxyServer]:
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    settings = make_settings(url_of(pair[0]), url_of(pair[1]), flags, routes=ROUTES)
    async with running_proxy(settings) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # The test client sends exactly what it is told: no default headers, raw bodies.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


NO_AUTO = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


async def test_any_method_body_query_and_headers_reach_the_backend_unchanged(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    body = bytes(range(256)) * 3
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
        async with client.request(
            method,
            URL(proxy.proxy_url + "/echo/a%20b/c?x=1&y=%2F&x=2", encoded=True),
            data=body if method != "GET" else None,
            headers={"X-Custom": "v1", "Content-Type": "application/x-thing", "X-User-Id": "u1"},
            skip_auto_headers=NO_AUTO,
        ) as resp:
            assert resp.status == 200
            seen = await resp.json()
        assert seen["method"] == method
        assert seen["path_qs"] == "/echo/a%20b/c?x=1&y=%2F&x=2"
        headers = dict((k.lower(), v) for k, v in seen["headers"])
        assert headers["x-custom"] == "v1"
        assert headers["content-type"] == "application/x-thing"
        assert "user-agent" not in headers and "accept-encoding" not in headers
        if method != "GET":
            assert seen["body"].encode("latin-1") == body


async def test_status_headers_and_body_reach_the_client_byte_for_byte(
    aiohttp_server: ServerFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    payload = gzip.compress(b'{"hello": "world"}' * 100)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.Response(status=207, reason="Multi Thing", body=payload)
        resp.headers["Content-Encoding"] = "gzip"
        resp.headers["Content-Type"] = "application/json"
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["X-Backend-Header"] = "kept"
        return resp

    backend = await aiohttp_server(backend_app("legacy", handler))
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with running_proxy(make_settings(url_of(backend), url_of(backend), flags)) as server:
        async with client.get(server.proxy_url + "/anything") as resp:
            raw = await resp.read()
            assert resp.status == 207 and resp.reason == "Multi Thing"
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert resp.headers["X-Backend-Header"] == "kept"
            assert resp.headers["X-Strangler-Backend"] == "legacy"
    assert raw == payload


async def test_hop_by_hop_headers_are_removed_in_both_directions(
    aiohttp_server: ServerFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.update({k.lower(): v for k, v in request.headers.items()})
        resp = web.Response(text="ok")
        resp.headers["Connection"] = "X-Private-Hop"
        resp.headers["X-Private-Hop"] = "secret"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers["X-Strangler-Backend"] = "forged"
        return resp

    backend = await aiohttp_server(backend_app("legacy", handler))
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with running_proxy(make_settings(url_of(backend), url_of(backend), flags)) as server:
        async with client.get(
            server.proxy_url + "/x",
            headers={
                "Connection": "keep-alive, X-Client-Hop",
                "X-Client-Hop": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic abc",
                "X-Strangler-Backend": "candidate",
                "X-Strangler-Shadow": "1",
                "X-Forwarded-For": "10.1.1.1",
                "Host": "public.example",
            },
        ) as resp:
            await resp.read()
            assert "X-Private-Hop" not in resp.headers
            assert "Keep-Alive" not in resp.headers
            assert "Proxy-Authenticate" not in resp.headers
            assert resp.headers.getall("X-Strangler-Backend") == ["legacy"]
    for name in ("x-client-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert "x-strangler-backend" not in seen and "x-strangler-shadow" not in seen
    assert seen["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "public.example"


async def test_users_are_split_between_backends_and_requests_without_user_go_to_legacy(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    served: dict[str, str] = {}
    for i in range(200):
        user = f"user-{i}"
        async with client.get(proxy.proxy_url + "/echo/x", headers={"X-User-Id": user}) as resp:
            body = await resp.json()
            assert body["backend"] == resp.headers["X-Strangler-Backend"]
            served[user] = body["backend"]
    assert 60 < list(served.values()).count("candidate") < 140
    for user, backend in list(served.items())[:50]:  # sticky
        async with client.get(proxy.proxy_url + "/echo/y", headers={"X-User-Id": user}) as resp:
            assert resp.headers["X-Strangler-Backend"] == backend
    for headers in ({}, {"X-User-Id": ""}):
        async with client.get(proxy.proxy_url + "/echo/x", headers=headers) as resp:
            assert resp.headers["X-Strangler-Backend"] == "legacy"


async def test_a_path_that_matches_no_route_goes_to_legacy_unchanged(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    for i in range(30):
        async with client.get(
            proxy.proxy_url + "/elsewhere/x?q=1", headers={"X-User-Id": f"user-{i}"}
        ) as resp:
            body = await resp.json()
            assert body["backend"] == "legacy"
            assert body["path_qs"] == "/elsewhere/x?q=1"


async def _hold_backend(
    aiohttp_server: ServerFactory,
    content_type: str,
    first: bytes,
    rest: bytes,
    release: asyncio.Event,
    finished: asyncio.Event | None = None,
) -> TestServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = content_type
        await resp.prepare(request)
        await resp.write(first)
        try:
            await release.wait()
            await resp.write(rest)
            await resp.write_eof()
        finally:
            if finished is not None:
                finished.set()
        return resp

    return await aiohttp_server(backend_app("legacy", handler))


@pytest.mark.parametrize(
    ("content_type", "first", "rest"),
    [
        ("application/x-ndjson", b'{"type":"agent_started"}\n', b'{"type":"agent_completed"}\n'),
        (
            "text/event-stream",
            b'event: agent_started\ndata: {"a":1}\n\n',
            b'event: agent_completed\ndata: {"b":2}\n\n',
        ),
        ("application/octet-stream", b"chunk-1", b"chunk-2"),
    ],
)
async def test_the_first_event_reaches_the_client_while_the_backend_holds_the_rest(
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    content_type: str,
    first: bytes,
    rest: bytes,
) -> None:
    release = asyncio.Event()
    backend = await _hold_backend(aiohttp_server, content_type, first, rest, release)
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with running_proxy(make_settings(url_of(backend), url_of(backend), flags)) as server:
        async with client.post(server.proxy_url + "/api/agent/stream", data=b"{}") as resp:
            assert resp.headers["Content-Type"].startswith(content_type)
            received = b""
            while len(received) < len(first):
                received += await resp.content.readany()
            assert received == first
            assert not release.is_set()  # the backend still holds the rest
            release.set()
            assert received + await resp.content.read() == first + rest


async def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_exchange(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    release, finished = asyncio.Event(), asyncio.Event()
    backend = await _hold_backend(
        aiohttp_server, "application/x-ndjson", b'{"n":1}\n', b"", release, finished
    )
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with running_proxy(make_settings(url_of(backend), url_of(backend), flags)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b'{"n":1}\n')
        assert b"200 OK" in head
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(finished.wait(), timeout=1.0)
        assert not release.is_set()


async def test_an_unreachable_backend_is_a_502_with_a_json_body(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with running_proxy(make_settings(dead, dead, flags)) as server:
        for _ in range(3):  # the proxy keeps running
            async with client.get(server.proxy_url + "/x") as resp:
                assert resp.status == 502
                assert resp.headers["Content-Type"].startswith("application/json")
                body = await resp.json()
                assert body["error"] == "backend_unreachable"
                assert body["backend"] == "legacy"


async def test_a_backend_that_does_not_answer_in_time_is_a_504(
    aiohttp_server: ServerFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    backend = await aiohttp_server(backend_app("legacy", handler))
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(url_of(backend), url_of(backend), flags, server={"read_timeout": 0.2})
    async with running_proxy(settings) as server, client.get(server.proxy_url + "/x") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "backend_timeout"


async def test_a_body_over_the_limit_is_a_413_and_never_reaches_the_backend(
    aiohttp_server: ServerFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    hits: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        hits.append(len(await request.read()))
        return web.Response(text="ok")

    backend = await aiohttp_server(backend_app("legacy", handler))
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(
        url_of(backend), url_of(backend), flags, server={"max_body_bytes": 1000}
    )

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 100

    async with running_proxy(settings) as server:
        async with client.post(server.proxy_url + "/x", data=b"x" * 1001) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "request_too_large"
        async with client.post(server.proxy_url + "/x", data=chunked()) as resp:
            assert resp.status == 413
        async with client.post(server.proxy_url + "/x", data=b"x" * 1000) as resp:
            assert resp.status == 200
    assert hits == [1000]


async def test_a_slow_reader_does_not_make_the_proxy_buffer_without_bound(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    chunk = b"x" * 65536
    total_chunks = 2000  # 128 MiB on offer
    progress = {"written": 0}
    stalled = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(total_chunks):
            try:
                await asyncio.wait_for(resp.write(chunk), timeout=0.5)
            except TimeoutError:
                stalled.set()  # back-pressure reached the backend
                return resp
            progress["written"] += len(chunk)
        return resp

    backend = await aiohttp_server(backend_app("legacy", handler))
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    async with running_proxy(make_settings(url_of(backend), url_of(backend), flags)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_port, limit=65536)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.wait_for(stalled.wait(), timeout=30)
        # Loopback socket buffers on both legs hold a few MiB; the proxy itself adds
        # at most its read and write high-water marks.
        assert progress["written"] < 32 * 1024 * 1024
        writer.close()
        await writer.wait_closed()


async def test_the_proxy_answers_a_malformed_request_with_a_4xx_and_keeps_running(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
    writer.write(b"GARBAGE\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    assert status_line.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), status_line
    writer.close()
    await writer.wait_closed()
    async with client.get(proxy.proxy_url + "/echo/ok") as resp:
        assert resp.status == 200


async def test_a_keep_alive_connection_the_backend_dropped_is_retried_for_an_idempotent_request(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    # Each connection answers its first request and closes on the second without a word:
    # the race of a backend closing an idle keep-alive connection as the proxy reuses it.
    answered: list[bytes] = []

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            answered.append(head.split(b" ", 2)[1])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.transport.abort()

    backend = await asyncio.start_server(one_per_connection, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{backend.sockets[0].getsockname()[1]}"
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    try:
        async with running_proxy(make_settings(url, url, flags)) as server:
            for i in range(3):
                async with client.get(f"{server.proxy_url}/get/{i}") as resp:
                    assert (resp.status, await resp.read()) == (200, b"ok")
            # Not idempotent, and written: the backend may have acted on it, so no retry.
            async with client.post(server.proxy_url + "/post", data=b"x") as resp:
                assert resp.status == 502
    finally:
        backend.close()
        await backend.wait_closed()
    assert answered == [b"/get/0", b"/get/1", b"/get/2"]
