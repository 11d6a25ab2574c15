"""WebSocket messages to events, one whole message at a time (the I/O layer reassembles
fragments): this module owns how text and binary messages become events. It is pure
and sans-I/O.
"""

from __future__ import annotations

import hashlib

from adapters.events import (
    BINARY_TYPE,
    MAX_EVENT_BYTES,
    Event,
    decode_event,
    oversized_event,
)


class WebSocketDecoder:
    """Feed it each message as it arrives: ``feed_text`` for text, ``feed_binary`` for
    binary, or ``feed`` with either.

    A text message is one JSON object, one event; anything else, or a message longer
    than ``max_size`` characters, is an error event. A binary message is not decoded: it
    becomes a ``_binary`` event carrying its length and SHA-256, so two backends sending
    the same bytes compare equal without the bytes being kept. Messages are whole, so
    nothing is carried between calls and ``close()`` has nothing left to give; it
    exists so every decoder can be driven alike.
    """

    def __init__(self, *, event_type_field: str = "type", max_size: int = MAX_EVENT_BYTES) -> None:
        self.event_type_field = event_type_field
        self.max_size = max_size

    def feed(self, data: str | bytes) -> list[Event]:
        if isinstance(data, str):
            return self.feed_text(data)
        return self.feed_binary(data)

    def feed_text(self, text: str) -> list[Event]:
        if len(text) > self.max_size:
            return [oversized_event(self.max_size, "a WebSocket message")]
        return [decode_event(text, self.event_type_field)]

    def feed_binary(self, data: bytes) -> list[Event]:
        digest = hashlib.sha256(data).hexdigest()
        return [Event(BINARY_TYPE, {"length": len(data), "sha256": digest})]

    def close(self) -> list[Event]:
        return []
