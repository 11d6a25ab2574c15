"""What the relays share: the running proxy's parts, built once at start (shell)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

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

    def close(self, *, code: int, message: bytes) -> Awaitable[bool]: ...


class Proxy:
    """The running proxy: settings, route table, flags, metrics and upstream pool.

    A plain class, compiled: the relays read its parts on every exchange, as native
    attributes. (A compiled dataclass crashed at import: its annotations are built
    from the classes, and some are imported here for type checking only.)"""

    def __init__(
        self,
        *,
        settings: Settings,
        routes: RouteTable,
        flags: FlagProvider,
        metrics: Metrics,
        pool: UpstreamPool,
        backend_urls: dict[Backend, str],
        shadows: ShadowRunner,
        experiments: dict[str, RouteExperiment],
        store: DivergenceStore | None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.flags = flags
        self.metrics = metrics
        self.pool = pool  # HTTP upstream exchanges
        self.backend_urls = backend_urls
        self.shadows = shadows
        self.experiments = experiments
        self.store = store
        self.websockets: set[Closable] = set()
        self.draining = False
        # Read on every request: one native attribute, not three lookups into settings.
        self.max_body_bytes = settings.server.max_body_bytes
        # A message (or a JSON answer) held whole for the isolation check: at most this.
        self.max_message_bytes = settings.server.max_ws_message_bytes
