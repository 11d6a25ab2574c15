"""What one backend did in one exchange or WebSocket turn, recorded as it happened (shell).

A ``Recorder`` sits beside a relay: it gets every chunk or frame the backend sent, turns
them into events with the route protocol's sans-I/O decoder, and notes the status, the
time to the first event and how the exchange ended. Time comes from the caller's clock
(``time.perf_counter``), so the recorder itself decides nothing.

What one side may hold is bounded (``[shadow] max_recorded_events`` and
``max_recorded_bytes``), whatever a backend sends and for however long: past either
limit the observation is marked ``over_limit``, what it held is let go and nothing more
is kept. The relay is not touched (the recorder never holds a byte back); the sequence
is simply no longer whole, so it is neither compared nor checked against a contract.
The check is two counter comparisons per chunk, not work per byte.
"""

from __future__ import annotations

from adapters.events import Event
from adapters.json_body import JsonBodyDecoder
from adapters.ndjson import NdjsonDecoder
from adapters.sse import SseDecoder
from adapters.websocket import WebSocketDecoder
from proxy.routing import Backend

# Defaults of ``[shadow] max_recorded_events`` and ``max_recorded_bytes``: what one side of
# one exchange or WebSocket turn may hold for its comparison.
MAX_RECORDED_EVENTS = 4096
MAX_RECORDED_BYTES = 1 << 20

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
        # Past the recording limit: the events are let go, the sequence is not whole.
        self.over_limit = False

    def __repr__(self) -> str:
        return (
            f"Observation({self.backend.value} {self.role}, status={self.status}, "
            f"{len(self.events)} events, error={self.error!r}, timed_out={self.timed_out}, "
            f"cancelled={self.cancelled}, over_limit={self.over_limit})"
        )

    @property
    def finished(self) -> bool:
        return self.duration is not None


class Recorder:
    """Feeds a backend's output to a decoder and keeps the resulting observation, up to
    ``max_events`` events and ``max_bytes`` bytes of the backend's output.

    Past a limit, ``feed`` still returns the events of what it is given when
    ``decodes_past_limit`` is set (isolation withholds another user's events, a
    WebSocket turn sees its end by them), else it stops decoding altogether."""

    def __init__(
        self,
        observation: Observation,
        protocol: str,
        event_type_field: str,
        max_events: int = MAX_RECORDED_EVENTS,
        max_bytes: int = MAX_RECORDED_BYTES,
    ) -> None:
        self.observation = observation
        self.protocol = protocol
        self.event_type_field = event_type_field
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.size = 0  # bytes (characters of a text message) fed while recording
        self.decodes_past_limit = False
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
        if obs.over_limit:
            if not self.decodes_past_limit:
                return []
        else:
            self.size += len(data)
        if self._decoder is None:
            self.begin(200)
        assert self._decoder is not None
        events = self._decoder.feed(data)  # type: ignore[arg-type]
        self._keep(events)
        return events

    def _keep(self, events: list[Event]) -> None:
        obs = self.observation
        if obs.over_limit:
            return
        if self.size > self.max_bytes or len(obs.events) + len(events) > self.max_events:
            # The sequence can no longer be whole: let go of it at once, and of the
            # decoder's partial input too when nobody needs what it would decode.
            obs.over_limit = True
            obs.events = []
            if not self.decodes_past_limit:
                self._decoder = None
            return
        obs.events.extend(events)

    def feed_last(self, data: bytes, now: float) -> list[Event]:
        """The whole rest of the body at once: decode it to the end (a JSON body's events
        are only known once it is complete)."""
        events = self.feed(data, now)
        tail = self.close()
        return events + tail if tail else events

    def close(self) -> list[Event]:
        """Decode what the backend left unfinished (an NDJSON line without its newline);
        once, and nothing past the limit unless ``decodes_past_limit``."""
        if self._decoder is None or self._closed:
            return []
        self._closed = True
        if self.observation.over_limit and not self.decodes_past_limit:
            return []
        tail = self._decoder.close()
        self._keep(tail)
        return tail

    def finish(self, now: float) -> Observation:
        obs = self.observation
        self.close()
        if obs.duration is None:
            obs.duration = now - obs.started
        return obs
