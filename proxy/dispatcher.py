"""Demo tool dispatchers, legacy and candidate, as real loopback backends (I/O).

This module owns the AI-agent tool dispatcher that the demo and the proxy's tests run
behind the proxy: one prompt in, one turn of events out (``agent_started``,
``agent_thinking``, ``tool_executing``/``tool_completed`` pairs, ``agent_completed``) over
WebSocket, NDJSON, SSE or one JSON body; defect knobs (drop, reorder, latency, errors, a
leaked user id, a hang) that can be changed while it runs; counters of what it did; and
the relay fixtures (echo, gzip, slow stream, hold) the proxy's tests lean on. A turn's
structure is planned by the pure functions here from a stable hash of the prompt, so two
runs on either backend differ only in ids, timestamps, durations and thinking text; the
rest is aiohttp handlers and the state they share.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gzip
import hashlib
import math
import random
import re
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeGuard

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

Json = dict[str, object]
Event = Json

NAMES: Final = ("legacy", "candidate")
EVENT_TYPES: Final = (
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
)
PROTOCOLS: Final = ("websocket", "ndjson", "sse", "json")
USER_HEADER: Final = "X-User-Id"
SHADOW_HEADER: Final = "X-Strangler-Shadow"
ANONYMOUS: Final = "anonymous"

# Knobs are a plain dataclass that tests and the demo set directly, so a hang has nothing
# to await; this poll bounds how late a cleared hang or a departed client is noticed.
_POLL_SECONDS: Final = 0.01
# The proxy's own body limit is what its tests exercise; the backend must not get there first.
_MAX_BODY: Final = 64 * 1024 * 1024
_MAX_LATENCY_MS: Final = 60_000.0
_SENDABLE_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})

# Delays and thinking text are noise by design: only the turn's structure is seeded.
_noise = random.Random()


# --- knobs and counters -------------------------------------------------------------


@dataclass
class Knobs:
    """Defects to inject. Each turn reads them when it starts, except ``hang``, which is
    read live so that clearing it releases the turns already waiting."""

    drop: set[str] = field(default_factory=set)
    reorder: bool = False
    latency_ms: float = 0.0
    error_rate: float = 0.0
    leak_user: str | None = None
    hang: bool = False

    def snapshot(self) -> Knobs:
        return dataclasses.replace(self, drop=set(self.drop))

    def as_json(self) -> Json:
        return {
            "drop": sorted(self.drop),
            "reorder": self.reorder,
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "leak_user": self.leak_user,
            "hang": self.hang,
        }

    def update(self, changes: object) -> None:
        """Apply a partial JSON object of knob values; all or nothing, ValueError if bad."""
        if not isinstance(changes, dict):
            raise ValueError("knobs must be a JSON object")
        valid = {str(key): _valid_knob(str(key), value) for key, value in changes.items()}
        for key, value in valid.items():
            setattr(self, key, value)


def _valid_knob(key: str, value: object) -> object:
    match key:
        case "drop":
            if not isinstance(value, list) or not all(v in EVENT_TYPES for v in value):
                raise ValueError(f"drop must be a list of event types out of {EVENT_TYPES}")
            return set(value)
        case "reorder" | "hang":
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
            return value
        case "latency_ms" | "error_rate":
            high = _MAX_LATENCY_MS if key == "latency_ms" else 1.0
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= high
            ):
                raise ValueError(f"{key} must be a number from 0 to {high:g}")
            return float(value)
        case "leak_user":
            if value is not None and not isinstance(value, str):
                raise ValueError("leak_user must be a string or null")
            return value
    raise ValueError(f"unknown knob {key!r}")


@dataclass
class Stats:
    """What the dispatcher did. ``turns`` counts every turn, shadow ones included;
    ``side_effects`` counts tool executions outside shadow turns; ``cancelled`` counts
    exchanges whose client left before they were answered in full."""

    turns: int = 0
    shadow_turns: int = 0
    side_effects: int = 0
    errors: int = 0
    cancelled: int = 0
    protocols: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 0))
    _changed: asyncio.Event = field(
        default_factory=asyncio.Event, init=False, repr=False, compare=False
    )

    def count_turn(self, protocol: str, *, shadow: bool) -> None:
        self.turns += 1
        self.shadow_turns += shadow
        self.protocols[protocol] += 1
        self._notify()

    def count_side_effect(self) -> None:
        self.side_effects += 1
        self._notify()

    def count_error(self) -> None:
        self.errors += 1
        self._notify()

    def count_cancelled(self) -> None:
        self.cancelled += 1
        self._notify()

    async def wait_until(self, predicate: Callable[[Stats], bool]) -> None:
        """Return once the counters satisfy ``predicate``, so callers need not poll."""
        while not predicate(self):
            await self._changed.wait()

    def as_json(self) -> Json:
        return {
            "turns": self.turns,
            "shadow_turns": self.shadow_turns,
            "side_effects": self.side_effects,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "protocols": dict(self.protocols),
        }

    def _notify(self) -> None:
        # Wake every current waiter once; later waiters wait on the fresh event.
        self._changed.set()
        self._changed = asyncio.Event()


# --- the turn plan (pure) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thought:
    """One ``agent_thinking`` chunk; its text is picked when emitted, so it varies per run."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    tool: str
    arguments: Json
    result: Json
    summary: str


