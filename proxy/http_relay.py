"""Relay one HTTP exchange to the chosen backend and stream the answer back (I/O).

A request body that came whole with its head is sent with it (and can be replayed to
the shadow, or on a retry). One still arriving is streamed to the primary as it comes
(``_Upload``): a backend that takes it slowly stops the reading of the client, so an
upload costs the proxy a bounded buffer, not its size; a copy is kept for the shadow
only up to the shadow body cap (beyond it the shadow is dropped, the primary goes on).
A Content-Length over the limit is a 413 before any backend sees the request; a body
that passes the limit mid-way, breaks its framing or stalls past the body timeout gets
413, 400 or 408 (a cut once the response has started), and the upstream connection is
discarded so that the backend never takes a part for the whole. The response is relayed as raw bytes
(compressed bodies stay compressed) as the backend sends them, through the lean upstream
pool of ``proxy.upstream``, to the lean server of ``proxy.server``; ``write`` waits for
the client to drain, and the upstream reader pauses when its buffer is full, so a slow
reader holds back the backend instead of growing the proxy's memory. A client that goes
away cancels the handler, which closes the upstream exchange at once.

On a route with an experiment, a recorder decodes what the primary sends into events as
it passes, without holding any of it back; the shadow runs concurrently on its own pool
and the two are compared once both have ended. On a route that checks isolation, NDJSON
lines and SSE events are relayed whole, one by one, so that an event carrying another
user's id can be withheld; a JSON body with such an event is replaced by a 502.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine, Sequence
from time import perf_counter
from typing import Any, Final

import orjson

from adapters.events import Event
from adapters.framing import NdjsonFramer, SseFramer
from adapters.isolation import belongs_to
from proxy.context import Proxy
from proxy.experiment import RouteExperiment
from proxy.headers import SHADOW_HEADER, downstream_response_block, upstream_request_block
from proxy.metrics import Outcome
from proxy.observation import Observation, Recorder
from proxy.routing import UNROUTED, Backend, Route
from proxy.server import BadBody, BodyTimeout, BodyTooLarge, ClientGone, Request
from proxy.shadow import shadow_backend, shadow_refusal
from proxy.upstream import (
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

log = logging.getLogger("strangler.relay")

SHADOW_LINE: Final = f"{SHADOW_HEADER}: 1\r\n".encode()


def error_body(
    error: str, detail: str, backend: Backend, route: str
) -> tuple[list[tuple[str, str]], bytes]:
    """The headers and JSON body of an answer the proxy gives itself."""
    body = orjson.dumps(
        {"error": error, "detail": detail, "backend": backend.value, "route": route}
    )
    return [("Content-Type", "application/json"), ("X-Strangler-Backend", backend.value)], body


# A backend failure as its error body tells it: by the backend's role, whatever the
# exception said (an upstream error names the backend's host and port).
_FAILURES: Final = {
    "backend_unreachable": "cannot be reached",
    "backend_timeout": "did not answer in time",
    "backend_error": "failed to answer",
    "response_too_large": "answered with more than the proxy holds",
}


def failure_detail(error: str, backend: Backend) -> str:
    """The client's text for a backend failure: the role that failed, and how."""
    return f"the {backend.value} backend {_FAILURES.get(error, 'failed')}"


def respond_error(
    request: Request, status: int, error: str, detail: str, backend: Backend, route: str
) -> None:
    headers, body = error_body(error, detail, backend, route)
    request.respond(status, "", headers, body)


_SHADOW_FAILURES: Final = frozenset({Outcome.TIMEOUT, Outcome.UNREACHABLE, Outcome.BROKEN})


def outcome_of_status(status: int) -> Outcome:
    if status >= 500:
        return Outcome.SERVER_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.SUCCESS


