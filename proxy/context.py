"""What the relays share: the running proxy's parts, built once at start (shell)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import web

from flags.provider import FlagProvider
from proxy.metrics import Metrics
from proxy.routing import Backend, RouteTable
from proxy.settings import Settings
from proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from proxy.divergence_store import DivergenceStore
    from proxy.experiment import RouteExperiment
    from proxy.shadow import ShadowRunner


class Closable(Protocol):
    """An open WebSocket session, as shutdown sees it."""

    def close(self, *, code: int = ..., message: bytes = ...) -> Awaitable[bool]: ...


@dataclass(eq=False)
class Proxy:
    """The running proxy: settings, route table, flags, metrics and upstream pool."""

    settings: Settings
    routes: RouteTable
    flags: FlagProvider
    metrics: Metrics
    session: aiohttp.ClientSession  # WebSocket upstream connections
    shadow_session: aiohttp.ClientSession  # shadow WebSocket connections: a pool of their own
    pool: UpstreamPool  # HTTP upstream exchanges
    backend_urls: dict[Backend, str]
    shadows: ShadowRunner
    experiments: dict[str, RouteExperiment]
    store: DivergenceStore | None
    websockets: set[Closable] = field(default_factory=set)
    draining: bool = False

    @property
    def identity_header(self) -> str:
        return self.settings.identity.header


PROXY_KEY = web.AppKey("strangler_proxy", Proxy)