@dataclass(frozen=True, slots=True)
class TurnPlan:
    steps: tuple[Thought | ToolCall, ...]
    answer: str

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(step for step in self.steps if isinstance(step, ToolCall))


def plan_turn(prompt: str) -> TurnPlan:
    """The turn's structure, a deterministic function of the prompt."""
    rng = random.Random(_stable_hash(prompt))
    steps: list[Thought | ToolCall] = [Thought()] * rng.randint(1, 3)
    for _ in range(rng.choices((0, 1, 2, 3), weights=(2, 4, 3, 1))[0]):
        steps.extend([Thought()] * rng.randint(0, 2))
        steps.append(rng.choice(_TOOLS)(rng, prompt))
    calls = [step for step in steps if isinstance(step, ToolCall)]
    topic = _clip(prompt, 60) or "your request"
    if calls:
        answer = f"About {topic}: " + "; ".join(call.summary for call in calls) + "."
    else:
        answer = f"About {topic}: no tools needed, answering directly."
    return TurnPlan(tuple(steps), answer)


def _stable_hash(text: str) -> int:
    # hash() is salted per process; legacy and candidate must agree across processes.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def _clip(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


def _calculator(rng: random.Random, prompt: str) -> ToolCall:
    a, op, b = rng.randint(2, 999), rng.choice("+-*/"), rng.randint(1, 99)
    value: int | float
    match op:
        case "+":
            value = a + b
        case "-":
            value = a - b
        case "*":
            value = a * b
        case _:
            value = round(a / b, 4)
    expression = f"{a} {op} {b}"
    return ToolCall(
        "calculator", {"expression": expression}, {"value": value}, f"{expression} = {value}"
    )


_CITIES: Final = ("Amsterdam", "Lagos", "Lima", "Osaka", "Oslo", "Perth", "Quito", "Tunis")
_SKIES: Final = ("sunny", "cloudy", "rain", "snow", "fog", "wind")


