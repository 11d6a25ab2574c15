"""The supervisor of ``strangler run`` and the worker processes it owns (I/O).

Every ``strangler run`` is a supervisor, the default single worker included, so that a
worker that dies (a crash in native code, the kernel's OOM killer) is serving again
within a second, and the death is logged and counted (``strangler_worker_restarts_total``).

The supervisor makes one listening socket per worker, all on the proxy port with
SO_REUSEPORT so that the kernel spreads connections across them, and keeps them open:
while a worker is started again, the connections meant for it wait in its socket's
backlog instead of being refused. Starting a Python process and importing the proxy
takes over a second on a busy machine, so workers are not started from scratch: a fork
server (``strangler forkserver``), started once, imports everything and forks a worker
on request, which serves within tens of milliseconds. The fork server forks twice, so
that each worker is re-parented to the supervisor (a child subreaper), which waits for
it and learns how it ended. A worker that dies again soon after starting is started
again after a growing delay (``proxy.restarts``).

The supervisor serves the admin listener: ``/readyz`` is ready once every worker has
said so, and ``/metrics`` adds up the workers' values through prometheus_client's
multiprocess mode, plus its own. SIGTERM is passed on to every worker, each drains as
a single proxy does, and the supervisor exits 0 once all have exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from flags.document import FlagsDocumentError, parse_flags
from flags.file import read_document, read_flags
from proxy import __version__, build
from proxy.admin import token_guard
from proxy.divergence_store import DivergenceStore, add_divergence_routes
from proxy.metrics import SupervisorMetrics
from proxy.restarts import exit_cause, next_restart
from proxy.settings import Settings

log = logging.getLogger("strangler.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class WorkerStartError(RuntimeError):
    """A worker or the fork server ended before the proxy was ready for the first time."""


@dataclass(eq=False)
class Worker:
    index: int
    pid: int | None = None
    ready: bool = False
    quick_deaths: int = 0
    started_at: float = 0.0
    died_at: float | None = None
    exited: asyncio.Future[int] | None = field(default=None, repr=False)
    restart: asyncio.TimerHandle | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, settings: Settings, config: Path) -> None:
        self.settings = settings
        self.config = config
        self.workers = [Worker(i) for i in range(settings.server.workers)]
        self.metrics = SupervisorMetrics()
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="strangler-metrics-"))
        self.draining = False
        self.started = False
        self.port = 0
        self.admin_port = 0
        self._sockets: list[socket.socket] = []
        self._admin: web.AppRunner | None = None
        self._events: tuple[int, int] | None = None
        self._received = b""
        self._forkserver: subprocess.Popen[bytes] | None = None
        self._forkserver_exited: asyncio.Future[int] | None = None
        self._forkserver_deaths = 0
        self._pending: set[int] = set()
        self._ready_early: set[int] = set()
        self._startup: asyncio.Future[None] | None = None
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
        """Listen, start every worker and return once all serve.

        Raises FlagsDocumentError for flags that cannot be trusted (nothing starts),
        WorkerStartError when a worker ends before it serves (its own log says why).
        """
        loop = asyncio.get_running_loop()
        if self.settings.flags.file is not None:
            read_flags(self.settings.flags.file)
        _become_subreaper()
        self._listen()
        await self._start_admin()
        events = os.pipe()
        os.set_blocking(events[0], False)
        self._events = events
        loop.add_reader(events[0], self._on_events)
        self._startup = loop.create_future()
        self._start_forkserver()
        for worker in self.workers:
            self._spawn(worker)
        await self._startup
        self.started = True
        server = self.settings.server
        log.info(
            "strangler %s (%s) listening on http://%s:%d (admin http://%s:%d), %d worker(s), "
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

    def _listen(self) -> None:
        server = self.settings.server
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        port = server.port
        for _ in self.workers:
            sock = socket.create_server(
                (server.host, port), family=family, backlog=1024, reuse_port=True
            )
            sock.set_inheritable(True)
            port = sock.getsockname()[1]  # a port-0 configuration: the others join it
            self._sockets.append(sock)
        self.port = port

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

    # The fork server

    def _start_forkserver(self) -> None:
        assert self._events is not None
        fds = [sock.fileno() for sock in self._sockets]
        events = self._events[1]
        if self._forkserver is not None and self._forkserver.stdin is not None:
            with contextlib.suppress(OSError):  # the pipe of the one that died
                self._forkserver.stdin.close()
        self._forkserver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "forkserver",
                "--config",
                str(self.config),
                "--listen-fds",
                ",".join(map(str, fds)),
                "--events-fd",
                str(events),
                "--supervisor-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            pass_fds=(*fds, events),
            env={**os.environ, MULTIPROC_ENV: str(self.metrics_dir)},
        )
        pid = self._forkserver.pid
        started = time.monotonic()
        self._forkserver_exited = self._watch(pid)
        self._forkserver_exited.add_done_callback(
            lambda done: self._on_forkserver_exit(pid, started, done.result())
        )
        for index in sorted(self._pending):
            self._request(index)

    def _on_forkserver_exit(self, pid: int, started: float, code: int) -> None:
        if self.draining:
            return
        how = _describe(code)
        if not self.started:
            self._fail_start(f"the fork server (pid {pid}) {how} before the workers served")
            return
        self._forkserver_deaths, delay = next_restart(
            self._forkserver_deaths, time.monotonic() - started
        )
        # Workers that serve go on serving; only restarts wait for the new fork server.
        log.error("the fork server (pid %d) %s; starting it again in %.2f s", pid, how, delay)
        asyncio.get_running_loop().call_later(delay, self._restart_forkserver)

    def _restart_forkserver(self) -> None:
        if not self.draining:
            self._start_forkserver()

    def _request(self, index: int) -> None:
        forkserver = self._forkserver
        assert forkserver is not None and forkserver.stdin is not None
        try:
            forkserver.stdin.write(f"spawn {index}\n".encode())
            forkserver.stdin.flush()
        except OSError:
            pass  # the fork server died: its successor receives every pending request

    # Workers

    def _spawn(self, worker: Worker) -> None:
        worker.restart = None
        worker.ready = False
        worker.pid = None
        self._pending.add(worker.index)
        self._request(worker.index)

    def _on_events(self) -> None:
        assert self._events is not None
        try:
            chunk = os.read(self._events[0], 65536)
        except BlockingIOError:
            return
        self._received += chunk
        *lines, self._received = self._received.split(b"\n")
        for line in lines:
            what, index_text, pid_text = line.decode().split()
            worker, pid = self.workers[int(index_text)], int(pid_text)
            if what == "spawned":
                self._on_spawned(worker, pid)
            elif worker.pid == pid:
                self._on_ready(worker, pid)
            else:  # ready before the fork server's word reached here
                self._ready_early.add(pid)

    def _on_spawned(self, worker: Worker, pid: int) -> None:
        self._pending.discard(worker.index)
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.exited = self._watch(pid)
        worker.exited.add_done_callback(
            lambda done: self._on_worker_exit(worker, pid, done.result())
        )
        if self.draining:  # forked from a request sent before the drain began
            os.kill(pid, signal.SIGTERM)
        elif pid in self._ready_early:
            self._ready_early.discard(pid)
            self._on_ready(worker, pid)

    def _on_ready(self, worker: Worker, pid: int) -> None:
        worker.ready = True
        if worker.died_at is not None:
            gap = time.monotonic() - worker.died_at
            worker.died_at = None
            log.info(
                "worker %d (pid %d) serving again, %.0f ms after its predecessor died",
                worker.index,
                pid,
                gap * 1000,
            )
        else:
            log.info("worker %d (pid %d) serving", worker.index, pid)
        startup = self._startup
        if startup is not None and not startup.done() and all(w.ready for w in self.workers):
            startup.set_result(None)

    def _on_worker_exit(self, worker: Worker, pid: int, code: int) -> None:
        worker.ready = False
        worker.pid = None
        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        if self.draining:
            return
        how = _describe(code)
        if not self.started:
            self._fail_start(f"worker {worker.index} (pid {pid}) {how} before it served")
            return
        now = time.monotonic()
        lived = now - worker.started_at
        worker.quick_deaths, delay = next_restart(worker.quick_deaths, lived)
        worker.died_at = now
        self.metrics.worker_restarts.labels(exit_cause(code)).inc()
        if delay == 0:
            when = "now"
        else:
            when = f"in {delay:.2f} s ({worker.quick_deaths} deaths in a row soon after start)"
        log.error(
            "worker %d (pid %d) %s after %.1f s; starting it again %s",
            worker.index,
            pid,
            how,
            lived,
            when,
        )
        if delay == 0:
            self._spawn(worker)
        else:
            worker.restart = asyncio.get_running_loop().call_later(delay, self._spawn, worker)

    def _fail_start(self, reason: str) -> None:
        startup = self._startup
        if startup is not None and not startup.done():
            startup.set_exception(WorkerStartError(reason))

    def _watch(self, pid: int) -> asyncio.Future[int]:
        """The exit status of a child process (negative: the signal that ended it).

        A thread per child waits for it: workers are re-parented here, so they are not
        children the event loop knows of (uvloop keeps SIGCHLD to itself), and a pidfd
        is not available under valgrind, where the instruction count runs the proxy.
        """
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()

        def settle(code: int) -> None:
            if not exited.done():
                exited.set_result(code)

        def wait() -> None:
            try:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # not re-parented here: the status is not ours
                code = 255
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, code)

        threading.Thread(target=wait, name=f"strangler-wait-{pid}", daemon=True).start()
        return exited

    async def stop(self) -> int:
        """Drain every worker and return the exit status."""
        self.draining = True
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
        # The fork server and the supervisor let go of the listening sockets first, so
        # that each is closed as its worker stops accepting.
        forkserver = self._forkserver
        if forkserver is not None and forkserver.stdin is not None:
            with contextlib.suppress(OSError):  # (a dead one's pipe may hold a request)
                forkserver.stdin.close()  # end of requests: it exits
            if self._forkserver_exited is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._forkserver_exited), 10.0)
                except TimeoutError:
                    forkserver.kill()
                    await self._forkserver_exited
        for sock in self._sockets:
            sock.close()
        exits = []
        for worker in self.workers:
            if worker.pid is not None and worker.exited is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
                exits.append(worker.exited)
        codes = await asyncio.gather(*exits)
        if self._events is not None:
            asyncio.get_running_loop().remove_reader(self._events[0])
            for fd in self._events:
                os.close(fd)
            self._events = None
        if self._admin is not None:
            await self._admin.cleanup()
        if self.store is not None:
            await self.store.close()
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
        body += generate_latest(self.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


def _describe(code: int) -> str:
    """``killed by SIGSEGV`` or ``exited with 1``."""
    if code < 0:
        return f"killed by {exit_cause(code)}"
    return f"exited with {code}"


def _prctl(option: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)


def _become_subreaper() -> None:
    """Workers, forked by the fork server's children, are re-parented here when those exit."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when ``parent`` dies, however it dies.

    ``parent`` is named rather than assumed: in a container the supervisor is pid 1.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_forkserver(
    settings: Settings, listen_fds: list[int], events_fd: int, supervisor: int
) -> int:
    """``strangler forkserver``: import everything once, then fork a worker per request.

    Requests are lines ``spawn INDEX`` on stdin; each fork is reported on ``events_fd``
    as ``spawned INDEX PID``. It also follows the flags (or bootstrap) file, so that a
    worker started again while the file is unsound starts from the last good document.
    """
    import proxy.app  # noqa: F401  (what a worker runs, imported before any fork)

    die_with(supervisor)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    # What is imported lives as long as the workers: out of the collector's sight, the
    # forked workers share these pages instead of copying them at the first collection.
    gc.collect()
    gc.freeze()
    last_good = _last_good_flags(settings, None)
    stdin = sys.stdin.buffer.fileno()
    received = b""
    while True:
        readable, _, _ = select.select([stdin], [], [], settings.flags.poll_interval)
        last_good = _last_good_flags(settings, last_good)
        if not readable:
            continue
        chunk = os.read(stdin, 4096)
        if not chunk:
            return 0
        received += chunk
        *lines, received = received.split(b"\n")
        for line in lines:
            index = int(line.split()[1])
            run = partial(_worker, settings, index, listen_fds, events_fd, supervisor, last_good)
            pid = _fork_worker(run)
            os.write(events_fd, f"spawned {index} {pid}\n".encode())


