"""Normalisation: ignored fields, canonical ids, coalesced runs and presence-only fields."""

from __future__ import annotations

import dataclasses
from copy import deepcopy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.compare import compare
from adapters.events import Event, error_event
from adapters.normalise import PRESENT, Normaliser

Json = dict[str, Any]


def payloads(normaliser: Normaliser, *data: Json) -> list[Json]:
    return [dict(e.data) for e in normaliser.normalise([Event("e", d) for d in data])]


# --- paths ----------------------------------------------------------------------------


def test_a_star_matches_exactly_one_level() -> None:
    [out] = payloads(
        Normaliser(ignore=["*.duration_ms"]),
        {"duration_ms": 1, "x": {"duration_ms": 2, "k": 1}, "a": {"b": {"duration_ms": 3}}},
    )
    assert out == {"duration_ms": 1, "x": {"k": 1}, "a": {"b": {"duration_ms": 3}}}


def test_a_bare_name_matches_only_the_top_level_field() -> None:
    [out] = payloads(Normaliser(ignore=["timestamp"]), {"timestamp": 1, "x": {"timestamp": 2}})
    assert out == {"x": {"timestamp": 2}}


def test_list_items_are_levels_named_by_their_index() -> None:
    [out] = payloads(
        Normaliser(ignore=["hits.*.score"], presence_only=["hits.0.url"]),
        {"hits": [{"url": "a", "score": 0.9}, {"url": "b", "score": 0.8}]},
    )
    assert out == {"hits": [{"url": PRESENT}, {"url": "b"}]}


def test_ignoring_list_items_removes_them() -> None:
    [out] = payloads(Normaliser(ignore=["xs.1"]), {"xs": [0, 1, 2]})
    assert out == {"xs": [0, 2]}


def test_a_star_alone_matches_every_top_level_field() -> None:
    [out] = payloads(Normaliser(presence_only=["*"]), {"a": 1, "b": {"c": 2}})
    assert out == {"a": PRESENT, "b": PRESENT}


def test_when_rules_overlap_ignore_wins_then_presence_then_canonical_ids() -> None:
    normaliser = Normaliser(
        ignore=["*.x"], presence_only=["a.*", "b.y"], canonical_ids=["a.x", "b.*", "c"]
    )
    [out] = payloads(normaliser, {"a": {"x": 1, "y": 2}, "b": {"y": 3, "z": 4}, "c": 5})
    assert out == {"a": {"y": PRESENT}, "b": {"y": PRESENT, "z": "b.*#1"}, "c": "c#1"}


@pytest.mark.parametrize("path", ["", "a..b", ".a", "a."])
def test_a_malformed_path_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="dotted field path"):
        Normaliser(ignore=[path])


def test_a_single_string_instead_of_a_list_is_refused() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        Normaliser(ignore="timestamp")


# --- the rules ------------------------------------------------------------------------


def test_canonical_ids_are_named_by_order_of_first_appearance_per_pattern() -> None:
    normaliser = Normaliser(canonical_ids=["run_id", "tool_call_id"])
    out = payloads(
        normaliser,
        {"run_id": "r-9", "tool_call_id": "t-5"},
        {"run_id": "r-9", "tool_call_id": "t-3"},
        {"run_id": "r-1", "tool_call_id": "t-5"},
    )
    assert out == [
        {"run_id": "run_id#1", "tool_call_id": "tool_call_id#1"},
        {"run_id": "run_id#1", "tool_call_id": "tool_call_id#2"},
        {"run_id": "run_id#2", "tool_call_id": "tool_call_id#1"},
    ]


def test_canonical_ids_under_a_star_do_not_depend_on_key_order() -> None:
    normaliser = Normaliser(canonical_ids=["*.id"])
    one = payloads(normaliser, {"a": {"id": "x"}, "b": {"id": "y"}})
    other = payloads(normaliser, {"b": {"id": "y"}, "a": {"id": "x"}})
    assert one[0]["a"] == other[0]["a"] == {"id": "*.id#1"}


def test_canonical_ids_of_different_json_types_stay_different() -> None:
    out = payloads(Normaliser(canonical_ids=["id"]), {"id": 1}, {"id": "1"}, {"id": True})
    assert [o["id"] for o in out] == ["id#1", "id#2", "id#3"]