class _Upload:
    """A request body on its way to the primary as it arrives (see ``_Exchange._streamed``).

    ``kept`` holds a copy for the shadow while the body is within ``cap`` bytes (None:
    no copy, or past the cap). ``error`` says why the client's body failed, if it did.
    """

    def __init__(self, request: Request, limit: int, cap: int) -> None:
        self.request = request
        self.limit = limit
        self.cap = cap
        self.kept: list[bytes] | None = [] if cap >= 0 else None
        self.kept_size = 0
        self.over_cap = False
        self.sent = 0
        self.whole = False
        self.shadowed = False  # its shadow has been started (or dropped)
        self.error: Exception | None = None

    @property
    def replayable(self) -> bool:
        """Whether the body can go again on another connection: nothing of it went yet,
        or all that went is in hand."""
        return self.sent == 0 or (self.kept is not None and self.kept_size == self.sent)

    async def send(self, conn: UpstreamConnection) -> None:
        """Stream the body to ``conn``, at the pace the backend takes it; on a retry, what
        went before goes again first. A client's failure cuts the connection."""
        try:
            if self.sent:
                assert self.kept is not None
                for piece in self.kept:
                    conn.send_body(piece)
                    if conn.body_paused:
                        await conn.drain_body()
            while True:
                data = await self.request.next_body(self.limit)
                if not data:
                    break
                # Counted before it is written: a write that fails has still used it up.
                self._keep(data)
                self.sent += len(data)
                conn.send_body(data)
                if conn.body_paused:
                    await conn.drain_body()
            conn.end_body()
            self.whole = True
        except (BodyTooLarge, BadBody, BodyTimeout, ClientGone) as error:
            self.error = error
            conn.cut(f"the client's request body failed: {type(error).__name__}")
        except UpstreamError:
            pass  # the connection failed: whoever awaits its answer hears of it

    def _keep(self, data: bytes) -> None:
        kept = self.kept
        if kept is None:
            return
        self.kept_size += len(data)
        if self.kept_size > self.cap:
            self.kept = None
            self.over_cap = True
        else:
            kept.append(data)


