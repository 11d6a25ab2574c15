"""Flag provider ``file``: an Unleash features document on disk, re-read on change (I/O).

The file is watched by reading it every ``poll_interval`` and comparing its bytes with
the document in force: a file's inode, size and modification time can all look the same
after two quick atomic replaces (inode numbers are reused, timestamps are coarse), its
bytes cannot.
A snapshot is swapped whole, so a request always sees one consistent document; a
document that fails to parse is logged and the last good snapshot stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

from flags.document import FlagsDocumentError, FlagSet, parse_flags
from flags.evaluation import is_enabled, rollout_percent

log = logging.getLogger("strangler.flags")

_DECISIONS_KEPT = 100_000


def read_flags(path: Path) -> FlagSet:
    """Read and parse a flags file; errors name the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FlagsDocumentError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse_flags(raw)
    except FlagsDocumentError as invalid:
        raise FlagsDocumentError(f"{path}: {invalid}") from invalid


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
        self._decisions: dict[tuple[str, str], bool] = {}
        self._raw: bytes | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reloaded = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._flags is not None

    @property
    def flags(self) -> FlagSet:
        return self._flags if self._flags is not None else FlagSet()

    async def start(self) -> None:
        self._raw = self._read()
        self._flags = read_flags(self.path)
        self._decisions = {}
        self._watcher = asyncio.create_task(self._watch(), name="strangler-flags-file-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    def is_enabled(self, flag: str, user_id: str) -> bool:
        # A decision depends on the snapshot, the flag and the user only: kept until
        # the snapshot changes (a user's next request costs a dict lookup).
        key = (flag, user_id)
        decisions = self._decisions
        decision = decisions.get(key)
        if decision is None:
            flags = self._flags
            decision = flags is not None and is_enabled(flags, flag, user_id, self.static_context)
            if len(decisions) >= _DECISIONS_KEPT:
                decisions.clear()
            decisions[key] = decision
        return decision

    def rollout_percent(self, flag: str) -> float:
        return rollout_percent(self.flags, flag)

    def reload_if_changed(self) -> bool:
        """Re-read the file when it changed; True when a new snapshot is in force."""
        raw = self._read()
        if raw is None or raw == self._raw:
            return False
        try:
            flags = parse_flags(raw)
        except FlagsDocumentError as exc:
            # Half-written or broken: keep serving the last good snapshot.
            self.reload_errors += 1
            self._raw = raw  # report a broken document once, not on every poll
            log.error("flags file %s not reloaded, keeping the previous flags: %s", self.path, exc)
            return False
        self._raw = raw
        self._flags = flags
        self._decisions = {}
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

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None  # mid-replace, or removed: keep the flags in force
