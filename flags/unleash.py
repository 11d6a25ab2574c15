"""Flag provider ``unleash``: the official Python SDK, bootstrapped from the flags file (I/O).

The SDK (PyPI ``UnleashClient``) decides; it polls the server in its own scheduler
thread, so decisions stay a plain synchronous call on the hot path. Bootstrapping from
the flags file makes decisions right before the first sync and while the server is
unreachable. The SDK's cache is replaced by an in-memory one that validates every
features document the SDK fetches before the SDK's engine sees it (the engine is fed
from the cache): a document that fails (``flags.validation``) is not stored, so the
engine reloads the last good one; it is logged once with the feature and field, and
counted. The cache also keeps a parsed copy of the document in force, which feeds the
rollout gauge. (The SDK's streaming mode hands documents to its engine before the
cache; the provider polls, where this holds.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from UnleashClient import UnleashClient  # type: ignore[attr-defined]
from UnleashClient.cache import BaseCache
from UnleashClient.constants import FEATURES_URL
from UnleashClient.utils import InstanceAllowType

from flags.document import FlagsDocumentError, FlagSet, parse_flags
from flags.evaluation import is_utf8_text, rollout_percent
from flags.file import read_flags

log = logging.getLogger("strangler.flags")


class _QuietPollErrors(logging.Filter):
    """The SDK logs a full traceback on every failed poll; keep one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


logging.getLogger("UnleashClient").addFilter(_QuietPollErrors())


class _MirrorCache(BaseCache):
    """In-memory SDK cache that keeps only sound features documents, and mirrors the
    one in force as a parsed FlagSet (``accept`` parses it, or raises to refuse it)."""

    def __init__(self, accept: Callable[[Any], None]) -> None:
        super().__init__()
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._accept = accept

    def set(self, key: str, value: Any) -> None:
        if key == FEATURES_URL:
            try:
                self._accept(value)
            except FlagsDocumentError:
                return  # the engine reloads the last good document from this cache
        with self._lock:
            self._data[key] = value

    def mset(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            self.set(key, value)

    def get(self, key: str, default: Any | None = None) -> Any:
        with self._lock:
            return self._data.get(key, default)

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._data

    def destroy(self) -> None:
        with self._lock:
            self._data.clear()


class UnleashFlagProvider:
    name = "unleash"

    def __init__(
        self,
        *,
        url: str,
        client_token: str,
        app_name: str = "strangler",
        environment: str = "development",
        project: str | None = None,
        refresh_interval: int = 15,
        bootstrap_file: Path | None = None,
        static_context: Mapping[str, str] | None = None,
        on_invalid: Callable[[], None] | None = None,
        on_loaded: Callable[[float], None] | None = None,
        fallback: bytes | None = None,
    ) -> None:
        """``on_invalid`` is called for each refused document, ``on_loaded`` with the
        time (Unix seconds) at which a document came into force; both may be called
        from the SDK's thread. ``fallback``: the last good bootstrap document of the
        proxy this provider serves in, for a bootstrap file found unsound."""
        self._flags: FlagSet | None = None
        self.on_invalid = on_invalid
        self.on_loaded = on_loaded
        self.reload_errors = 0
        self._refused: Any = None
        self._cache = _MirrorCache(self._accept)
        if bootstrap_file is not None:
            try:
                read_flags(bootstrap_file)  # refuse a broken bootstrap file with its name
                bootstrap = bootstrap_file.read_text(encoding="utf-8")
            except (FlagsDocumentError, OSError, UnicodeDecodeError) as exc:
                if fallback is None:
                    raise
                # A worker started again while the file is unsound: the last good copy.
                log.error("flags bootstrap file refused, starting from the last good: %s", exc)
                bootstrap = fallback.decode()
                self.reload_errors += 1
                if on_invalid is not None:
                    on_invalid()
            self._cache.set(FEATURES_URL, bootstrap)
            self._cache.bootstrapped = True
        self.static_context = dict(static_context or {})
        self._client = UnleashClient(
            url=url.rstrip("/") + "/api",
            app_name=app_name,
            environment=environment,
            instance_id=f"strangler-{uuid.uuid4()}",
            refresh_interval=refresh_interval,
            disable_metrics=True,
            custom_headers={"Authorization": client_token},
            project_name=project,
            cache=self._cache,
            multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
        )
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started and self._flags is not None

    @property
    def flags(self) -> FlagSet:
        return self._flags if self._flags is not None else FlagSet()

    async def start(self) -> None:
        # initialize_client registers with the server synchronously: keep it off the loop.
        await asyncio.to_thread(self._client.initialize_client)
        self._started = True

    async def close(self) -> None:
        await asyncio.to_thread(self._client.destroy)

    def is_enabled(self, flag: str, user_id: str) -> bool:
        # The SDK hands the id to mmh3 as a str, which crashes the process on text UTF-8
        # cannot carry: such an id is no id (off, as without one), never the SDK's.
        if not user_id or not is_utf8_text(user_id):
            return False
        return bool(self._client.is_enabled(flag, {**self.static_context, "userId": user_id}))

    def rollout_percent(self, flag: str) -> float:
        return rollout_percent(self.flags, flag)

    def _accept(self, raw: Any) -> None:
        """Parse a document the SDK is about to store; raise FlagsDocumentError to refuse it."""
        if raw == self._refused:
            # Served again unchanged (a server without ETags): reported once already.
            raise FlagsDocumentError("the document refused before")
        try:
            flags = parse_flags(raw if isinstance(raw, str | bytes) else dict(raw))
        except (FlagsDocumentError, TypeError, ValueError) as exc:
            self._refused = raw
            self.reload_errors += 1
            log.error(
                "features document from Unleash refused, the last good flags stay in force: %s",
                exc,
            )
            if self.on_invalid is not None:
                self.on_invalid()
            if isinstance(exc, FlagsDocumentError):
                raise
            raise FlagsDocumentError(str(exc)) from exc
        self._refused = None
        self._flags = flags
        if self.on_loaded is not None:
            self.on_loaded(time.time())
