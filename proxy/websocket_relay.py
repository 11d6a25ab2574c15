"""What a watched WebSocket session adds to the relay: turns, a shadow leg, isolation (I/O).

A session on a route that shadows or checks something runs on the same raw legs and
frame reader as any other (``proxy.websocket_direct``), with three additions. The
backend's messages are collected whole and decoded into events for the route's turns
(``proxy.turns``); with a user field, a message's frames are held until it is whole and
withheld if it carries another user's id (counted per backend). A sampled session gets
a shadow leg: one more raw connection to the other backend, opened beside the session,
never before it, which receives the client's frames as they were sent (a client's
masked frames are what a backend expects) and whose frames reach no one. A session
never waits for a shadow: when the shadow runner has no room, or its breaker holds the
backend back, the session is relayed without one and the drop is counted; a shadow
that falls behind (its unsent backlog past twice the message limit), fails or breaks
the protocol is given up, counted, and the session goes on. When the session ends, a
shadow that still owes turns gets up to ``turn_idle_seconds`` to finish them; then the
session's turns are concluded. An idle session has no task and no timer: the turns'
idle clock ticks only while a turn is open.
"""

from __future__ import annotations

import asyncio
import logging
import random
from time import perf_counter

from adapters.events import Event
from adapters.isolation import belongs_to
from proxy.context import Proxy
from proxy.experiment import RouteExperiment
from proxy.metrics import Outcome
from proxy.routing import Backend, Route
from proxy.server import Request
from proxy.shadow import session_shadow
from proxy.turns import TurnTracker
from proxy.websocket_direct import (
    GOING_AWAY,
    HandshakeFailed,
    Leg,
    Session,
    open_upstream,
    start_session,
)

log = logging.getLogger("strangler.relay")

_SHADOW_HEADER_LINE = b"X-Strangler-Shadow: 1\r\n"
_FAILURES = (Outcome.UNREACHABLE, Outcome.BROKEN, Outcome.TIMEOUT)
# How long a shadow that was sent a close frame gets to answer it.
_SHADOW_CLOSE_WAIT = 1.0


async def relay_websocket(
    request: Request,
    proxy: Proxy,
    route: Route,
    experiment: RouteExperiment,
    backend: Backend,
    user_id: str | None,
) -> None:
    """A session whose turns the route's experiment watches."""
    await start_session(request, proxy, WatchedSession(proxy, route, experiment, backend, user_id))


async def close_all(proxy: Proxy, code: int = GOING_AWAY) -> None:
    """Close every open client session (shutdown: 1001)."""
    sessions = list(proxy.websockets)
    await asyncio.gather(
        *[ws.close(code=code, message=b"proxy shutting down") for ws in sessions],
        return_exceptions=True,
    )