class _Exchange:
    """One relayed exchange: the primary, and the shadow's hand-off if there is one."""

    def __init__(
        self,
        request: Request,
        proxy: Proxy,
        route: Route | None,
        backend: Backend,
        user_id: str | None,
    ) -> None:
        self.request = request
        self.proxy = proxy
        self.route = route
        self.label = route.name if route is not None else UNROUTED
        self.backend = backend
        self.user_id = user_id
        self.started = perf_counter()
        self.experiment: RouteExperiment | None = (
            proxy.experiments.get(route.name) if route is not None else None
        )
        self.user_field = route.user_field if route is not None and user_id else None
        self.recorder: Recorder | None = None
        self.primary_done: asyncio.Future[Observation] | None = None
        self.first_at: float | None = None  # when the first body bytes came
        self.upload: _Upload | None = None  # a body streamed as it arrives

    async def run(self) -> None:
        proxy = self.proxy
        request = self.request
        outcome = Outcome.CLIENT_CLOSED
        try:
            limit = proxy.max_body_bytes
            try:
                request.check_body(limit)
            except (BodyTooLarge, BadBody) as error:
                outcome = self._refuse_body(error)
                return
            block = self._upstream_block()
            body = request.body_at_hand(limit)
            if body is None:
                outcome = await self._streamed(block)
                return
            if self.experiment is not None and self.experiment.watches:
                self._start_observing(block, body)
            outcome = await self._primary(block, body)
        except ClientGone:
            outcome = Outcome.CLIENT_CLOSED
        finally:
            self._account(outcome)

    def _refuse_body(self, error: Exception) -> Outcome:
        """The client's body failed: the answer it earns, or a cut once the response
        has started (a client that went away gets nothing)."""
        request, proxy = self.request, self.proxy
        if isinstance(error, ClientGone):
            return Outcome.CLIENT_CLOSED
        if isinstance(error, BodyTooLarge):
            status, code, outcome = 413, "request_too_large", Outcome.TOO_LARGE
            detail = f"request body over {proxy.max_body_bytes} bytes"
        elif isinstance(error, BodyTimeout):
            status, code, outcome = 408, "request_timeout", Outcome.CLIENT_ERROR
            detail = f"no request body bytes for {proxy.settings.server.body_timeout:g} s"
        else:
            status, code, outcome = 400, "bad_request", Outcome.CLIENT_ERROR
            detail = str(error)
        if request.started:
            request.abort()
        else:
            respond_error(request, status, code, detail, self.backend, self.label)
        return outcome

    def _account(self, outcome: Outcome) -> None:
        """The exchange is over: count it, with its times, and conclude what it observed."""
        started, first = self.started, self.first_at
        timed = outcome is not Outcome.CLIENT_CLOSED and outcome is not Outcome.TOO_LARGE
        self.proxy.metrics.exchange(
            self.label,
            self.backend,
            "primary",
            outcome,
            perf_counter() - started if timed else None,
            None if first is None else first - started,
        )
        self._finish_observing(outcome)

    def _upstream_block(self) -> bytes:
        request = self.request
        return upstream_request_block(
            request.raw_headers, client_ip=request.remote, proto=request.scheme, host=request.host
        )

    # --- observation and shadow -------------------------------------------------------

    def _start_observing(self, block: bytes, body: bytes | None) -> bool:
        """Record the primary if the route compares or checks it, and start its shadow
        if it gets one. With ``body`` None (still arriving) the shadow waits for the
        whole body (``_shadow_whole``): True if it is to run then."""
        route, experiment = self.route, self.experiment
        assert route is not None and experiment is not None
        settings = route.settings
        request = self.request
        refusal = shadow_refusal(
            settings,
            request.method,
            len(body) if body is not None else max(request.length, 0),
            self.proxy.settings.shadow.max_body_bytes,
            random.random(),
        )
        shadows = self.proxy.shadows
        target = shadow_backend(settings, self.backend)
        if refusal is None and not shadows.has_room():
            refusal = "shutdown" if shadows.closing else "concurrency"
        # The breaker is asked when the shadow starts: a probe it grants must run.
        shadowed = refusal is None and (body is None or shadows.admits(route.name, target))
        if refusal is not None and refusal != "sampled_out":
            shadows.drop(route.name, refusal)
        if not (shadowed or experiment.contract is not None or self.user_field is not None):
            return False
        observation = Observation(self.backend, "primary", self.started)
        limits = self.proxy.settings.shadow
        recorder = self.recorder = Recorder(
            observation,
            route.protocol,
            settings.event_type_field,
            limits.max_recorded_events,
            limits.max_recorded_bytes,
        )
        # Isolation withholds events by what the recorder decodes, past its limit too.
        recorder.decodes_past_limit = self.user_field is not None
        if not shadowed:
            return False
        self.primary_done = asyncio.get_running_loop().create_future()
        if body is None:
            return True
        self._launch_shadow(block, body)
        return False

    def _shadow_whole(self, block: bytes, upload: _Upload) -> None:
        """The streamed body has come whole: its shadow starts, or is dropped (counted)."""
        route = self.route
        assert route is not None
        shadows = self.proxy.shadows
        kept = upload.kept
        if kept is None:
            shadows.drop(route.name, "body_too_large")
            self.primary_done = None  # the primary is concluded alone
            return
        if not shadows.has_room():
            shadows.drop(route.name, "shutdown" if shadows.closing else "concurrency")
            self.primary_done = None
            return
        if not shadows.admits(route.name, shadow_backend(route.settings, self.backend)):
            self.primary_done = None
            return
        self._launch_shadow(block, kept[0] if len(kept) == 1 else b"".join(kept))

    def _launch_shadow(self, block: bytes, body: bytes) -> None:
        route, experiment, done = self.route, self.experiment, self.primary_done
        assert route is not None and experiment is not None and done is not None
        request = self.request
        shadow = _Shadow(
            self.proxy,
            route,
            experiment,
            shadow_backend(route.settings, self.backend),
            done,
            (request.method, request.wire_target, block, body),
        )
        if self.user_field is not None:
            shadow.user_id = self.user_id
            shadow.recorder.decodes_past_limit = True  # its leaks are counted throughout
        if not shadow.start() and not self.proxy.shadows.spawn(route.name, shadow.run()):
            self.primary_done = None

    def _finish_observing(self, outcome: Outcome) -> None:
        recorder, experiment = self.recorder, self.experiment
        if recorder is None or experiment is None:
            return
        observation = recorder.finish(perf_counter())
        observation.cancelled = outcome is Outcome.CLIENT_CLOSED
        if outcome in (Outcome.UNREACHABLE, Outcome.TIMEOUT, Outcome.BROKEN):
            observation.error = observation.error or outcome.value
            observation.timed_out = outcome is Outcome.TIMEOUT
        if self.primary_done is not None:
            if not self.primary_done.done():
                self.primary_done.set_result(observation)
        else:
            experiment.conclude(observation, None)

    def _withheld(self, events: Sequence[Event]) -> bool:
        """Whether these events carry another user's id (counted once per event)."""
        assert self.user_field is not None and self.user_id is not None
        bad = [e for e in events if not belongs_to(e, self.user_field, self.user_id)]
        if bad:
            self.proxy.metrics.isolation_violations.labels(self.label, self.backend.value).inc(
                len(bad)
            )
            log.warning(
                "route %s: withheld %d event(s) of another user from %s",
                self.label,
                len(bad),
                self.backend.value,
            )
        return bool(bad)

    # --- the primary exchange ---------------------------------------------------------

    async def _primary(self, block: bytes, body: bytes) -> Outcome:
        proxy = self.proxy
        request = self.request
        try:
            upstream = await proxy.pool.request(
                proxy.backend_urls[self.backend], request.method, request.wire_target, block, body
            )
        except UpstreamError as error:
            return self._upstream_failed(error)
        except ValueError as refused:
            # A request line the upstream client refuses to send: the request itself
            # is malformed.
            respond_error(request, 400, "bad_request", str(refused), self.backend, self.label)
            return Outcome.CLIENT_ERROR
        return await self._relay(upstream)

    def _upstream_failed(self, error: UpstreamError) -> Outcome:
        """No response from the backend: 502 or 504."""
        if isinstance(error, UpstreamUnreachable):
            return self._fail(502, "backend_unreachable", str(error), Outcome.UNREACHABLE)
        if isinstance(error, UpstreamTimeout):
            detail = str(error) or "no response within the backend timeout"
            return self._fail(504, "backend_timeout", detail, Outcome.TIMEOUT)
        return self._fail(502, "backend_error", str(error), Outcome.BROKEN)

    async def _streamed(self, block: bytes) -> Outcome:
        """The primary exchange for a body still arriving: the head goes at once, the
        body as it comes (``_Upload``), the response is relayed as usual. A connection
        found closed by the backend (the keep-alive race) is tried again on a new one
        only if the body can be replayed."""
        proxy, request = self.proxy, self.request
        shadowing = False
        if self.experiment is not None and self.experiment.watches:
            shadowing = self._start_observing(block, None)
        upload = self.upload = _Upload(
            request, proxy.max_body_bytes, proxy.settings.shadow.max_body_bytes if shadowing else -1
        )
        origin = proxy.backend_urls[self.backend]
        loop = asyncio.get_running_loop()
        sending: asyncio.Task[None] | None = None
        try:
            fresh = False
            while True:
                try:
                    conn = await proxy.pool.open(
                        origin,
                        request.method,
                        request.wire_target,
                        block,
                        request.length,
                        fresh=fresh,
                    )
                except UpstreamError as error:
                    return self._upstream_failed(error)
                except ValueError as refused:
                    respond_error(
                        request, 400, "bad_request", str(refused), self.backend, self.label
                    )
                    return Outcome.CLIENT_ERROR
                sending = loop.create_task(self._send(conn, upload, block, shadowing))
                try:
                    upstream = await conn.response_head()
                    break
                except UpstreamError as error:
                    if upload.error is None and not fresh and conn.retryable and upload.replayable:
                        sending.cancel()
                        await asyncio.wait((sending,))
                        fresh = True
                        continue
                    return self._upstream_failed(error)
            outcome = await self._relay(upstream)
            if upload.error is not None and outcome is Outcome.BROKEN:
                # The client's body failed while the response was under way (cut).
                return self._refuse_body(upload.error)
            return outcome
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
            if shadowing and not upload.whole:
                # The body never came whole: no shadow; the primary is concluded alone.
                if upload.over_cap:
                    proxy.shadows.drop(self.label, "body_too_large")
                self.primary_done = None

    async def _send(
        self, conn: UpstreamConnection, upload: _Upload, block: bytes, shadowing: bool
    ) -> None:
        await upload.send(conn)
        if shadowing and upload.whole and not upload.shadowed:
            upload.shadowed = True  # once, though a retry sends the body again
            self._shadow_whole(block, upload)

    async def _relay(self, upstream: UpstreamResponse) -> Outcome:
        """Relay the primary's response to the client."""
        backend, label = self.backend, self.label
        request = self.request
        recorder = self.recorder
        if recorder is not None:
            recorder.begin(upstream.status)
        outcome = outcome_of_status(upstream.status)
        block, length = downstream_response_block(upstream.raw_headers, backend)
        protocol = self.route.protocol if self.route is not None else "json"
        framed = self.user_field is not None and protocol in ("ndjson", "sse")
        if framed:
            length = None  # withheld events shorten the body: its length comes at the end
        async with upstream:
            if upstream.complete or (self.user_field is not None and protocol == "json"):
                # The whole body came with the head (or must be seen whole before it may
                # go out): answer in one write, nothing to stream.
                # Held whole, so bounded: an endless or huge answer must not grow the
                # proxy. The bound of a message held whole for the same isolation check
                # on a WebSocket route (one that came whole is already in hand).
                limit = -1 if upstream.complete else self.proxy.max_message_bytes
                parts: list[bytes] = []
                size = 0
                try:
                    async for chunk in upstream:
                        size += len(chunk)
                        if size > limit >= 0:
                            detail = f"an answer held whole passed {limit} bytes"
                            return self._fail(502, "response_too_large", detail, Outcome.TOO_LARGE)
                        parts.append(chunk)
                except UpstreamError as broken:
                    return self._fail(502, "backend_error", str(broken), Outcome.BROKEN)
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                now = perf_counter()
                self.first_at = now
                if framed:
                    whole = NdjsonFramer() if protocol == "ndjson" else SseFramer()
                    frames = whole.feed(payload) + whole.close()
                    payload = b"".join(self._kept(frames, now))
                elif recorder is not None:
                    events = recorder.feed_last(payload, now)
                    if self.user_field is not None and self._withheld(events):
                        respond_error(
                            request,
                            502,
                            "isolation_violation",
                            "the backend's answer carried another user's data",
                            backend,
                            label,
                        )
                        return Outcome.BROKEN
                request.respond_block(upstream.status, upstream.reason, block, payload, length)
                return outcome
            first = await upstream.read_chunk() if upstream.buffered else b""
            now = perf_counter()
            if first:
                self.first_at = now
            framer = (NdjsonFramer() if protocol == "ndjson" else SseFramer()) if framed else None
            if framer is not None:
                request.start_block(
                    upstream.status,
                    upstream.reason,
                    block,
                    length,
                    b"".join(self._kept(framer.feed(first), now)),
                )
            else:
                if recorder is not None and first:
                    recorder.feed(first, now)
                request.start_block(upstream.status, upstream.reason, block, length, first)
            try:
                async for chunk in upstream:
                    now = perf_counter()
                    if self.first_at is None:
                        self.first_at = now
                    if framer is not None:
                        await self._relay_frames(framer.feed(chunk), now)
                        continue
                    if recorder is not None:
                        recorder.feed(chunk, now)
                    await request.write(chunk)
                if framer is not None:
                    await self._relay_frames(framer.close(), perf_counter())
            except UpstreamError as broken:
                # The status line is gone already: the only honest signal left is to cut
                # the client's connection so it cannot mistake a truncated body for whole.
                log.warning(
                    "backend %s failed mid-response on route %s: %s", backend, label, broken
                )
                request.abort()
                if recorder is not None:
                    recorder.observation.error = str(broken)
                return Outcome.BROKEN
            if self.first_at is None:
                self.first_at = perf_counter()
            await request.finish()
        return outcome

    def _fail(self, status: int, error: str, detail: str, outcome: Outcome) -> Outcome:
        upload = self.upload
        if upload is not None and upload.error is not None:
            # The exchange failed because the client's body did (the upload cut it).
            return self._refuse_body(upload.error)
        # The log keeps what happened (the backend's address with it); the client is
        # told which role failed, never where the backend lives.
        log.warning("route %s backend %s: %s (%s)", self.label, self.backend, error, detail)
        told = failure_detail(error, self.backend)
        respond_error(self.request, status, error, told, self.backend, self.label)
        return outcome

    def _kept(self, frames: list[bytes], now: float) -> list[bytes]:
        """The frames that may reach the client: each is recorded, another user's withheld."""
        recorder = self.recorder
        assert recorder is not None
        kept = []
        for frame in frames:
            events = recorder.feed(frame, now)
            if events and self._withheld(events):
                continue
            kept.append(frame)
        return kept

    async def _relay_frames(self, frames: list[bytes], now: float) -> None:
        for frame in self._kept(frames, now):
            await self.request.write(frame)


