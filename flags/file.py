"""Flag provider ``file``: an Unleash features document on disk, re-read on change (I/O).

The file is watched by polling its identity (inode, size, mtime) so that an atomic
replace (write a temporary file, then rename) is picked up within ``poll_interval``.
A snapshot is swapped whole, so a request always sees one consistent document; a
document that fails to parse is logged and the last good snapshot stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from flags.document import FlagsDocumentError, FlagSet, parse_flags
from flags.evaluation import is_enabled, rollout_percent

log = logging.getLogger("strangler.flags")


def read_flags(path: Path) -> FlagSet:
    """Read and parse a flags file; errors name the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FlagsDocumentError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse_flags(raw)
    except FlagsDocumentError as exc:
        raise FlagsDocumentError(f"{path}: {exc}") from exc


class FileFlagProvider:
    name = "file"

    def __init__(
        self,
        path: Path,
        *,
        poll_interval: float = 1.0,
        static_context: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.static_context = dict(static_context or {})
        self.reloads = 0
        self.reload_errors = 0
        self._flags: FlagSet | None = None
        self._identity: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reloaded = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._flags is not None

    @property
    def flags(self) -> FlagSet:
        return self._flags if self._flags is not None else FlagSet()

    async def start(self) -> None:
        self._identity = self._stat()
        self._flags = read_flags(self.path)
        self._watcher = asyncio.create_task(self._watch(), name="strangler-flags-file-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    def is_enabled(self, flag: str, user_id: str) -> bool:
        flags = self._flags
        return flags is not None and is_enabled(flags, flag, user_id, self.static_context)

    def rollout_percent(self, flag: str) -> float:
        return rollout_percent(self.flags, flag)

    def reload_if_changed(self) -> bool:
        """Re-read the file when its identity changed; True when a new snapshot is in force."""
        identity = self._stat()
        if identity is None or identity == self._identity:
            return False
        try:
            flags = read_flags(self.path)
        except FlagsDocumentError as exc:
            # Half-written or broken: keep serving the last good snapshot.
            self.reload_errors += 1
            log.error("flags file not reloaded, keeping the previous flags: %s", exc)
            return False
        self._identity = identity
        self._flags = flags
        self.reloads += 1
        # Wake whoever waits for this reload, then arm a fresh event for the next one.
        self._reloaded.set()
        self._reloaded = asyncio.Event()
        log.info("flags reloaded from %s (%d features)", self.path, len(flags.features))
        return True

    async def wait_for_reload(self) -> None:
        """Return after the next snapshot is in force."""
        await self._reloaded.wait()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.reload_if_changed()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)
