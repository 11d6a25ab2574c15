"""The event: one typed JSON object out of a backend's stream, the unit every comparison,
contract and isolation check works on (pure). This module owns the value type, the
reserved type names the adapters use for things that are not a backend's own events
(``_error`` for input that could not be decoded, ``_response`` for a one-shot JSON reply,
``_binary`` for a binary WebSocket frame), and the one way a decoded JSON document becomes
an event, so that every decoder names types and reports bad input alike. Reserved names
start with an underscore; a backend's own events may of course use such names too, they
are then simply events of that type, and only ``Event.error`` marks decoding failures.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, final

import orjson

ERROR_TYPE: Final = "_error"
RESPONSE_TYPE: Final = "_response"
BINARY_TYPE: Final = "_binary"
# What an object without a type field is called: the name SSE gives such events too.
UNTYPED: Final = "message"
# A line, SSE event, frame or body larger than this is reported and dropped, not buffered.
MAX_EVENT_BYTES: Final = 1 << 20

_EXCERPT_CHARS: Final = 120


@final
class Event:
    """One event: its type, its decoded JSON object, and, for input that could not be
    decoded, why (``error`` is then set and ``type`` is ``ERROR_TYPE``).

    ``data`` is the decoded object itself, not a copy: treat it as immutable. Events are
    immutable, compared by value, and not hashable (their payload is a dict). A plain
    class rather than a frozen dataclass: compiled, it is built in a sixth of the time
    (a frozen dataclass's ``__init__`` is interpreted and sets every field through
    ``object.__setattr__``), and every event a shadowed exchange carries is built twice."""

    __slots__ = ("data", "error", "type")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, type: str, data: Mapping[str, Any], error: str | None = None) -> None:
        self.type: Final = type
        self.data: Final = data
        self.error: Final = error

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.type == other.type and self.error == other.error and self.data == other.data

    def __repr__(self) -> str:
        return f"Event(type={self.type!r}, data={self.data!r}, error={self.error!r})"

    @property
    def is_error(self) -> bool:
        return self.error is not None


def error_event(reason: str, excerpt: bytes | str = b"") -> Event:
    """An event standing for input that could not be decoded, with a short excerpt of it."""
    if isinstance(excerpt, bytes):
        excerpt = excerpt[: _EXCERPT_CHARS * 4].decode("utf-8", "replace")
    data = {"error": reason, "excerpt": excerpt[:_EXCERPT_CHARS]}
    return Event(ERROR_TYPE, data, error=reason)


def oversized_event(limit: int, what: str) -> Event:
    """The error event for input over a size limit; it names the limit only, so that it
    does not depend on how much of the input had arrived when the limit was crossed."""
    return error_event(f"{what} exceeds the limit of {limit} bytes")


def decode_event(
    document: bytes | str, event_type_field: str, event_type: str | None = None
) -> Event:
    """The event one JSON document stands for; never raises.

    Its type is ``event_type`` if given (an SSE ``event:`` field), else the object's
    ``event_type_field`` if that is a string, else ``UNTYPED`` when the field is absent.
    A document that is not JSON, not an object, or whose type field is not a string
    becomes an error event."""
    try:
        value = orjson.loads(document)
    except orjson.JSONDecodeError as error:
        return error_event(f"malformed JSON: {error}", document)
    return event_from_value(value, event_type_field, event_type, document)


def event_from_value(
    value: object,
    event_type_field: str,
    event_type: str | None = None,
    document: bytes | str = b"",
) -> Event:
    """The event a decoded JSON value stands for, by the rules of ``decode_event``."""
    if not isinstance(value, dict):
        return error_event(f"a JSON {_json_kind(value)} is not an event object", document)
    if event_type is None:
        named = value.get(event_type_field, UNTYPED)
        if not isinstance(named, str):
            reason = f"the {event_type_field!r} field is a JSON {_json_kind(named)}, not a string"
            return error_event(reason, document)
        event_type = named
    return Event(event_type, value)


def _json_kind(value: object) -> str:
    match value:
        case dict():
            return "object"
        case list():
            return "array"
        case str():
            return "string"
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case None:
            return "null"
    return type(value).__name__
