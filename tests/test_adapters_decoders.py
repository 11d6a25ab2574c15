"""The sans-I/O decoders: NDJSON, SSE, one JSON body and WebSocket messages to events."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.events import BINARY_TYPE, ERROR_TYPE, RESPONSE_TYPE, UNTYPED, Event
from adapters.json_body import JsonBodyDecoder
from adapters.ndjson import NdjsonDecoder
from adapters.sse import SseDecoder
from adapters.websocket import WebSocketDecoder

Json = dict[str, Any]
StreamDecoder = NdjsonDecoder | SseDecoder | JsonBodyDecoder

RUN = "5a0c1a4e-8f4e-4c59-9a57-3f0e8e3b7b61"
CALL = "0e7d2b58-3f5c-4c02-a9b8-2b0f4b6d8f11"
TEXT = "naïve — 東京 ✓"


def event(kind: str, seq: int, **fields: Any) -> Json:
    """An event shaped like the demo dispatcher's."""
    base: Json = {
        "type": kind,
        "user_id": "alice",
        "run_id": RUN,
        "seq": seq,
        "timestamp": f"2026-11-24T23:00:0{seq}.123Z",
    }
    return base | fields


TURN: list[Json] = [
    event("agent_started", 0),
    event("agent_thinking", 1, text=f"Let me check {TEXT}."),
    event("agent_thinking", 2, text="🙂 emoji take four bytes"),
    event(
        "tool_executing",
        3,
        tool_call_id=CALL,
        tool="weather",
        arguments={"city": "東京", "unit": "celsius"},
    ),
    event(
        "tool_completed",
        4,
        tool_call_id=CALL,
        tool="weather",
        result={"city": "東京", "temperature": 12.5, "unit": "celsius", "ok": True, "x": None},
        duration_ms=123.456,
    ),
    event("agent_completed", 5, answer=f"About {TEXT}: 12.5 degrees.", tool_calls=1),
]


def ndjson(events: Iterable[Json], newline: bytes = b"\n") -> bytes:
    return b"".join(orjson.dumps(e) + newline for e in events)


def sse(events: Iterable[Json], newline: bytes = b"\n", *, pretty: bool = False) -> bytes:
    """SSE as the dispatcher writes it; ``pretty`` spreads each JSON over data lines."""
    out = b""
    for e in events:
        data = orjson.dumps(e, option=orjson.OPT_INDENT_2 if pretty else 0)
        lines = [b"event: " + e["type"].encode()] + [b"data: " + x for x in data.split(b"\n")]
        out += newline.join(lines) + newline + newline
    return out


def feed_all(decoder: StreamDecoder, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def chunkings(stream: bytes) -> Iterable[list[bytes]]:
    """The stream whole, byte by byte, and split in two at every position."""
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]


def as_pairs(events: Iterable[Event]) -> list[tuple[str, Json]]:
    return [(e.type, dict(e.data)) for e in events]


EXPECTED = [(e["type"], e) for e in TURN]

STREAMS: dict[str, tuple[Callable[[], StreamDecoder], bytes]] = {
    "ndjson-lf": (NdjsonDecoder, ndjson(TURN)),
    "ndjson-crlf": (NdjsonDecoder, ndjson(TURN, b"\r\n")),
    "ndjson-blank-lines": (NdjsonDecoder, b"\n" + ndjson(TURN, b"\n\n\r\n")),
    "sse-lf": (SseDecoder, sse(TURN)),
    "sse-crlf": (SseDecoder, sse(TURN, b"\r\n")),
    "sse-cr": (SseDecoder, sse(TURN, b"\r")),
    "sse-crlf-multiline-data": (SseDecoder, sse(TURN, b"\r\n", pretty=True)),
    "sse-cr-multiline-data": (SseDecoder, sse(TURN, b"\r", pretty=True)),
    "sse-bom-comments-ids": (
        SseDecoder,
        b"\xef\xbb\xbf: keep-alive\nretry: 1500\n\n"
        + b"".join(b"id: " + str(i).encode() + b"\n" + sse([e]) for i, e in enumerate(TURN)),
    ),
    "json-body": (
        lambda: JsonBodyDecoder(200),
        orjson.dumps({"user_id": "alice", "run_id": RUN, "events": TURN}),
    ),
}


