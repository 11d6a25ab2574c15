"""What a client is told of a failing backend names its role, never its address.

A 502 or 504 body and a WebSocket close reason say which backend failed (legacy or
candidate) and how; the backend's host and port stay in the proxy's log. Each failure
(unreachable, too slow, broken) is tried on every surface a client sees: an HTTP answer
on a new upstream connection and on a warm one, and the close reason of a WebSocket
session on the direct and on the watched relay.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from tests.proxy_harness import ROUTES, flags_document, make_settings, running_proxy, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]
WATCHED = {
    "name": "watched",
    "path": "/ws/watched",
    "protocol": "websocket",
    "flag": "ssot-dispatcher",
    "shadow": 1.0,
}


@asynccontextmanager
async def failing_backend(
    failure: str, aiohttp_server: ServerFactory
) -> AsyncIterator[tuple[str, int]]:
    """A backend that fails so: its host and port. ``slow`` and ``broken`` answer
    ``/echo/warm`` (a connection is then warm), and fail every other request."""
    if failure == "unreachable":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield "127.0.0.1", port
        return
    never = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/echo/warm":
            return web.Response(text="warm")
        if failure == "slow":
            await never.wait()
        assert request.transport is not None
        request.transport.abort()  # broken: the connection cut before any answer
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    try:
        yield "127.0.0.1", server.port
    finally:
        never.set()


def assert_no_address(text: str, host: str, port: int, what: str) -> None:
    assert host not in text and str(port) not in text, f"{what}: {text!r}"
    assert "legacy" in text, f"{what} does not name the role: {text!r}"


FAILURES = [("unreachable", 502), ("slow", 504), ("broken", 502)]


@pytest.mark.parametrize(("failure", "status"), FAILURES)
async def test_an_error_body_names_the_backends_role_never_its_address(
    aiohttp_server: ServerFactory, tmp_path: Path, failure: str, status: int
) -> None:
    async with failing_backend(failure, aiohttp_server) as (host, port):
        url = f"http://{host}:{port}"
        flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        settings = make_settings(url, url, flags, routes=ROUTES, server={"read_timeout": 0.3})
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as client:
            # A new upstream connection, then (where the backend answers at all) a warm one.
            warm = [False] if failure == "unreachable" else [False, True]
            for reuse in warm:
                if reuse:
                    async with client.get(proxy.proxy_url + "/echo/warm") as resp:
                        assert resp.status == 200
                async with client.get(proxy.proxy_url + "/echo/x") as resp:
                    assert resp.status == status
                    body = await resp.text()
                assert_no_address(body, host, port, f"{failure} body (warm: {reuse})")


@pytest.mark.parametrize("path", ["/ws/agent", "/ws/watched"], ids=["direct", "watched"])
@pytest.mark.parametrize(
    ("failure", "code"), [("unreachable", 1014), ("slow", 1011), ("broken", 1014)]
)
async def test_a_websocket_close_reason_names_the_backends_role_never_its_address(
    aiohttp_server: ServerFactory, tmp_path: Path, failure: str, code: int, path: str
) -> None:
    async with failing_backend(failure, aiohttp_server) as (host, port):
        url = f"http://{host}:{port}"
        flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
        routes = [*ROUTES, WATCHED]
        settings = make_settings(url, url, flags, routes=routes, server={"read_timeout": 0.3})
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as client:
            async with client.ws_connect(proxy.proxy_url + path) as ws:
                msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, code)
            assert_no_address(msg.extra, host, port, f"{failure} close reason on {path}")