class WatchedSession(Session):
    def __init__(
        self,
        proxy: Proxy,
        route: Route,
        experiment: RouteExperiment,
        backend: Backend,
        user_id: str | None,
    ) -> None:
        super().__init__(proxy, route.name, backend)
        self.watched = True
        self.route_config = route
        self.experiment = experiment
        self.user_id = user_id
        self.user_field: str | None = None
        self.tracker: TurnTracker | None = None
        self.shadow: _Shadow | None = None
        self.owed = False  # the shadow owes turns the primary finished
        self.concluded = False
        self._ticker: asyncio.TimerHandle | None = None

    def opened(self, target: str, block: bytes, protocol: str | None) -> None:
        """Watch the turns; open a shadow leg if the session is sampled and there is room."""
        route = self.route_config
        settings = route.settings
        proxy = self.proxy
        shadows = proxy.shadows
        target_backend, dropped = session_shadow(
            settings, self.backend, random.random(), shadows.has_room()
        )
        if dropped is not None:
            shadows.drop(route.name, dropped)
        if target_backend is not None and not shadows.admits(route.name, target_backend):
            target_backend = None
        limits = proxy.settings.shadow
        self.tracker = TurnTracker(
            route,
            self.experiment,
            self.backend,
            target_backend,
            limits.max_recorded_events,
            limits.max_recorded_bytes,
        )
        self.upstream.collects = True
        if settings.user_field and self.user_id:
            self.user_field = settings.user_field
            self.upstream.holds = True
        if target_backend is not None:
            shadow = self.shadow = _Shadow(self, target_backend)
            self.client.mirrors = True
            # The shadow speaks the subprotocol the backend chose for the client.
            shadow.start(target, block + _SHADOW_HEADER_LINE, [protocol] if protocol else [])

    # -- turns

    def client_message(self) -> None:
        tracker = self.tracker
        if tracker is not None:
            tracker.client_message(perf_counter())
            self._tick_soon()

    def message(self, leg: Leg, data: bytes, text: bool) -> bool:
        tracker = self.tracker
        if tracker is None:
            return True
        value: str | bytes = data.decode() if text else data  # checked UTF-8 already
        now = perf_counter()
        shadow = self.shadow
        if leg.is_shadow:
            events = tracker.shadow_frame(value, now)
            if shadow is not None:
                if self.user_field is not None:
                    self._withheld(events, shadow.backend)  # counted; never delivered anyway
                shadow.check_settled()
            return False
        events = tracker.primary_frame(value, now)
        return self.user_field is None or not self._withheld(events, self.backend)

    def _withheld(self, events: list[Event], backend: Backend) -> bool:
        """Whether a message carries another user's id; counted per backend."""
        user_field, user_id = self.user_field, self.user_id
        assert user_field is not None and user_id is not None
        bad = 0
        for event in events:
            if not belongs_to(event, user_field, user_id):
                bad += 1
        if bad:
            self.proxy.metrics.isolation_violations.labels(self.route, backend.value).inc(bad)
            log.warning(
                "route %s: withheld an event of another user from %s", self.route, backend.value
            )
        return bad > 0

    def _tick_soon(self) -> None:
        tracker = self.tracker
        if self._ticker is None and tracker is not None and not self.concluded:
            step = max(0.01, min(0.5, tracker.idle / 4))
            self._ticker = asyncio.get_running_loop().call_later(step, self._tick)

    def _tick(self) -> None:
        """The turns' idle clock: runs while a turn is open."""
        self._ticker = None
        tracker = self.tracker
        if tracker is None or self.concluded:
            return
        tracker.tick(perf_counter())
        if self.shadow is not None:
            self.shadow.check_settled()
        if tracker.open:
            self._tick_soon()

    # -- the end

    def ending(self, backend_ended: bool, failure: str | None) -> None:
        tracker = self.tracker
        if tracker is not None:
            # Cut off by the client or the proxy, a turn is not compared; ended by the
            # backend, it is compared as it stands.
            self.owed = tracker.primary_over(
                perf_counter(), cancelled=not backend_ended, error=failure
            )

    def ended(self) -> None:
        # The user's session is over whatever the shadow still does: a shadow that owes
        # turns finishes them on its own and concludes the session's turns when it ends;
        # the client's closing handshake never waited for it.
        shadow = self.shadow
        if shadow is not None and not shadow.over:
            shadow.finish(self.owed and not self.proxy.shadows.closing)
        else:
            self.conclude()

    def conclude(self) -> None:
        """Once the primary and the shadow are both over: conclude the turns still open."""
        if self.concluded:
            return
        self.concluded = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.tracker is not None:
            self.tracker.close(perf_counter())

    # -- the shadow leg's events

    def mirror(self, data: bytes) -> None:
        shadow = self.shadow
        if shadow is not None:
            shadow.forward(data)

    def shadow_closed(self, leg: Leg, code: int) -> None:
        if self.shadow is not None:
            self.shadow.closed_by_backend()

    def shadow_failed(self, leg: Leg, what: str) -> None:
        if self.shadow is not None:
            self.shadow.broke(what)


