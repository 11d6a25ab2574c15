"""Assembly and life cycle of a running proxy: listeners, flags, upstream pool (I/O).

``ProxyServer`` binds the proxy and admin listeners, loads the flags (the proxy is
not ready before), and on ``stop`` drains: it stops accepting, reports not ready,
closes WebSocket sessions with 1001, lets HTTP exchanges in flight finish within
``server.shutdown_grace``, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from types import TracebackType

from aiohttp import web
from prometheus_client import CollectorRegistry

from flags.file import FileFlagProvider
from flags.provider import FlagProvider
from flags.unleash import UnleashFlagProvider
from proxy import __version__, build
from proxy.admin import build_admin_app, refresh_rollout_gauges
from proxy.context import Proxy
from proxy.dispatch import build_handler
from proxy.divergence_store import DivergenceStore
from proxy.experiment import RouteExperiment
from proxy.metrics import Metrics
from proxy.routing import Backend, RouteTable
from proxy.server import HttpServer
from proxy.settings import FlagSettings, Settings
from proxy.shadow import ShadowRunner
from proxy.upstream import UpstreamPool
from proxy.websocket_relay import close_all

log = logging.getLogger("strangler")


def build_flag_provider(
    flags: FlagSettings, metrics: Metrics | None = None, fallback: bytes | None = None
) -> FlagProvider:
    """The provider named by ``flags.provider``, counting refused documents in ``metrics``.

    ``fallback``: the last good flags (or bootstrap) file of the proxy a worker serves
    in, for a file found unsound when the worker starts.
    """
    static_context = {"environment": flags.environment, "appName": flags.app_name}
    on_invalid = None if metrics is None else metrics.flags_invalid.inc
    on_loaded = None if metrics is None else metrics.flags_loaded.set
    if flags.provider == "unleash":
        assert flags.url is not None and flags.client_token is not None
        return UnleashFlagProvider(
            url=flags.url,
            client_token=flags.client_token.get_secret_value(),
            app_name=flags.app_name,
            environment=flags.environment,
            project=flags.project,
            refresh_interval=flags.refresh_interval,
            bootstrap_file=flags.file,
            static_context=static_context,
            on_invalid=on_invalid,
            on_loaded=on_loaded,
            fallback=fallback,
        )
    assert flags.file is not None
    return FileFlagProvider(
        flags.file,
        poll_interval=flags.poll_interval,
        static_context=static_context,
        on_invalid=on_invalid,
        on_loaded=on_loaded,
        fallback=fallback,
    )


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), backlog=1024)
    sock.setblocking(False)
    return sock


class ProxyServer:
    """A proxy and its admin listener, started and stopped as one.

    Given a listening socket its supervisor made (``listen_fd``) it is a worker
    process: it serves on that socket (the supervisor keeps it open, so connections wait
    in its backlog while a worker that died is started again) and has no admin listener:
    the supervisor serves it, with the metrics of every worker (see ``proxy.workers``).
    Without one it serves in-process, on its own listeners (the demo, the tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        flags: FlagProvider | None = None,
        listen_fd: int | None = None,
        flags_fallback: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.worker = listen_fd is not None
        self.listen_fd = listen_fd
        self._gauges: asyncio.Task[None] | None = None
        self.metrics = Metrics(registry)
        self.flags = (
            flags
            if flags is not None
            else build_flag_provider(settings.flags, self.metrics, flags_fallback)
        )
        self.store: DivergenceStore | None = (
            DivergenceStore(
                settings.divergences.path,
                max_rows=settings.divergences.max_rows,
                redact=settings.divergences.redact,
            )
            if any(route.shadow > 0 for route in settings.routes)
            else None
        )
        self.proxy: Proxy | None = None
        self._runners: list[web.BaseRunner] = []
        self._http: HttpServer | None = None
        self.proxy_port = 0
        self.admin_port = 0

    @property
    def proxy_url(self) -> str:
        return f"http://{self.settings.server.host}:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.settings.admin.host}:{self.admin_port}"

    async def start(self) -> None:
        server = self.settings.server
        if self.store is not None:
            await self.store.start()
        self.proxy = proxy = Proxy(
            settings=self.settings,
            routes=RouteTable(self.settings.routes),
            flags=self.flags,
            metrics=self.metrics,
            pool=UpstreamPool(
                max_connections=server.upstream_connections,
                connect_timeout=server.connect_timeout,
                read_timeout=server.read_timeout,
            ),
            backend_urls={
                Backend.LEGACY: self.settings.backends.legacy,
                Backend.CANDIDATE: self.settings.backends.candidate,
            },
            shadows=ShadowRunner(
                self.settings.shadow,
                self.metrics,
                connect_timeout=server.connect_timeout,
                read_timeout=server.read_timeout,
            ),
            experiments={},
            store=self.store,
        )
        for route in proxy.routes.routes:
            proxy.experiments[route.name] = RouteExperiment(route, self.metrics, self.store)
        if not self.worker:
            # Admin first: /healthz answers and /readyz says "not ready" while flags load.
            admin_sock = _listen(self.settings.admin.host, self.settings.admin.port)
            self.admin_port = admin_sock.getsockname()[1]
            admin = web.AppRunner(
                build_admin_app(proxy),
                handler_cancellation=True,
                shutdown_timeout=1.0,
                access_log=None,
            )
            await self._serve(admin, admin_sock)
        await self.flags.start()
        if self.worker:
            self._gauges = asyncio.create_task(self._refresh_gauges(proxy))
        if self.listen_fd is not None:
            proxy_sock = socket.socket(fileno=self.listen_fd)
            proxy_sock.setblocking(False)
        else:
            proxy_sock = _listen(server.host, server.port)
        self.proxy_port = proxy_sock.getsockname()[1]
        self._http = HttpServer(
            build_handler(proxy),
            keepalive_timeout=server.keepalive_timeout,
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            key_header=self.settings.identity.header,
        )
        await self._http.start(proxy_sock)
        if self.worker:
            log.info("worker (pid %d) serving on %s", os.getpid(), self.proxy_url)
            return
        log.info(
            "strangler %s (%s) listening on %s (admin %s), legacy %s, candidate %s, flags %s",
            __version__,
            build(),
            self.proxy_url,
            self.admin_url,
            self.settings.backends.legacy,
            self.settings.backends.candidate,
            self.flags.name,
        )

    async def _refresh_gauges(self, proxy: Proxy) -> None:
        # Without an admin listener of its own, a worker keeps its gauges current, and
        # its batched observations flushed, for the supervisor's scrapes. Once a second:
        # a flush writes each value to its shared file, and Prometheus scrapes every few
        # seconds at the most.
        while True:
            refresh_rollout_gauges(proxy)
            proxy.metrics.flush()
            await asyncio.sleep(1.0)

    async def _serve(self, runner: web.BaseRunner, sock: socket.socket) -> None:
        await runner.setup()
        await web.SockSite(runner, sock, backlog=1024).start()
        self._runners.append(runner)

    async def stop(self) -> None:
        proxy = self.proxy
        if proxy is not None:
            proxy.draining = True
        # Proxy listener first, admin last so /readyz says why. Stop accepting, close
        # WebSocket sessions with 1001 (new upgrades are refused while draining), then
        # give HTTP exchanges in flight their grace period.
        if self._http is not None:
            self._http.stop_accepting()
            if proxy is not None:
                await close_all(proxy)
            await self._http.shutdown(self.settings.server.shutdown_grace)
            self._http = None
        for runner in reversed(self._runners):
            for site in list(runner.sites):
                await site.stop()
            await runner.cleanup()
        self._runners.clear()
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
        await self.flags.close()
        if proxy is not None:
            await proxy.shadows.close()
            await proxy.pool.close()
        if self.store is not None:
            await self.store.close()
        self.metrics.flush()
        log.info("strangler stopped")

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(
    settings: Settings,
    *,
    listen_fd: int | None = None,
    on_ready: Callable[[], None] | None = None,
    flags_fallback: bytes | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain and return the exit status.

    ``on_ready`` is called once the proxy serves (a worker tells its supervisor).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = ProxyServer(settings, listen_fd=listen_fd, flags_fallback=flags_fallback)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    # Everything loaded so far lives as long as the process: out of the collector's
    # sight, a full collection walks only what serving creates, not every module and
    # class of the dependencies (a pause that showed in the shadowed runs' p99).
    gc.collect()
    gc.freeze()
    if on_ready is not None:
        on_ready()
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", settings.server.shutdown_grace)
    await server.stop()
    return 0
