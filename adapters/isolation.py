"""Isolation, whether an event may reach the session it was produced for: this module
owns that decision for a route's user field. It is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from adapters.events import Event


def belongs_to(event: Event, user_field: str, user_id: str) -> bool:
    """Whether ``event`` may be delivered to the session of ``user_id``.

    ``user_field`` names the event field carrying the user id, dotted for a nested one
    (``meta.user_id``). An event whose field names another user must never be
    delivered, and counts as an isolation violation. An event without the field, or
    with ``null`` there, names no other user and passes: a missing field leaks no one's
    events, and rolling a flag back for it would be a false alarm (whether every event
    must carry the field is for a contract to say). A number is read as its decimal
    text, since a user id from a header is always text; any other value is not the
    session's user. Events standing for decoding errors carry no user and pass.
    """
    value: object = event.data
    for name in user_field.split("."):
        if not isinstance(value, Mapping) or name not in value:
            return True
        value = value[name]
    if value is None or value == user_id:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) == user_id
    return False


def isolation_violations(events: Iterable[Event], user_field: str, user_id: str) -> list[int]:
    """The positions of the events that do not belong to the session of ``user_id``."""
    return [
        index for index, event in enumerate(events) if not belongs_to(event, user_field, user_id)
    ]