def _weather(rng: random.Random, prompt: str) -> ToolCall:
    city, unit = rng.choice(_CITIES), rng.choice(("celsius", "fahrenheit"))
    reading = _stable_hash(city)
    celsius = reading % 41 - 5
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32, 1)
    sky = _SKIES[reading // 41 % len(_SKIES)]
    result: Json = {
        "city": city,
        "temperature": temperature,
        "unit": unit,
        "conditions": sky,
        "humidity_pct": reading // 997 % 101,
    }
    summary = f"{city} is {temperature} degrees {unit} with {sky}"
    return ToolCall("weather", {"city": city, "unit": unit}, result, summary)


_TOPICS: Final = ("rate limits", "refund policy", "tool timeouts", "release notes")


def _search(rng: random.Random, prompt: str) -> ToolCall:
    query = _clip(prompt, 40).lower() or rng.choice(_TOPICS)
    limit = rng.randint(1, 3)
    slug = "-".join(re.findall(r"[a-z0-9]+", query)) or "query"
    page = _stable_hash(query) % 9000 + 1000
    hits = [
        {
            "title": f"{query.capitalize()}, part {i + 1}",
            "url": f"https://docs.example.org/{slug}/{page + i}",
            "score": round(0.97 - 0.11 * i, 2),
        }
        for i in range(limit)
    ]
    summary = f"{limit} result(s) for {query!r}"
    return ToolCall("search", {"query": query, "limit": limit}, {"hits": hits}, summary)


_ORDER_STATES: Final = ("pending", "packed", "shipped", "delivered")


def _order_lookup(rng: random.Random, prompt: str) -> ToolCall:
    order_id = f"ORD-{rng.randint(10000, 99999)}"
    record = _stable_hash(order_id)
    status = _ORDER_STATES[record % len(_ORDER_STATES)]
    result: Json = {
        "order_id": order_id,
        "status": status,
        "items": record // 4 % 5 + 1,
        "total_eur": round(record // 20 % 50_000 / 100, 2),
    }
    return ToolCall("order_lookup", {"order_id": order_id}, result, f"order {order_id} is {status}")


_TOOLS: Final = (_calculator, _weather, _search, _order_lookup)


# --- pacing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pace:
    """Built-in delays as (low, high) milliseconds at time_scale 1."""

    start: tuple[float, float]
    thinking: tuple[float, float]


# The candidate thinks faster; tools are the same code on both sides, so they take as long.
_PACES: Final = {
    "legacy": _Pace(start=(5, 15), thinking=(30, 70)),
    "candidate": _Pace(start=(5, 15), thinking=(15, 45)),
}
_TOOL_MS: Final = {
    "calculator": (20.0, 60.0),
    "weather": (60.0, 180.0),
    "search": (100.0, 300.0),
    "order_lookup": (40.0, 120.0),
}

_OPENERS: Final = ("Let me", "I should", "Next I will", "First I'll", "Now to", "Better to")
_ACTIONS: Final = ("check", "look at", "weigh", "work out", "confirm", "compare")
_OBJECTS: Final = (
    "the request",
    "what the user wants",
    "the numbers",
    "the constraints",
    "which tool fits",
    "the details",
)


def _thought_text() -> str:
    return f"{_noise.choice(_OPENERS)} {_noise.choice(_ACTIONS)} {_noise.choice(_OBJECTS)}."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the running dispatcher ---------------------------------------------------------------


class _ClientGone(Exception):
    """The client left while the dispatcher was waiting on its behalf."""


class Dispatcher:
    """One running demo dispatcher: its name, knobs and counters, and what ends waits."""

    def __init__(self, name: str, knobs: Knobs, time_scale: float) -> None:
        if name not in _PACES:
            raise ValueError(f"dispatcher name must be one of {NAMES}, not {name!r}")
        if not (math.isfinite(time_scale) and time_scale >= 0):
            raise ValueError(f"time_scale must be a finite number >= 0, not {time_scale!r}")
        self.name = name
        self.knobs = knobs
        self.time_scale = time_scale
        self.stats = Stats()
        self.hold_release = asyncio.Event()
        self.stopping = asyncio.Event()
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.pace = _PACES[name]

    def start_turn(self, prompt: str, *, user_id: str, shadow: bool, protocol: str) -> Turn:
        knobs = self.knobs.snapshot()
        self.stats.count_turn(protocol, shadow=shadow)
        fails = _noise.random() < knobs.error_rate
        if fails:
            self.stats.count_error()
        return Turn(
            self, plan_turn(prompt), user_id=user_id, shadow=shadow, knobs=knobs, fails=fails
        )

    def unhung(self) -> bool:
        return not self.knobs.hang

    async def pause(self, bounds_ms: tuple[float, float]) -> None:
        seconds = _noise.uniform(*bounds_ms) * self.time_scale / 1000
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def wait_for(
        self, request: web.Request, released: Callable[[], bool], wakeup: asyncio.Event
    ) -> bool:
        """Wait until ``released()``: True; or the server stops: False. Raises _ClientGone
        when the client disconnects, since nobody would read the answer."""
        while not released():
            if self.stopping.is_set():
                return False
            if _client_gone(request):
                raise _ClientGone
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_SECONDS):
                    await wakeup.wait()
        return True

    @contextlib.contextmanager
    def counting_abandoned(self) -> Iterator[None]:
        """Count an exchange the client left; a departed client is not an error."""
        try:
            yield
        except asyncio.CancelledError:
            # aiohttp cancels the handler on disconnect when handler_cancellation is on.
            self.stats.count_cancelled()
            raise
        except (_ClientGone, ConnectionError):
            self.stats.count_cancelled()


class Turn:
    """One agent turn: its plan, the knobs it started with, and the events it emits."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        plan: TurnPlan,
        *,
        user_id: str,
        shadow: bool,
        knobs: Knobs,
        fails: bool,
    ) -> None:
        self.dispatcher = dispatcher
        self.plan = plan
        self.user_id = user_id
        self.shadow = shadow
        self.knobs = knobs
        self.fails = fails
        self.run_id = str(uuid.uuid4())

    def error_event(self) -> Event:
        event = self._event("error")
        event["error"] = "injected failure"
        event["timestamp"] = _now()
        return event

    async def events(self) -> AsyncGenerator[Event, None]:
        """The events as delivered: defects applied, seq and timestamp stamped on the way
        out, so seq counts what the client actually receives."""
        knobs = self.knobs
        swap = None
        if knobs.reorder:
            swap = "tool_executing" if self.plan.tool_calls else "agent_started"
        held: Event | None = None
        seq = 0
        async with contextlib.aclosing(self._planned_events()) as planned:
            async for event in planned:
                if event["type"] == swap:
                    held, swap = event, None
                    continue
                batch = (event,) if held is None else (event, held)
                held = None
                for out in batch:
                    if out["type"] in knobs.drop:
                        continue
                    if knobs.latency_ms > 0:
                        await asyncio.sleep(knobs.latency_ms / 1000)
                    out["seq"], out["timestamp"] = seq, _now()
                    seq += 1
                    yield out

    async def _planned_events(self) -> AsyncGenerator[Event, None]:
        dispatcher = self.dispatcher
        await dispatcher.pause(dispatcher.pace.start)
        yield self._event("agent_started")
        for step in self.plan.steps:
            if isinstance(step, Thought):
                await dispatcher.pause(dispatcher.pace.thinking)
                thinking = self._event("agent_thinking", text=_thought_text())
                if self.knobs.leak_user is not None:
                    thinking["user_id"] = self.knobs.leak_user
                yield thinking
                continue
            call_id = str(uuid.uuid4())
            yield self._event(
                "tool_executing", tool_call_id=call_id, tool=step.tool, arguments=step.arguments
            )
            began = time.monotonic()
            if not self.shadow:
                dispatcher.stats.count_side_effect()
            await dispatcher.pause(_TOOL_MS[step.tool])
            yield self._event(
                "tool_completed",
                tool_call_id=call_id,
                tool=step.tool,
                result=step.result,
                duration_ms=round((time.monotonic() - began) * 1000, 3),
            )
        yield self._event(
            "agent_completed", answer=self.plan.answer, tool_calls=len(self.plan.tool_calls)
        )

    def _event(self, kind: str, **fields: object) -> Event:
        # seq and timestamp are placeholders here, stamped when the event is emitted.
        event: Event = {
            "type": kind,
            "user_id": self.user_id,
            "run_id": self.run_id,
            "seq": 0,
            "timestamp": "",
        }
        event.update(fields)
        return event


# Tests and the demo reach a running dispatcher's state through these.
DISPATCHER_KEY: Final = web.AppKey("strangler.dispatcher", Dispatcher)
KNOBS_KEY: Final = web.AppKey("strangler.dispatcher.knobs", Knobs)
STATS_KEY: Final = web.AppKey("strangler.dispatcher.stats", Stats)
HOLD_RELEASE_KEY: Final = web.AppKey("strangler.dispatcher.hold_release", asyncio.Event)


# --- HTTP plumbing --------------------------------------------------------------------------


def _user_of(request: web.Request) -> str:
    return request.headers.get(USER_HEADER) or ANONYMOUS


def _is_shadow(request: web.Request) -> bool:
    return request.headers.get(SHADOW_HEADER) == "1"


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": message}).decode(), content_type="application/json"
    )


def _abandoned() -> web.Response:
    # Nobody will read it; aiohttp needs a response to finish the exchange quietly.
    return web.Response(status=499, reason="Client Closed Request")


def _prompt_from(message: object) -> str:
    if not isinstance(message, dict):
        raise ValueError("a turn needs a JSON object")
    prompt = message.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    return prompt


async def _read_prompt(request: web.Request) -> str:
    try:
        message = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _bad_request("malformed JSON") from None
    try:
        return _prompt_from(message)
    except ValueError as error:
        raise _bad_request(str(error)) from None


def _number_query(request: web.Request, key: str, default: float, high: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_request(f"{key} must be a number") from None
    if not 0 <= value <= high:
        raise _bad_request(f"{key} must be from 0 to {high:g}")
    return value


def _ndjson_line(event: Json) -> bytes:
    return orjson.dumps(event) + b"\n"


def _sse_message(event: Json) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _stream_response(content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = content_type
    response.enable_chunked_encoding()
    return response


# --- agent endpoints ----------------------------------------------------------------------


async def _ndjson(request: web.Request) -> web.StreamResponse:
    return await _http_turn(request, "ndjson")


async def _sse(request: web.Request) -> web.StreamResponse:
    return await _http_turn(request, "sse")


async def _run(request: web.Request) -> web.StreamResponse:
    return await _http_turn(request, "json")


async def _http_turn(request: web.Request, protocol: str) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER_KEY]
    prompt = await _read_prompt(request)
    turn = dispatcher.start_turn(
        prompt, user_id=_user_of(request), shadow=_is_shadow(request), protocol=protocol
    )
    response: web.StreamResponse = _abandoned()
    with dispatcher.counting_abandoned():
        if not await dispatcher.wait_for(request, dispatcher.unhung, dispatcher.stopping):
            return _json_response({"error": "dispatcher stopping"}, status=503)
        if turn.fails:
            return _json_response(
                {"error": "injected failure", "dispatcher": dispatcher.name, "run_id": turn.run_id},
                status=500,
            )
        if protocol == "json":
            response = await _answer_whole(request, turn)
        else:
            response = await _answer_streamed(request, turn, protocol)
    return response


async def _answer_whole(request: web.Request, turn: Turn) -> web.Response:
    events: list[Event] = []
    async with contextlib.aclosing(turn.events()) as stream:
        async for event in stream:
            # Nothing is written until the end, so a departure shows only on the socket.
            if _client_gone(request):
                raise _ClientGone
            events.append(event)
    return _json_response({"user_id": turn.user_id, "run_id": turn.run_id, "events": events})


async def _answer_streamed(request: web.Request, turn: Turn, protocol: str) -> web.StreamResponse:
    if protocol == "sse":
        frame, response = _sse_message, _stream_response("text/event-stream")
    else:
        frame, response = _ndjson_line, _stream_response("application/x-ndjson")
    await response.prepare(request)
    async with contextlib.aclosing(turn.events()) as stream:
        async for event in stream:
            await response.write(frame(event))
    await response.write_eof()
    return response


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    dispatcher = request.app[DISPATCHER_KEY]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    dispatcher.sockets.add(ws)
    try:
        await _Session(dispatcher, request, ws).run()
    finally:
        dispatcher.sockets.discard(ws)
    return ws


class _Session:
    """One WebSocket connection. A reader answers control frames at once while a worker
    runs the turns one after another, so a slow or hanging turn never stops pings, binary
    echo or a close request."""

    def __init__(
        self, dispatcher: Dispatcher, request: web.Request, ws: web.WebSocketResponse
    ) -> None:
        self.dispatcher = dispatcher
        self.request = request
        self.ws = ws
        self.user_id = _user_of(request)
        self.shadow = _is_shadow(request)
        self._prompts: asyncio.Queue[str] = asyncio.Queue()
        # Set when a turn closes the socket itself: that close must finish, not be cancelled.
        self._turn_closes = False

    async def run(self) -> None:
        worker = asyncio.create_task(self._run_turns())
        try:
            async for message in self.ws:
                if message.type is WSMsgType.BINARY:
                    await self.ws.send_bytes(message.data)
                elif message.type is WSMsgType.TEXT:
                    code = await self._on_text(message.data)
                    if code is not None:
                        await _stop(worker)
                        await self.ws.close(code=code)
                        break
        except ConnectionError:
            pass  # the client is gone; the finally below ends its turn
        finally:
            if self._turn_closes:
                await worker
            else:
                await _stop(worker)

    async def _on_text(self, data: str) -> int | None:
        """Queue the turn a text frame asks for; return the close code it asks for, if any."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            message = None
        if isinstance(message, dict) and "close" in message:
            code = message["close"]
            if _sendable_close_code(code):
                return code
        else:
            try:
                self._prompts.put_nowait(_prompt_from(message))
            except ValueError:
                pass
            else:
                return None
        await self._send({"type": "error", "error": "bad request", "user_id": self.user_id})
        return None

    async def _run_turns(self) -> None:
        dispatcher = self.dispatcher
        while True:
            prompt = await self._prompts.get()
            turn = dispatcher.start_turn(
                prompt, user_id=self.user_id, shadow=self.shadow, protocol="websocket"
            )
            carry_on = False
            with dispatcher.counting_abandoned():
                carry_on = await self._play(turn)
            if not carry_on:
                return

    async def _play(self, turn: Turn) -> bool:
        dispatcher = self.dispatcher
        if not await dispatcher.wait_for(self.request, dispatcher.unhung, dispatcher.stopping):
            return False
        if turn.fails:
            await self._send(turn.error_event())
            self._turn_closes = True
            await self.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"injected failure")
            return False
        async with contextlib.aclosing(turn.events()) as stream:
            async for event in stream:
                await self._send(event)
        return True

    async def _send(self, event: Json) -> None:
        await self.ws.send_frame(orjson.dumps(event), WSMsgType.TEXT)


