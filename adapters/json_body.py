"""One JSON response body to events: this module owns how a one-shot reply becomes a
sequence, an agent run's ``events`` list or a single ``_response`` event. It is pure
and sans-I/O: chunks are gathered and decoded at ``close()``.
"""

from __future__ import annotations

import orjson

from adapters.events import (
    MAX_EVENT_BYTES,
    RESPONSE_TYPE,
    Event,
    error_event,
    event_from_value,
    oversized_event,
)


class JsonBodyDecoder:
    """Feed it the body's chunks in order, then close it for the events.

    A body that is an object holding an ``events`` list is an agent run answered at
    once: its events, in order, are the sequence (items that are not objects become
    error events; the object's other fields are left out). Any other JSON body is one
    ``_response`` event whose payload is ``{"status": status, "body": body}``; an empty
    body counts as ``null``, as a 204 has none. A body that is not JSON, or is larger
    than ``max_size`` bytes, is one error event. The HTTP status is not an event of the
    run, so it is kept apart: ``status`` is what ``compare`` takes as
    ``reference_status`` or ``subject_status``, and reports as a ``status`` divergence
    when the two differ.
    """

    def __init__(
        self,
        status: int,
        *,
        event_type_field: str = "type",
        events_field: str = "events",
        max_size: int = MAX_EVENT_BYTES,
    ) -> None:
        self.status = status
        self.event_type_field = event_type_field
        self.events_field = events_field
        self.max_size = max_size
        self._body = bytearray()
        self._size = 0  # counted on even once the body is dropped for its size

    def feed(self, data: bytes) -> list[Event]:
        self._size += len(data)
        if self._size <= self.max_size:
            self._body += data
        else:
            self._body.clear()
        return []

    def close(self) -> list[Event]:
        body, size = bytes(self._body), self._size
        self._body.clear()
        self._size = 0
        if size > self.max_size:
            return [oversized_event(self.max_size, "a JSON body")]
        if not body.strip():
            return [Event(RESPONSE_TYPE, {"status": self.status, "body": None})]
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            return [error_event(f"malformed JSON: {error}", body)]
        if isinstance(value, dict):
            events = value.get(self.events_field)
            if isinstance(events, list):
                return [self._event(item) for item in events]
        return [Event(RESPONSE_TYPE, {"status": self.status, "body": value})]

    def _event(self, item: object) -> Event:
        event = event_from_value(item, self.event_type_field)
        if event.is_error:  # rare: spend the re-encoding on an excerpt only then
            try:
                excerpt = orjson.dumps(item)
            except TypeError:  # nested deeper than orjson encodes
                excerpt = b"..."
            event = event_from_value(item, self.event_type_field, document=excerpt)
        return event