def relay_http(
    request: Request,
    proxy: Proxy,
    route: Route | None,
    backend: Backend,
    user_id: str | None = None,
) -> Coroutine[Any, Any, None] | None:
    """Relay one exchange: None when it runs by callbacks (``_Direct``), else the
    exchange's coroutine, to be awaited (no frame in between on the per-request path)."""
    body = request.body_at_hand(proxy.max_body_bytes)
    exchange = _Direct(request, proxy, route, backend, user_id)
    # Isolation withholds events frame by frame: that stays with the task.
    if body is not None and exchange.user_field is None and exchange.start(body):
        return None
    return exchange.run()


class _Direct(_Exchange):
    """An exchange relayed by callbacks on a warm upstream connection: no task and no
    future for the primary, the classic proxy loop. The request body is in hand; the
    response goes out as the backend sends it, in one write if it came whole, and a
    client that falls behind stops the reading of the upstream connection. On a route
    that shadows or checks a contract, a recorder decodes what passes and the shadow runs
    beside it, as with ``_Exchange``; a route that checks isolation, an exchange with no
    idle connection at hand, and a retry after the keep-alive race go the way of
    ``_Exchange``'s ``run`` (which this object also has)."""

    response: UpstreamResponse | None = None
    connection: UpstreamConnection | None = None

    def start(self, body: bytes) -> bool:
        request = self.request
        block = self._upstream_block()
        try:
            connection = self.proxy.pool.start(
                self.proxy.backend_urls[self.backend],
                request.method,
                request.wire_target,
                block,
                body,
                self,
            )
        except ValueError:
            return False  # run() answers it (400)
        if connection is None:
            return False
        self.connection = connection
        request.on_events(self)
        if self.experiment is not None and self.experiment.watches:
            self._start_observing(block, body)
        return True

    def upstream_ready(self, connection: UpstreamConnection) -> None:
        request, backend, label = self.request, self.backend, self.label
        response = connection.response
        recorder = self.recorder
        if response is None:
            error = connection.error
            if error is None:
                return
            # Whatever happens next, this exchange is over for the connection: it hears
            # no more of it (its closing would report the failure a second time).
            again = connection.retryable
            connection.abandon()
            if again:
                # The keep-alive race: the exchange goes again, on a new connection, and
                # what was observed of this try is set aside (compared as ignored).
                self.connection = None
                self.request.on_events(None)
                self._finish_observing(Outcome.CLIENT_CLOSED)
                retry = _Exchange(request, self.proxy, self.route, backend, None)
                retry.experiment = None
                request.run(retry.run())
                return
            if isinstance(error, UpstreamUnreachable):
                self._direct_fail(502, "backend_unreachable", str(error), Outcome.UNREACHABLE)
            elif isinstance(error, UpstreamTimeout):
                detail = str(error) or "no response within the backend timeout"
                self._direct_fail(504, "backend_timeout", detail, Outcome.TIMEOUT)
            else:
                self._direct_fail(502, "backend_error", str(error), Outcome.BROKEN)
            return
        try:
            data = response.take()
        except UpstreamError as exc:
            response.close()
            if self.response is None:
                self._direct_fail(502, "backend_error", str(exc), Outcome.BROKEN)
            else:
                log.warning("backend %s failed mid-response on route %s: %s", backend, label, exc)
                request.abort()
                if recorder is not None:
                    recorder.observation.error = str(exc)
                self._done(Outcome.BROKEN)
            return
        now = perf_counter()
        if self.response is None:
            self.response = response
            if recorder is not None:
                recorder.begin(response.status)
            block, length = downstream_response_block(response.raw_headers, backend)
            if response.complete:
                self.first_at = now
                if recorder is not None:
                    recorder.feed(data, now)
                request.respond_block(response.status, response.reason, block, data, length)
                response.release()
                self._done(outcome_of_status(response.status))
                return
            request.start_block(response.status, response.reason, block, length, data)
        elif data:
            request.send(data)
        if data:
            if recorder is not None:
                recorder.feed(data, now)
            if self.first_at is None:
                self.first_at = now
        if response.complete:
            response.release()
            if self.first_at is None:
                self.first_at = now
            self._done(outcome_of_status(response.status) if request.end() else Outcome.BROKEN)
        elif request.write_paused:
            connection.hold()

    def client_writable(self) -> None:
        if self.connection is not None:
            self.connection.unhold()

    def client_lost(self) -> None:
        if self.connection is not None:
            self.connection.abandon()
        self._done(Outcome.CLIENT_CLOSED)

    def _direct_fail(self, status: int, error: str, detail: str, outcome: Outcome) -> None:
        self._done(self._fail(status, error, detail, outcome))

    def _done(self, outcome: Outcome) -> None:
        self.connection = None
        self.request.on_events(None)
        self._account(outcome)