def _sendable_close_code(code: object) -> TypeGuard[int]:
    if isinstance(code, bool) or not isinstance(code, int):
        return False
    return code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        # Swallow the worker's cancellation, never our own.
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


# --- control and relay fixtures -----------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return _json_response({"status": "ok", "dispatcher": request.app[DISPATCHER_KEY].name})


async def _get_knobs(request: web.Request) -> web.Response:
    return _json_response(request.app[KNOBS_KEY].as_json())


async def _put_knobs(request: web.Request) -> web.Response:
    knobs = request.app[KNOBS_KEY]
    try:
        knobs.update(orjson.loads(await request.read()))
    except ValueError as error:  # orjson.JSONDecodeError is one too
        raise _bad_request(str(error)) from None
    return _json_response(knobs.as_json())


async def _stats(request: web.Request) -> web.Response:
    dispatcher = request.app[DISPATCHER_KEY]
    return _json_response({"dispatcher": dispatcher.name, **dispatcher.stats.as_json()})


async def _echo(request: web.Request) -> web.Response:
    status = int(_number_query(request, "status", 200, 599))
    if status < 200:
        raise _bad_request("status must be from 200 to 599")
    extra: list[tuple[str, str]] = []
    for item in request.query.getall("set_header", []):
        name, colon, value = item.partition(":")
        if not colon or not name.strip():
            raise _bad_request("set_header must be Name:Value")
        extra.append((name.strip(), value.strip()))
    body = await request.read()
    if status in (204, 304):
        response = web.Response(status=status)  # these statuses carry no body
    else:
        response = _json_response(
            {
                "backend": request.app[DISPATCHER_KEY].name,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": [[name, value] for name, value in request.headers.items()],
                "body": base64.b64encode(body).decode(),
            },
            status=status,
        )
    for name, value in extra:
        response.headers.add(name, value)
    return response


