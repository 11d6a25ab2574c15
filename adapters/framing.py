"""Raw event frames of an HTTP stream, for relaying event by event (pure, sans-I/O).

Where a route checks isolation, the proxy must hold back a whole event until it knows
whose it is, then pass on its exact bytes or withhold them. A framer cuts the stream into
those byte spans: one NDJSON line with its line end, or one SSE event block up to and
including the blank line that dispatches it. Frames joined give back the input exactly,
however it was chunked, so a relay that forwards every frame forwards the stream
unchanged. What is left at the end of the stream (no final line end) comes out of
``close``.
"""

from __future__ import annotations

import re
from typing import Final

_LINE_END: Final = re.compile(rb"[\r\n]")


class NdjsonFramer:
    """Cuts after every ``\\n``."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        data = self._pending + data if self._pending else data
        end = data.rfind(b"\n")
        if end < 0:
            self._pending = data
            return []
        self._pending = data[end + 1 :]
        return data[: end + 1].splitlines(keepends=True) if b"\r" in data else _lines(data, end)

    def close(self) -> list[bytes]:
        rest, self._pending = self._pending, b""
        return [rest] if rest else []


def _lines(data: bytes, end: int) -> list[bytes]:
    frames = []
    start = 0
    while start <= end:
        stop = data.index(b"\n", start) + 1
        frames.append(data[start:stop])
        start = stop
    return frames


class SseFramer:
    """Cuts after each blank line (the event's dispatch), whatever the line ends.

    Lines end in CRLF, LF or CR; a CR that ends one chunk may be the first half of a CRLF,
    so the framer waits for the next byte before it decides. A blank line at the start of
    a frame (extra blank lines between events) is a frame of its own that holds no event.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._scan = 0  # where the first line not yet examined starts, in _pending

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._pending + data if self._pending else data
        frames = []
        frame_start = 0
        pos = self._scan
        size = len(buf)
        while True:
            match = _LINE_END.search(buf, pos)
            if match is None:
                break
            idx = match.start()
            if buf[idx] == 0x0D:  # CR
                if idx + 1 == size:
                    break  # CR or CRLF? the next chunk tells
                end = idx + 2 if buf[idx + 1] == 0x0A else idx + 1
            else:
                end = idx + 1
            if idx == pos:  # an empty line: the frame is complete
                frames.append(buf[frame_start:end])
                frame_start = end
            pos = end
        self._pending = buf[frame_start:]
        self._scan = pos - frame_start
        return frames

    def close(self) -> list[bytes]:
        rest, self._pending, self._scan = self._pending, b"", 0
        return [rest] if rest else []
