"""Relay one WebSocket session between the client and the backend it connected to (I/O).

The upstream connection is opened first, with the client's subprotocol offer; the
client's handshake is then accepted with the subprotocol the backend chose. Frames are
relayed both ways as they come: text, binary, ping and pong (automatic pings are off on
both legs so that pings travel end to end), and close frames with their code and reason.
A session stays on its backend for its whole life. Failures map to close codes: backend
unreachable 1014 (bad gateway), backend timeout or abnormal end 1011, a message over
the limit 1009; a proxy shutting down closes its sessions with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from proxy.context import Proxy
from proxy.headers import BACKEND_HEADER, upstream_request_headers
from proxy.metrics import Outcome
from proxy.routing import Backend

log = logging.getLogger("strangler.relay")

BAD_GATEWAY = 1014
# Codes that describe a connection's end but may never be sent in a close frame.
_UNSENDABLE = frozenset({1005, 1006, 1015})


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


def sendable(code: int | None) -> int:
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999):
        return WSCloseCode.OK
    return code


async def relay_websocket(
    request: web.BaseRequest, proxy: Proxy, route: str, backend: Backend
) -> web.StreamResponse:
    settings = proxy.settings.server
    offered = [
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in value.split(",")
        if p.strip()
    ]
    headers = upstream_request_headers(
        request.headers.items(),
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
        websocket=True,
    )
    url = URL(proxy.backend_urls[backend] + request.raw_path, encoded=True)
    failure: tuple[int, str, Outcome] | None = None
    upstream: aiohttp.ClientWebSocketResponse | None = None
    try:
        upstream = await proxy.session.ws_connect(
            url,
            headers=headers,
            protocols=offered,
            autoping=False,
            autoclose=False,
            max_msg_size=settings.max_ws_message_bytes,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=settings.connect_timeout),
        )
    except aiohttp.WSServerHandshakeError as exc:
        failure = (BAD_GATEWAY, f"backend refused the handshake: {exc.status}", Outcome.BROKEN)
    except aiohttp.ClientConnectorError:
        failure = (BAD_GATEWAY, "backend unreachable", Outcome.UNREACHABLE)
    except (TimeoutError, aiohttp.ServerTimeoutError):
        failure = (WSCloseCode.INTERNAL_ERROR, "backend timeout", Outcome.TIMEOUT)
    except aiohttp.ClientError as exc:
        failure = (BAD_GATEWAY, f"backend error: {type(exc).__name__}", Outcome.BROKEN)

    chosen = upstream.protocol if upstream is not None else None
    client = web.WebSocketResponse(
        protocols=(chosen,) if chosen else (),
        autoping=False,
        autoclose=False,
        max_msg_size=settings.max_ws_message_bytes,
    )
    client.headers[BACKEND_HEADER] = backend.value
    try:
        await client.prepare(request)
    except BaseException:
        if upstream is not None:
            await upstream.close(code=WSCloseCode.GOING_AWAY)
        raise
    if upstream is None:
        assert failure is not None
        code, reason, outcome = failure
        log.warning("route %s backend %s: websocket %s", route, backend, reason)
        await client.close(code=code, message=reason.encode()[:120])
        proxy.metrics.count_request(route, backend.value, "primary", outcome.value)
        return client

    session = _Session(proxy, route, backend, client, upstream)
    return await session.run()


class _Session:
    def __init__(
        self,
        proxy: Proxy,
        route: str,
        backend: Backend,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
    ) -> None:
        self.proxy = proxy
        self.route = route
        self.backend = backend
        self.client = client
        self.upstream = upstream
        self.outcome = Outcome.SUCCESS
        # Set once either leg starts the closing handshake, so that the other leg's
        # reader, which then sees its connection end, does not take it for a failure.
        self.closing = False
        self.turn_started: float | None = None
        self.first_event = proxy.metrics.first_event.labels(route, backend.value, "primary")

    async def run(self) -> web.WebSocketResponse:
        proxy = self.proxy
        gauge = proxy.metrics.websocket_sessions.labels(self.route, self.backend.value)
        gauge.inc()
        proxy.websockets.add(self.client)
        tasks = [
            asyncio.create_task(self._client_to_upstream(), name="ws-client-to-upstream"),
            asyncio.create_task(self._upstream_to_client(), name="ws-upstream-to-client"),
        ]
        try:
            # Either side ending ends the session; the other leg is then closed.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if not self.upstream.closed:
                await self.upstream.close(code=WSCloseCode.GOING_AWAY)
            if not self.client.closed:
                await self.client.close(code=WSCloseCode.GOING_AWAY)
            proxy.websockets.discard(self.client)
            gauge.dec()
            proxy.metrics.count_request(
                self.route, self.backend.value, "primary", self.outcome.value
            )
        return self.client

    async def _client_to_upstream(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await client.receive()
            if msg.type is WSMsgType.TEXT:
                self._start_turn()
                await upstream.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self._start_turn()
                await upstream.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await upstream.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await upstream.pong(msg.data)
            elif self.closing:
                return
            elif msg.type is WSMsgType.CLOSE:
                self.closing = True
                code = sendable(msg.data)
                reason = msg.extra.encode() if msg.extra else b""
                await upstream.close(code=code, message=reason)
                await client.close(code=code, message=reason)
                return
            elif msg.type is WSMsgType.ERROR:
                self.closing = True
                code = client.close_code or WSCloseCode.INTERNAL_ERROR
                if code == WSCloseCode.MESSAGE_TOO_BIG:
                    self.outcome = Outcome.TOO_LARGE
                else:
                    self.outcome = Outcome.CLIENT_CLOSED
                await client.close(code=code)
                await upstream.close(code=WSCloseCode.GOING_AWAY)
                return
            else:  # CLOSING / CLOSED: the client is gone
                self.closing = True
                self.outcome = Outcome.CLIENT_CLOSED
                await upstream.close(code=WSCloseCode.GOING_AWAY)
                return

    async def _upstream_to_client(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await upstream.receive()
            if msg.type is WSMsgType.TEXT:
                self._first_event()
                await client.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self._first_event()
                await client.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await client.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await client.pong(msg.data)
            elif self.closing:
                return
            elif msg.type is WSMsgType.CLOSE:
                self.closing = True
                code = sendable(msg.data)
                if code >= 1011 and code < 3000:
                    self.outcome = Outcome.SERVER_ERROR
                await upstream.close(code=code)
                await client.close(code=code, message=msg.extra.encode() if msg.extra else b"")
                return
            else:
                # The backend went away without a close frame, or sent garbage.
                self.closing = True
                too_big = upstream.close_code == WSCloseCode.MESSAGE_TOO_BIG
                code = WSCloseCode.MESSAGE_TOO_BIG if too_big else WSCloseCode.INTERNAL_ERROR
                self.outcome = Outcome.TOO_LARGE if too_big else Outcome.BROKEN
                await client.close(code=code, message=b"backend connection lost")
                return

    def _start_turn(self) -> None:
        if self.turn_started is None:
            self.turn_started = time.perf_counter()

    def _first_event(self) -> None:
        if self.turn_started is not None:
            self.first_event.observe(time.perf_counter() - self.turn_started)
            self.turn_started = None


async def close_all(proxy: Proxy, code: int = WSCloseCode.GOING_AWAY) -> None:
    """Close every open client session (shutdown: 1001)."""
    sessions = list(proxy.websockets)
    await asyncio.gather(
        *(ws.close(code=code, message=b"proxy shutting down") for ws in sessions),
        return_exceptions=True,
    )
