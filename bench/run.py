"""Benchmark: direct vs nginx ``split_clients`` vs strangler on the same loopback backends,
routing only and with shadow runs.

One run (``make bench``) starts two backends (``bench/backend.py``: legacy and candidate)
and runs two suites (``--suite routing|shadow|all``, ``all`` by default), measuring one
path at a time while the others, if started, stay idle.

**routing** measures three workloads:

- ``json``: ``POST /api/json``, one small JSON response (wrk, ``bench/users.lua``);
- ``ndjson``: ``GET /api/stream``, five chunked NDJSON event lines (wrk);
- ``websocket``: one client message, five JSON event frames back (``bench/wsload.py``),

through each path: ``direct`` (the load generators talk to the backends themselves, the
load shared between both as the proxies share it, so that the direct path has the same
backend capacity), ``nginx`` (``split_clients`` on ``$http_x_user_id``,
``worker_processes auto``: one worker per CPU), ``nginx-w1`` (the same with
``worker_processes 1``), and ``strangler`` started as ``strangler run --config`` with a
50 % ``flexibleRollout``, with ``[server] workers = 1`` and ``2``. Each strangler run is
compared with the nginx that runs as many worker processes (``nginx_peers``): on a machine
the load generator and the backends share, a proxy with more processes gets more of the
scheduler's time, whatever each process costs. HTTP runs use 50 connections over 2 wrk threads
for a fixed duration, then one connection for latency at one client; every request carries
its own ``X-User-Id``. WebSocket runs use 200 sessions, then one. The suite runs in
interleaved rounds (``--rounds``, 5): each row of the report is the run of median
throughput, and each ratio the median of the rounds' own ratios (``paired_ratio``).

**shadow** measures what shadow runs cost:

1. Shadowed throughput, JSON and NDJSON at 50 clients: strangler with ``shadow = 1.0`` on
   both routes and comparison on (the demo's normalisation rules; the backends answer one
   request with comparable sequences, so every comparison does real work and matches),
   against nginx ``split_clients`` plus ``mirror`` of every request to the other upstream.
   strangler's admin ``/metrics`` (comparisons by outcome, shadows dropped by reason) and
   the backends' own count of shadow requests are read around the loaded window.
2. A hanging shadow backend: every user served by legacy, every exchange shadowed on a
   candidate that accepts connections and never answers (``[shadow] timeout = 2``, 64
   shadow connections), against the same config with ``shadow = 0``, at a fixed moderate
   load (a few wrk connections, each pausing between requests): the primary's p50/p99.
3. The cost of comparing one five-event turn (``bench/compare_cost.py``, timeit).

CPU: the machine has two cores shared by the load generator, the proxy and the backends. By
default nothing is pinned: every path then gets the same two cores and the scheduler, which
is how the numbers would be produced by anyone running the two peers side by side, and what
lets nginx's two workers and strangler's ``workers = 2`` use both cores. ``--pin`` puts the
load generator and the backends on CPU 0 and the proxy on CPU 1, which isolates the proxy's
cost per core (nginx's ``auto`` then still starts one worker per online CPU, both on CPU 1).
The report shows, for every run, the CPU each party used (percent of one core), which is
where the time goes.

Everything started here (backends, nginx, strangler, wrk, the WebSocket load generator) is a
child in its own process group, stopped on every exit path (normal end, error, Ctrl-C,
SIGTERM) and killed by the kernel if this process dies. Traffic stays on 127.0.0.1.

Output: a Markdown report on stdout (tables, ratios, targets) and
``bench/results/latest.json``. ``--quick`` shortens every window for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
STRANGLER = str(Path(sys.executable).parent / "strangler")
CLK_TCK = os.sysconf("SC_CLK_TCK")
FLAG = "ssot-dispatcher"
# A loaded run during which unrelated processes used more than this (percent of one core)
# is repeated once.
NOISY_PERCENT = 25.0
ALL_PATHS = ("direct", "nginx-w1", "nginx", "nginx-plain", "minimal", "strangler")
SUITES = ("routing", "shadow")
SHADOW_WORKLOADS = ("json", "ndjson")

WORKLOADS: dict[str, dict[str, str]] = {
    "json": {"path": "/api/json", "method": "POST", "body": "body"},
    "ndjson": {"path": "/api/stream", "method": "GET", "body": "nobody"},
    "websocket": {"path": "/ws/agent"},
}

TARGETS = (
    # (key, workload, description, threshold); see evaluate_targets().
    ("json_vs_nginx", "json", "JSON throughput at 50 clients >= 0.6 x nginx", 0.6),
    ("ndjson_vs_nginx", "ndjson", "NDJSON throughput at 50 clients >= 0.9 x nginx", 0.9),
    ("ws_vs_direct", "websocket", "WebSocket events/s at 200 sessions >= 0.7 x direct", 0.7),
    ("json_added_p50", "json", "JSON added p50 at 1 client <= 0.4 ms over direct", 0.4),
    ("ndjson_added_p50", "ndjson", "NDJSON added p50 at 1 client <= 0.4 ms over direct", 0.4),
    ("ws_added_p50", "websocket", "WebSocket added p50 at 1 session <= 0.4 ms over direct", 0.4),
)


SHADOW_TARGETS = (
    # (key, workload, description, threshold): strangler shadowed / nginx split + mirror.
    (
        "json_shadow_vs_mirror",
        "json",
        "Shadowed JSON throughput at 50 clients >= 1.2 x nginx split_clients + mirror",
        1.2,
    ),
    (
        "ndjson_shadow_vs_mirror",
        "ndjson",
        "Shadowed NDJSON throughput at 50 clients >= 4 x nginx split_clients + mirror",
        4.0,
    ),
)
HANG_P99_TARGET = 0.10  # the primary's p99 moves by less than this with a hanging shadow
COMPARE_COST_TARGET_US = 50.0

# The routes strangler is configured with: (name, path prefix, protocol, workload).
ROUTES = (
    ("json", "/api/json", "json", "json"),
    ("stream", "/api/stream", "ndjson", "ndjson"),
    ("agent", "/ws/agent", "websocket", "websocket"),
)
ROUTE_OF_WORKLOAD = {workload: name for name, _, _, workload in ROUTES}
CONTRACT = "agent_started (agent_thinking | tool_executing tool_completed)* agent_completed"
# What legitimately differs between the two backends' answers to one request: the demo
# route's rules for the event streams, the backend's name and request id for the JSON.
EVENT_RULES: dict[str, list[str]] = {
    "ignore": ["timestamp", "seq", "duration_ms", "*.duration_ms"],
    "canonical_ids": ["run_id", "tool_call_id"],
    "coalesce": ["agent_thinking"],
    "presence_only": ["text", "*.text"],
}
COMPARE_RULES: dict[str, dict[str, list[str]]] = {
    "json": {"ignore": ["body.backend"], "canonical_ids": ["body.request_id"]},
    "stream": EVENT_RULES,
    "agent": EVENT_RULES,
}
# The hanging-shadow case: what bounds the shadows that hang.
HANG_SHADOW = {"timeout": 2.0, "connections": 64, "max_concurrent": 256}


class BenchError(RuntimeError):
    """A step of the benchmark could not be carried out; the message says which and why."""


# ----------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    latency_duration: float
    connections: int
    threads: int
    ws_sessions: int
    ws_duration: float
    ws_latency_duration: float
    pin: bool
    paths: tuple[str, ...]
    workloads: tuple[str, ...]
    strangler_workers: tuple[int, ...]
    install: bool
    keep_temp: bool
    output: Path
    suites: tuple[str, ...] = SUITES
    hang_connections: int = 10
    hang_think_ms: int = 5
    hang_duration: float = 8.0
    hang_warmup: float = 3.0
    hang_workloads: tuple[str, ...] = ("ndjson",)
    hang_rounds: int = 5
    rounds: int = 5


@dataclass
class Measurement:
    """One workload through one path: the loaded run and the one-client run."""

    workload: str
    path: str
    unit: str
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p50_one_client_ms: float = 0.0
    p99_one_client_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    requests: int = 0  # HTTP requests completed in the loaded window
    p90_ms: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)  # probe deltas, loaded window
    round: int = 0  # the routing suite's round this run belongs to (its medians: -1)


@dataclass
class PathInfo:
    """What was started for one path and whether it could be measured."""

    key: str
    label: str
    workers: int = 1
    available: bool = True
    reason: str = ""
    split: dict[str, int] = field(default_factory=dict)
    processes: int = 0
    notes: list[str] = field(default_factory=list)
    setup: StranglerSetup | None = None  # strangler paths: how it is configured
    admin_port: int = 0


# ----------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it if the benchmark dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def group_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` (every child here leads its own group)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (user, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK


def background_load(seconds: float = 1.0) -> float:
    """Percent of one core busy on this machine while the benchmark has started nothing."""
    before, start = machine_busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (machine_busy_seconds() - before) / (time.perf_counter() - start)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds consumed so far by the live members of a process group."""
    total = 0
    for pid in group_members(pgid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


class Supervisor:
    """Owns every long-running child and stops all of them, whatever happens."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def cpus(self, role: str) -> str | None:
        if not self.pin:
            return None
        return "1" if role == "proxy" else "0"

    def command(self, argv: list[str], role: str) -> list[str]:
        cpus = self.cpus(role)
        return ["taskset", "-c", cpus, *argv] if cpus else argv

    def start(self, name: str, argv: list[str], role: str, log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as sink:
            process = subprocess.Popen(
                self.command(argv, role),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=REPO_DIR,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.children[name] = process
        self.logs[name] = log
        return process

    def stop(self, name: str) -> None:
        process = self.children.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        # Workers that outlived their leader (same group, so started by us).
        for pid in group_members(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        log = self.logs.get(name)
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------------------
# Readiness and sanity
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], process: subprocess.Popen[bytes], what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what}: exited with code {process.returncode} before it was ready")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.1)
    raise BenchError(f"{what}: not ready after {timeout:.0f} s")


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    return check


def http_get_ok(port: int, path: str) -> Callable[[], bool]:
    def check() -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            return connection.getresponse().status == 200
        finally:
            connection.close()

    return check


def sanity_check(port: int, path_key: str, expect_header: bool) -> dict[str, int]:
    """Both workloads answer correctly and users are split between the two backends."""
    split: dict[str, int] = {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for n in range(200):
            user = f"sanity-{n}"
            body = json.dumps({"user_id": user, "prompt": "hi"})
            headers = {"X-User-Id": user, "Content-Type": "application/json"}
            connection.request("POST", "/api/json", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise BenchError(f"{path_key}: POST /api/json -> {response.status} {payload!r}")
            document = json.loads(payload)
            backend = str(document.get("backend"))
            if document.get("user_id") != user:
                raise BenchError(f"{path_key}: backend saw user {document.get('user_id')!r}")
            served_by = response.getheader("X-Strangler-Backend")
            if expect_header and served_by != backend:
                raise BenchError(
                    f"{path_key}: X-Strangler-Backend {served_by!r} but body says {backend!r}"
                )
            split[backend] = split.get(backend, 0) + 1
        connection.request("GET", "/api/stream", headers={"X-User-Id": "sanity-stream"})
        response = connection.getresponse()
        lines = [line for line in response.read().splitlines() if line.strip()]
        if response.status != 200 or len(lines) != 5:
            raise BenchError(
                f"{path_key}: GET /api/stream -> {response.status}, {len(lines)} lines"
            )
    finally:
        connection.close()
    return split


# ----------------------------------------------------------------------------------------
# Load generators
# ----------------------------------------------------------------------------------------


@dataclass
class LoadRun:
    """Finished load-generator processes: their parsed JSON lines and who spent which CPU."""

    results: list[dict[str, Any]]
    wall: float
    cpu_percent: dict[str, float]


def run_loadgens(
    argvs: list[list[str]],
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    timeout: float,
    env: dict[str, str] | None = None,
) -> LoadRun:
    """Run load generators side by side to completion, sampling CPU over their window.

    The window is the generators' whole life (wrk) or the span between the first
    MEASURE_START and MEASURE_END lines (wsload). Their own CPU comes from wait4's rusage.
    """

    def sample() -> tuple[float, dict[str, float]]:
        cpu = {
            role: sum(group_cpu_seconds(pgid) for pgid in pgids) for role, pgids in groups.items()
        }
        cpu["machine"] = machine_busy_seconds()
        return time.perf_counter(), cpu

    markers: dict[str, tuple[float, dict[str, float]]] = {}
    outputs: list[list[str]] = [[] for _ in argvs]

    def read(process: subprocess.Popen[bytes], output: list[str]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line in ("MEASURE_START", "MEASURE_END"):
                markers.setdefault(line, sample())
            else:
                output.append(line)

    first = sample()
    processes = [
        subprocess.Popen(
            supervisor.command(argv, "loadgen"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            env=os.environ | env if env else None,
            preexec_fn=_die_with_parent,
        )
        for argv in argvs
    ]
    watchdogs = [threading.Timer(timeout, process.kill) for process in processes]
    readers = [
        threading.Thread(target=read, args=(process, output), daemon=True)
        for process, output in zip(processes, outputs, strict=True)
    ]
    cpu_seconds = 0.0
    try:
        for thread in (*watchdogs, *readers):
            thread.start()
        for reader in readers:
            reader.join()
        last = sample()
        for process in processes:
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            cpu_seconds += usage.ru_utime + usage.ru_stime
    finally:
        for watchdog in watchdogs:
            watchdog.cancel()
        for process in processes:
            if process.returncode is None:
                process.kill()
                process.wait()
    begin = markers.get("MEASURE_START", first)
    finish = markers.get("MEASURE_END", last)
    wall = finish[0] - begin[0]
    cpu = {role: 100.0 * (finish[1][role] - begin[1][role]) / wall for role in finish[1]}
    cpu["loadgen"] = 100.0 * cpu_seconds / (last[0] - first[0])
    results = []
    for argv, process, output in zip(argvs, processes, outputs, strict=True):
        parsed = next((line for line in output if line.startswith("BENCH_JSON ")), None)
        if process.returncode != 0 or parsed is None:
            tail = "\n".join(output[-15:])
            name = Path(argv[0]).name
            raise BenchError(f"{name} failed (exit {process.returncode}):\n{tail}")
        results.append(json.loads(parsed[len("BENCH_JSON ") :]))
    return LoadRun(results, wall, cpu)


def merged_percentile(results: list[dict[str, Any]], percent: float) -> float:
    """A percentile (us) of several wrk runs together, from each run's sampled latency curve,
    weighting every run by its request count."""
    if len(results) == 1:
        return float(results[0][f"p{percent:g}_us"])
    total = sum(result["requests"] for result in results)

    def share_below(value: float) -> float:
        """Fraction of all requests at or under ``value`` (linear between curve points)."""
        share = 0.0
        for result in results:
            curve = result["curve"]
            below = 0.0
            for (p0, v0), (p1, v1) in itertools.pairwise([[0.0, 0], *curve, [100.0, curve[-1][1]]]):
                if value >= v1:
                    below = p1
                elif value >= v0:
                    below = p0 + (p1 - p0) * ((value - v0) / (v1 - v0) if v1 > v0 else 1.0)
                    break
                else:
                    break
            share += below / 100.0 * result["requests"] / total
        return share

    candidates = sorted({float(v) for result in results for _, v in result["curve"]})
    low, high = candidates[0], candidates[-1]
    for _ in range(40):  # bisection on the value
        middle = (low + high) / 2
        if share_below(middle) < percent / 100.0:
            low = middle
        else:
            high = middle
    return high


def wrk_argv(url: str, workload: str, connections: int, threads: int, duration: float) -> list[str]:
    spec = WORKLOADS[workload]
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
        "--timeout",
        "5s",
        "-s",
        str(BENCH_DIR / "users.lua"),
        url + spec["path"],
        "--",
        spec["method"],
        spec["body"],
    ]


def wrk(
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    urls: list[str],
    workload: str,
    connections: int,
    threads: int,
    duration: float,
    think_ms: int = 0,
) -> LoadRun:
    """wrk on one URL, or one wrk per URL sharing the connections and threads; with
    ``think_ms``, every connection pauses that long between requests (a paced load)."""
    share = len(urls)
    argvs = [
        wrk_argv(url, workload, max(1, connections // share), max(1, threads // share), duration)
        for url in urls
    ]
    env = {"BENCH_THINK_MS": str(think_ms)} if think_ms > 0 else None
    return run_loadgens(argvs, supervisor, groups, timeout=duration + 30, env=env)


def wsload(
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    urls: list[str],
    sessions: int,
    warmup: float,
    duration: float,
) -> LoadRun:
    argv = [PYTHON, str(BENCH_DIR / "wsload.py")]
    for url in urls:
        argv += ["--url", url + WORKLOADS["websocket"]["path"]]
    argv += ["--sessions", str(sessions), "--warmup", str(warmup), "--duration", str(duration)]
    run = run_loadgens([argv], supervisor, groups, timeout=warmup + duration + 60)
    run.cpu_percent["loadgen"] = float(run.results[0]["cpu_percent"])
    return run


def with_other(cpu: dict[str, float]) -> dict[str, float]:
    """Adds "other": machine CPU not spent by the parties we started (kernel softirq work
    on their behalf, and any unrelated process, which would make the run noisy)."""
    ours = sum(value for role, value in cpu.items() if role != "machine")
    return cpu | {"other": max(0.0, cpu.get("machine", ours) - ours)}


def wrk_errors(results: list[dict[str, Any]]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for result in results:
        for kind, count in result["errors"].items():
            if count:
                errors[kind] = errors.get(kind, 0) + int(count)
    return errors


def ws_errors(result: dict[str, Any]) -> dict[str, int]:
    errors = {kind: int(count) for kind, count in result["errors"].items()}
    for kind in ("short_turns", "isolation_violations"):
        if result.get(kind):
            errors[kind] = int(result[kind])
    if result["upgraded"] < result["sessions"]:
        errors["not_upgraded"] = int(result["sessions"] - result["upgraded"])
    return errors


def measure_websocket(
    settings: Settings,
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    path_key: str,
    urls: list[str],
) -> Measurement:
    loaded = wsload(
        supervisor, groups, urls, settings.ws_sessions, settings.warmup, settings.ws_duration
    )
    single = wsload(
        supervisor, groups, urls[:1], 1, settings.warmup / 2, settings.ws_latency_duration
    )
    result, one = loaded.results[0], single.results[0]
    return Measurement(
        "websocket",
        path_key,
        "events/s",
        rate=float(result["events_per_s"]),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        p50_one_client_ms=one["p50_us"] / 1000,
        p99_one_client_ms=one["p99_us"] / 1000,
        errors=ws_errors(result) | {f"one_session_{k}": v for k, v in ws_errors(one).items()},
        cpu_percent=with_other(loaded.cpu_percent),
    )


Probe = Callable[[], dict[str, float]]


def settled(probe: Probe, timeout: float = 5.0) -> dict[str, float]:
    """The probe's counters once two readings 0.75 s apart agree (the shadows still in
    flight when the load stopped have finished, and worker processes, which flush their
    counts every half second, have flushed), or after ``timeout``."""
    reading = probe()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.75)
        again = probe()
        if again == reading:
            break
        reading = again
    return reading


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters: their change over the window; gauges (``gauge_*``): their last value."""
    changes = {key: after[key] - before.get(key, 0.0) for key in after}
    changes |= {key: value for key, value in after.items() if key.startswith("gauge_")}
    return {key: value for key, value in changes.items() if value}