@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_decodes_to_the_same_events_however_it_is_chunked(name: str) -> None:
    make, stream = STREAMS[name]
    for chunks in chunkings(stream):
        assert as_pairs(feed_all(make(), chunks)) == EXPECTED, (name, chunks)


def test_a_multi_byte_character_split_between_chunks_survives() -> None:
    line = orjson.dumps(event("agent_thinking", 1, text=TEXT)) + b"\n"
    cut = line.index("東".encode()) + 1  # inside the three bytes of 東
    decoder = NdjsonDecoder()
    assert decoder.feed(line[:cut]) == []
    [decoded] = decoder.feed(line[cut:])
    assert decoded.data["text"] == TEXT


def test_an_sse_crlf_split_between_chunks_is_one_line_end_not_a_blank_line() -> None:
    # A blank line here would dispatch the first half of the JSON alone: a decoding error.
    decoder = SseDecoder()
    assert decoder.feed(b'event: agent_started\r\ndata: {"type":\r') == []
    assert decoder.feed(b'\ndata: "agent_started"}\r\n') == []
    [decoded] = decoder.feed(b"\r\n")
    assert (decoded.type, dict(decoded.data)) == ("agent_started", {"type": "agent_started"})


def test_a_byte_order_mark_split_across_chunks_is_still_skipped() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbb") == []
    assert as_pairs(decoder.feed(b'\xbfdata: {"type": "a"}\n\n')) == [("a", {"type": "a"})]


# --- NDJSON ---------------------------------------------------------------------------


def test_ndjson_decodes_a_last_line_without_newline_at_close() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'{"type": "a"}\n{"type": "b"}') == [Event("a", {"type": "a"})]
    assert decoder.close() == [Event("b", {"type": "b"})]


def test_ndjson_turns_a_malformed_line_into_an_error_event_and_carries_on() -> None:
    events = feed_all(
        NdjsonDecoder(), [b'{"type": "a"}\n{"type": \n[1, 2]\n"text"\n\xff\xfe\n{"type": "b"}\n']
    )
    assert [e.type for e in events] == ["a", ERROR_TYPE, ERROR_TYPE, ERROR_TYPE, ERROR_TYPE, "b"]
    assert all(e.is_error and e.error for e in events[1:-1])
    assert "malformed JSON" in (events[1].error or "")
    assert events[2].error == "a JSON array is not an event object"
    assert events[1].data["excerpt"] == '{"type": '


def test_ndjson_names_an_object_without_a_type_field_message() -> None:
    [decoded] = feed_all(NdjsonDecoder(), [b'{"line": 1}\n'])
    assert decoded == Event(UNTYPED, {"line": 1})


def test_ndjson_reports_a_type_field_that_is_not_a_string() -> None:
    [decoded] = feed_all(NdjsonDecoder(), [b'{"type": 7}\n'])
    assert decoded.error == "the 'type' field is a JSON number, not a string"


def test_ndjson_reads_the_type_from_the_configured_field() -> None:
    [decoded] = feed_all(NdjsonDecoder(event_type_field="kind"), [b'{"kind": "k", "type": 1}\n'])
    assert decoded.type == "k"


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_ndjson_reports_an_oversized_line_once_and_decodes_the_next_one(chunk_size: int) -> None:
    stream = b'{"type": "a", "pad": "' + b"x" * 200 + b'"}\n{"type": "b"}\n'
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
    events = feed_all(NdjsonDecoder(max_size=100), chunks)
    assert [e.type for e in events] == [ERROR_TYPE, "b"]
    assert events[0].error == "an NDJSON line exceeds the limit of 100 bytes"


def test_ndjson_never_buffers_more_than_its_limit() -> None:
    decoder = NdjsonDecoder(max_size=100)
    for _ in range(1000):
        decoder.feed(b"y" * 1000)
    assert len(decoder._line) == 0  # what is thrown away is not kept


# --- SSE ------------------------------------------------------------------------------