async def _gzip(request: web.Request) -> web.Response:
    document = orjson.dumps(
        {"backend": request.app[DISPATCHER_KEY].name, "encoding": "gzip", "text": "strangler " * 64}
    )
    # Compressed here and labelled by hand: aiohttp only compresses when asked to.
    return web.Response(
        body=gzip.compress(document, mtime=0),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )


async def _slow_stream(request: web.Request) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER_KEY]
    lines = int(_number_query(request, "n", 5, 10_000))
    gap = _number_query(request, "gap_ms", 100, _MAX_LATENCY_MS) / 1000
    response = _stream_response("application/x-ndjson")
    await response.prepare(request)
    with dispatcher.counting_abandoned():
        for line in range(lines):
            if line and gap:
                await asyncio.sleep(gap)
            await response.write(_ndjson_line({"backend": dispatcher.name, "line": line}))
        await response.write_eof()
    return response


async def _hold(request: web.Request) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER_KEY]
    release = dispatcher.hold_release
    response = _stream_response("application/x-ndjson")
    await response.prepare(request)
    with dispatcher.counting_abandoned():
        await response.write(_ndjson_line({"backend": dispatcher.name, "held": True}))
        if await dispatcher.wait_for(request, release.is_set, release):
            await response.write(_ndjson_line({"backend": dispatcher.name, "released": True}))
        await response.write_eof()
    return response


