"""Build real proxies on loopback for tests: settings in code, ports chosen by the OS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from flags.provider import FlagProvider
from proxy.app import ProxyServer
from proxy.settings import Settings


def flags_document(
    flag: str = "ssot-dispatcher", rollout: float = 50, **extra: Any
) -> dict[str, Any]:
    strategy = {
        "name": "flexibleRollout",
        "parameters": {"rollout": str(rollout), "stickiness": "userId", "groupId": flag},
        "constraints": [],
    }
    return {
        "version": 1,
        "features": [{"name": flag, "enabled": True, "strategies": [strategy]}],
        **extra,
    }


def write_flags(path: Path, document: Mapping[str, Any]) -> Path:
    """Write atomically, as operators are told to: a temporary file, then a rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)
    return path


ADMIN_TOKEN = "test-token"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # what the admin views ask for


def make_settings(
    legacy: str,
    candidate: str,
    flags_file: Path,
    *,
    routes: Sequence[Mapping[str, Any]] = (),
    server: Mapping[str, Any] | None = None,
) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": 0, **(server or {})},
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
        backends={"legacy": legacy, "candidate": candidate},
        flags={"provider": "file", "file": flags_file, "poll_interval": 0.05},
        routes=list(routes),
    )


ROUTES = [
    {"name": "agent", "path": "/ws/agent", "protocol": "websocket", "flag": "ssot-dispatcher"},
    {"name": "stream", "path": "/api/agent", "protocol": "ndjson", "flag": "ssot-dispatcher"},
    {"name": "echo", "path": "/echo", "protocol": "json", "flag": "ssot-dispatcher"},
]


@asynccontextmanager
async def running_proxy(
    settings: Settings, flags: FlagProvider | None = None
) -> AsyncIterator[ProxyServer]:
    server = ProxyServer(settings, registry=CollectorRegistry(), flags=flags)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class StranglerProcess:
    """A real ``strangler run`` process, started on a configuration file."""

    def __init__(self, proc: asyncio.subprocess.Process, proxy_url: str, admin_url: str) -> None:
        self.proc = proc
        self.proxy_url = proxy_url
        self.admin_url = admin_url
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def _read_log(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode())


@asynccontextmanager
async def strangler_process(config: Path) -> AsyncIterator[StranglerProcess]:
    """Start ``strangler run --config`` and wait for the line that says where it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    seen = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        seen.append(line)
        assert line, "strangler exited before listening:\n" + "".join(seen)
        match = re.search(r"listening on (\S+) \(admin (\S+?)\)", line)
        if match:
            break
    running = StranglerProcess(proc, match.group(1), match.group(2))
    running.log.extend(seen)
    running._reader = asyncio.create_task(running._read_log())
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
        await proc.wait()
        await running._reader


def rss_bytes(pid: int) -> int:
    """The resident memory of a process and all its descendants."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def config_with(tmp_path: Path, section: str, keys: str) -> Path:
    """A configuration file with the given ``[section]`` keys, two backends and a flags
    file beside it: the least a setting's own test needs."""
    write_flags(tmp_path / "flags.json", flags_document())
    config = tmp_path / "strangler.toml"
    config.write_text(
        f"[{section}]\n{keys}\n[backends]\n"
        'legacy = "http://127.0.0.1:9001"\ncandidate = "http://127.0.0.1:9002"\n'
        '[flags]\nfile = "flags.json"\n'
    )
    return config
