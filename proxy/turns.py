"""WebSocket turns: the events after one client message, per side, until the turn ends (shell).

A turn starts with a client message and ends, on each side separately, at an event type
listed in the route's ``turn_end``, at the point where the route's contract is complete
and nothing can follow (``agent_completed`` in the demo grammar), or after
``turn_idle_seconds`` without an event. When there is a way to see the end and a side
only goes quiet, that side timed out. A new client message ends the open turn. Once both
sides have ended, the route's experiment compares them; without a shadow, the primary's
sequence is still checked against the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.events import Event
from proxy.experiment import RouteExperiment
from proxy.observation import Observation, Recorder
from proxy.routing import Backend, Route


@dataclass(eq=False)
class _Side:
    recorder: Recorder
    last_activity: float
    ended: bool = False

    @property
    def observation(self) -> Observation:
        return self.recorder.observation


@dataclass(eq=False)
class _Turn:
    number: int
    primary: _Side
    shadow: _Side | None


class TurnTracker:
    def __init__(
        self,
        route: Route,
        experiment: RouteExperiment,
        primary: Backend,
        shadow: Backend | None,
    ) -> None:
        self.route = route
        self.experiment = experiment
        self.primary_backend = primary
        self.shadow_backend = shadow
        self.protocol = route.protocol
        self.type_field = route.settings.event_type_field
        self.turn_end = frozenset(route.settings.turn_end)
        self.idle = route.settings.turn_idle_seconds
        self.can_see_end = bool(self.turn_end) or experiment.contract is not None
        self.turn: _Turn | None = None
        self.turns = 0
        self._decoder = Recorder(Observation(primary, "primary", 0.0), "websocket", self.type_field)

    def _side(self, backend: Backend, role: str, now: float) -> _Side:
        recorder = Recorder(Observation(backend, role, now), "websocket", self.type_field)
        return _Side(recorder, now)

    def client_message(self, now: float) -> None:
        if self.turn is not None:
            self._end_turn(now)
        self.turns += 1
        shadow = (
            self._side(self.shadow_backend, "shadow", now)
            if self.shadow_backend is not None
            else None
        )
        self.turn = _Turn(self.turns, self._side(self.primary_backend, "primary", now), shadow)

    def shadow_lost(self, reason: str, now: float) -> None:
        """The shadow connection failed: this turn's shadow ends in error, later turns have none."""
        self.shadow_backend = None
        turn = self.turn
        if turn is not None and turn.shadow is not None and not turn.shadow.ended:
            turn.shadow.observation.error = reason
            self._end_side(turn, turn.shadow, now)

    def primary_frame(self, data: str | bytes, now: float) -> list[Event]:
        """Decode a frame from the serving backend (isolation needs it even between turns)."""
        turn = self.turn
        if turn is None or turn.primary.ended:
            return self._decoder.feed(data, now)
        events = turn.primary.recorder.feed(data, now)
        self._after_events(turn, turn.primary, events, now)
        return events

    def shadow_frame(self, data: str | bytes, now: float) -> list[Event]:
        turn = self.turn
        if turn is None or turn.shadow is None or turn.shadow.ended:
            return self._decoder.feed(data, now)
        events = turn.shadow.recorder.feed(data, now)
        self._after_events(turn, turn.shadow, events, now)
        return events

    def tick(self, now: float) -> None:
        """End the sides of the open turn that have been quiet for ``turn_idle_seconds``."""
        turn = self.turn
        if turn is None:
            return
        for side in (turn.primary, turn.shadow):
            if side is not None and not side.ended and now - side.last_activity >= self.idle:
                # Quiet although the end could have been seen: it did not finish.
                side.observation.timed_out = self.can_see_end
                self._end_side(turn, side, now)

    def close(self, now: float, *, cancelled: bool) -> None:
        """The session ended: conclude the open turn (ignored if the client left mid-turn)."""
        turn = self.turn
        if turn is None:
            return
        if cancelled:
            turn.primary.observation.cancelled = True
        self._end_turn(now)

    def _after_events(self, turn: _Turn, side: _Side, events: list[Event], now: float) -> None:
        side.last_activity = now
        if not events:
            return
        observed = side.observation.events
        if any(e.type in self.turn_end for e in events) or (
            self.experiment.contract is not None
            and self.experiment.contract.finished([e.type for e in observed])
        ):
            self._end_side(turn, side, now)

    def _end_side(self, turn: _Turn, side: _Side, now: float) -> None:
        side.ended = True
        side.recorder.finish(now)
        if turn.primary.ended and (turn.shadow is None or turn.shadow.ended):
            self._conclude(turn)

    def _end_turn(self, now: float) -> None:
        turn = self.turn
        assert turn is not None
        for side in (turn.primary, turn.shadow):
            if side is not None and not side.ended:
                side.ended = True
                side.recorder.finish(now)
        self._conclude(turn)

    def _conclude(self, turn: _Turn) -> None:
        if self.turn is turn:
            self.turn = None
        shadow = turn.shadow.observation if turn.shadow is not None else None
        self.experiment.conclude(turn.primary.observation, shadow, turn=turn.number)