# --- assembly -------------------------------------------------------------------------------


async def _name_the_dispatcher(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Dispatcher"] = request.app[DISPATCHER_KEY].name


async def _stop_dispatcher(app: web.Application) -> None:
    dispatcher = app[DISPATCHER_KEY]
    dispatcher.stopping.set()
    # Open sessions would otherwise hold the server's shutdown for its whole timeout.
    await asyncio.gather(
        *(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"dispatcher stopping")
            for ws in list(dispatcher.sockets)
        )
    )


def build_app(name: str, *, knobs: Knobs | None = None, time_scale: float = 1.0) -> web.Application:
    """A demo dispatcher app; ``time_scale`` multiplies every built-in delay (0: none)."""
    dispatcher = Dispatcher(name, knobs if knobs is not None else Knobs(), time_scale)
    app = web.Application(client_max_size=_MAX_BODY)
    app[DISPATCHER_KEY] = dispatcher
    app[KNOBS_KEY] = dispatcher.knobs
    app[STATS_KEY] = dispatcher.stats
    app[HOLD_RELEASE_KEY] = dispatcher.hold_release
    app.on_response_prepare.append(_name_the_dispatcher)
    app.on_shutdown.append(_stop_dispatcher)
    app.add_routes(
        [
            web.get("/healthz", _healthz),
            web.get("/_knobs", _get_knobs),
            web.put("/_knobs", _put_knobs),
            web.get("/_stats", _stats),
            web.get("/ws/agent", _websocket),
            web.post("/api/agent/stream", _ndjson),
            web.post("/api/agent/sse", _sse),
            web.post("/api/agent/run", _run),
            web.get("/gzip", _gzip),
            web.get("/slow-stream", _slow_stream),
            web.get("/hold", _hold),
            web.route("*", "/echo/{tail:.*}", _echo),
            # Any other path or method echoes too, so relay tests can use any URL.
            web.route("*", "/{tail:.*}", _echo),
        ]
    )
    return app


async def serve(
    name: str,
    host: str,
    port: int,
    *,
    time_scale: float = 1.0,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve one demo dispatcher until cancelled; ``ready`` is set once it accepts."""
    runner = web.AppRunner(
        build_app(name, time_scale=time_scale),
        access_log=None,  # the demo draws its own terminal view
        handler_cancellation=True,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
