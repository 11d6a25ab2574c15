"""Reference point, not a product: the smallest aiohttp proxy that does strangler's routing job.

aiohttp server, one aiohttp client session with a keep-alive pool, uvloop; users split
50/50 between two backends by a hash of ``X-User-Id``; HTTP bodies relayed chunk by chunk as
they arrive; WebSocket frames relayed both ways. No flags, metrics, header hygiene, shadow or
comparison. Measured next to strangler (``bench/run.py --paths ...,minimal``) it separates
what aiohttp itself costs from what strangler's own code adds.

Run: ``python bench/minimal_proxy.py --port 18090 --legacy URL --candidate URL``. Pure I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib
from typing import Any

import aiohttp
from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the project
    uvloop = None  # type: ignore[assignment]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BACKENDS = web.AppKey("backends", tuple)


def choose(request: web.Request) -> tuple[str, str]:
    user = request.headers.get("X-User-Id", "")
    legacy, candidate = request.app[BACKENDS]
    if user and zlib.crc32(user.encode()) % 2:
        return "candidate", candidate
    return "legacy", legacy


def forwarded(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


async def relay(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await relay_websocket(request)
    name, base = choose(request)
    body = await request.read()
    async with request.app[SESSION].request(
        request.method,
        base + request.raw_path,
        headers=forwarded(request),
        data=body or None,
        allow_redirects=False,
        auto_decompress=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        response.headers["X-Strangler-Backend"] = name
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def relay_websocket(request: web.Request) -> web.WebSocketResponse:
    name, base = choose(request)
    client = web.WebSocketResponse()
    client.headers["X-Strangler-Backend"] = name
    await client.prepare(request)
    async with request.app[SESSION].ws_connect(
        base + request.raw_path, headers={"X-User-Id": request.headers.get("X-User-Id", "")}
    ) as upstream:

        async def downstream() -> None:
            async for message in upstream:
                if message.type is aiohttp.WSMsgType.TEXT:
                    await client.send_str(message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await client.send_bytes(message.data)

        pump = asyncio.create_task(downstream())
        try:
            async for message in client:
                if message.type is aiohttp.WSMsgType.TEXT:
                    await upstream.send_str(message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await upstream.send_bytes(message.data)
        finally:
            pump.cancel()
    return client


async def serve(port: int, legacy: str, candidate: str) -> None:
    app = web.Application()
    app[BACKENDS] = (legacy, candidate)
    app.router.add_route("*", "/{tail:.*}", relay)
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SESSION] = session
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--legacy", required=True)
    parser.add_argument("--candidate", required=True)
    args: Any = parser.parse_args(argv)
    coro = serve(args.port, args.legacy, args.candidate)
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
