"""Build real proxies on loopback for tests: settings in code, ports chosen by the OS."""

from __future__ import annotations

import json
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
        admin={"host": "127.0.0.1", "port": 0, "token": "test-token"},
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
