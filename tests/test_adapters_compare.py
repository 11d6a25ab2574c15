"""Comparing two normalised event sequences: alignment and the kind of each divergence."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Sequence
from copy import deepcopy as copy_of
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adapters.compare import Comparison, DivergenceKind, compare, payload_differences
from adapters.events import Event, error_event
from adapters.ndjson import NdjsonDecoder
from adapters.normalise import Normaliser
from adapters.sse import SseDecoder

Json = dict[str, Any]
K = DivergenceKind

# The demo dispatcher's route: its top-level seq and duration_ms are noise too.
ROUTE = Normaliser(
    ignore=["timestamp", "seq", "duration_ms", "*.duration_ms"],
    canonical_ids=["run_id", "tool_call_id"],
    coalesce=["agent_thinking"],
    presence_only=["text", "*.text"],
)
TOOLS = {
    "weather": ({"city": "東京", "unit": "celsius"}, {"temperature": 12.5, "sky": "fog"}),
    "calculator": ({"expression": "6 * 7"}, {"value": 42}),
    "search": ({"query": "naïve — 東京 ✓", "limit": 2}, {"hits": [{"url": "u1"}, {"url": "u2"}]}),
}


@dataclass(frozen=True)
class Plan:
    """A turn's structure; rendering it adds what differs from run to run."""

    steps: tuple[str, ...]  # "think" or a tool name

    def render(self, seed: int, user: str = "alice") -> list[Event]:
        rng = random.Random(seed)
        run = str(uuid.UUID(int=rng.getrandbits(128)))
        out: list[Json] = []

        def emit(kind: str, **fields: Any) -> None:
            stamp = f"2026-11-24T23:{rng.randint(0, 59):02}:00.000Z"
            out.append(
                {"type": kind, "user_id": user, "run_id": run, "seq": len(out), "timestamp": stamp}
                | fields
            )

        emit("agent_started")
        for step in self.steps:
            if step == "think":
                for _ in range(rng.randint(1, 3)):
                    emit("agent_thinking", text=rng.choice(["Let me see.", "naïve — 東京 ✓"]))
                continue
            call = str(uuid.UUID(int=rng.getrandbits(128)))
            arguments, result = TOOLS[step]
            emit("tool_executing", tool_call_id=call, tool=step, arguments=arguments)
            emit(
                "tool_completed",
                tool_call_id=call,
                tool=step,
                result=result,
                duration_ms=round(rng.uniform(1, 300), 3),
            )
        tools = sum(step != "think" for step in self.steps)
        emit("agent_completed", answer=f"Done with {tools} tools.", tool_calls=tools)
        return [Event(e["type"], e) for e in out]


@st.composite
def plans(draw: st.DrawFn, min_tools: int = 0) -> Plan:
    steps = ["think"]
    for _ in range(draw(st.integers(min_tools, 3))):
        if draw(st.booleans()):
            steps.append("think")
        steps.append(draw(st.sampled_from(sorted(TOOLS))))
    return Plan(tuple(steps))


SEEDS = st.integers(0, 2**32)
SOME_TOOLS = Plan(("think", "weather", "think", "calculator"))


def judge(reference: Sequence[Event], subject: Sequence[Event], **options: Any) -> Comparison:
    return compare(ROUTE.normalise(reference), ROUTE.normalise(subject), **options)


def kinds(comparison: Comparison) -> list[DivergenceKind]:
    return [divergence.kind for divergence in comparison.divergences]


# --- what matches -------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)
EVENTS = st.lists(
    st.builds(
        Event,
        st.sampled_from(["a", "b", "c", "agent_thinking"]),
        st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=5),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS)
def test_a_sequence_compared_with_itself_matches(events: list[Event]) -> None:
    normalised = ROUTE.normalise(events)
    copy = ROUTE.normalise([Event(e.type, copy_of(e.data)) for e in events])
    assert compare(normalised, normalised) == Comparison()
    assert compare(normalised, copy).matched