class _Shadow:
    """A shadow exchange: the same request on the other backend, marked, then compared
    once the primary has ended too.

    On an idle connection of the shadow pool it is relayed by callbacks (``start``): no
    task and no future of its own, as ``_Direct`` for the primary, with a timer for the
    deadline. Without one, or after the keep-alive race, it runs as a task (``run``).
    With ``user_id`` (the route checks isolation), its events that carry another user's
    id are counted against the shadow backend: nothing of it reaches the client anyway,
    but a candidate leaking in the shadow must show before it ever serves.
    """

    user_id: str | None = None
    connection: UpstreamConnection | None = None
    timer: asyncio.TimerHandle | None = None

    def __init__(
        self,
        proxy: Proxy,
        route: Route,
        experiment: RouteExperiment,
        backend: Backend,
        primary_done: asyncio.Future[Observation],
        request: tuple[str, str | bytes, bytes, bytes],
    ) -> None:
        self.proxy = proxy
        self.route = route
        self.experiment = experiment
        self.backend = backend
        self.primary_done = primary_done
        self.request = request  # method, target, header block, body
        self.started = perf_counter()
        self.observation = Observation(backend, "shadow", self.started)
        limits = proxy.settings.shadow
        self.recorder = Recorder(
            self.observation,
            route.protocol,
            route.settings.event_type_field,
            limits.max_recorded_events,
            limits.max_recorded_bytes,
        )
        self.leaked = 0  # events carrying another user's id (with ``user_id``)
        self.outcome = Outcome.SUCCESS
        self.responded = False

    def _deadline(self) -> float:
        # A little jitter keeps shadows that started together from timing out together.
        return self.proxy.shadows.timeout * random.uniform(0.9, 1.1)

    def _begin(self, status: int) -> None:
        self.responded = True
        self.recorder.begin(status)
        self.outcome = outcome_of_status(status)

    def _timed_out(self) -> Outcome:
        self.observation.timed_out = True
        self.proxy.shadows.drop(self.route.name, "timeout")
        return Outcome.TIMEOUT

    def _failed(self, error: UpstreamError) -> Outcome:
        if isinstance(error, UpstreamTimeout):
            # The pool's own timeouts: no slot, or no answer, in time.
            return self._timed_out()
        self.observation.error = str(error)
        unreachable = isinstance(error, UpstreamUnreachable)
        self.proxy.shadows.drop(self.route.name, "unreachable" if unreachable else "error")
        return Outcome.UNREACHABLE if unreachable else Outcome.BROKEN

    def _record(self, outcome: Outcome) -> None:
        """The shadow exchange is over: its count and times, the breaker, leaks."""
        proxy, label, backend = self.proxy, self.route.name, self.backend
        observation = self.observation
        finished = perf_counter()
        self._count_leaks(self.recorder.close())
        self.recorder.finish(finished)
        proxy.shadows.report(label, backend, outcome not in _SHADOW_FAILURES)
        if self.leaked:
            proxy.metrics.isolation_violations.labels(label, backend.value).inc(self.leaked)
        proxy.metrics.exchange(
            label, backend, "shadow", outcome, finished - self.started, observation.first_event
        )

    def _feed(self, data: bytes) -> None:
        """Record what the shadow sent; with ``user_id``, count another user's events as
        they pass (the recorder may let go of them past its limit)."""
        self._count_leaks(self.recorder.feed(data, perf_counter()))

    def _count_leaks(self, events: list[Event]) -> None:
        user_field, user_id = self.route.user_field, self.user_id
        if events and user_id is not None and user_field is not None:
            self.leaked += sum(1 for e in events if not belongs_to(e, user_field, user_id))

    # --- as a task --------------------------------------------------------------------

    async def run(self) -> None:
        method, target, block, body = self.request
        shadows = self.proxy.shadows
        try:
            async with asyncio.timeout(self._deadline()):
                upstream = await shadows.pool.request(
                    self.proxy.backend_urls[self.backend],
                    method,
                    target,
                    block + SHADOW_LINE,
                    body,
                )
                self._begin(upstream.status)
                async with upstream:
                    async for chunk in upstream:
                        self._feed(chunk)
            outcome = self.outcome
        except TimeoutError:
            outcome = self._timed_out()
        except UpstreamError as error:
            outcome = self._failed(error)
        self._record(outcome)
        primary = await self.primary_done
        self.experiment.conclude(primary, self.observation)

    # --- by callbacks -----------------------------------------------------------------

    def start(self) -> bool:
        """Start on an idle connection; False (nothing sent) if there is none."""
        method, target, block, body = self.request
        proxy = self.proxy
        shadows = proxy.shadows
        try:
            connection = shadows.pool.start(
                proxy.backend_urls[self.backend], method, target, block + SHADOW_LINE, body, self
            )
        except ValueError:
            return False  # the task path reports it
        if connection is None:
            return False
        self.connection = connection
        self.timer = asyncio.get_running_loop().call_later(self._deadline(), self._expire)
        shadows.hold(self)
        return True

    def upstream_ready(self, connection: UpstreamConnection) -> None:
        response = connection.response
        if response is None:
            error = connection.error
            if error is None:
                return
            connection.abandon()
            self.connection = None
            if connection.retryable:
                # The keep-alive race: again, on a new connection, as a task.
                self._stop()
                shadows = self.proxy.shadows
                shadows.release(self)
                shadows.spawn(self.route.name, self.run())
                return
            self._finish(self._failed(error))
            return
        try:
            data = response.take()
        except UpstreamError as broken:
            response.close()
            self.connection = None
            self._finish(self._failed(broken))
            return
        if not self.responded:
            self._begin(response.status)
        if data:
            self._feed(data)
        if response.complete:
            response.release()
            self.connection = None
            self._finish(self.outcome)

    def _expire(self) -> None:
        self.timer = None
        if self.connection is not None:
            self.connection.abandon()
            self.connection = None
        self._finish(self._timed_out())

    def cancel(self) -> None:
        """Shutdown past the drain deadline: no comparison, counted as such."""
        self._stop()
        if self.connection is not None:
            self.connection.abandon()
            self.connection = None
        self.primary_done.remove_done_callback(self._conclude)
        shadows = self.proxy.shadows
        shadows.drop(self.route.name, "shutdown")
        shadows.release(self)

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _finish(self, outcome: Outcome) -> None:
        self._stop()
        self._record(outcome)
        done = self.primary_done
        if done.done():
            self._conclude(done)
        else:
            done.add_done_callback(self._conclude)

    def _conclude(self, done: asyncio.Future[Observation]) -> None:
        # Running until compared, as a shadow task does: whoever waits for the shadows
        # to settle also waits for their comparisons.
        self.proxy.shadows.release(self)
        if done.cancelled():
            return
        try:
            self.experiment.conclude(done.result(), self.observation)
        except Exception:  # a shadow's failure is data, never the primary's problem
            log.exception("shadow on route %s failed", self.route.name)