def test_sse_takes_the_type_from_the_event_field_first() -> None:
    events = feed_all(SseDecoder(), [b'event: custom\ndata: {"type": "a"}\n\n'])
    assert [e.type for e in events] == ["custom"]


def test_sse_falls_back_to_the_json_type_field_then_to_message() -> None:
    events = feed_all(SseDecoder(), [b'data: {"type": "a"}\n\ndata: {"n": 1}\n\n'])
    assert as_pairs(events) == [("a", {"type": "a"}), ("message", {"n": 1})]


def test_sse_joins_data_lines_with_newlines() -> None:
    events = feed_all(SseDecoder(), [b'data: {"type":\ndata: "a",\ndata:"b": 1}\n\n'])
    assert as_pairs(events) == [("a", {"type": "a", "b": 1})]


def test_sse_ignores_comments_unknown_fields_and_events_without_data() -> None:
    stream = b': hello\nfoo: bar\nevent: ping\n\nid: 7\n\n:\ndata: {"type": "a"}\n\n'
    assert as_pairs(feed_all(SseDecoder(), [stream])) == [("a", {"type": "a"})]


def test_sse_removes_only_one_space_after_the_colon() -> None:
    [decoded] = feed_all(SseDecoder(), [b'event:  spaced\ndata:{"type": "a"}\n\n'])
    assert decoded.type == " spaced"


def test_sse_keeps_the_last_event_id_and_the_retry_time() -> None:
    decoder = SseDecoder()
    feed_all(decoder, [b"id: 41\nretry: 2500\nretry: soon\nid: a\0b\n\n"])
    assert (decoder.last_event_id, decoder.retry_ms) == ("41", 2500)


def test_sse_drops_an_event_the_stream_ends_before_completing() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"type": "a"}\n\ndata: {"type": "b"}\n') == [
        Event("a", {"type": "a"})
    ]
    assert decoder.close() == []


def test_sse_turns_data_that_is_not_a_json_object_into_an_error_event() -> None:
    events = feed_all(SseDecoder(), [b'data: [DONE]\n\ndata: 3\n\ndata: {"type": "a"}\n\n'])
    assert [e.type for e in events] == [ERROR_TYPE, ERROR_TYPE, "a"]
    assert events[0].data["excerpt"] == "[DONE]"


def test_sse_decodes_invalid_utf8_with_replacement_as_the_standard_says() -> None:
    [decoded] = feed_all(SseDecoder(), [b'data: {"type": "a\xff"}\n\n'])
    assert decoded.type == "a\ufffd"


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_sse_reports_an_oversized_event_once_and_decodes_the_next_one(chunk_size: int) -> None:
    big = b"".join(b"data: " + b"x" * 30 + b"\n" for _ in range(10))
    stream = b"event: big\n" + big + b'\ndata: {"type": "b"}\n\n'
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
    events = feed_all(SseDecoder(max_size=100), chunks)
    assert [e.type for e in events] == [ERROR_TYPE, "b"]
    assert events[0].error == "an SSE event exceeds the limit of 100 bytes"


# --- one JSON body --------------------------------------------------------------------


def test_a_json_body_with_an_events_list_is_those_events_and_nothing_else() -> None:
    body = orjson.dumps({"user_id": "alice", "run_id": RUN, "events": TURN})
    decoder = JsonBodyDecoder(200)
    assert decoder.feed(body[:10]) == []
    assert as_pairs(feed_all(decoder, [body[10:]])) == EXPECTED
    assert decoder.status == 200


def test_any_other_json_body_is_one_response_event_with_status_and_body() -> None:
    body = b'{"error": "injected failure"}'
    assert feed_all(JsonBodyDecoder(500), [body]) == [
        Event(RESPONSE_TYPE, {"status": 500, "body": {"error": "injected failure"}})
    ]
    assert feed_all(JsonBodyDecoder(200), [b"[1, 2]"]) == [
        Event(RESPONSE_TYPE, {"status": 200, "body": [1, 2]})
    ]


def test_an_empty_json_body_counts_as_null() -> None:
    assert feed_all(JsonBodyDecoder(204), []) == [
        Event(RESPONSE_TYPE, {"status": 204, "body": None})
    ]