def measure_http(
    settings: Settings,
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    path_key: str,
    workload: str,
    urls: list[str],
    probe: Probe | None = None,
) -> Measurement:
    """Warm-up, the loaded run, then one client. ``probe`` (counters such as strangler's
    metrics) is read just before the loaded run and once things settle after it."""
    connections, threads = settings.connections, settings.threads
    if settings.warmup > 0:
        wrk(supervisor, groups, urls, workload, connections, threads, settings.warmup)
    before = settled(probe) if probe is not None else {}
    loaded = wrk(supervisor, groups, urls, workload, connections, threads, settings.duration)
    counters = delta(before, settled(probe)) if probe is not None else {}
    single = wrk(supervisor, groups, urls[:1], workload, 1, 1, settings.latency_duration)
    one = single.results[0]
    return Measurement(
        workload,
        path_key,
        "req/s",
        rate=sum(r["requests"] / (r["duration_us"] / 1e6) for r in loaded.results),
        p50_ms=merged_percentile(loaded.results, 50) / 1000,
        p99_ms=merged_percentile(loaded.results, 99) / 1000,
        p50_one_client_ms=one["p50_us"] / 1000,
        p99_one_client_ms=one["p99_us"] / 1000,
        errors=wrk_errors(loaded.results)
        | {f"one_client_{k}": v for k, v in wrk_errors(single.results).items()},
        cpu_percent=with_other(loaded.cpu_percent),
        requests=sum(int(r["requests"]) for r in loaded.results),
        p90_ms=merged_percentile(loaded.results, 90) / 1000,
        counters=counters,
    )


