"""WebSocket turns: the events after one client message, per side, until the turn ends (shell).

A turn starts with a client message and ends, on each side separately, at an event type
listed in the route's ``turn_end``, at the point where the route's contract is complete
and nothing can follow (``agent_completed`` in the demo grammar), or after
``turn_idle_seconds`` without an event. When there is a way to see the end and a side
only goes quiet, that side timed out. Once both sides have ended, the route's experiment
compares them, turn by turn in order; without a shadow, the primary's sequence is still
checked against the contract.

What a side records of one turn is bounded as an HTTP exchange's is (``[shadow]
max_recorded_events`` and ``max_recorded_bytes``): a chatty turn that never ends lets
go of its events at the limit, is neither compared nor checked, and is counted as such.
Its frames are still decoded, one message at a time, so that its end is seen by an
event type in ``turn_end`` (the contract's terminal types by default) or the idle
timeout, and its later frames do not spill into the next turn.
"""

from __future__ import annotations

from adapters.events import Event
from proxy.experiment import RouteExperiment
from proxy.observation import MAX_RECORDED_BYTES, MAX_RECORDED_EVENTS, Observation, Recorder
from proxy.routing import Backend, Route


# Plain classes, not dataclasses: compiled, a dataclass's ``__init__`` stays interpreted,
# and a shadowed session builds three of these a turn.
class _Side:
    def __init__(self, recorder: Recorder, last_activity: float) -> None:
        self.recorder = recorder
        self.last_activity = last_activity
        self.ended = False

    @property
    def observation(self) -> Observation:
        return self.recorder.observation


class _Turn:
    def __init__(self, number: int, primary: _Side, shadow: _Side | None) -> None:
        self.number = number
        self.primary = primary
        self.shadow = shadow


MAX_OPEN_TURNS = 64


