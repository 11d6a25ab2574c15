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
import random
import time

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from adapters.events import Event
from adapters.isolation import belongs_to
from proxy.context import Proxy
from proxy.experiment import RouteExperiment
from proxy.headers import BACKEND_HEADER, SHADOW_HEADER, upstream_request_headers
from proxy.metrics import Outcome
from proxy.routing import UNROUTED, Backend, Route
from proxy.shadow import shadow_backend, shadow_refusal
from proxy.turns import TurnTracker

log = logging.getLogger("strangler.relay")

BAD_GATEWAY = WSCloseCode.BAD_GATEWAY
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
    request: web.BaseRequest,
    proxy: Proxy,
    route_obj: Route | None,
    backend: Backend,
    user_id: str | None = None,
) -> web.StreamResponse:
    route = route_obj.name if route_obj is not None else UNROUTED
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
        # Every reason starts "backend ...": told by role, never by address.
        await client.close(code=code, message=f"{backend.value} {reason}".encode()[:120])
        proxy.metrics.count_request(route, backend.value, "primary", outcome.value)
        return client

    session = _Session(proxy, route, backend, client, upstream)
    experiment = proxy.experiments.get(route) if route_obj is not None else None
    if route_obj is not None and experiment is not None and experiment.watches:
        session.observe(route_obj, experiment, user_id, url, headers)
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
        # Set when the backend ended the session (its close frame, or its connection
        # lost), with why if it failed: turns it cut short are compared as they stand.
        # Any other end (the client left or closed, the proxy stopped) cancels them.
        self.backend_ended = False
        self.backend_failure: str | None = None
        self.turn_started: float | None = None
        self.first_event = proxy.metrics.first_event.labels(route, backend.value, "primary")
        self.tracker: TurnTracker | None = None
        self.user_field: str | None = None
        self.user_id: str | None = None
        self.shadow: _Shadow | None = None
        self.watcher: asyncio.Task[None] | None = None

    def observe(
        self,
        route: Route,
        experiment: RouteExperiment,
        user_id: str | None,
        url: URL,
        headers: list[tuple[str, str]],
    ) -> None:
        """Record turns for the route's experiment; open a shadow connection if sampled."""
        settings = route.settings
        refusal = shadow_refusal(
            settings, "GET", 0, self.proxy.settings.shadow.max_body_bytes, random.random()
        )
        if refusal is not None and refusal != "sampled_out":
            self.proxy.shadows.drop(route.name, refusal)
        target = shadow_backend(settings, self.backend) if refusal is None else None
        if target is not None and not self.proxy.shadows.has_room():
            self.proxy.shadows.drop(route.name, "concurrency")
            target = None
        if target is not None and not self.proxy.shadows.admits(route.name, target):
            target = None
        self.tracker = TurnTracker(route, experiment, self.backend, target)
        if settings.user_field and user_id:
            self.user_field, self.user_id = settings.user_field, user_id
        if target is not None:
            shadow_url = URL(self.proxy.backend_urls[target] + url.raw_path_qs, encoded=True)
            self.shadow = _Shadow(self, target, shadow_url, [*headers, (SHADOW_HEADER, "1")])

    async def run(self) -> web.WebSocketResponse:
        proxy = self.proxy
        gauge = proxy.metrics.websocket_sessions.labels(self.route, self.backend.value)
        gauge.inc()
        proxy.websockets.add(self.client)
        tasks = [
            asyncio.create_task(self._client_to_upstream(), name="ws-client-to-upstream"),
            asyncio.create_task(self._upstream_to_client(), name="ws-upstream-to-client"),
        ]
        if self.tracker is not None:
            self.watcher = asyncio.create_task(self._watch_turns(), name="ws-turns")
        if self.shadow is not None:
            self.shadow.task = self.proxy.shadows.adopt(self.route, self.shadow.run())
        try:
            # Either side ending ends the session; the other leg is then closed.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            owed = False
            if self.tracker is not None:
                owed = self.tracker.primary_over(
                    time.perf_counter(),
                    cancelled=not self.backend_ended,
                    error=self.backend_failure,
                )
            proxy.websockets.discard(self.client)
            gauge.dec()
            proxy.metrics.count_request(
                self.route, self.backend.value, "primary", self.outcome.value
            )
            # The user's session is over whatever the shadow still does: a shadow still
            # running finishes the turns it owes in its own task, owned by the shadow
            # runner (drained, then cut at shutdown), and concludes the session's turns
            # when it ends; neither the client's closing handshake nor a cancelled
            # handler waits on it or cuts it short.
            shadow = self.shadow
            if shadow is not None and shadow.task is not None and not shadow.task.done():
                shadow.finish(owed and not proxy.shadows.closing)
            else:
                await self.conclude()
            if not self.upstream.closed:
                await self.upstream.close(code=WSCloseCode.GOING_AWAY)
            if not self.client.closed:
                await self.client.close(code=WSCloseCode.GOING_AWAY)
        return self.client

    async def conclude(self) -> None:
        """Once the primary and the shadow are both over: stop watching the turns and
        conclude those still open."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self.tracker is not None:
            self.tracker.close(time.perf_counter())

    async def _client_to_upstream(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await client.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self._start_turn()
                if self.tracker is not None:
                    self.tracker.client_message(time.perf_counter())
                if self.shadow is not None:
                    self.shadow.forward(msg.data)
                if msg.type is WSMsgType.TEXT:
                    await upstream.send_str(msg.data)
                else:
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
                # The client's handshake is answered first, with its own code: the
                # backend's may be slow, and this task ends with the session.
                await client.close(code=code, message=reason)
                await upstream.close(code=code, message=reason)
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
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self._first_event()
                if self.tracker is not None:
                    events = self.tracker.primary_frame(msg.data, time.perf_counter())
                    if self.user_field is not None and self._withheld(events, self.backend):
                        continue
                if msg.type is WSMsgType.TEXT:
                    await client.send_str(msg.data)
                else:
                    await client.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await client.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await client.pong(msg.data)
            elif self.closing:
                return
            elif msg.type is WSMsgType.CLOSE:
                self.closing = True
                self.backend_ended = True
                code = sendable(msg.data)
                if code >= 1011 and code < 3000:
                    self.outcome = Outcome.SERVER_ERROR
                    self.backend_failure = f"the backend closed the session with {code}"
                await upstream.close(code=code)
                await client.close(code=code, message=msg.extra.encode() if msg.extra else b"")
                return
            else:
                # The backend went away without a close frame, or sent garbage.
                self.closing = True
                self.backend_ended = True
                too_big = upstream.close_code == WSCloseCode.MESSAGE_TOO_BIG
                code = WSCloseCode.MESSAGE_TOO_BIG if too_big else WSCloseCode.INTERNAL_ERROR
                self.outcome = Outcome.TOO_LARGE if too_big else Outcome.BROKEN
                self.backend_failure = (
                    "a backend message over the size limit"
                    if too_big
                    else "the backend connection was lost"
                )
                await client.close(code=code, message=b"backend connection lost")
                return

    def _withheld(self, events: list[Event], backend: Backend) -> bool:
        """Whether a frame carries another user's id; counted per backend."""
        assert self.user_field is not None and self.user_id is not None
        bad = sum(1 for e in events if not belongs_to(e, self.user_field, self.user_id))
        if bad:
            self.proxy.metrics.isolation_violations.labels(self.route, backend.value).inc(bad)
            log.warning(
                "route %s: withheld an event of another user from %s", self.route, backend.value
            )
        return bad > 0

    async def _watch_turns(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        step = max(0.01, min(0.5, tracker.idle / 4))
        while True:
            await asyncio.sleep(step)
            tracker.tick(time.perf_counter())

    def _start_turn(self) -> None:
        if self.turn_started is None:
            self.turn_started = time.perf_counter()

    def _first_event(self) -> None:
        if self.turn_started is not None:
            self.first_event.observe(time.perf_counter() - self.turn_started)
            self.turn_started = None


class _Shadow:
    """The session's shadow connection: same client messages, frames never delivered.

    Messages go through a bounded queue so that a shadow that reads slowly never makes
    the primary wait; if the queue fills, the shadow is given up (counted), not the primary.
    """

    QUEUE = 256

    def __init__(
        self, session: _Session, backend: Backend, url: URL, headers: list[tuple[str, str]]
    ) -> None:
        self.session = session
        self.backend = backend
        self.url = url
        self.headers = headers
        self.queue: asyncio.Queue[str | bytes | None] = asyncio.Queue(self.QUEUE)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.task: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.lost = False
        # Set by finish(): the primary is over, and whether the shadow owes turns.
        self.finished = False
        self.owed = False
        self.outcome = Outcome.SUCCESS
        self.started = time.perf_counter()

    def forward(self, data: str | bytes) -> None:
        if self.lost:
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.fail("backlog", "the shadow fell behind the client's messages")

    def finish(self, owed: bool) -> None:
        """The session's primary is over: after the client's messages already queued,
        wait (within the idle timeout) for the turns the shadow owes if ``owed``, then
        end, concluding the session's turns."""
        self.finished, self.owed = True, owed
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            self.fail("backlog", "the shadow fell behind the client's messages")

    def fail(self, reason: str, detail: str) -> None:
        if self.lost:
            return
        self.lost = True
        session = self.session
        session.proxy.shadows.drop(session.route, reason)
        if session.tracker is not None:
            session.tracker.shadow_lost(detail, time.perf_counter())

    async def run(self) -> None:
        try:
            await self._relay()
        finally:
            await self._stop()
            if self.finished:  # the session has ended: the last one out concludes
                await self.session.conclude()

    async def _relay(self) -> None:
        session = self.session
        proxy = session.proxy
        settings = proxy.settings.server
        try:
            self.ws = await proxy.shadow_session.ws_connect(
                self.url,
                headers=self.headers,
                max_msg_size=settings.max_ws_message_bytes,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0),
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcome = Outcome.UNREACHABLE
            self.fail("unreachable", f"shadow connection failed: {type(exc).__name__}")
            return
        self.reader = asyncio.create_task(self._read(self.ws), name="ws-shadow-reader")
        try:
            while not self.lost:
                data = await self.queue.get()
                if data is None:
                    break
                if isinstance(data, str):
                    await self.ws.send_str(data)
                else:
                    await self.ws.send_bytes(data)
        except (aiohttp.ClientError, ConnectionError) as exc:
            self.outcome = Outcome.BROKEN
            self.fail("error", f"shadow connection failed: {type(exc).__name__}")
        tracker = session.tracker
        if self.owed and not self.lost and tracker is not None:
            # The shadow usually lags: let it finish the turns the primary did.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tracker.idle):
                    await tracker.settled.wait()

    async def _stop_reading(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        session = self.session
        tracker = session.tracker
        assert tracker is not None
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                events = tracker.shadow_frame(msg.data, time.perf_counter())
                if session.user_field is not None:
                    session._withheld(events, self.backend)  # counted; never delivered anyway
                continue
            if not session.closing:
                self.outcome = Outcome.BROKEN
                self.fail("error", "the shadow backend closed the connection")
            return

    async def _stop(self) -> None:
        self.lost = True
        metrics = self.session.proxy.metrics
        # The reader goes first: a close() that has to break into a pending receive()
        # waits on that receive, unbounded by the close timeout.
        await self._stop_reading()
        if self.ws is not None and not self.ws.closed:
            await self.ws.close(code=WSCloseCode.GOING_AWAY)
        failed = self.outcome in (Outcome.UNREACHABLE, Outcome.BROKEN, Outcome.TIMEOUT)
        self.session.proxy.shadows.report(self.session.route, self.backend, not failed)
        metrics.count_request(self.session.route, self.backend.value, "shadow", self.outcome.value)


async def close_all(proxy: Proxy, code: int = WSCloseCode.GOING_AWAY) -> None:
    """Close every open client session (shutdown: 1001)."""
    sessions = list(proxy.websockets)
    await asyncio.gather(
        *(ws.close(code=code, message=b"proxy shutting down") for ws in sessions),
        return_exceptions=True,
    )