@settings(max_examples=100, deadline=None)
@given(plan=plans(), seed_a=SEEDS, seed_b=SEEDS)
def test_two_runs_of_one_turn_match_once_their_noise_is_normalised_away(
    plan: Plan, seed_a: int, seed_b: int
) -> None:
    # Ids, timestamps, durations, thinking text and thinking chunk counts all differ.
    assert judge(plan.render(seed_a), plan.render(seed_b)).divergences == ()


def test_equal_sequences_match_with_no_divergences() -> None:
    turn = SOME_TOOLS.render(1)
    comparison = judge(turn, turn, reference_status=200, subject_status=200)
    assert comparison.matched and comparison.divergences == () and comparison.kinds == set()


def test_payloads_compare_as_json_values() -> None:
    assert payload_differences({"a": 1, "b": 2}, {"b": 2, "a": 1.0}) == []
    assert [p for p, _, _ in payload_differences({"ok": True}, {"ok": 1})] == ["ok"]
    assert [p for p, _, _ in payload_differences({"n": 0}, {"n": False})] == ["n"]
    big = {"n": 2**70}  # beyond what orjson encodes: the slow path decides
    assert compare([Event("a", big)], [Event("a", dict(big))]).matched


# --- each defect is reported as its kind --------------------------------------------


@settings(max_examples=100, deadline=None)
@given(plan=plans(), seed=SEEDS, data=st.data())
def test_a_dropped_event_is_missing(plan: Plan, seed: int, data: st.DataObject) -> None:
    turn = plan.render(seed)
    index = data.draw(
        st.sampled_from([i for i, e in enumerate(turn) if e.type != "agent_thinking"])
    )
    comparison = judge(turn, turn[:index] + turn[index + 1 :])
    assert set(kinds(comparison)) == {K.MISSING}
    assert turn[index].type in {d.event_type for d in comparison.divergences}


@settings(max_examples=100, deadline=None)
@given(plan=plans(), seed=SEEDS, data=st.data())
def test_an_inserted_event_is_extra(plan: Plan, seed: int, data: st.DataObject) -> None:
    turn = plan.render(seed)
    index = data.draw(st.integers(0, len(turn)))
    stray = Event("agent_unexpected", {"type": "agent_unexpected"})
    comparison = judge(turn, [*turn[:index], stray, *turn[index:]])
    assert set(kinds(comparison)) == {K.EXTRA}
    assert "agent_unexpected" in {d.event_type for d in comparison.divergences}


@settings(max_examples=100, deadline=None)
@given(plan=plans(min_tools=1), seed=SEEDS, data=st.data())
def test_two_events_of_different_types_swapped_are_out_of_order(
    plan: Plan, seed: int, data: st.DataObject
) -> None:
    turn = plan.render(seed)
    swappable = [
        i
        for i in range(len(turn) - 1)
        if turn[i].type != turn[i + 1].type
        and "agent_thinking" not in (turn[i].type, turn[i + 1].type)
    ]
    index = data.draw(st.sampled_from(swappable))
    swapped = [*turn[:index], turn[index + 1], turn[index], *turn[index + 2 :]]
    comparison = judge(turn, swapped)
    assert kinds(comparison) == [K.ORDER]


@settings(max_examples=100, deadline=None)
@given(plan=plans(), seed=SEEDS, data=st.data())
def test_a_changed_field_is_a_payload_divergence_naming_its_path(
    plan: Plan, seed: int, data: st.DataObject
) -> None:
    turn = plan.render(seed)
    index = data.draw(st.integers(0, len(turn) - 1))
    changed = dict(turn[index].data)
    if "result" in changed and data.draw(st.booleans()):
        path = "result.sky"
        changed["result"] = {**changed["result"], "sky": "changed"}
    else:
        path = data.draw(st.sampled_from(["user_id", "verdict"]))
        changed[path] = "changed"
    comparison = judge(turn, [*turn[:index], Event(turn[index].type, changed), *turn[index + 1 :]])
    assume(comparison.divergences)  # a thinking chunk after the first is coalesced away
    [divergence] = comparison.divergences
    assert (divergence.kind, divergence.paths) == (K.PAYLOAD, (path,))
    assert divergence.event_type == turn[index].type


