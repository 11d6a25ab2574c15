"""Several worker processes on one port, and the supervisor that owns them (I/O).

With ``server.workers`` above 1, ``strangler run`` becomes a supervisor. It reserves the
proxy port, starts the workers (``strangler worker``), which each listen on it with
SO_REUSEPORT so the kernel spreads connections across them, and serves the admin
listener itself: ``/readyz`` is ready once every worker has said so, and ``/metrics``
adds up the workers' values through prometheus_client's multiprocess mode. A worker
that dies is started again; SIGTERM is passed on to every worker, each drains as a
single proxy does, and the supervisor exits 0 once all have exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from proxy import __version__, build
from proxy.admin import token_guard
from proxy.divergence_store import DivergenceStore, add_divergence_routes
from proxy.settings import Settings

log = logging.getLogger("strangler.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY = 1.0


@dataclass(eq=False)
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    ready_task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, settings: Settings, config: Path) -> None:
        self.settings = settings
        self.config = config
        self.workers = [Worker(i) for i in range(settings.server.workers)]
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="strangler-metrics-"))
        self.draining = False
        self.port = 0
        self.admin_port = 0
        self._reservation: socket.socket | None = None
        self._admin: web.AppRunner | None = None
        self._watchers: list[asyncio.Task[None]] = []
        # The workers write divergences to the shared SQLite file; the supervisor reads it.
        divergences = settings.divergences
        self.store = (
            DivergenceStore(divergences.path, max_rows=divergences.max_rows)
            if any(route.shadow > 0 for route in settings.routes)
            else None
        )

    @property
    def ready(self) -> bool:
        return not self.draining and all(w.ready for w in self.workers)

    async def start(self) -> None:
        server = self.settings.server
        # Bound but never listening: it holds the port (and tells a port-0 configuration
        # which port it got) without taking a share of the connections.
        reservation = socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((server.host, server.port))
        self._reservation = reservation
        self.port = reservation.getsockname()[1]
        await self._start_admin()
        for worker in self.workers:
            await self._spawn(worker)
        self._watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
        log.info(
            "strangler %s (%s) listening on http://%s:%d (admin http://%s:%d), %d workers, "
            "legacy %s, candidate %s, flags %s",
            __version__,
            build(),
            server.host,
            self.port,
            self.settings.admin.host,
            self.admin_port,
            len(self.workers),
            self.settings.backends.legacy,
            self.settings.backends.candidate,
            self.settings.flags.provider,
        )

    async def _start_admin(self) -> None:
        app = web.Application(middlewares=[token_guard(self.settings.admin.token)])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self.store is not None:
            await self.store.start()
            add_divergence_routes(app, self.store)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        admin = self.settings.admin
        sock = socket.create_server((admin.host, admin.port), backlog=128)
        sock.setblocking(False)
        self.admin_port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        self._admin = runner

    async def _spawn(self, worker: Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, MULTIPROC_ENV: str(self.metrics_dir)}
        worker.ready = False
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "worker",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            "--ready-fd",
            str(write_fd),
            pass_fds=(write_fd,),
            env=env,
        )
        os.close(write_fd)
        worker.ready_task = asyncio.create_task(self._await_ready(worker, read_fd))

    async def _await_ready(self, worker: Worker, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        with os.fdopen(read_fd, "rb") as pipe:
            line = await loop.run_in_executor(None, pipe.readline)
        worker.ready = line == b"ready\n"

    async def _watch(self, worker: Worker) -> None:
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.ready = False
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                worker.process.pid, str(self.metrics_dir)
            )
            if self.draining:
                return
            worker.restarts += 1
            log.error(
                "worker %d (pid %d) exited with %d; starting it again",
                worker.index,
                worker.process.pid,
                code,
            )
            await asyncio.sleep(RESTART_DELAY)
            await self._spawn(worker)

    async def stop(self) -> int:
        """Drain every worker and return the exit status."""
        self.draining = True
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        codes = []
        for worker in self.workers:
            if worker.process is not None:
                codes.append(await worker.process.wait())
            if worker.ready_task is not None:
                await worker.ready_task
        for task in self._watchers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._admin is not None:
            await self._admin.cleanup()
        if self.store is not None:
            await self.store.close()
        if self._reservation is not None:
            self._reservation.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return 0 if all(code == 0 for code in codes) else 1

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(body=orjson.dumps({"ready": True}), content_type="application/json")
        reasons = ["shutting down"] if self.draining else []
        reasons += [f"worker {w.index} not ready" for w in self.workers if not w.ready]
        body = orjson.dumps({"ready": False, "reasons": reasons})
        return web.Response(status=503, body=body, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=str(self.metrics_dir)
        )
        body = await asyncio.to_thread(generate_latest, registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


def die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM when its supervisor dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def supervise(settings: Settings, config: Path) -> int:
    """``strangler run`` with several workers: until SIGTERM or SIGINT, then drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(settings, config)
    try:
        await supervisor.start()
    except BaseException:
        await supervisor.stop()
        raise
    await stop.wait()
    log.info("signal received: draining %d workers", len(supervisor.workers))
    return await supervisor.stop()
