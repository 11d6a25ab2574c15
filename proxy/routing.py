"""The route table and the routing decision (pure).

A request's path selects at most one route (path prefixes on segment boundaries,
which the configuration keeps from overlapping); the route's flag, evaluated for the
request's user, selects the backend. No user id, no route, or the flag off: legacy.
A user is never bucketed at random, so a retry always lands where the first try did.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.settings import RouteSettings, normalised_prefix


class Backend(enum.StrEnum):
    LEGACY = "legacy"
    CANDIDATE = "candidate"

    # Named here, str's C hash fills the class's hash slot directly. Inherited, with
    # Enum's Python __hash__ further along the MRO, the slot is the generic one that
    # looks __hash__ up on every call: about 230 instructions more per exchange (metrics
    # and pool dicts are keyed by members). It agrees with ==: a member equals its value.
    __hash__ = str.__hash__


UNROUTED: Final = "_unrouted"
"""The metrics label for requests that match no route (they go to legacy unchanged)."""


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    protocol: str
    flag: str
    settings: RouteSettings
    user_field: str | None  # settings.user_field, read per exchange: a native copy


class RouteTable:
    """Finds the route of a path; the longest prefix wins (they never overlap anyway)."""

    def __init__(self, routes: Sequence[RouteSettings]) -> None:
        built = [
            Route(r.name, normalised_prefix(r.path), r.protocol, r.flag, r, r.user_field)
            for r in routes
        ]
        self.routes: tuple[Route, ...] = tuple(
            sorted(built, key=lambda r: len(r.prefix), reverse=True)
        )
        self.by_name = {r.name: r for r in built}

    def match(self, path: str) -> Route | None:
        # A prefix matches itself and what lies below it: /api, /api/x, not /apis.
        for route in self.routes:
            prefix = route.prefix
            if prefix == "/" or (
                path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")
            ):
                return route
        return None


def choose_backend(
    route: Route | None, user_id: str | None, flag_on: Callable[[str, str], bool]
) -> Backend:
    """Which backend serves this exchange."""
    if route is None or not user_id:
        return Backend.LEGACY
    return Backend.CANDIDATE if flag_on(route.flag, user_id) else Backend.LEGACY