class TurnTracker:
    """Turns in order; each side's frames belong to the oldest turn that side has not ended.

    A client may send its next message before a side has finished the previous turn (the
    shadow often lags, starting later and running on another backend): the side then
    finishes the old turn first and its later frames go to the next one. Only when the
    end of a turn cannot be seen (no ``turn_end`` and no contract) does a new message end
    the turns still open.
    """

    def __init__(
        self,
        route: Route,
        experiment: RouteExperiment,
        primary: Backend,
        shadow: Backend | None,
        max_events: int = MAX_RECORDED_EVENTS,
        max_bytes: int = MAX_RECORDED_BYTES,
    ) -> None:
        self.route = route
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.experiment = experiment
        self.primary_backend = primary
        self.shadow_backend = shadow
        self.type_field = route.settings.event_type_field
        # Without explicit end types, the contract's own: a turn that breaks the contract
        # still ends at agent_completed instead of swallowing the session's later turns.
        contract = experiment.contract
        self.turn_end = frozenset(route.settings.turn_end) or (
            contract.terminal_types if contract is not None else frozenset()
        )
        self.idle = route.settings.turn_idle_seconds
        self.can_see_end = bool(self.turn_end) or experiment.contract is not None
        self.open: list[_Turn] = []
        self.turns = 0
        # Frames between turns are decoded too (isolation needs their events); the
        # decoder is made on the first such frame: a session that idles costs none.
        self._decoder: Recorder | None = None

    @property
    def settled(self) -> bool:
        """Whether no turn is open."""
        return not self.open

    def _side(self, backend: Backend, role: str, now: float) -> _Side:
        recorder = Recorder(
            Observation(backend, role, now),
            "websocket",
            self.type_field,
            self.max_events,
            self.max_bytes,
        )
        recorder.decodes_past_limit = True  # the turn's end and isolation need its events
        return _Side(recorder, now)

    def client_message(self, now: float) -> None:
        if not self.can_see_end:
            for turn in list(self.open):
                for side in (turn.primary, turn.shadow):
                    if side is not None and not side.ended:
                        self._end_side(turn, side, now)
        elif len(self.open) >= MAX_OPEN_TURNS:
            oldest = self.open[0]
            for side in (oldest.primary, oldest.shadow):
                if side is not None and not side.ended:
                    side.observation.timed_out = True
                    self._end_side(oldest, side, now)
        self.turns += 1
        shadow = (
            self._side(self.shadow_backend, "shadow", now)
            if self.shadow_backend is not None
            else None
        )
        self.open.append(
            _Turn(self.turns, self._side(self.primary_backend, "primary", now), shadow)
        )

    def shadow_lost(self, reason: str, now: float) -> None:
        """The shadow connection failed: its open turns end in error, later turns have none."""
        self.shadow_backend = None
        for turn in list(self.open):
            if turn.shadow is not None and not turn.shadow.ended:
                turn.shadow.observation.error = reason
                self._end_side(turn, turn.shadow, now)

    def _current(self, shadow: bool) -> tuple[_Turn, _Side] | None:
        for turn in self.open:
            side = turn.shadow if shadow else turn.primary
            if side is not None and not side.ended:
                return turn, side
        return None

    def primary_frame(self, data: str | bytes, now: float) -> list[Event]:
        """Decode a frame from the serving backend (isolation needs it even between turns)."""
        return self._frame(data, now, shadow=False)

    def shadow_frame(self, data: str | bytes, now: float) -> list[Event]:
        return self._frame(data, now, shadow=True)

    def _frame(self, data: str | bytes, now: float, *, shadow: bool) -> list[Event]:
        current = self._current(shadow)
        if current is None:
            decoder = self._decoder
            if decoder is None:
                observation = Observation(self.primary_backend, "primary", 0.0)
                decoder = self._decoder = Recorder(observation, "websocket", self.type_field)
                decoder.decodes_past_limit = True  # it keeps nothing: only isolation needs it
            events = decoder.feed(data, now)
            decoder.observation.events.clear()  # kept for nothing: no turn is open
            return events
        turn, side = current
        events = side.recorder.feed(data, now)
        side.last_activity = now
        observation = side.observation
        if events and (
            any(e.type in self.turn_end for e in events)
            or (
                # Past the limit the sequence is gone: the turn ends by its type or idles.
                not observation.over_limit
                and self.experiment.contract is not None
                and self.experiment.contract.finished([e.type for e in observation.events])
            )
        ):
            self._end_side(turn, side, now)
        return events

    def tick(self, now: float) -> None:
        """End a side that has been quiet for ``turn_idle_seconds`` in its current turn."""
        for shadow in (False, True):
            current = self._current(shadow)
            if current is None:
                continue
            turn, side = current
            if now - side.last_activity >= self.idle:
                # Quiet although the end could have been seen: it did not finish.
                side.observation.timed_out = self.can_see_end
                self._end_side(turn, side, now)

    def primary_over(self, now: float, *, cancelled: bool, error: str | None) -> bool:
        """The primary connection ended: no frame can come for its open turns, which end
        now. Cut off by the client or the proxy (``cancelled``), a turn is not compared;
        ended by the backend, it is compared as it stands, with ``error`` if the backend
        failed. Returns whether the shadow still owes a turn worth comparing."""
        for turn in list(self.open):
            if not turn.primary.ended:
                observation = turn.primary.observation
                if cancelled:
                    observation.cancelled = True
                elif error is not None:
                    observation.error = error
                self._end_side(turn, turn.primary, now)
        return any(
            turn.shadow is not None
            and not turn.shadow.ended
            and not turn.primary.observation.cancelled
            for turn in self.open
        )

    def close(self, now: float) -> None:
        """The session is over: a side still in a turn did not finish it in time."""
        for turn in list(self.open):
            for side in (turn.primary, turn.shadow):
                if side is not None and not side.ended:
                    cut = turn.primary.observation.cancelled
                    side.observation.timed_out = self.can_see_end and not cut
                    self._end_side(turn, side, now)

    def _end_side(self, turn: _Turn, side: _Side, now: float) -> None:
        side.ended = True
        side.recorder.finish(now)
        # Conclude in order: a turn is compared once both its sides ended and every
        # earlier turn has been.
        while self.open:
            head = self.open[0]
            if not head.primary.ended or (head.shadow is not None and not head.shadow.ended):
                break
            self.open.pop(0)
            shadow = head.shadow.observation if head.shadow is not None else None
            self.experiment.conclude(head.primary.observation, shadow, turn=head.number)
