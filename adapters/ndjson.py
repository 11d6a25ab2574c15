"""NDJSON (newline-delimited JSON) bytes to events, fed chunk by chunk: this module owns
the line framing and its limits. It is pure and sans-I/O, in the manner of httpx's
decoders: the I/O layer feeds it the body's chunks as they arrive.
"""

from __future__ import annotations

from adapters.events import MAX_EVENT_BYTES, Event, decode_event, oversized_event


class NdjsonDecoder:
    """Feed it the body's chunks in order, then close it; each call returns the events
    completed so far.

    Lines end in ``\\n``; a ``\\r`` before it is tolerated. Each line is decoded as a
    whole, never a chunk at a time, so a multi-byte UTF-8 character split across chunks
    is fine. Blank lines are skipped; a line that is not a JSON object becomes an error
    event and decoding carries on with the next line. A final line without its newline
    is decoded by ``close()``. A line longer than ``max_size`` bytes becomes one error
    event and is thrown away as it arrives, so memory stays bounded whatever the
    backend sends.
    """

    def __init__(self, *, event_type_field: str = "type", max_size: int = MAX_EVENT_BYTES) -> None:
        self.event_type_field = event_type_field
        self.max_size = max_size
        self._line = bytearray()
        # Set while the rest of an oversized line, already reported, is being thrown away.
        self._discarding = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._discarding:
                self._discarding = False
            elif self._line:
                self._line += data[start:end]
                self._decode(bytes(self._line), events)
                self._line.clear()
            else:
                self._decode(data[start:end], events)
            start = end + 1
        if not self._discarding and start < len(data):
            self._line += data[start:]
            if len(self._line) > self.max_size:
                events.append(oversized_event(self.max_size, "an NDJSON line"))
                self._line.clear()
                self._discarding = True
        return events

    def close(self) -> list[Event]:
        events: list[Event] = []
        if self._line:
            self._decode(bytes(self._line), events)
            self._line.clear()
        self._discarding = False
        return events

    def _decode(self, line: bytes, events: list[Event]) -> None:
        if len(line) > self.max_size:
            events.append(oversized_event(self.max_size, "an NDJSON line"))
        elif line.strip():
            events.append(decode_event(line, self.event_type_field))
