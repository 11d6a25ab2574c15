"""Shadow runs: the other backend on the same exchange, never in the primary's way (I/O).

The ``ShadowRunner`` owns every shadow task (strong references, so none is lost to the
garbage collector), a bound on how many run at once, a deadline for each, and an upstream
pool of its own, so a slow or hanging shadow backend can neither hold the primary's
connections nor delay it. At shutdown the shadows in flight get ``drain_seconds`` and are
then cancelled. A backend whose shadows keep failing (``breaker_failures`` in a row)
gets none for ``breaker_seconds``, then one probe: a hanging candidate costs the primary
nothing while it hangs. Whatever is not run or not finished is counted by reason in
``strangler_shadow_dropped_total`` (``breaker`` for those the breaker holds back).
Which exchanges are shadowed, and against which backend, is decided by the pure
functions at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from proxy.metrics import Metrics
from proxy.routing import Backend
from proxy.settings import RouteSettings, ShadowSettings
from proxy.upstream import UpstreamPool

log = logging.getLogger("strangler.shadow")


def shadow_backend(route: RouteSettings, serving: Backend) -> Backend:
    """The backend run in the shadow: the other one, or legacy again for an A/A baseline."""
    if route.shadow_target == "legacy":
        return Backend.LEGACY
    return Backend.CANDIDATE if serving is Backend.LEGACY else Backend.LEGACY


def shadow_refusal(
    route: RouteSettings, method: str, body_size: int, body_cap: int, draw: float
) -> str | None:
    """Why this exchange gets no shadow, or None to shadow it.

    ``draw`` is a uniform random number in [0, 1) for the route's sample rate; an
    exchange sampled out is not a dropped shadow and returns ``"sampled_out"``.
    """
    if route.shadow <= 0 or draw >= route.shadow:
        return "sampled_out"
    if method.upper() not in route.shadow_methods:
        return "method"
    if body_size > body_cap:
        return "body_too_large"
    return None


def session_shadow(
    route: RouteSettings, serving: Backend, draw: float, room: bool
) -> tuple[Backend | None, str | None]:
    """For a WebSocket session: the backend to shadow it on, or None and the reason
    counted as a drop (None when it is only sampled out). A session never waits for a
    shadow: when the runner has no ``room``, it goes unshadowed (``concurrency``)."""
    refusal = shadow_refusal(route, "GET", 0, 0, draw)
    if refusal is not None:
        return None, None if refusal == "sampled_out" else refusal
    if not room:
        return None, "concurrency"
    return shadow_backend(route, serving), None


class CallbackShadow(Protocol):
    """A shadow relayed by callbacks, without a task: the runner can only cut it."""

    def cancel(self) -> None: ...


class ShadowRunner:
    def __init__(
        self,
        settings: ShadowSettings,
        metrics: Metrics,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool = UpstreamPool(
            max_connections=settings.connections,
            connect_timeout=connect_timeout,
            read_timeout=min(read_timeout, settings.timeout),
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.callbacks: set[CallbackShadow] = set()  # shadows relayed without a task
        self._quiet: list[asyncio.Future[None]] = []
        self.closing = False
        self._failures: dict[tuple[str, Backend], int] = {}
        self._open_until: dict[tuple[str, Backend], float] = {}
        self._probing: set[tuple[str, Backend]] = set()

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    def drop(self, route: str, reason: str) -> None:
        self.metrics.count_dropped(route, reason)

    def has_room(self) -> bool:
        return not self.closing and self.running() < self.settings.max_concurrent

    def running(self) -> int:
        return len(self.tasks) + len(self.callbacks)

    def hold(self, shadow: CallbackShadow) -> None:
        """A shadow relayed by callbacks is running (it calls ``release`` when it ends)."""
        self.callbacks.add(shadow)

    def release(self, shadow: CallbackShadow) -> None:
        callbacks = self.callbacks
        callbacks.discard(shadow)
        if not callbacks and self._quiet:
            waiters, self._quiet = self._quiet, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def quiet(self) -> None:
        """Until no shadow relayed by callbacks runs."""
        while self.callbacks:
            waiter = asyncio.get_running_loop().create_future()
            self._quiet.append(waiter)
            await waiter

    async def settle(self) -> None:
        """Until every shadow running now, and any it starts, has ended."""
        while self.tasks or self.callbacks:
            if self.tasks:
                await asyncio.wait(set(self.tasks))
            await self.quiet()

    def adopt(self, route: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Own a shadow that the caller also ends itself (a WebSocket session's shadow)."""
        task = asyncio.create_task(self._guarded(route, work), name=f"shadow-{route}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def admits(self, route: str, backend: Backend) -> bool:
        """Whether the breaker lets a shadow on ``backend`` run now (counted if not)."""
        key = (route, backend)
        until = self._open_until.get(key)
        if until is None:
            return True
        if asyncio.get_running_loop().time() < until or key in self._probing:
            self.drop(route, "breaker")
            return False
        self._probing.add(key)  # half open: one probe at a time
        return True

    def report(self, route: str, backend: Backend, ok: bool) -> None:
        """How a shadow on ``backend`` went: failures in a row open the breaker."""
        limit = self.settings.breaker_failures
        if limit <= 0:
            return
        key = (route, backend)
        self._probing.discard(key)
        if ok:
            self._failures.pop(key, None)
            if self._open_until.pop(key, None) is not None:
                log.info("route %s: shadows on %s resume", route, backend)
            return
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if failures >= limit:
            pause = self.settings.breaker_seconds
            if key not in self._open_until:
                log.warning(
                    "route %s: %d shadows in a row failed on %s; pausing its shadows for %.1f s",
                    route,
                    failures,
                    backend,
                    pause,
                )
            self._open_until[key] = asyncio.get_running_loop().time() + pause

    def spawn(
        self, route: str, work: Coroutine[Any, Any, None], backend: Backend | None = None
    ) -> bool:
        """Run ``work`` as a shadow task, or drop it (counted) when there is no room
        or the breaker holds ``backend`` back."""
        if self.closing or self.running() >= self.settings.max_concurrent:
            work.close()
            self.drop(route, "shutdown" if self.closing else "concurrency")
            return False
        if backend is not None and not self.admits(route, backend):
            work.close()
            return False
        task = asyncio.create_task(self._guarded(route, work), name=f"shadow-{route}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _guarded(self, route: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            # A WebSocket session that ends cancels its own shadow: that is no drop.
            if self.closing:
                self.drop(route, "shutdown")
            raise
        except Exception:  # a shadow's failure is data, never the primary's problem
            log.exception("shadow on route %s failed", route)
            self.drop(route, "error")

    async def close(self) -> None:
        """Let shadows in flight finish within ``drain_seconds``, cancel the rest."""
        self.closing = True
        waiting: set[asyncio.Future[None]] = set(self.tasks)
        quiet = asyncio.ensure_future(self.quiet()) if self.callbacks else None
        if quiet is not None:
            waiting.add(quiet)
        if waiting:
            await asyncio.wait(waiting, timeout=self.settings.drain_seconds)
            if quiet is not None:
                quiet.cancel()
            for shadow in list(self.callbacks):
                shadow.cancel()
            pending = [task for task in self.tasks if not task.done()]
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.pool.close()