def _last_good_flags(settings: Settings, last_good: bytes | None) -> bytes | None:
    path = settings.flags.file  # the flags file, or the Unleash provider's bootstrap
    if path is None:
        return None
    try:
        raw = read_document(path)
        if raw != last_good:
            parse_flags(raw)
    except FlagsDocumentError:
        return last_good
    return raw


def _fork_worker(run: Callable[[], NoReturn]) -> int:
    """Fork ``run`` as a grandchild, re-parented to the supervisor; its pid.

    Returns once the intermediate child has exited, so the worker is the supervisor's
    child by the time the supervisor hears of it.
    """
    report_r, report_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(report_r)
            pid = os.fork()
            if pid == 0:
                os.close(report_w)
                run()
            os.write(report_w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        pid_text = report.read()
    os.waitpid(middle, 0)
    return int(pid_text)


def _worker(
    settings: Settings,
    index: int,
    listen_fds: list[int],
    events_fd: int,
    supervisor: int,
    last_good: bytes | None,
) -> NoReturn:
    code = 1
    try:
        # Re-parenting follows the intermediate child's exit, a moment away; the death
        # signal must be asked of the supervisor, not of that child.
        deadline = time.monotonic() + 5.0
        while os.getppid() != supervisor and time.monotonic() < deadline:
            time.sleep(0.001)
        die_with(supervisor)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the fork server's requests are not this worker's
        os.close(devnull)
        for number, fd in enumerate(listen_fds):
            if number != index:
                os.close(fd)  # so that a socket closes when its own worker stops accepting

        def ready() -> None:
            os.write(events_fd, f"ready {index} {os.getpid()}\n".encode())
            os.close(events_fd)

        import uvloop

        from proxy.app import serve

        code = uvloop.run(
            serve(
                settings,
                listen_fd=listen_fds[index],
                on_ready=ready,
                flags_fallback=last_good,
            )
        )
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


async def supervise(settings: Settings, config: Path) -> int:
    """``strangler run``: until SIGTERM or SIGINT, then drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(settings, config)
    starting = asyncio.create_task(supervisor.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        # A signal while the workers start stops the start (a worker may never serve).
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            log.info("signal received while starting: stopping")
            return await supervisor.stop()
        starting.result()
    except BaseException:
        stopping.cancel()
        await supervisor.stop()
        raise
    await stopping
    log.info("signal received: draining %d worker(s)", len(supervisor.workers))
    return await supervisor.stop()