@settings(max_examples=50, deadline=None)
@given(plan=plans(), seed=SEEDS, data=st.data())
def test_other_defects_are_reported_as_their_kind(
    plan: Plan, seed: int, data: st.DataObject
) -> None:
    turn = plan.render(seed)
    cut = data.draw(st.integers(0, len(turn) - 1))
    assert kinds(judge(turn, turn, reference_status=200, subject_status=500)) == [K.STATUS]
    assert kinds(judge(turn, [*turn, error_event("malformed JSON")])) == [K.ERROR]
    assert kinds(judge(turn, turn[:cut], subject_timed_out=True)) == [K.TIMEOUT]


# --- alignment and details ----------------------------------------------------------


def test_one_lost_event_is_one_divergence_not_a_cascade() -> None:
    turn = SOME_TOOLS.render(1)
    reference = ROUTE.normalise(turn)
    [divergence] = compare(reference, [*reference[:3], *reference[4:]]).divergences
    assert divergence.kind is K.MISSING
    assert (divergence.index_reference, divergence.index_subject) == (3, None)
    assert divergence.event_type == reference[3].type
    assert str(divergence.kind) == "missing"


def test_an_event_that_moved_is_one_order_divergence_with_both_positions() -> None:
    a, b, c, d = (Event(t, {"type": t}) for t in "abcd")
    [divergence] = compare([a, b, c, d], [a, c, d, b]).divergences
    assert (divergence.kind, divergence.event_type) == (K.ORDER, "b")
    assert (divergence.index_reference, divergence.index_subject) == (1, 3)


def test_a_moved_event_whose_payload_also_changed_is_missing_and_extra() -> None:
    a, b, c = (Event(t, {"type": t}) for t in "abc")
    changed = Event("b", {"type": "b", "n": 1})
    assert kinds(compare([a, b, c], [a, c, changed])) == [K.MISSING, K.EXTRA]


def test_a_payload_divergence_lists_fields_present_on_one_side_only() -> None:
    reference = [Event("a", {"x": 1, "nested": {"k": [1, 2, 3]}, "gone": True})]
    subject = [Event("a", {"x": 2, "nested": {"k": [1, 5]}, "new": None})]
    [divergence] = compare(reference, subject).divergences
    assert divergence.paths == ("gone", "nested.k.1", "nested.k.2", "new", "x")
    assert "x: 1 vs 2" in divergence.detail
    assert "gone: true vs absent" in divergence.detail


def test_a_subject_that_timed_out_is_not_also_missing_its_tail() -> None:
    turn = ROUTE.normalise(SOME_TOOLS.render(1))
    [divergence] = compare(turn, turn[:2], subject_timed_out=True).divergences
    assert divergence.kind is K.TIMEOUT
    assert (divergence.index_reference, divergence.index_subject) == (2, 2)
    assert f"{len(turn) - 2} reference events after it were not compared" in divergence.detail


def test_a_timed_out_subject_still_reports_what_differs_before_its_end() -> None:
    turn = ROUTE.normalise(SOME_TOOLS.render(1))
    truncated = [turn[0], *turn[2:4]]
    assert kinds(compare(turn, truncated, subject_timed_out=True)) == [K.MISSING, K.TIMEOUT]


def test_a_reference_that_timed_out_is_not_reported_as_extra_in_the_subject() -> None:
    turn = ROUTE.normalise(SOME_TOOLS.render(1))
    comparison = compare(turn[:3], turn, reference_timed_out=True)
    assert kinds(comparison) == [K.TIMEOUT]
    assert comparison.divergences[0].index_reference == 3


def test_an_error_event_is_an_error_and_not_also_extra() -> None:
    a, b = Event("a", {}), Event("b", {})
    comparison = compare([a, b], [a, error_event("malformed JSON: x", b"{"), b])
    [divergence] = comparison.divergences
    assert (divergence.kind, divergence.index_subject, divergence.index_reference) == (
        K.ERROR,
        1,
        None,
    )
    assert "malformed JSON" in divergence.detail


