"""Framers cut streams into raw event frames that join back to the input exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.framing import NdjsonFramer, SseFramer
from adapters.ndjson import NdjsonDecoder
from adapters.sse import SseDecoder

NDJSON = (
    '{"type":"agent_started","user_id":"u1"}\n'
    '{"type":"agent_thinking","text":"naïve — 東京 ✓"}\r\n'
    "\n"
    '{"type":"agent_completed"}'
).encode()
SSE = (
    '\ufeffevent: agent_started\ndata: {"a": 1}\n\n'
    ': comment\r\nevent: agent_thinking\r\ndata: {"text": "東京"}\r\n\r\n'
    'data: {"type": "tool_executing"}\r\rdata: {"type": "agent_completed"}\n\n'
    "\n"
    'data: {"type": "trailing"}\n'
).encode()


def frames_of(framer: NdjsonFramer | SseFramer, chunks: list[bytes]) -> list[bytes]:
    frames = []
    for chunk in chunks:
        frames.extend(framer.feed(chunk))
    return frames + framer.close()


def splits(data: bytes) -> list[list[bytes]]:
    out = [[data], [data[i : i + 1] for i in range(len(data))]]
    out += [[data[:i], data[i:]] for i in range(1, len(data))]
    return out


@pytest.mark.parametrize(("framer_type", "stream"), [(NdjsonFramer, NDJSON), (SseFramer, SSE)])
def test_frames_join_back_to_the_stream_and_do_not_depend_on_chunking(
    framer_type: type[NdjsonFramer] | type[SseFramer], stream: bytes
) -> None:
    whole = frames_of(framer_type(), [stream])
    assert b"".join(whole) == stream
    for chunks in splits(stream):
        assert frames_of(framer_type(), chunks) == whole


def test_each_ndjson_frame_is_one_line() -> None:
    assert frames_of(NdjsonFramer(), [NDJSON]) == [
        b'{"type":"agent_started","user_id":"u1"}\n',
        '{"type":"agent_thinking","text":"naïve — 東京 ✓"}\r\n'.encode(),
        b"\n",
        b'{"type":"agent_completed"}',
    ]


def test_each_sse_frame_decodes_to_at_most_one_event_and_together_to_the_whole_stream() -> None:
    frames = frames_of(SseFramer(), [SSE])
    decoder = SseDecoder()
    per_frame = [decoder.feed(frame) for frame in frames]
    assert all(len(events) <= 1 for events in per_frame)
    assert [e for events in per_frame for e in events] == SseDecoder().feed(SSE)
    assert sum(1 for events in per_frame if events) == 4


def test_each_ndjson_frame_decodes_to_at_most_one_event() -> None:
    decoder = NdjsonDecoder()
    frames = frames_of(NdjsonFramer(), [NDJSON])
    per_frame = [decoder.feed(frame) for frame in frames[:-1]] + [
        decoder.feed(frames[-1]) + decoder.close()
    ]
    assert [len(events) for events in per_frame] == [1, 1, 0, 1]


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_any_bytes_split_anywhere_frame_the_same(data: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    for framer_type in (NdjsonFramer, SseFramer):
        whole = frames_of(framer_type(), [data])
        assert b"".join(whole) == data
        assert frames_of(framer_type(), chunks) == whole