def measure_paced(
    settings: Settings,
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    path_key: str,
    workload: str,
    url: str,
    probe: Probe | None = None,
) -> Measurement:
    """A fixed moderate load: a few connections, each pausing between requests, so that
    latency, not saturation, is what the run shows."""
    connections, think = settings.hang_connections, settings.hang_think_ms
    threads = min(settings.threads, connections)
    if settings.hang_warmup > 0:
        wrk(supervisor, groups, [url], workload, connections, threads, settings.hang_warmup, think)
    before = settled(probe, timeout=1.0) if probe is not None else {}
    loaded = wrk(
        supervisor, groups, [url], workload, connections, threads, settings.hang_duration, think
    )
    after = probe() if probe is not None else {}
    result = loaded.results[0]
    return Measurement(
        workload,
        path_key,
        "req/s",
        rate=result["requests"] / (result["duration_us"] / 1e6),
        p50_ms=result["p50_us"] / 1000,
        p90_ms=result["p90_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        errors=wrk_errors(loaded.results),
        cpu_percent=with_other(loaded.cpu_percent),
        requests=int(result["requests"]),
        counters=delta(before, after),
    )


def log_measurement(measurement: Measurement, log: Callable[[str], None]) -> None:
    log(
        f"  {measurement.workload:<9} {measurement.path:<13} {measurement.rate:>10,.0f} "
        f"{measurement.unit:<8} p50 {measurement.p50_ms:6.2f} ms  "
        f"p99 {measurement.p99_ms:6.2f} ms  "
        + (
            f"1-client p50 {measurement.p50_one_client_ms:.3f} ms  "
            if measurement.p50_one_client_ms
            else ""
        )
        + "cpu "
        + " ".join(f"{k}={v:.0f}%" for k, v in measurement.cpu_percent.items())
        + (f"  errors {measurement.errors}" if measurement.errors else "")
    )


def measure(
    settings: Settings,
    supervisor: Supervisor,
    groups: dict[str, list[int]],
    path_key: str,
    workload: str,
    ports: list[int],
    log: Callable[[str], None],
    probe: Probe | None = None,
) -> Measurement:
    """One workload through one path (again if the machine was noisy: measure_quietly).
    Several ports (direct): the load is shared between them, as the proxies share it
    between the two backends; one-client runs use the first."""

    def once() -> Measurement:
        if workload == "websocket":
            urls = [f"ws://127.0.0.1:{port}" for port in ports]
            return measure_websocket(settings, supervisor, groups, path_key, urls)
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        return measure_http(settings, supervisor, groups, path_key, workload, urls, probe)

    return measure_quietly(once, log)


def measure_quietly(run: Callable[[], Measurement], log: Callable[[str], None]) -> Measurement:
    """One measurement, repeated once if unrelated processes took more than NOISY_PERCENT
    of a core; the quieter attempt is kept, flagged if still noisy."""
    attempts: list[Measurement] = []
    while len(attempts) < 2:
        measurement = run()
        attempts.append(measurement)
        log_measurement(measurement, log)
        if measurement.cpu_percent["other"] <= NOISY_PERCENT:
            break
        log(f"  ^ noisy: {measurement.cpu_percent['other']:.0f} % of a core went elsewhere")
    best = min(attempts, key=lambda m: m.cpu_percent["other"])
    if best.cpu_percent["other"] > NOISY_PERCENT:
        best.notes.append(
            f"noisy: {best.cpu_percent['other']:.0f} % of a core used by other processes"
        )
    return best


# ----------------------------------------------------------------------------------------
# Peers: backends, nginx, strangler
# ----------------------------------------------------------------------------------------


def ensure_tools(
    install: bool,
    log: Callable[[str], None],
    tools: tuple[str, ...] = ("nginx", "wrk"),
    packages: tuple[str, ...] = ("nginx", "wrk"),
) -> None:
    """The commands ``tools`` on the PATH, from the apt ``packages`` where missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    if not install:
        raise BenchError(f"missing {', '.join(missing)} (run without --no-install)")
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    environment = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {', '.join(missing)} with apt-get")
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    if subprocess.run(command, env=environment, timeout=600, **quiet).returncode != 0:
        subprocess.run(["apt-get", "update"], env=environment, timeout=600, **quiet)
        subprocess.run(command, env=environment, timeout=600, check=True, **quiet)
    still = [tool for tool in tools if shutil.which(tool) is None]
    if still:
        raise BenchError(f"apt-get did not provide {', '.join(still)}")


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def start_backends(
    supervisor: Supervisor, workdir: Path, ports: dict[str, int], hang: bool = False
) -> list[int]:
    """One backend process per name; with ``hang``, backends that never answer."""
    pgids = []
    for name, port in ports.items():
        argv = [PYTHON, str(BENCH_DIR / "backend.py"), "--name", name, "--port", str(port)]
        argv += ["--hang"] if hang else []
        process = supervisor.start(f"backend-{name}", argv, "backends", workdir / f"{name}.log")
        wait_until(port_open(port), process, f"backend {name}", timeout=15)
        pgids.append(process.pid)
    return pgids


def backend_stats(ports: dict[str, int]) -> dict[str, float]:
    """Requests each backend answered so far, and how many were marked as shadows."""
    counters: dict[str, float] = {}
    for name, port in ports.items():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/_stats")
            stats = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        counters[f"backend_requests{{backend={name}}}"] = float(stats["requests"])
        counters[f"backend_shadow_requests{{backend={name}}}"] = float(stats["shadow_requests"])
    return counters


_NGINX_TUNED = {
    "WORKERS": "auto",
    "CLIENT_KEEPALIVE": "keepalive_requests 1000000;",
    "UPSTREAM_KEEPALIVE": "keepalive 256;\n        keepalive_requests 1000000;",
    "UPSTREAM_HTTP_VERSION": "1.1",
    "MIRROR": "",
    "MIRROR_LOCATION": "",
}
# The mirror as the nginx documentation shows it, towards the other upstream.
_NGINX_MIRROR_LOCATION = """
        location = /_mirror {
            internal;
            proxy_pass http://$strangler_shadow_pool$request_uri;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Connection "";
            proxy_set_header X-Strangler-Shadow 1;
        }"""
NGINX_TUNING = {
    "nginx": _NGINX_TUNED,
    "nginx-w1": _NGINX_TUNED | {"WORKERS": "1"},
    "nginx-plain": _NGINX_TUNED
    | {"CLIENT_KEEPALIVE": "", "UPSTREAM_KEEPALIVE": "", "UPSTREAM_HTTP_VERSION": "1.0"},
    "nginx-mirror": _NGINX_TUNED
    | {
        "MIRROR": "mirror /_mirror;\n            mirror_request_body on;",
        "MIRROR_LOCATION": _NGINX_MIRROR_LOCATION,
    },
}


def start_nginx(
    supervisor: Supervisor, workdir: Path, ports: dict[str, int], variant: str
) -> tuple[int, int]:
    port = free_port()
    prefix = workdir / variant
    prefix.mkdir(exist_ok=True)  # again in every round
    config = (BENCH_DIR / "nginx.conf.template").read_text()
    for name, value in {
        "PREFIX": str(prefix),
        "PORT": str(port),
        "LEGACY_PORT": str(ports["legacy"]),
        "CANDIDATE_PORT": str(ports["candidate"]),
        **NGINX_TUNING[variant],
    }.items():
        config = config.replace(f"@{name}@", value)
    (prefix / "nginx.conf").write_text(config)
    argv = [
        "nginx",
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(prefix / "nginx.conf"),
        "-g",
        "daemon off;",
    ]
    process = supervisor.start(variant, argv, "proxy", prefix / "stdout.log")
    try:
        wait_until(port_open(port), process, "nginx", timeout=15)
    except BenchError as error:
        tail = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
        raise BenchError(f"{error}\n{tail}") from error
    time.sleep(0.3)  # let every worker reach accept()
    return process.pid, port


def start_minimal(supervisor: Supervisor, workdir: Path, ports: dict[str, int]) -> tuple[int, int]:
    port = free_port()
    argv = [
        PYTHON,
        str(BENCH_DIR / "minimal_proxy.py"),
        "--port",
        str(port),
        "--legacy",
        f"http://127.0.0.1:{ports['legacy']}",
        "--candidate",
        f"http://127.0.0.1:{ports['candidate']}",
    ]
    process = supervisor.start("minimal", argv, "proxy", workdir / "minimal.log")
    wait_until(port_open(port), process, "minimal aiohttp proxy", timeout=15)
    return process.pid, port


@dataclass(frozen=True)
class StranglerSetup:
    """What one strangler run is configured with, beyond ports."""

    workers: int = 1
    rollout: int = 50  # percent of users on the candidate
    shadow: float = 0.0  # on the json and stream routes (the WebSocket route never)
    shadow_settings: tuple[tuple[str, float | int], ...] = ()  # the [shadow] section
    # The json and stream routes carry their comparison rules and contract even with
    # shadow = 0 (the hanging case's baseline: the same routes, only no shadow).
    checked: bool = False


def toml(value: object) -> str:
    """A TOML value for the strings, numbers and string lists written here (JSON's
    spelling of those is valid TOML)."""
    return json.dumps(value)


def strangler_config(
    port: int, admin_port: int, ports: dict[str, int], setup: StranglerSetup, directory: Path
) -> str:
    """The TOML config: the three routes, shadowed and compared when ``setup.shadow``
    (checked, without shadows, when ``setup.checked``)."""
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}"]
    if setup.workers != 1:
        lines.append(f"workers = {setup.workers}")
    lines += ["[admin]", 'host = "127.0.0.1"', f"port = {admin_port}", 'token = "bench"']
    lines += [
        "[backends]",
        f'legacy = "http://127.0.0.1:{ports["legacy"]}"',
        f'candidate = "http://127.0.0.1:{ports["candidate"]}"',
        "[identity]",
        'header = "X-User-Id"',
        "[flags]",
        'provider = "file"',
        'file = "flags.json"',
    ]
    if setup.shadow_settings:
        lines.append("[shadow]")
        lines += [f"{key} = {toml(value)}" for key, value in setup.shadow_settings]
    lines += ["[divergences]", f"path = {toml(str(directory / 'divergences.sqlite3'))}"]
    for name, path, protocol, _ in ROUTES:
        shadow = setup.shadow if name != "agent" else 0.0
        lines += [
            "[[routes]]",
            f'name = "{name}"',
            f'path = "{path}"',
            f'protocol = "{protocol}"',
            f'flag = "{FLAG}"',
            f"shadow = {shadow!r}",
        ]
        if name != "agent" and (shadow > 0 or setup.checked):
            if protocol == "json":  # the workload POSTs; the bench backends have no side effects
                lines.append(f"shadow_methods = {toml(['GET', 'HEAD', 'OPTIONS', 'POST'])}")
            else:
                lines.append(f"contract = {toml(CONTRACT)}")
            lines.append("[routes.compare]")
            lines += [f"{key} = {toml(value)}" for key, value in COMPARE_RULES[name].items()]
    return "\n".join(lines) + "\n"


def flags_document(rollout: int) -> dict[str, Any]:
    return {
        "version": 1,
        "features": [
            {
                "name": FLAG,
                "enabled": True,
                "strategies": [
                    {
                        "name": "flexibleRollout",
                        "parameters": {
                            "rollout": str(rollout),
                            "stickiness": "userId",
                            "groupId": FLAG,
                        },
                    }
                ],
            }
        ],
    }


def strangler_runnable() -> str:
    """Empty when ``strangler run`` exists; otherwise why it cannot be measured."""
    if not Path(STRANGLER).exists():
        return f"{STRANGLER} is not installed"
    try:
        done = subprocess.run(
            [STRANGLER, "run", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_DIR,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"strangler run --help failed: {error}"
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        return "strangler run --help failed: " + (lines[-1] if lines else f"exit {done.returncode}")
    return ""


def start_strangler(
    supervisor: Supervisor,
    workdir: Path,
    name: str,
    ports: dict[str, int],
    setup: StranglerSetup,
) -> tuple[int, int, int]:
    """Start ``strangler run``; its process group, proxy port and admin port."""
    directory = workdir / name
    directory.mkdir(exist_ok=True)  # again in every round
    port, admin_port = free_port(), free_port()
    config = directory / "strangler.toml"
    config.write_text(strangler_config(port, admin_port, ports, setup, directory))
    (directory / "flags.json").write_text(json.dumps(flags_document(setup.rollout)))
    argv = [STRANGLER, "run", "--config", str(config)]
    process = supervisor.start(name, argv, "proxy", directory / "strangler.log")
    try:
        wait_until(http_get_ok(admin_port, "/readyz"), process, name, timeout=30)
        wait_until(port_open(port), process, name, timeout=10)
    except BenchError as error:
        tail = supervisor.log_tail(name)
        supervisor.stop(name)
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        raise BenchError(f"{error}: {last.strip()}\n{tail}") from error
    time.sleep(0.3)
    return process.pid, port, admin_port


_SAMPLE = re.compile(r"^(strangler_[a-z_]+?)(?:_total)?\{([^}]*)\}\s+(\S+)$")


def scrape(admin_port: int) -> dict[str, float]:
    """strangler's counters from its admin ``/metrics``, keyed ``name{label=value,...}``
    (``_total`` dropped; histograms and gauges left out)."""
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or not line.split("{", 1)[0].endswith("_total"):
            continue
        labels = ",".join(
            sorted(
                f"{k}={v}" for k, v in re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match.group(2))
            )
        )
        key = f"{match.group(1)}{{{labels}}}"
        counters[key] = counters.get(key, 0.0) + float(match.group(3))
    return counters


def counted(counters: dict[str, float], name: str, **labels: str) -> dict[str, float]:
    """The counters of one metric whose labels include ``labels``, keyed by their labels."""
    out = {}
    for key, value in counters.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        have = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
        if all(have.get(k) == v for k, v in labels.items()):
            out[rest.rstrip("}")] = value
    return out


def counted_by(counters: dict[str, float], name: str, label: str, **labels: str) -> dict[str, int]:
    """One metric summed per value of ``label``."""
    out: dict[str, int] = {}
    for rest, value in counted(counters, name, **labels).items():
        have = dict(pair.split("=", 1) for pair in rest.split(",") if pair)
        key = have.get(label, "")
        out[key] = out.get(key, 0) + round(value)
    return out


# ----------------------------------------------------------------------------------------
# Shadow suite: shadowed throughput vs nginx mirror, a hanging shadow, comparison cost
# ----------------------------------------------------------------------------------------

# The hanging-shadow cases: every user on legacy, the candidate hangs (or not).
HANG_CASES = (
    # (key, label, shadow, candidate hangs, routes checked)
    ("hang-off", "shadow = 0 (same config)", 0.0, True, True),
    ("hang-hanging", "shadow = 1.0, candidate hangs", 1.0, True, True),
    ("hang-healthy", "shadow = 1.0, candidate healthy (reference)", 1.0, False, True),
    ("hang-plain", "shadow = 0, no contract or comparison rules (reference)", 0.0, True, False),
)


@dataclass
class ShadowResults:
    paths: list[PathInfo] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)  # shadowed throughput
    hang: list[Measurement] = field(default_factory=list)  # path = a HANG_CASES key
    hang_round: list[int] = field(default_factory=list)  # the round of each of ``hang``
    hang_labels: dict[str, str] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_shadow_paths(settings: Settings) -> list[PathInfo]:
    plan = [PathInfo("nginx-mirror", "nginx split_clients + mirror ({workers} workers)")]
    for w in settings.strangler_workers:
        plan.append(
            PathInfo(
                f"strangler-shadow-w{w}",
                f"strangler shadow = 1.0 ({w} worker{'s' if w > 1 else ''})",
                w,
                setup=StranglerSetup(workers=w, shadow=1.0),
            )
        )
    return plan


def shadow_probe(info: PathInfo, backend_ports: dict[str, int]) -> Probe:
    """Counters around a loaded window: the backends' own request and shadow counts, and
    strangler's metrics when the path is strangler."""
    if info.admin_port:
        admin = info.admin_port
        return lambda: scrape(admin) | backend_stats(backend_ports)
    return lambda: backend_stats(backend_ports)


def established(port: int) -> int:
    """TCP connections established to a local listening port right now (IPv4 loopback)."""
    count = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def shadow_traffic(counters: dict[str, float]) -> int:
    return round(sum(v for k, v in counters.items() if k.startswith("backend_shadow_requests")))


def run_shadow_suite(
    settings: Settings,
    supervisor: Supervisor,
    workdir: Path,
    backend_ports: dict[str, int],
    backends: list[int],
    strangler_problem: str,
    meta: dict[str, Any],
    log: Callable[[str], None],
) -> ShadowResults:
    results = ShadowResults(paths=plan_shadow_paths(settings))
    for info in results.paths:
        try:
            if info.key.startswith("strangler") and strangler_problem:
                raise BenchError(strangler_problem)
            before = backend_stats(backend_ports)
            ports, proxy = open_path(info, supervisor, workdir, backend_ports, "")
            if info.key in NGINX_TUNING:
                meta["nginx_workers"] = meta["nginx_workers"] or info.processes
            probe = shadow_probe(info, backend_ports)
            mirrored = shadow_traffic(delta(before, settled(probe)))
            if mirrored == 0:
                raise BenchError("no shadow request reached the other backend during the check")
            groups = {"backends": backends} | ({"proxy": [proxy]} if proxy else {})
            log(f"{info.label}: ports {ports}, split {info.split}, {mirrored} shadow requests")
            for workload in SHADOW_WORKLOADS:
                results.measurements.append(
                    measure(settings, supervisor, groups, info.key, workload, ports, log, probe)
                )
                summary = shadow_summary(results.measurements[-1])
                log(f"    {summary}")
        except BenchError as error:
            not_measured(info, error, log)
        finally:
            supervisor.stop(info.key)
    if strangler_problem:
        results.notes.append(f"hanging-shadow case not measured: {strangler_problem}")
    else:
        run_hanging_cases(settings, supervisor, workdir, backend_ports, backends, results, log)
    results.cost = compare_cost(log)
    return results


def run_hanging_cases(
    settings: Settings,
    supervisor: Supervisor,
    workdir: Path,
    backend_ports: dict[str, int],
    backends: list[int],
    results: ShadowResults,
    log: Callable[[str], None],
) -> None:
    """The primary's latency at a fixed moderate load with shadow = 0, with every exchange
    shadowed on a candidate that never answers, and (for reference) on a healthy one."""
    hanging_port = free_port()
    hanging = start_backends(supervisor, workdir, {"hanging": hanging_port}, hang=True)
    groups_backends = backends + hanging
    shadow_settings = tuple(HANG_SHADOW.items())
    legacy_only = {"legacy": backend_ports["legacy"]}
    # What is compared here is latency, which the scheduler's placement of five busy
    # processes on two cores moves more than the shadows do: the proxy gets CPU 1, the
    # load generator and the backends CPU 0 (children of this process inherit it).
    everything = os.sched_getaffinity(0)
    pinned = len(everything) >= 2 and not settings.pin
    if pinned:
        for pid in [0, *groups_backends]:
            pin_process(pid, {0})
    try:
        for round_ in range(settings.hang_rounds):
            # Each round starts one case later: no case always runs first or last.
            turn = round_ % len(HANG_CASES)
            for key, label, shadow, hangs, checked in HANG_CASES[turn:] + HANG_CASES[:turn]:
                results.hang_labels[key] = label
                name = f"{key}-{round_ + 1}"
                candidate = hanging_port if hangs else backend_ports["candidate"]
                ports = {"legacy": backend_ports["legacy"], "candidate": candidate}
                setup = StranglerSetup(
                    rollout=0, shadow=shadow, shadow_settings=shadow_settings, checked=checked
                )
                try:
                    pgid, port, admin = start_strangler(supervisor, workdir, name, ports, setup)
                    if pinned:
                        pin_process(pgid, {1})
                    sanity_check(port, name, expect_header=True)

                    def probe(admin: int = admin) -> dict[str, float]:
                        held = {"gauge_hanging_connections": float(established(hanging_port))}
                        return scrape(admin) | backend_stats(legacy_only) | held

                    groups = {"backends": groups_backends, "proxy": [pgid]}
                    log(f"{label} (round {round_ + 1}): port {port}")
                    for workload in settings.hang_workloads:
                        url = f"http://127.0.0.1:{port}"
                        measurement = measure_quietly(
                            functools.partial(
                                measure_paced,
                                settings,
                                supervisor,
                                groups,
                                key,
                                workload,
                                url,
                                probe,
                            ),
                            log,
                        )
                        results.hang.append(measurement)
                        results.hang_round.append(round_)
                        log(f"    {shadow_summary(measurement)}")
                except BenchError as error:
                    results.notes.append(f"{label}: not measured: {error}".splitlines()[0])
                    log(f"{label}: not measured: {error}")
                finally:
                    supervisor.stop(name)
    finally:
        supervisor.stop("backend-hanging")
        if pinned:
            for pid in [0, *backends]:
                pin_process(pid, everything)


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (0: this process) on ``cpus``."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for task in tasks.iterdir() if tasks.exists() else []:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def compare_cost(log: Callable[[str], None]) -> dict[str, Any]:
    """``bench/compare_cost.py`` in a fresh interpreter, with nothing else running."""
    argv = [PYTHON, str(BENCH_DIR / "compare_cost.py"), "--json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO_DIR)
    except (OSError, subprocess.TimeoutExpired) as error:
        log(f"compare_cost.py failed: {error}")
        return {"error": str(error)}
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        reason = (done.stdout + done.stderr).strip().splitlines()[-1:] or [
            f"exit {done.returncode}"
        ]
        log(f"compare_cost.py failed: {reason[0]}")
        return {"error": reason[0]}
    cost: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
    log(
        f"comparing one five-event turn: {cost['match_us']:.1f} µs "
        f"(decode {cost['decode_two_us']:.1f}, normalise {cost['normalise_two_us']:.1f}, "
        f"compare {cost['compare_us']:.1f})"
    )
    return cost


def shadow_summary(m: Measurement) -> dict[str, Any]:
    """What the counters say about one loaded window's shadows."""
    counters = m.counters
    route = ROUTE_OF_WORKLOAD[m.workload]
    summary: dict[str, Any] = {
        "requests": m.requests,
        "backend_shadow_requests": shadow_traffic(counters),
    }
    if "gauge_hanging_connections" in counters:
        summary["hanging_connections"] = round(counters["gauge_hanging_connections"])
    if not any(key.startswith("strangler_") for key in counters):
        return summary
    requests = counted_by(counters, "strangler_requests", "role", route=route)
    comparisons = counted_by(counters, "strangler_comparisons", "outcome", route=route)
    summary |= {
        "primary": requests.get("primary", 0),
        "shadow": requests.get("shadow", 0),
        "comparisons": comparisons,
        "compared": sum(comparisons.values()),
        "dropped": counted_by(counters, "strangler_shadow_dropped", "reason", route=route),
        "divergences": counted_by(counters, "strangler_divergences", "kind", route=route),
        "contract_violations": sum(
            round(v)
            for v in counted(counters, "strangler_contract_violations", route=route).values()
        ),
    }
    return summary


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def hang_figures(results: ShadowResults, workload: str, key: str) -> Measurement | None:
    """One hanging-shadow case over its rounds: the median of each figure."""
    runs = [m for m in results.hang if m.workload == workload and m.path == key]
    if not runs:
        return None
    if len(runs) == 1:
        return runs[0]
    return Measurement(
        workload,
        key,
        runs[0].unit,
        rate=median([m.rate for m in runs]),
        p50_ms=median([m.p50_ms for m in runs]),
        p90_ms=median([m.p90_ms for m in runs]),
        p99_ms=median([m.p99_ms for m in runs]),
        requests=round(median([float(m.requests) for m in runs])),
        # Counters per round, on average.
        counters={
            k: sum(m.counters.get(k, 0.0) for m in runs) / len(runs)
            for r in runs
            for k in r.counters
        },
    )


def paired_change(results: ShadowResults, workload: str, key: str) -> float | None:
    """How a case's p99 differs from the ``shadow = 0`` baseline: each round against that
    round's baseline run (the machine drifts more between rounds than within one), the
    median over rounds."""
    runs = [(r, m) for r, m in zip(results.hang_round, results.hang, strict=True)]
    offs = {r: m for r, m in runs if m.workload == workload and m.path == "hang-off"}
    changes = [
        m.p99_ms / offs[r].p99_ms - 1
        for r, m in runs
        if m.workload == workload and m.path == key and r in offs and offs[r].p99_ms
    ]
    return median(changes) if changes else None


def evaluate_shadow_targets(settings: Settings, results: ShadowResults) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key, workload, description, threshold in SHADOW_TARGETS:
        nginx = find(results.measurements, workload, "nginx-mirror")
        for info in results.paths:
            if not info.key.startswith("strangler") or not info.available:
                continue
            value = ratio(find(results.measurements, workload, info.key), nginx)
            if value is not None:
                rows.append(
                    {
                        "target": key,
                        "description": description,
                        "path": info.key,
                        "threshold": threshold,
                        "value": value,
                        "met": value >= threshold,
                    }
                )
    for workload in settings.hang_workloads:
        change = paired_change(results, workload, "hang-hanging")
        if change is None:
            continue
        rows.append(
            {
                "target": f"{workload}_hang_p99",
                "description": f"{workload.upper()} primary p99 with a hanging shadow backend "
                f"moves < {HANG_P99_TARGET:.0%} vs shadow = 0",
                "path": "hang-hanging",
                "threshold": HANG_P99_TARGET,
                "value": change,
                "met": abs(change) < HANG_P99_TARGET,
            }
        )
    if "match_us" in results.cost:
        rows.append(
            {
                "target": "compare_cost",
                "description": "Decode + normalise + compare one five-event turn "
                f"<= {COMPARE_COST_TARGET_US:g} µs",
                "path": "adapters",
                "threshold": COMPARE_COST_TARGET_US,
                "value": results.cost["match_us"],
                "met": results.cost["match_us"] <= COMPARE_COST_TARGET_US,
            }
        )
    return rows


def shadow_document(results: ShadowResults, targets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "paths": [asdict(info) for info in results.paths],
        "measurements": [asdict(m) | {"shadow": shadow_summary(m)} for m in results.measurements],
        "hang": [asdict(m) | {"shadow": shadow_summary(m)} for m in results.hang],
        "hang_labels": results.hang_labels,
        "compare_cost": results.cost,
        "targets": targets,
        "notes": results.notes,
    }


def fmt_counts(counts: dict[str, int]) -> str:
    shown = {k: v for k, v in sorted(counts.items()) if v}
    return ", ".join(f"{k} {v:,}" for k, v in shown.items()) if shown else "0"


def shadow_report(
    settings: Settings,
    meta: dict[str, Any],
    results: ShadowResults,
    routing: list[Measurement],
    routing_paths: list[PathInfo],
    targets: list[dict[str, Any]],
) -> str:
    labels = {info.key: info.label for info in results.paths}
    routing_labels = {info.key: info.label for info in routing_paths if info.available}
    measured = [info for info in results.paths if info.available]
    out = [
        "## Benchmark: shadow runs (strangler shadow = 1.0 + comparison vs nginx mirror)",
        "",
        f"{meta['machine']}; {meta['nginx']}; {meta['wrk']}; CPU pinning: {meta['pinning']}.",
        "strangler: `shadow = 1.0` on the JSON and NDJSON routes (JSON: `shadow_methods` "
        "adds POST), every exchange also run on the other backend and compared with the "
        "demo's rules (`ignore` timestamp/seq/duration_ms, `canonical_ids` run_id and "
        "tool_call_id, `coalesce` agent_thinking, `presence_only` text; NDJSON also checks "
        "the contract), `[shadow]` defaults (`max_concurrent = 256`, 256 connections, "
        "`timeout = 30`). nginx: the same `split_clients` plus `mirror` of every request, "
        "body included, to the other upstream (nginx compares nothing). "
        f"wrk, {settings.connections} connections / {settings.threads} threads for "
        f"{settings.duration:g} s after {settings.warmup:g} s warm-up, then 1 connection.",
        "",
        "| workload | path | throughput | p50 | p99 | p50 at 1 client | vs nginx + mirror "
        "| vs same proxy without shadow |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in SHADOW_WORKLOADS:
        nginx = find(results.measurements, workload, "nginx-mirror")
        for info in measured:
            m = find(results.measurements, workload, info.key)
            if m is None:
                continue
            plain_key = "nginx" if info.key == "nginx-mirror" else f"strangler-w{info.workers}"
            plain = find(routing, workload, plain_key) if plain_key in routing_labels else None
            versus = ratio(m, nginx) if info.key != "nginx-mirror" else None
            out.append(
                f"| {workload} | {labels[m.path]} | {fmt_rate(m.rate)} {m.unit} "
                f"| {m.p50_ms:.2f} ms | {m.p99_ms:.2f} ms | {m.p50_one_client_ms:.3f} ms "
                f"| {fmt_ratio(versus)} | {fmt_ratio(ratio(m, plain))} |"
            )
    out += [
        "",
        '"vs same proxy without shadow": against the routing suite\'s run of the same '
        "proxy (nginx without mirror, strangler with `shadow = 0`) in this report.",
        "",
        "### Shadows and comparisons in the 50-client window",
        "",
        "| workload | path | requests | shadow requests at the backends | compared "
        "| match | mismatch | ignored or error | contract violations "
        "| shadows dropped (reason) | compared / requests |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for m in results.measurements:
        summary = shadow_summary(m)
        if "primary" in summary:
            outcomes = summary["comparisons"]
            share = summary["compared"] / summary["primary"] if summary["primary"] else 0.0
            other = outcomes.get("ignored", 0) + outcomes.get("error", 0)
            out.append(
                f"| {m.workload} | {labels[m.path]} | {summary['primary']:,} "
                f"| {summary['backend_shadow_requests']:,} | {summary['compared']:,} "
                f"| {outcomes.get('match', 0):,} | {outcomes.get('mismatch', 0):,} | {other:,} "
                f"| {summary['contract_violations']:,} | {fmt_counts(summary['dropped'])} "
                f"| {share:.1%} |"
            )
        else:
            out.append(
                f"| {m.workload} | {labels[m.path]} | {m.requests:,} "
                f"| {summary['backend_shadow_requests']:,} | — | — | — | — | — "
                "| — (nginx compares nothing) | — |"
            )
    out += [
        "",
        "strangler's figures are deltas of its admin `/metrics` "
        '(`strangler_requests_total{role="primary"}`, `strangler_comparisons_total`, '
        "`strangler_shadow_dropped_total`) over the window, read once the shadows still in "
        "flight have finished; the shadow requests are the backends' own count of requests "
        "carrying `X-Strangler-Shadow`. A shadow is dropped, never queued, when "
        "`[shadow] max_concurrent` shadows are already running: the primary is never slowed. "
        '"ignored": the client left before the primary ended (wrk stopping), so there is '
        "nothing to compare.",
    ]
    mismatches = [
        (m, shadow_summary(m)) for m in results.measurements if shadow_summary(m).get("divergences")
    ]
    for m, summary in mismatches:
        out.append(
            f"Divergences, {m.workload} via {labels[m.path]}: {fmt_counts(summary['divergences'])}."
        )
    out += hang_report(settings, results)
    out += cost_report(results.cost)
    out += [
        "",
        "### Where the CPU goes, shadow runs (percent of one core; 200 % = both)",
        "",
        "| workload | path | load generator | proxy | backends | other | machine |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [(m, labels[m.path]) for m in results.measurements]
    rows += [(m, results.hang_labels.get(m.path, m.path)) for m in results.hang]
    for m, label in rows:
        cpu = m.cpu_percent
        out.append(
            f"| {m.workload} | {label} | {cpu.get('loadgen', 0):.0f} % | "
            f"{cpu.get('proxy', 0):.0f} % | {cpu.get('backends', 0):.0f} % "
            f"| {cpu.get('other', 0):.0f} % | {cpu.get('machine', 0):.0f} % |"
        )
    if targets:
        out += [
            "",
            "### Targets (shadow runs)",
            "",
            "| target | path | measured | met |",
            "| --- | --- | ---: | --- |",
        ]
        names = labels | {"hang-hanging": "strangler, hanging shadow", "adapters": "adapters"}
        for row in targets:
            if row["target"] == "compare_cost":
                measured_text = f"{row['value']:.1f} µs"
            elif row["target"].endswith("_hang_p99"):
                measured_text = f"{row['value']:+.1%}"
            else:
                measured_text = f"{row['value']:.2f}"
            out.append(
                f"| {row['description']} | {names.get(row['path'], row['path'])} "
                f"| {measured_text} | {'yes' if row['met'] else '**no**'} |"
            )
    notes = [f"{info.label}: {note}" for info in results.paths for note in info.notes]
    notes += [
        f"{info.label}: not measured: {info.reason}" for info in results.paths if not info.available
    ]
    notes += results.notes
    notes += [
        f"{m.workload} via {labels.get(m.path, results.hang_labels.get(m.path, m.path))}: "
        + "; ".join(m.notes)
        for m in results.measurements + results.hang
        if m.notes
    ]
    notes += [
        f"{m.workload} via {labels.get(m.path, results.hang_labels.get(m.path, m.path))}: "
        f"errors {m.errors}"
        for m in results.measurements + results.hang
        if m.errors
    ]
    if notes:
        out += ["", "### Notes (shadow runs)", ""] + [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def hang_report(settings: Settings, results: ShadowResults) -> list[str]:
    if not results.hang:
        return []
    rounds = settings.hang_rounds
    out = [
        "",
        "### A hanging shadow backend does not hurt the primary",
        "",
        f"Every user on legacy (rollout 0 %), every exchange shadowed on the candidate "
        f"(`shadow = 1.0`), which accepts connections and never answers; `[shadow] timeout = "
        f"{HANG_SHADOW['timeout']:g}`, `connections = {HANG_SHADOW['connections']}`, "
        f"`max_concurrent = {HANG_SHADOW['max_concurrent']}`; 1 strangler worker, alone on "
        f"CPU 1 (load generator and backends on CPU 0). Fixed "
        f"moderate load: wrk, {settings.hang_connections} connections each pausing "
        f"{settings.hang_think_ms} ms between requests, {settings.hang_duration:g} s after "
        f"{settings.hang_warmup:g} s warm-up (past the first shadow timeouts)"
        + (
            f"; median of {rounds} interleaved rounds, each starting one case later (the "
            f"last column: the median of each round's p99 against that round's `shadow = 0` "
            f"run)."
            if rounds > 1
            else "."
        ),
        "",
        "| workload | case | throughput | p50 | p90 | p99 | shadows run | compared "
        "| shadows dropped (reason) | connections held by the hanging backend "
        "| p99 vs shadow = 0 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    hanging_notes: list[str] = []
    for workload in settings.hang_workloads:
        for key, label, _, hangs, _ in HANG_CASES:
            m = hang_figures(results, workload, key)
            if m is None:
                continue
            summary = shadow_summary(m)
            paired = paired_change(results, workload, key) if key != "hang-off" else None
            change = "" if paired is None else f"{paired:+.1%}"
            held = summary.get("hanging_connections", 0) if hangs else None
            out.append(
                f"| {workload} | {label} | {fmt_rate(m.rate)} {m.unit} | {m.p50_ms:.3f} ms "
                f"| {m.p90_ms:.3f} ms | {m.p99_ms:.3f} ms | {summary.get('shadow', 0):,} "
                f"| {summary.get('compared', 0):,} | {fmt_counts(summary.get('dropped', {}))} "
                f"| {'—' if held is None else f'{held:,}'} | {change} |"
            )
            if key == "hang-hanging" and summary.get("compared"):
                hanging_notes.append(
                    f"{workload}: the {summary['compared']:,} shadows that ran and timed out "
                    f"were compared as mismatches (divergences: "
                    f"{fmt_counts(summary['divergences'])}) and counted as "
                    f"{summary['contract_violations']:,} candidate contract violations."
                )
    out += [
        "",
        "With the candidate hanging, the shadows that start wait for a connection or an "
        "answer until the timeout (`timeout` dropped, compared as a `timeout` divergence); "
        "once `breaker_failures` (default 5) have failed in a row, the candidate gets no "
        "shadow for `breaker_seconds` (default 5), then one probe (`breaker` dropped), and "
        "while shadows hang, those beyond `max_concurrent` are dropped at once "
        "(`concurrency`). The primary has its own pool and never waits for a shadow. "
        "The `shadow = 0` baseline keeps the routes' contract and comparison rules, so it "
        "differs from the shadowed runs only in the shadows; the last row drops them too "
        "(the route then checks nothing and is relayed without decoding a byte). "
        '"connections held": established connections to the hanging backend at the end of '
        "the window (the shadow pool's `connections` bound).",
        *(["", *hanging_notes] if hanging_notes else []),
    ]
    return out


def cost_report(cost: dict[str, Any]) -> list[str]:
    if "match_us" not in cost:
        return ["", f"Comparison cost not measured: {cost.get('error', 'unknown')}"] if cost else []
    return [
        "",
        "### Cost of comparing one five-event turn (`bench/compare_cost.py`, timeit)",
        "",
        f"One turn, agent_started … agent_completed, {cost['bytes_per_side']:,} bytes of NDJSON "
        "per side (uuid ids, ISO timestamps, tool arguments and result), legacy and candidate "
        "differing in ids, timestamps, duration and thinking text; demo normalisation rules. "
        f"Median of {cost['repeat']} runs of {cost['number']:,} calls, Python {cost['python']}.",
        "",
        "| step | µs per turn |",
        "| --- | ---: |",
        f"| decode + normalise + compare, both sides, matching turn | {cost['match_us']:.1f} |",
        f"| &nbsp;&nbsp;decode both sides (`NdjsonDecoder`, one feed per line) "
        f"| {cost['decode_two_us']:.1f} |",
        f"| &nbsp;&nbsp;normalise both sides (`Normaliser`) | {cost['normalise_two_us']:.1f} |",
        f"| &nbsp;&nbsp;compare (`compare`, equal fast path) | {cost['compare_us']:.1f} |",
        f"| decode + normalise + compare, a changed tool result (mismatch) "
        f"| {cost['mismatch_us']:.1f} |",
        f"| contract check of both sides (`Contract.check`) | {cost['contract_two_us']:.1f} |",
    ]


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def find(measurements: list[Measurement], workload: str, path: str) -> Measurement | None:
    return next((m for m in measurements if m.workload == workload and m.path == path), None)


def nginx_peers(paths: list[PathInfo]) -> dict[str, str]:
    """Each strangler path's nginx to compare with: the one running as many worker
    processes (``nginx-w1`` for one worker, ``nginx``'s ``auto`` for one per CPU), else
    ``nginx``. A proxy is measured against its peer with the same processes, so that
    neither wins by having more of the CPU scheduler's share on a shared machine."""
    nginx = {info.processes: info.key for info in paths if info.key in ("nginx", "nginx-w1")}
    return {
        info.key: nginx.get(info.workers, "nginx")
        for info in paths
        if info.key.startswith("strangler")
    }


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> float | None:
    if numerator is None or denominator is None or not denominator.rate:
        return None
    return numerator.rate / denominator.rate


def paired_ratio(
    measurements: list[Measurement],
    rounds: list[Measurement],
    workload: str,
    path: str,
    against: str,
) -> float | None:
    """``path``'s throughput against ``against``'s on one workload: each round's ratio
    (the two runs seconds apart), the median over the rounds that measured both. The
    machine's speed drifts from minute to minute, and a run's rate moves with it; two
    runs of the same round drift together, so their ratio moves less than either rate.
    Without rounds, the ratio of the two median runs."""
    ratios = round_ratios(rounds, workload, path, against)
    if ratios:
        return median(ratios)
    return ratio(find(measurements, workload, path), find(measurements, workload, against))


def round_ratios(rounds: list[Measurement], workload: str, path: str, against: str) -> list[float]:
    """Per round that measured both, in round order: ``path``'s rate over ``against``'s."""
    pairs: dict[int, dict[str, float]] = {}
    for m in rounds:
        if m.workload == workload and m.path in (path, against):
            pairs.setdefault(m.round, {})[m.path] = m.rate
    return [
        pairs[r][path] / pairs[r][against]
        for r in sorted(pairs)
        if pairs[r].get(against) and path in pairs[r]
    ]


def evaluate_targets(
    measurements: list[Measurement],
    rounds: list[Measurement],
    strangler_keys: list[str],
    peers: dict[str, str],
) -> list[dict[str, Any]]:
    rows = []
    for key, workload, description, threshold in TARGETS:
        direct = find(measurements, workload, "direct")
        for path in strangler_keys:
            strangler = find(measurements, workload, path)
            against = peers.get(path, "nginx") if key.endswith("_vs_nginx") else "direct"
            value: float | None
            per_round: list[float] = []
            if key.endswith(("_vs_nginx", "_vs_direct")):
                per_round = round_ratios(rounds, workload, path, against)
                value = paired_ratio(measurements, rounds, workload, path, against)
                met = value is not None and value >= threshold
            else:
                value = (
                    strangler.p50_one_client_ms - direct.p50_one_client_ms
                    if strangler is not None and direct is not None
                    else None
                )
                met = value is not None and value <= threshold
            if value is not None:
                rows.append(
                    {
                        "target": key,
                        "description": description,
                        "path": path,
                        "against": against,
                        "threshold": threshold,
                        "value": value,
                        "rounds": per_round,
                        "met": met,
                    }
                )
    return rows


def comparisons(
    measurements: list[Measurement], rounds: list[Measurement], peers: dict[str, str]
) -> list[dict[str, Any]]:
    """Per workload and proxied path: throughput ratios (strangler against the nginx
    with as many workers, ``nginx_against``) and added one-client p50."""
    rows = []
    for m in measurements:
        if m.path == "direct":
            continue
        direct = find(measurements, m.workload, "direct")
        peer = peers.get(m.path)
        rows.append(
            {
                "workload": m.workload,
                "path": m.path,
                "nginx_against": peer,
                "vs_nginx": (
                    paired_ratio(measurements, rounds, m.workload, m.path, peer) if peer else None
                ),
                "vs_direct": paired_ratio(measurements, rounds, m.workload, m.path, "direct"),
                "added_p50_one_client_ms": (
                    m.p50_one_client_ms - direct.p50_one_client_ms if direct else None
                ),
            }
        )
    return rows


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown_report(
    settings: Settings,
    meta: dict[str, Any],
    paths: list[PathInfo],
    measurements: list[Measurement],
    rounds: list[Measurement],
    targets: list[dict[str, Any]],
    peers: dict[str, str],
) -> str:
    labels = {info.key: info.label for info in paths}
    skipped = [info for info in paths if not info.available]
    paths = [info for info in paths if info.available]
    out = [
        "## Benchmark: direct vs nginx split_clients vs strangler",
        "",
        f"{meta['machine']}; {meta['nginx']}"
        + (
            f" (`worker_processes auto`: {meta['nginx_workers']} workers"
            + ("; and `worker_processes 1`" if "nginx-w1" in labels else "")
            + ")"
            if meta["nginx_workers"]
            else ""
        )
        + f"; {meta['wrk']}; CPU pinning: {meta['pinning']}; "
        f"background load before the run: {meta['background_cpu_percent']:.0f} % of one core.",
        f"HTTP: wrk, {settings.connections} connections / {settings.threads} threads for "
        f"{settings.duration:g} s, then 1 connection for {settings.latency_duration:g} s. "
        f"WebSocket: {settings.ws_sessions} sessions for {settings.ws_duration:g} s, then 1. "
        "Backends: legacy + candidate (`bench/backend.py`); nginx and strangler split users "
        "50/50 between them; direct drives both straight (load shared), its 1-client runs "
        "go to legacy."
        + (
            f" Every path measured in {settings.rounds} interleaved rounds, each starting one "
            "path later; each row is the round of median throughput, and each ratio the "
            "median of the rounds' own ratios (runs of one round are seconds apart)."
            if settings.rounds > 1
            else ""
        ),
        "",
        "| workload | path | throughput | p50 | p99 | p50 at 1 client "
        "| vs nginx, as many workers | vs direct |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in settings.workloads:
        direct = find(measurements, workload, "direct")
        for info in paths:
            m = find(measurements, workload, info.key)
            if m is None:
                continue
            peer = peers.get(info.key)
            versus_nginx = (
                paired_ratio(measurements, rounds, workload, m.path, peer) if peer else None
            )
            versus_direct = (
                paired_ratio(measurements, rounds, workload, m.path, "direct")
                if info.key != "direct"
                else None
            )
            out.append(
                f"| {workload} | {labels[m.path]} | {fmt_rate(m.rate)} {m.unit} "
                f"| {m.p50_ms:.2f} ms | {m.p99_ms:.2f} ms | {m.p50_one_client_ms:.3f} ms "
                f"| {fmt_ratio(versus_nginx)} | {fmt_ratio(versus_direct)} |"
            )
    out += [
        "",
        "p50/p99 are per request at 50 connections (HTTP) or per turn, message sent to fifth "
        "event received, at 200 sessions (WebSocket).",
        "",
        "### Added latency at one client (p50 - direct p50)",
        "",
        "| workload | " + " | ".join(labels[i.key] for i in paths if i.key != "direct") + " |",
        "| --- |" + " ---: |" * sum(1 for i in paths if i.key != "direct"),
    ]
    for workload in settings.workloads:
        direct = find(measurements, workload, "direct")
        cells = []
        for info in paths:
            if info.key == "direct":
                continue
            m = find(measurements, workload, info.key)
            cells.append(
                f"{(m.p50_one_client_ms - direct.p50_one_client_ms) * 1000:+.0f} µs"
                if m is not None and direct is not None
                else ""
            )
        out.append(f"| {workload} | " + " | ".join(cells) + " |")
    out += [
        "",
        "### Where the CPU goes (percent of one core over the loaded window; 200 % = both)",
        "",
        "| workload | path | load generator | proxy | backends | other | machine |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in measurements:
        cpu = m.cpu_percent
        proxy = f"{cpu['proxy']:.0f} %" if "proxy" in cpu else "—"
        out.append(
            f"| {m.workload} | {labels[m.path]} | {cpu.get('loadgen', 0):.0f} % | {proxy} "
            f"| {cpu.get('backends', 0):.0f} % | {cpu.get('other', 0):.0f} % "
            f"| {cpu.get('machine', 0):.0f} % |"
        )
    out += [
        "",
        '"other" is machine CPU not charged to the processes above: kernel work on their '
        "behalf, or unrelated processes (a noisy run).",
    ]
    if targets:
        out += [
            "",
            "### Targets",
            "",
            "| target | path | against | measured | each round | met |",
            "| --- | --- | --- | ---: | --- | --- |",
        ]
        for row in targets:
            measured = (
                f"{row['value'] * 1000:+.0f} µs"
                if row["target"].endswith("_p50")
                else f"{row['value']:.2f}"
            )
            out.append(
                f"| {row['description']} | {labels[row['path']]} "
                f"| {labels.get(row['against'], row['against'])} | {measured} "
                f"| {', '.join(f'{r:.2f}' for r in row['rounds'])} "
                f"| {'yes' if row['met'] else '**no**'} |"
            )
    notes = [info for info in paths if info.notes]
    if notes:
        out += ["", "### Notes", ""]
        out += [f"- {info.label}: {note}" for info in notes for note in info.notes]
    if skipped:
        out += ["", "### Not measured", ""]
        out += [f"- {info.label}: {info.reason}" for info in skipped]
    noisy = [m for m in measurements if m.notes]
    if noisy:
        out += ["", "### Noisy runs", ""]
        out += [f"- {m.workload} via {labels[m.path]}: {'; '.join(m.notes)}" for m in noisy]
    errors = [m for m in measurements if m.errors]
    if errors:
        out += ["", "### Errors seen", ""]
        out += [f"- {m.workload} via {labels[m.path]}: {m.errors}" for m in errors]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="loaded HTTP window (s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before each (s)")
    parser.add_argument("--latency-duration", type=float, default=3.0, help="1-client run (s)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ws-sessions", type=int, default=200)
    parser.add_argument("--ws-duration", type=float, default=6.0)
    parser.add_argument("--ws-latency-duration", type=float, default=2.0)
    parser.add_argument("--pin", action="store_true", help="proxy on CPU 1, the rest on CPU 0")
    parser.add_argument(
        "--paths",
        default="direct,nginx-w1,nginx,strangler",
        help="comma list of direct, nginx (one worker per CPU), nginx-w1 (one worker), "
        "strangler; references: nginx-plain (nginx "
        "defaults: no upstream keep-alive), minimal (bench/minimal_proxy.py, a bare aiohttp "
        "proxy); 'all' for every one",
    )
    parser.add_argument("--workloads", default="json,ndjson,websocket")
    parser.add_argument(
        "--strangler-workers", default="1,2", help="[server] workers values to measure"
    )
    parser.add_argument(
        "--suite",
        default="all",
        choices=("routing", "shadow", "all"),
        help="routing: direct / nginx / strangler without shadows; shadow: shadowed "
        "throughput vs nginx mirror, a hanging shadow backend, comparison cost; all: both",
    )
    parser.add_argument(
        "--hang-connections", type=int, default=10, help="hanging-shadow case: connections"
    )
    parser.add_argument(
        "--hang-think-ms", type=int, default=5, help="hanging-shadow case: pause per request"
    )
    parser.add_argument("--hang-duration", type=float, default=8.0)
    parser.add_argument(
        "--hang-workloads", default="ndjson", help="comma list of json, ndjson (hanging case)"
    )
    parser.add_argument(
        "--hang-rounds", type=int, default=5, help="repeat the hanging-shadow cases, interleaved"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="routing suite: interleaved rounds over the paths; each figure is the median",
    )
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    parser.add_argument("--no-install", action="store_true", help="never call apt-get")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    hang_warmup = HANG_SHADOW["timeout"] + 1.0  # past the first shadow timeouts
    if args.quick:
        args.duration, args.warmup, args.latency_duration = 2.0, 1.0, 1.0
        args.ws_duration, args.ws_latency_duration = 2.0, 1.0
        args.hang_duration = 2.0
    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    paths = ALL_PATHS if args.paths == "all" else tuple(p for p in args.paths.split(",") if p)
    unknown = [p for p in paths if p not in ALL_PATHS]
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    hang_workloads = tuple(w for w in args.hang_workloads.split(",") if w)
    unknown = [w for w in hang_workloads if w not in SHADOW_WORKLOADS]
    if unknown:
        parser.error(f"unknown hang workload(s): {', '.join(unknown)}")
    return Settings(
        duration=args.duration,
        warmup=args.warmup,
        latency_duration=args.latency_duration,
        connections=args.connections,
        threads=args.threads,
        ws_sessions=args.ws_sessions,
        ws_duration=args.ws_duration,
        ws_latency_duration=args.ws_latency_duration,
        pin=args.pin,
        paths=paths,
        workloads=workloads,
        strangler_workers=tuple(int(w) for w in args.strangler_workers.split(",") if w),
        install=not args.no_install,
        keep_temp=args.keep_temp,
        output=args.output,
        suites=SUITES if args.suite == "all" else (args.suite,),
        hang_connections=args.hang_connections,
        hang_think_ms=args.hang_think_ms,
        hang_duration=args.hang_duration,
        hang_warmup=hang_warmup,
        hang_workloads=hang_workloads,
        hang_rounds=max(1, args.hang_rounds),
        rounds=max(1, args.rounds),
    )


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="strangler-bench-"))
    try:
        yield directory
    finally:
        if keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def plan_paths(settings: Settings) -> list[PathInfo]:
    """One entry per path to measure, in order; strangler once per ``workers`` value."""
    labels = {
        "direct": "direct",
        "nginx": "nginx ({workers} workers)",
        "nginx-w1": "nginx ({workers} worker)",
        "nginx-plain": "nginx, no upstream keep-alive ({workers} workers)",
        "minimal": "minimal aiohttp proxy",
    }
    plan = []
    for path in settings.paths:
        if path == "strangler":
            plan += [
                PathInfo(f"strangler-w{w}", f"strangler ({w} worker{'s' if w > 1 else ''})", w)
                for w in settings.strangler_workers
            ]
        else:
            plan.append(PathInfo(path, labels[path]))
    return plan


def open_path(
    info: PathInfo,
    supervisor: Supervisor,
    workdir: Path,
    backend_ports: dict[str, int],
    strangler_problem: str,
) -> tuple[list[int], int | None]:
    """Start what the path needs and check it routes; the ports to load and the proxy's
    process group (None for direct). A strangler path's admin port goes to ``info``."""
    key = info.key
    if key == "direct":
        info.split = sanity_check(backend_ports["legacy"], key, expect_header=False)
        return list(backend_ports.values()), None
    if key in NGINX_TUNING:
        pgid, port = start_nginx(supervisor, workdir, backend_ports, key)
        info.processes = len(group_members(pgid)) - 1  # the master is not a worker
        info.label = info.label.format(workers=info.processes)
    elif key == "minimal":
        pgid, port = start_minimal(supervisor, workdir, backend_ports)
        info.processes = 1
    else:
        if strangler_problem:
            raise BenchError(strangler_problem)
        setup = info.setup or StranglerSetup(workers=info.workers)
        pgid, port, info.admin_port = start_strangler(
            supervisor, workdir, key, backend_ports, setup
        )
        info.processes = len(group_members(pgid))
        if info.processes < info.workers:
            info.notes.append(
                f"`workers = {info.workers}` was accepted but {info.processes} "
                "process(es) run: the key has no effect yet"
            )
    info.split = sanity_check(port, key, expect_header=True)
    return [port], pgid


def run_all(
    settings: Settings, meta: dict[str, Any], log: Callable[[str], None]
) -> tuple[list[PathInfo], list[Measurement], list[Measurement], ShadowResults | None]:
    """Backends up once, then every path of every suite in turn, each stopped before the
    next starts."""
    supervisor = Supervisor(settings.pin)
    paths = plan_paths(settings) if "routing" in settings.suites else []
    measurements: list[Measurement] = []
    rounds: list[Measurement] = []
    shadow: ShadowResults | None = None
    try:
        with workspace(settings.keep_temp) as workdir:
            backend_ports = {"legacy": free_port(), "candidate": free_port()}
            log(f"backends on {backend_ports}; work dir {workdir}")
            backends = start_backends(supervisor, workdir, backend_ports)
            wanted = "strangler" in settings.paths or "shadow" in settings.suites
            problem = strangler_runnable() if wanted else ""
            rounds = run_routing_rounds(
                settings, supervisor, workdir, backend_ports, backends, paths, problem, meta, log
            )
            measurements += median_measurements(rounds)
            if "shadow" in settings.suites:
                shadow = run_shadow_suite(
                    settings, supervisor, workdir, backend_ports, backends, problem, meta, log
                )
    finally:
        supervisor.stop_all()
    return paths, measurements, rounds, shadow


def run_routing_rounds(
    settings: Settings,
    supervisor: Supervisor,
    workdir: Path,
    backend_ports: dict[str, int],
    backends: list[int],
    paths: list[PathInfo],
    problem: str,
    meta: dict[str, Any],
    log: Callable[[str], None],
) -> list[Measurement]:
    """Every routing path, ``settings.rounds`` times. A round starts every path, then
    measures one workload through all of them before the next workload, so that the
    runs compared with each other are seconds apart, not minutes: on a shared virtual
    machine the speed of the CPU drifts from minute to minute. Each round starts one
    path later, so that the order favours no path. A path waiting its turn is idle."""
    runs: list[Measurement] = []
    for number in range(settings.rounds):
        if settings.rounds > 1 and paths:
            log(f"routing round {number + 1} of {settings.rounds}")
        shift = number % len(paths) if paths else 0
        opened: list[tuple[PathInfo, list[int], dict[str, list[int]]]] = []
        try:
            for info in paths[shift:] + paths[:shift]:
                if not info.available:
                    continue
                try:
                    ports, proxy = open_path(info, supervisor, workdir, backend_ports, problem)
                except BenchError as error:
                    supervisor.stop(info.key)
                    not_measured(info, error, log)
                    continue
                if info.key == "nginx":
                    meta["nginx_workers"] = info.processes
                log(f"{info.label}: ports {ports}, split {info.split}")
                opened.append(
                    (info, ports, {"backends": backends} | ({"proxy": [proxy]} if proxy else {}))
                )
            for workload in settings.workloads:
                for info, ports, groups in opened:
                    if not info.available:
                        continue
                    try:
                        m = measure(settings, supervisor, groups, info.key, workload, ports, log)
                    except BenchError as error:
                        not_measured(info, error, log)
                        continue
                    m.round = number
                    runs.append(m)
        finally:
            for info, _, _ in opened:
                supervisor.stop(info.key)
    return runs


def not_measured(info: PathInfo, error: BenchError, log: Callable[[str], None]) -> None:
    """A path that could not be measured: reported in the tables with why."""
    info.available = False
    info.reason = str(error).strip().splitlines()[0]
    log(f"{info.label}: not measured: {error}")


def median_measurements(runs: list[Measurement]) -> list[Measurement]:
    """Per workload and path, the run of median throughput (a real run, so its latencies
    and CPU belong together), noting the spread of the rounds."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in runs:
        groups.setdefault((m.workload, m.path), []).append(m)
    chosen = []
    for group in groups.values():
        ordered = sorted(group, key=lambda m: m.rate)
        middle = replace(ordered[(len(ordered) - 1) // 2], round=-1)
        if len(group) > 1:
            rates = ", ".join(f"{m.rate:,.0f}" for m in sorted(group, key=lambda m: m.round))
            note = f"median of {len(group)} rounds ({rates} {middle.unit})"
            middle.notes = [*middle.notes, note]
        chosen.append(middle)
    return chosen


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)
    started = time.monotonic()
    ensure_tools(settings.install, log)
    idle_check = background_load()
    if idle_check > 15:
        log(
            f"warning: {idle_check:.0f} % of a core is busy before the benchmark starts; "
            "results will be noisy"
        )
    meta: dict[str, Any] = {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "nginx": tool_version(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": tool_version(["wrk", "-v"]).split(" [")[0],
        "pinning": "load generator + backends on CPU 0, proxy on CPU 1"
        if settings.pin
        else "none (all processes share both CPUs)",
        "nginx_workers": 0,
        "background_cpu_percent": idle_check,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    paths, measurements, rounds, shadow = run_all(settings, meta, log)

    strangler_keys = [i.key for i in paths if i.key.startswith("strangler") and i.available]
    peers = nginx_peers(paths)
    targets = evaluate_targets(measurements, rounds, strangler_keys, peers)
    shadow_targets = evaluate_shadow_targets(settings, shadow) if shadow is not None else []
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    parts = []
    if "routing" in settings.suites:
        parts.append(markdown_report(settings, meta, paths, measurements, rounds, targets, peers))
    if shadow is not None:
        parts.append(shadow_report(settings, meta, shadow, measurements, paths, shadow_targets))
    report = "\n".join(parts)
    print(report)
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "paths": [asdict(info) for info in paths],
        "measurements": [asdict(m) for m in measurements],
        "rounds": [asdict(m) for m in rounds],
        "comparisons": comparisons(measurements, rounds, peers),
        "targets": targets,
        "shadow": shadow_document(shadow, shadow_targets) if shadow is not None else None,
    }
    settings.output.write_text(json.dumps(document, indent=2) + "\n")
    settings.output.with_suffix(".md").write_text(report)
    log(
        f"wrote {settings.output} and {settings.output.with_suffix('.md')} in {meta['elapsed_s']} s"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as failure:
        print(f"bench: {failure}", file=sys.stderr)
        sys.exit(1)