def test_a_run_of_a_coalesced_type_becomes_its_first_event() -> None:
    normaliser = Normaliser(coalesce=["thinking"])
    events = [
        Event("start", {}),
        Event("thinking", {"n": 1}),
        Event("thinking", {"n": 2}),
        Event("tool", {}),
        Event("thinking", {"n": 3}),
        Event("other", {}),
        Event("other", {}),
    ]
    out = normaliser.normalise(events)
    assert [(e.type, dict(e.data)) for e in out] == [
        ("start", {}),
        ("thinking", {"n": 1}),
        ("tool", {}),
        ("thinking", {"n": 3}),
        ("other", {}),
        ("other", {}),
    ]


def test_presence_only_keeps_whether_a_field_is_there_not_its_value() -> None:
    out = payloads(Normaliser(presence_only=["text"]), {"text": "a"}, {"text": None}, {})
    assert out == [{"text": PRESENT}, {"text": PRESENT}, {}]


def test_error_events_are_left_alone() -> None:
    error = error_event("malformed JSON", b"{")
    normaliser = Normaliser(ignore=["excerpt"], coalesce=["_error"])
    assert normaliser.normalise([error, error]) == (error, error)


def test_normalising_never_changes_the_events_it_is_given() -> None:
    data = {"run_id": "r", "x": {"ms": 1, "keep": [1]}, "timestamp": "t"}
    snapshot = deepcopy(data)
    normaliser = Normaliser(ignore=["timestamp", "*.ms"], canonical_ids=["run_id"])
    [out] = normaliser.normalise([Event("e", data)])
    assert data == snapshot
    assert out.data == {"run_id": "run_id#1", "x": {"keep": [1]}}


def test_an_event_with_nothing_to_normalise_is_passed_through_as_is() -> None:
    event = Event("e", {"a": {"b": 1}})
    [out] = Normaliser(ignore=["timestamp", "*.ms"]).normalise([event])
    assert out is event


def test_a_normaliser_is_a_frozen_value() -> None:
    one = Normaliser(ignore=["a"], coalesce=("t",))
    assert one == Normaliser(ignore=("a",), coalesce=["t"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.ignore = ()  # type: ignore[misc]


# --- what normalisation removes never makes a mismatch --------------------------------

NOISY = Normaliser(
    ignore=["ts", "*.ms"], canonical_ids=["id", "*.ref"], coalesce=["chunk"], presence_only=["text"]
)
IDS = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def noisy_events(draw: st.DrawFn, kind: str) -> Event:
    data: Json = {
        "type": kind,
        "id": draw(IDS),
        "ts": draw(st.integers()),
        "text": draw(st.text(max_size=5)),
        "body": {"ms": draw(st.floats(0, 1e3)), "ref": draw(IDS), "value": draw(st.integers(0, 9))},
    }
    return Event(kind, data)


RUNS = st.lists(st.tuples(st.sampled_from(["start", "chunk", "tool", "end"]), st.integers(1, 3)))


@settings(max_examples=150, deadline=None)
@given(runs=RUNS, data=st.data())
def test_what_normalisation_removes_never_makes_a_mismatch(
    runs: list[tuple[str, int]], data: st.DataObject
) -> None:
    reference: list[Event] = []
    subject: list[Event] = []
    rename = {"a": "z-1", "b": "z-2", "c": "z-3", "d": "z-4"}  # any one-to-one renaming
    for kind, count in runs:
        length = count if kind != "chunk" else 1
        for _ in range(length):
            event = data.draw(noisy_events(kind))
            reference.append(event)
            noise = data.draw(noisy_events(kind))
            body = {**event.data["body"], "ref": rename[event.data["body"]["ref"]]}
            body["ms"] = noise.data["body"]["ms"]
            twin = {
                **event.data,
                "id": rename[event.data["id"]],
                "ts": noise.data["ts"],
                "text": noise.data["text"],
                "body": body,
            }
            subject.append(Event(kind, twin))
        if kind == "chunk":  # more chunks on one side, whatever they hold
            reference += [data.draw(noisy_events(kind)) for _ in range(count - 1)]
            subject += [data.draw(noisy_events(kind)) for _ in range(data.draw(st.integers(0, 2)))]
    comparison = compare(NOISY.normalise(reference), NOISY.normalise(subject))
    assert comparison.divergences == ()


def test_an_id_that_is_not_a_string_still_gets_a_canonical_name() -> None:
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    out = payloads(Normaliser(canonical_ids=["id"]), {"id": {"a": 1}}, {"id": deep}, {"id": None})
    assert [o["id"] for o in out] == ["id#1", "id#2", "id#3"]
