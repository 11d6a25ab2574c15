"""An answer the proxy must see whole before it may go out is held, and so bounded.

On a JSON route with a ``user_field``, the one-shot answer is checked for another user's
data before the client gets any of it. It is held up to ``server.max_ws_message_bytes``
(the bound of a WebSocket message held whole for the same check): a backend that answers
with more, or never stops, gets the client a 502 and its connection closed, and the
proxy does not grow with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.app import ProxyServer
from tests.proxy_harness import flags_document, make_settings, running_proxy, write_flags
from tests.raw_http import bounded, connect, read_response, request

LIMIT = 64 * 1024
ROUTE = {
    "name": "run",
    "path": "/run",
    "protocol": "json",
    "flag": "ssot-dispatcher",
    "user_field": "user_id",
}


@asynccontextmanager
async def answering(size: int | None) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A backend that answers every request with a chunked JSON body of ``size`` bytes, or
    (None) one that never ends; the event is set once the proxy has cut it off."""
    cut = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        head, tail = b'{"user_id": "u1", "text": "', b'"}'
        body = head + b"x" * ((size or 0) - len(head) - len(tail)) + tail
        try:
            if size is not None:
                writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
                await writer.drain()
                await reader.read()  # until the proxy lets the connection go
                return
            filler = b" " * 16384
            for _ in range(16384):  # 256 MiB at most: the test ends long before
                writer.write(b"%x\r\n%b\r\n" % (len(filler), filler))
                await writer.drain()
        except ConnectionError:
            cut.set()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", cut
    finally:
        server.close()


@asynccontextmanager
async def proxy_for(url: str, tmp_path: Path) -> AsyncIterator[ProxyServer]:
    flags = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    settings = make_settings(
        url, url, flags, routes=[ROUTE], server={"max_ws_message_bytes": LIMIT}
    )
    async with running_proxy(settings) as proxy:
        yield proxy


@pytest.mark.parametrize("size", [None, 4 * LIMIT])
async def test_an_answer_held_whole_past_its_bound_is_a_502_and_the_backend_is_cut_off(
    tmp_path: Path, size: int | None
) -> None:
    async with answering(size) as (url, cut), proxy_for(url, tmp_path) as proxy:
        async with connect(proxy) as client:
            await client.send(request("GET", "/run/1", "X-User-Id: u1"))
            response = await read_response(client.reader)
        assert response.status == 502
        body = json.loads(response.body)
        assert body["error"] == "response_too_large"
        assert "127.0.0.1" not in body["detail"]
        if size is None:
            await bounded(cut.wait(), 10)


async def test_an_answer_within_its_bound_is_checked_and_delivered_whole(tmp_path: Path) -> None:
    async with answering(LIMIT - 100) as (url, _), proxy_for(url, tmp_path) as proxy:
        async with connect(proxy) as client:
            await client.send(request("GET", "/run/1", "X-User-Id: u1"))
            response = await read_response(client.reader)
    assert response.status == 200
    assert len(response.body) == LIMIT - 100
    assert json.loads(response.body)["user_id"] == "u1"
