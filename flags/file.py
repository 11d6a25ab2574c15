"""Flag provider ``file``: an Unleash features document on disk, re-read on change (I/O).

The file is watched by reading it every ``poll_interval`` and comparing its bytes with
the document in force: a file's inode, size and modification time can all look the same
after two quick atomic replaces (inode numbers are reused, timestamps are coarse), its
bytes cannot.
A snapshot is swapped whole, so a request always sees one consistent document. A
document that fails to parse or to validate (``flags.validation``) at start is an error
that stops the start; on a reload it is logged once, with the feature and field, and
counted (``on_invalid``), and the last good snapshot stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flags.document import FlagsDocumentError, FlagSet, parse_flags
from flags.evaluation import is_enabled, rollout_percent

log = logging.getLogger("strangler.flags")

_DECISIONS_KEPT = 100_000
# A features document is parsed on the event loop, in one go: a huge one would hold every
# request for seconds (19 MiB, 30,000 features: 4 s). A project's flags are far smaller.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


class DocumentTooLarge(FlagsDocumentError):
    """A flags file over MAX_DOCUMENT_BYTES."""


def read_document(path: Path) -> bytes:
    """The bytes of a flags file; FlagsDocumentError naming the file when it cannot be
    read or is over MAX_DOCUMENT_BYTES (checked before it is read)."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_DOCUMENT_BYTES:
                raise DocumentTooLarge(
                    f"{path}: {size} bytes, over the {MAX_DOCUMENT_BYTES} a flags document may have"
                )
            return file.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise FlagsDocumentError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def read_flags(path: Path) -> FlagSet:
    """Read and parse a flags file; errors name the file."""
    raw = read_document(path)
    try:
        return parse_flags(raw)
    except FlagsDocumentError as invalid:
        raise invalid.within(path) from invalid


class FileFlagProvider:
    name = "file"

    def __init__(
        self,
        path: Path,
        *,
        poll_interval: float = 1.0,
        static_context: Mapping[str, str] | None = None,
        on_invalid: Callable[[], None] | None = None,
        on_loaded: Callable[[float], None] | None = None,
        fallback: bytes | None = None,
    ) -> None:
        """``on_invalid`` is called for each refused document, ``on_loaded`` with the
        time (Unix seconds) at which a document came into force. ``fallback`` is the last
        good document of the proxy this provider serves in (a worker started again while
        the file is unsound starts from it); without one, an unsound file stops the start.
        """
        self.path = path
        self.fallback = fallback
        self.on_invalid = on_invalid
        self.on_loaded = on_loaded
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
        try:
            self._flags = read_flags(self.path)
        except FlagsDocumentError as exc:
            if self.fallback is None:
                raise
            self._flags = parse_flags(self.fallback)
            self.reload_errors += 1
            log.error("flags file refused, starting from the last good flags: %s", exc)
            if self.on_invalid is not None:
                self.on_invalid()
        else:
            self._loaded()  # (not for the fallback: the file did not load)
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
        try:
            raw = read_document(self.path)
        except DocumentTooLarge as too_large:
            # (Its own name: compiled, one name is one type across except clauses.)
            return self._refuse(str(too_large).encode(), too_large)  # its text stands for it
        except FlagsDocumentError:
            return False  # mid-replace, or removed: the flags in force stay
        if raw == self._raw:
            return False
        try:
            flags = parse_flags(raw)
        except FlagsDocumentError as exc:
            return self._refuse(raw, exc)
        self._raw = raw
        self._flags = flags
        self._decisions = {}
        self.reloads += 1
        self._loaded()
        # Wake whoever waits for this reload, then arm a fresh event for the next one.
        self._reloaded.set()
        self._reloaded = asyncio.Event()
        log.info("flags reloaded from %s (%d features)", self.path, len(flags.features))
        return True

    def _refuse(self, raw: bytes, exc: FlagsDocumentError) -> bool:
        """Half-written or unsound: the last good snapshot stays in force. A document is
        reported once, not on every poll."""
        if raw == self._raw:
            return False
        self.reload_errors += 1
        self._raw = raw
        log.error("flags file %s refused, the last good flags stay in force: %s", self.path, exc)
        if self.on_invalid is not None:
            self.on_invalid()
        return False

    async def wait_for_reload(self) -> None:
        """Return after the next snapshot is in force."""
        await self._reloaded.wait()

    def _loaded(self) -> None:
        if self.on_loaded is not None:
            self.on_loaded(time.time())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.reload_if_changed()

    def _read(self) -> bytes | None:
        try:
            return read_document(self.path)
        except FlagsDocumentError:
            return None  # unreadable or too large: reported by the start or a reload
