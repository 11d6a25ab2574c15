"""What one backend did in one exchange or WebSocket turn, recorded as it happened (shell).

A ``Recorder`` sits beside a relay: it gets every chunk or frame the backend sent, turns
them into events with the route protocol's sans-I/O decoder, and notes the status, the
time to the first event and how the exchange ended. Time comes from the caller's clock
(``time.perf_counter``), so the recorder itself decides nothing.
"""

from __future__ import annotations

from adapters.events import Event
from adapters.json_body import JsonBodyDecoder
from adapters.ndjson import NdjsonDecoder
from adapters.sse import SseDecoder
from adapters.websocket import WebSocketDecoder
from proxy.routing import Backend

Decoder = NdjsonDecoder | SseDecoder | JsonBodyDecoder | WebSocketDecoder


def decoder_for(protocol: str, event_type_field: str, status: int | None = None) -> Decoder:
    """The decoder of a route's protocol; bodies of unknown shape count as one JSON body."""
    if protocol == "ndjson":
        return NdjsonDecoder(event_type_field=event_type_field)
    if protocol == "sse":
        return SseDecoder(event_type_field=event_type_field)
    if protocol == "websocket":
        return WebSocketDecoder(event_type_field=event_type_field)
    return JsonBodyDecoder(status if status is not None else 200, event_type_field=event_type_field)


class Observation:
    """What one backend did in one exchange or turn. A plain class, not a dataclass:
    compiled, a dataclass's generated ``__init__`` stays interpreted, and every shadowed
    exchange builds two of these."""

    def __init__(self, backend: Backend, role: str, started: float) -> None:
        self.backend = backend
        self.role = role  # "primary" or "shadow"
        self.started = started
        self.status: int | None = None
        self.events: list[Event] = []
        self.first_event: float | None = None  # seconds after start
        self.duration: float | None = None  # seconds after start, once finished
        self.timed_out = False
        self.error: str | None = None  # the exchange failed (transport, framing)
        self.cancelled = False  # the client went away: nothing to compare

    def __repr__(self) -> str:
        return (
            f"Observation({self.backend.value} {self.role}, status={self.status}, "
            f"{len(self.events)} events, error={self.error!r}, timed_out={self.timed_out}, "
            f"cancelled={self.cancelled})"
        )

    @property
    def finished(self) -> bool:
        return self.duration is not None


class Recorder:
    """Feeds a backend's output to a decoder and keeps the resulting observation."""

    def __init__(
        self,
        observation: Observation,
        protocol: str,
        event_type_field: str,
    ) -> None:
        self.observation = observation
        self.protocol = protocol
        self.event_type_field = event_type_field
        self._decoder: Decoder | None = (
            None if protocol == "json" else decoder_for(protocol, event_type_field)
        )
        self._closed = False

    def begin(self, status: int) -> None:
        """The response head arrived: JSON bodies need the status to decode."""
        self.observation.status = status
        if self._decoder is None:
            self._decoder = decoder_for(self.protocol, self.event_type_field, status)

    def feed(self, data: bytes | str, now: float) -> list[Event]:
        obs = self.observation
        if obs.first_event is None and data:
            obs.first_event = now - obs.started
        if self._decoder is None:
            self.begin(200)
        assert self._decoder is not None
        events = self._decoder.feed(data)  # type: ignore[arg-type]
        obs.events.extend(events)
        return events

    def feed_last(self, data: bytes, now: float) -> list[Event]:
        """The whole rest of the body at once: decode it to the end (a JSON body's events
        are only known once it is complete)."""
        events = self.feed(data, now)
        assert self._decoder is not None
        tail = self._decoder.close()
        self._closed = True
        self.observation.events.extend(tail)
        return events + tail

    def finish(self, now: float) -> Observation:
        obs = self.observation
        if self._decoder is not None and not self._closed:
            self._closed = True
            obs.events.extend(self._decoder.close())
        if obs.duration is None:
            obs.duration = now - obs.started
        return obs
