"""Server-sent events (``text/event-stream``) bytes to events, fed chunk by chunk: this
module owns the WHATWG event-stream interpretation and its limits. It is pure and
sans-I/O, in the manner of httpx's decoders.
"""

from __future__ import annotations

import re
from typing import Final

from adapters.events import MAX_EVENT_BYTES, Event, decode_event, oversized_event

_BOM: Final = b"\xef\xbb\xbf"
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


class SseDecoder:
    """Feed it the body's chunks in order, then close it; each call returns the events
    dispatched so far. ``last_event_id`` and ``retry_ms`` follow the stream's fields.

    It follows the WHATWG event-stream interpretation: a UTF-8 byte order mark at the start
    is skipped; lines end in CRLF, LF or CR, and a CR ending one chunk followed by an LF
    starting the next is one line end, not two; ``:`` starts a comment; a field's value
    loses one leading space; ``data`` lines join with ``\\n``; ``event`` names the type;
    ``id`` and ``retry`` are kept on the decoder; a blank line dispatches; an event without
    data is not dispatched, and, as in a browser, an event the stream ends before
    completing is dropped. Lines are decoded as UTF-8 with replacement, as the standard
    says. Each dispatched data is parsed as one JSON object: its type is the ``event``
    field, else the object's type field, else ``message``; data that is not a JSON object
    becomes an error event. An event whose lines or data grow beyond ``max_size`` bytes
    becomes one error event and the rest of it is thrown away as it arrives.
    """

    def __init__(self, *, event_type_field: str = "type", max_size: int = MAX_EVENT_BYTES) -> None:
        self.event_type_field = event_type_field
        self.max_size = max_size
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self._started = False  # the byte order mark has been looked for
        self._after_cr = False  # the last chunk ended in CR: an LF next belongs to it
        self._line = bytearray()
        self._skipping_line = False  # the rest of an oversized line is thrown away
        self._event_type = ""
        self._data: list[str] = []
        self._data_size = 0
        self._oversized = False  # the current event was reported too large: drop it

    def feed(self, data: bytes) -> list[Event]:
        if not self._started:
            data = bytes(self._line) + data
            self._line.clear()
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._line += data  # too short to tell yet
                return []
            self._started = True
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if self._after_cr and data:
            self._after_cr = False
            if data.startswith(b"\n"):
                data = data[1:]
        events: list[Event] = []
        start = 0
        for match in _LINE_END.finditer(data):
            end = match.start()
            if self._skipping_line:
                self._skipping_line = False
            elif self._line:
                self._line += data[start:end]
                self._interpret(bytes(self._line), events)
                self._line.clear()
            else:
                self._interpret(data[start:end], events)
            start = match.end()
        if data.endswith(b"\r"):
            self._after_cr = True
        if not self._skipping_line and start < len(data):
            self._line += data[start:]
            if len(self._line) > self.max_size:
                self._report_oversized(events)
                self._line.clear()
                self._skipping_line = True
        return events

    def close(self) -> list[Event]:
        # The standard drops an unterminated last line and an undispatched last event.
        self._line.clear()
        self._skipping_line = False
        self._reset_event()
        return []

    def _interpret(self, raw: bytes, events: list[Event]) -> None:
        if not raw:
            self._dispatch(events)
            return
        if len(raw) > self.max_size:
            self._report_oversized(events)
            return
        line = raw.decode("utf-8", "replace")
        name, colon, value = line.partition(":")
        if not name and colon:
            return  # a comment
        if value.startswith(" "):
            value = value[1:]
        match name:
            case "data":
                if self._oversized:
                    return
                self._data.append(value)
                self._data_size += len(raw)
                if self._data_size > self.max_size:
                    self._report_oversized(events)
            case "event":
                self._event_type = value
            case "id":
                if "\0" not in value:
                    self.last_event_id = value
            case "retry":
                if value.isascii() and value.isdigit():
                    self.retry_ms = int(value)

    def _dispatch(self, events: list[Event]) -> None:
        if self._data and not self._oversized:
            document = "\n".join(self._data)
            events.append(decode_event(document, self.event_type_field, self._event_type or None))
        self._reset_event()

    def _report_oversized(self, events: list[Event]) -> None:
        if not self._oversized:
            events.append(oversized_event(self.max_size, "an SSE event"))
        self._oversized = True
        self._data.clear()
        self._data_size = 0

    def _reset_event(self) -> None:
        self._event_type = ""
        self._data.clear()
        self._data_size = 0
        self._oversized = False
