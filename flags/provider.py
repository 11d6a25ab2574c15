"""The flag provider protocol that routing depends on (pure)."""

from __future__ import annotations

from typing import Protocol


class FlagProvider(Protocol):
    """Answers, on the hot path and without awaiting, whether a flag is on for a user.

    ``start`` loads the first snapshot (the proxy is not ready before), ``close`` stops
    any background work. ``rollout_percent`` feeds the rollout gauge and the admin API.
    """

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def is_enabled(self, flag: str, user_id: str) -> bool: ...

    def rollout_percent(self, flag: str) -> float: ...