def test_a_backend_error_event_counts_as_an_error_when_its_type_says_so() -> None:
    a, c = Event("a", {}), Event("c", {})
    failure = Event("error", {"type": "error", "error": "injected failure"})
    comparison = compare([a, c], [a, failure], error_types={"error"})
    assert kinds(comparison) == [K.MISSING, K.ERROR]
    assert "injected failure" in comparison.divergences[1].detail
    assert kinds(compare([a, c], [a, failure])) == [K.MISSING, K.EXTRA]


def test_divergences_are_listed_in_the_order_of_the_sequences() -> None:
    e = {t: Event(t, {"type": t}) for t in "abcdef"}
    reference = [e["a"], e["b"], e["c"], e["d"], e["e"]]
    subject = [e["a"], error_event("bad"), e["c"], Event("d", {"n": 1}), e["e"], e["f"]]
    comparison = compare(reference, subject, reference_status=200, subject_status=201)
    assert kinds(comparison) == [K.STATUS, K.MISSING, K.ERROR, K.PAYLOAD, K.EXTRA]


def test_long_sequences_are_aligned_too() -> None:
    reference = [Event(t, {"i": i}) for i, t in enumerate("abcde" * 100)]
    subject = reference[:100] + reference[101:400] + [Event("z", {})] + reference[400:]
    assert sorted(kinds(compare(reference, subject))) == [K.EXTRA, K.MISSING]


# --- through the decoders -----------------------------------------------------------


def encode(events: Sequence[Event], protocol: str) -> bytes:
    if protocol == "ndjson":
        return b"".join(orjson.dumps(e.data) + b"\n" for e in events)
    return b"".join(
        b"event: " + e.type.encode() + b"\r\ndata: " + orjson.dumps(e.data) + b"\r\n\r\n"
        for e in events
    )


def decode(stream: bytes, protocol: str, cuts: list[int]) -> list[Event]:
    decoder = NdjsonDecoder() if protocol == "ndjson" else SseDecoder()
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    events: list[Event] = []
    for start, end in itertools.pairwise(bounds):
        events += decoder.feed(stream[start:end])
    return events + decoder.close()


@settings(max_examples=100, deadline=None)
@given(
    plan=plans(),
    seeds=st.tuples(SEEDS, SEEDS),
    protocol=st.sampled_from(["ndjson", "sse"]),
    defect=st.sampled_from(["none", "drop", "swap", "garble"]),
    cuts=st.tuples(
        st.lists(st.integers(0, 10_000), max_size=10), st.lists(st.integers(0, 10_000), max_size=10)
    ),
)
def test_the_comparison_of_decoded_streams_does_not_depend_on_chunking(
    plan: Plan,
    seeds: tuple[int, int],
    protocol: str,
    defect: str,
    cuts: tuple[list[int], list[int]],
) -> None:
    reference, subject = plan.render(seeds[0]), plan.render(seeds[1])
    if defect == "drop":
        subject = subject[1:]
    elif defect == "swap":
        subject = subject[:-2] + subject[-1:] + subject[-2:-1]
    streams = encode(reference, protocol), encode(subject, protocol)
    if defect == "garble":
        streams = streams[0], streams[1].replace(b'"tool_calls"', b'"tool_calls', 1)
    whole = judge(decode(streams[0], protocol, []), decode(streams[1], protocol, []))
    chunked = judge(decode(streams[0], protocol, cuts[0]), decode(streams[1], protocol, cuts[1]))
    assert chunked == whole
    assert whole.matched == (defect == "none")


@pytest.mark.parametrize("protocol", ["ndjson", "sse"])
def test_a_turn_survives_the_round_trip_through_a_decoder(protocol: str) -> None:
    turn = SOME_TOOLS.render(7)
    assert decode(encode(turn, protocol), protocol, []) == turn


def test_payloads_nested_deeper_than_python_recurses_still_compare() -> None:
    def nested(leaf: bytes) -> list[Event]:
        document = b'{"type": "a", "x": ' + b"[" * 1000 + leaf + b"]" * 1000 + b"}\n"
        return NdjsonDecoder().feed(document)

    assert compare(nested(b""), nested(b"")).matched
    [divergence] = compare(nested(b""), nested(b"1")).divergences
    assert divergence.kind is K.PAYLOAD
    assert divergence.paths == ("x" + ".0" * 999 + ".0",)