def test_a_json_body_that_is_not_json_is_an_error_event() -> None:
    [decoded] = feed_all(JsonBodyDecoder(502), [b"<html>Bad gateway</html>"])
    assert decoded.is_error and decoded.data["excerpt"] == "<html>Bad gateway</html>"


def test_items_of_an_events_list_that_are_not_objects_become_error_events_in_place() -> None:
    body = b'{"events": [{"type": "a"}, 5, {"type": "b"}]}'
    events = feed_all(JsonBodyDecoder(200), [body])
    assert [e.type for e in events] == ["a", ERROR_TYPE, "b"]
    assert events[1].data["excerpt"] == "5"


def test_a_json_body_over_the_limit_is_one_error_and_is_not_kept() -> None:
    decoder = JsonBodyDecoder(200, max_size=10)
    decoder.feed(b'{"events": ')
    decoder.feed(b"[]}")
    assert len(decoder._body) == 0
    [decoded] = decoder.close()
    assert decoded.error == "a JSON body exceeds the limit of 10 bytes"


# --- WebSocket ------------------------------------------------------------------------


def test_a_websocket_text_message_is_one_event() -> None:
    decoder = WebSocketDecoder()
    for e in TURN:
        assert decoder.feed_text(orjson.dumps(e).decode()) == [Event(e["type"], e)]
    assert decoder.close() == []


def test_a_websocket_binary_message_is_a_digest_not_its_bytes() -> None:
    payload = b"\x00\x01binary"
    assert WebSocketDecoder().feed(payload) == [
        Event(BINARY_TYPE, {"length": 8, "sha256": hashlib.sha256(payload).hexdigest()})
    ]


def test_a_malformed_or_oversized_websocket_message_is_an_error_event() -> None:
    decoder = WebSocketDecoder(max_size=20)
    assert decoder.feed("not json")[0].is_error
    assert decoder.feed_text('{"type": "' + "x" * 20 + '"}')[0].error == (
        "a WebSocket message exceeds the limit of 20 bytes"
    )
    assert decoder.feed("\ud800")[0].is_error  # a lone surrogate cannot be UTF-8


# --- any input at all -----------------------------------------------------------------

DECODERS: dict[str, Callable[[], StreamDecoder]] = {
    "ndjson": lambda: NdjsonDecoder(max_size=64),
    "sse": lambda: SseDecoder(max_size=64),
    "json": lambda: JsonBodyDecoder(200, max_size=64),
}
# Random bytes rarely form lines and fields; these fragments make them likely.
FRAGMENTS = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b"data: ", b"event: a\n", b":", b'{"type": "a"}', b"{", b"\xef"]
)
NOISE = st.lists(st.one_of(st.binary(max_size=40), FRAGMENTS), max_size=20).map(b"".join)


@pytest.mark.parametrize("name", DECODERS)
@settings(max_examples=150, deadline=None)
@given(stream=NOISE, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_bytes_decode_without_raising_and_whatever_the_chunking(
    name: str, stream: bytes, cuts: list[int]
) -> None:
    whole = feed_all(DECODERS[name](), [stream])
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_all(DECODERS[name](), chunks) == whole
    assert all(isinstance(e, Event) and isinstance(e.type, str) for e in whole)
    assert all(e.type == ERROR_TYPE for e in whole if e.is_error)


@settings(max_examples=150, deadline=None)
@given(message=st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_any_websocket_message_decodes_without_raising(message: str | bytes) -> None:
    [decoded] = WebSocketDecoder(max_size=64).feed(message)
    assert isinstance(decoded, Event)


def test_documents_nested_as_deep_as_json_decoding_allows_never_break_a_decoder() -> None:
    deep = b"[" * 1000 + b"]" * 1000
    body = b'{"events": [' + deep + b', {"type": "a", "x": ' + deep + b"}]}"
    events = feed_all(JsonBodyDecoder(200), [body])
    assert [e.type for e in events] == [ERROR_TYPE, "a"]
    assert events[0].data["excerpt"] == "..."  # too deep for orjson to encode again
    too_deep = b'{"type": "a", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}\n"
    assert [e.type for e in feed_all(NdjsonDecoder(), [too_deep])] == [ERROR_TYPE]
