"""Real demo dispatchers behind a real proxy with shadowing, for the shadow tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import ProxyServer
from proxy.context import Proxy
from proxy.dispatcher import KNOBS_KEY, STATS_KEY, Knobs, Stats, build_app, plan_turn
from proxy.settings import Settings
from tests.proxy_harness import ADMIN_TOKEN, flags_document, running_proxy, write_flags

ServerFactory = Callable[..., Awaitable[TestServer]]
FLAG = "ssot-dispatcher"
CONTRACT = "agent_started (agent_thinking | tool_executing tool_completed)* agent_completed"
# What legitimately differs between two runs of the same turn on the demo dispatchers.
DEMO_COMPARE = {
    "ignore": ["timestamp", "seq", "duration_ms", "*.duration_ms"],
    "canonical_ids": ["run_id", "tool_call_id"],
    "coalesce": ["agent_thinking"],
    "presence_only": ["text"],
}
TOOL_PROMPT = next(p for p in (f"prompt {i}" for i in range(200)) if plan_turn(p).tool_calls)


def routes(**overrides: Any) -> list[dict[str, Any]]:
    common = {
        "flag": FLAG,
        "shadow": 1.0,
        "shadow_methods": ["GET", "POST"],
        "contract": CONTRACT,
        "user_field": "user_id",
        "compare": DEMO_COMPARE,
        "turn_idle_seconds": 2.0,
        **overrides,
    }
    return [
        {"name": "agent", "path": "/ws/agent", "protocol": "websocket", **common},
        {"name": "stream", "path": "/api/agent/stream", "protocol": "ndjson", **common},
        {"name": "sse", "path": "/api/agent/sse", "protocol": "sse", **common},
        {"name": "run", "path": "/api/agent/run", "protocol": "json", **common},
    ]


@dataclass
class Stack:
    server: ProxyServer
    legacy: web.Application
    candidate: web.Application
    flags_path: Path

    @property
    def proxy(self) -> Proxy:
        assert self.server.proxy is not None
        return self.server.proxy

    @property
    def url(self) -> str:
        return self.server.proxy_url

    def knobs(self, backend: str) -> Knobs:
        return (self.legacy if backend == "legacy" else self.candidate)[KNOBS_KEY]

    def stats(self, backend: str) -> Stats:
        return (self.legacy if backend == "legacy" else self.candidate)[STATS_KEY]

    def sample(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    async def settle(self) -> None:
        """Wait until every shadow in flight has been compared."""
        await self.proxy.shadows.settle()


@asynccontextmanager
async def shadow_stack(
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    *,
    rollout: float = 0,
    route_overrides: dict[str, Any] | None = None,
    shadow: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    legacy = build_app("legacy", time_scale=0)
    candidate = build_app("candidate", time_scale=0)
    legacy_server = await aiohttp_server(legacy)
    candidate_server = await aiohttp_server(candidate)
    flags_path = write_flags(tmp_path / "flags.json", flags_document(FLAG, rollout=rollout))
    settings = Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
            "backends": {
                "legacy": f"http://127.0.0.1:{legacy_server.port}",
                "candidate": f"http://127.0.0.1:{candidate_server.port}",
            },
            "flags": {"provider": "file", "file": flags_path, "poll_interval": 0.05},
            "shadow": {"drain_seconds": 2.0, **(shadow or {})},
            "divergences": {"path": tmp_path / "divergences.sqlite3"},
            "routes": routes(**(route_overrides or {})),
        }
    )
    async with running_proxy(settings) as server:
        yield Stack(server, legacy, candidate, flags_path)