class _Shadow:
    """A watched session's shadow leg: the client's frames go to it, its frames are
    decoded for the turns and reach no one. It runs until the session has ended and
    its owed turns are done (or it fails), and is held by the shadow runner meanwhile
    (shutdown drains it, then cuts it)."""

    def __init__(self, session: WatchedSession, backend: Backend) -> None:
        self.session = session
        self.backend = backend
        self.leg = Leg(session, False, True)
        self.leg.collects = True
        self.backlog: list[bytes] | None = []  # client frames before its handshake is done
        self.backlog_size = 0
        # An unsent backlog past this gives the shadow up: it must never hold the client.
        self.limit = 2 * session.limit
        self.connecting: asyncio.Task[None] | None = None
        self.finished = False  # the session has ended
        self.owed = False
        self.failed = False
        self.over = False  # it no longer runs: accounted for, released
        self.outcome = Outcome.SUCCESS
        self._timer: asyncio.TimerHandle | None = None

    def start(self, target: str, block: bytes, offered: list[str]) -> None:
        proxy = self.session.proxy
        proxy.shadows.hold(self)
        self.connecting = asyncio.get_running_loop().create_task(
            self._connect(target, block, offered), name=f"shadow-{self.session.route}"
        )

    async def _connect(self, target: str, block: bytes, offered: list[str]) -> None:
        session = self.session
        try:
            transport, rest, _ = await open_upstream(
                session.proxy, self.backend, target, block, offered
            )
        except HandshakeFailed as failure:
            self.connecting = None
            self.outcome = failure.outcome
            self.fail("unreachable", f"shadow connection failed: {failure}")
            return
        except Exception as error:  # a shadow's failure is data, never the session's
            log.exception("route %s: shadow connection failed", session.route)
            self.connecting = None
            self.outcome = Outcome.BROKEN
            self.fail("error", f"shadow connection failed: {type(error).__name__}")
            return
        self.connecting = None
        if self.over:
            transport.abort()
            return
        leg = self.leg
        transport.set_protocol(leg)
        leg.connection_made(transport)
        backlog, self.backlog = self.backlog, None
        if backlog:
            transport.write(b"".join(backlog))
        if rest:
            leg.data_received(rest)
        transport.resume_reading()

    def forward(self, data: bytes) -> None:
        """Client frames, as the backend got them."""
        if self.failed or self.over:
            return
        leg = self.leg
        transport = leg.transport
        if transport is None:
            backlog = self.backlog
            assert backlog is not None
            self.backlog_size += len(data)
            if self.backlog_size > self.limit:
                self.fail("backlog", "the shadow fell behind the client's messages")
                return
            backlog.append(data)
            return
        if leg.closed or leg.close_sent:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.limit:
            self.fail("backlog", "the shadow fell behind the client's messages")

    def finish(self, owed: bool) -> None:
        """The session has ended: wait (within the idle timeout) for the turns the
        shadow owes if ``owed``, then end."""
        self.finished, self.owed = True, owed
        tracker = self.session.tracker
        if not owed or self.failed or tracker is None or tracker.settled:
            self.end()
            return
        self._timer = asyncio.get_running_loop().call_later(tracker.idle, self.end)

    def check_settled(self) -> None:
        """After a shadow message or a tick: the owed turns may be done."""
        tracker = self.session.tracker
        if self.finished and not self.over and tracker is not None and tracker.settled:
            self.end()

    def closed_by_backend(self) -> None:
        leg = self.leg
        leg.close_received = True
        leg.deaf = True
        if self.over:
            leg.shut()  # the answer to the proxy's close
            return
        if not self.session.closing:
            self.outcome = Outcome.BROKEN
            self.fail("error", "the shadow backend closed the connection")
        else:
            self.end()

    def broke(self, what: str) -> None:
        """The shadow leg broke the protocol, sent too much, or was lost."""
        if self.over:
            return
        self.outcome = Outcome.BROKEN
        self.fail("error", what)

    def fail(self, reason: str, detail: str) -> None:
        if self.failed or self.over:
            return
        self.failed = True
        session = self.session
        session.proxy.shadows.drop(session.route, reason)
        if session.tracker is not None:
            session.tracker.shadow_lost(detail, perf_counter())
        self.end()

    def cancel(self) -> None:
        """Cut at shutdown, once the drain time is over."""
        if not self.over:
            self.session.proxy.shadows.drop(self.session.route, "shutdown")
            self.end()

    def end(self) -> None:
        """Stop: close the connection, account for the shadow, and, the session over,
        conclude its turns."""
        if self.over:
            return
        self.over = True
        self.backlog = None
        self.session.client.mirrors = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        leg = self.leg
        if leg.transport is not None and not leg.closed:
            leg.send_close(GOING_AWAY, b"")
            if leg.close_received:
                leg.shut()
            else:
                self._timer = asyncio.get_running_loop().call_later(_SHADOW_CLOSE_WAIT, leg.abort)
        session = self.session
        proxy = session.proxy
        proxy.shadows.report(session.route, self.backend, self.outcome not in _FAILURES)
        proxy.metrics.count_request(session.route, self.backend.value, "shadow", self.outcome)
        if self.finished:
            session.conclude()
        proxy.shadows.release(self)
