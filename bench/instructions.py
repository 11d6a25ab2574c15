"""Instructions the proxy runs per exchange, counted by valgrind's callgrind.

Throughput on a shared machine moves by 10-20 % from one run to the next; the number of
user-space instructions the proxy runs over a fixed number of exchanges moves by under
0.5 %. That makes it the ruler for a change of a few percent on the per-request path.

This starts the two bench backends (``bench/backend.py``) and ``strangler run``, routing
only, as the routing suite configures it, under ``valgrind --tool=callgrind``. For each
workload it warms the proxy up, zeroes the counters, drives a fixed number of exchanges
on 10 keep-alive connections (users spread over both backends), dumps the counters and
prints the instructions per exchange. System calls are counted up to the kernel's door:
the kernel's own work is not in the figure (see ``perf`` for that). Under valgrind the
proxy runs about fifty times slower; the count does not depend on it.

Run: ``.venv/bin/python bench/instructions.py [--exchanges 2000] [--workloads ...]``
(``json,ndjson,websocket`` by default; a WebSocket exchange is one turn, a client message
and the five events back; installs valgrind with apt-get where missing, ``--no-install``
refuses to). The file callgrind wrote is kept with ``--keep``:
``callgrind_annotate --inclusive=yes FILE`` says where the instructions go.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import (
    PYTHON,
    STRANGLER,
    WORKLOADS,
    BenchError,
    StranglerSetup,
    Supervisor,
    ensure_tools,
    flags_document,
    free_port,
    http_get_ok,
    start_backends,
    strangler_config,
    wait_until,
)
from wsload import TERMINAL, masked_text_frame

CONNECTIONS = 10
WARMUP = 300
_TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


async def websocket_turns(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str, count: int
) -> None:
    """The handshake, then ``count`` turns: one client message, frames up to the terminal
    event."""
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {WORKLOADS['websocket']['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nX-User-Id: {user}\r\n\r\n".encode()
    )
    response = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in response.split(b"\r\n", 1)[0]:
        raise BenchError(f"websocket: {response.splitlines()[0]!r}")
    message = json.dumps({"type": "user_message", "user_id": user, "text": "run the tool"})
    frame = masked_text_frame(message.encode(), os.urandom(4))
    for _ in range(count):
        writer.write(frame)
        while True:
            first, size = await reader.readexactly(2)
            if size == 126:
                size = int.from_bytes(await reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(size)
            if first & 0x0F == 0x8:
                raise BenchError(f"websocket: closed {payload[:2].hex()}")
            if TERMINAL in payload:
                break


async def drive(port: int, workload: str, exchanges: int) -> None:
    """``exchanges`` requests of the workload (WebSocket: turns), on CONNECTIONS keep-alive
    connections."""
    spec = WORKLOADS[workload]

    async def one_connection(index: int, count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if workload == "websocket":
                await websocket_turns(reader, writer, f"user-{index}", count)
                return
            for n in range(count):
                user = f"user-{index}-{n % 37}".encode()
                if spec["method"] == "POST":
                    body = b'{"user_id": "%s", "prompt": "hi"}' % user
                    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: %s\r\n" % (
                        spec["path"].encode(),
                        user,
                    )
                    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(
                        body
                    )
                    writer.write(head + body)
                else:
                    writer.write(
                        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: %s\r\n\r\n"
                        % (spec["path"].encode(), user)
                    )
                response = await reader.readuntil(b"\r\n\r\n")
                if not response.startswith(b"HTTP/1.1 200 "):
                    raise BenchError(f"{workload}: {response.splitlines()[0]!r}")
                length = _LENGTH.search(response)
                if length is not None:
                    await reader.readexactly(int(length.group(1)))
                else:  # chunked: up to the last chunk
                    await reader.readuntil(b"\r\n0\r\n\r\n")
        finally:
            writer.close()

    share, rest = divmod(exchanges, CONNECTIONS)
    await asyncio.gather(
        *(one_connection(i, share + (1 if i < rest else 0)) for i in range(CONNECTIONS))
    )


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)],
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def count(
    pid: int, directory: Path, port: int, workload: str, exchanges: int
) -> tuple[int, int, int]:
    """Instructions per exchange of one workload; what the idle proxy ran in as long, and
    what the once-a-second write-out of the metrics cost, both taken off.

    The proxy also works by the clock: the listener sweeps its connections, and each
    worker writes its batched metrics out for the supervisor once a second. Under
    valgrind a run takes fifty times as long, so that work would weigh fifty times as
    much as in service (where a write-out costs a few instructions an exchange). The
    sweeps are measured over an idle window as long as the run, the write-out
    (``Metrics.flush``, whose cost grows with what the batch holds) in the run's own
    counts; both are taken off, so the figure is what the exchanges themselves cost.
    """
    asyncio.run(drive(port, workload, WARMUP))
    callgrind_control(pid, "--zero")
    started = time.monotonic()
    asyncio.run(drive(port, workload, exchanges))
    elapsed = time.monotonic() - started
    busy, busy_flush = _dump(pid, directory, workload)
    callgrind_control(pid, "--zero")
    time.sleep(elapsed)
    idle, idle_flush = _dump(pid, directory, f"{workload}-idle")
    idle_rest = idle - idle_flush
    return (busy - busy_flush - idle_rest) // exchanges, idle_rest, busy_flush


# A line of ``callgrind_annotate --inclusive=yes`` naming the compiled Metrics.flush.
_FLUSH = re.compile(r"^\s*([\d,]+) .*metrics___Metrics___flush ", re.MULTILINE)


def _flush_cost(dump: Path) -> int:
    """The instructions spent in the metrics write-out, inclusive (0 for a build that is
    not compiled, whose Python functions callgrind cannot tell apart)."""
    listing = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dump)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return max((int(m.group(1).replace(",", "")) for m in _FLUSH.finditer(listing)), default=0)


def _dump(pid: int, directory: Path, name: str) -> tuple[int, int]:
    """Dump the counters of ``pid`` since they were zeroed: their total, and the part of
    it the metrics write-out took."""
    before = set(directory.glob("callgrind.out.*"))
    callgrind_control(pid, "--dump", name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(directory.glob("callgrind.out.*")) - before:
            totals = _TOTALS.search(dump.read_bytes())
            if totals is not None:
                kept = directory / f"callgrind.{name}.out"
                dump.rename(kept)
                return int(totals.group(1)), _flush_cost(kept)
        time.sleep(0.2)
    raise BenchError(f"{name}: callgrind wrote no dump")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=2000)
    parser.add_argument("--workloads", default="json,ndjson,websocket")
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind files")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)} ({', '.join(WORKLOADS)})")
    try:
        ensure_tools(not args.no_install, print, ("valgrind", "callgrind_control"), ("valgrind",))
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="strangler-instructions-"))
    supervisor = Supervisor(pin=False)
    try:
        ports = {"legacy": free_port(), "candidate": free_port()}
        start_backends(supervisor, directory, ports)
        port, admin_port = free_port(), free_port()
        config = directory / "strangler.toml"
        config.write_text(strangler_config(port, admin_port, ports, StranglerSetup(), directory))
        (directory / "flags.json").write_text(json.dumps(flags_document(50)))
        # `strangler run` supervises its worker, forked by a fork server it starts: every
        # process runs under callgrind, and the worker's counters are the ones read.
        command = [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={directory / 'callgrind.out.%p'}",
            *(PYTHON, STRANGLER, "run", "--config", str(config)),
        ]
        log_file = directory / "strangler.log"
        process = supervisor.start("strangler", command, "proxy", log_file)
        wait_until(http_get_ok(admin_port, "/readyz"), process, "strangler", timeout=600)
        worker = re.search(r"worker 0 \(pid (\d+)\) serving", log_file.read_text())
        # (A build from before every run was supervised serves in the process itself.)
        pid = int(worker.group(1)) if worker is not None else process.pid
        print(f"strangler under callgrind, {args.exchanges:,} exchanges a workload")
        for workload in workloads:
            per_exchange, idle, flush = count(pid, directory, port, workload, args.exchanges)
            print(
                f"  {workload:<9} {per_exchange:>9,} instructions per exchange (taken off:"
                f" the idle proxy's {idle:,} in as long, the metrics write-out's {flush:,})"
            )
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()
        if args.keep:
            print(f"callgrind files in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
