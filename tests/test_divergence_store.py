"""The divergence store: real SQLite files in a temporary directory, and its admin
endpoint served by a real aiohttp test server."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from adapters.compare import Divergence, DivergenceKind, compare
from adapters.events import Event, error_event
from proxy.divergence_store import (
    REDACTED,
    DivergenceRecord,
    DivergenceStore,
    DivergenceStoreError,
    Redaction,
    add_divergence_routes,
)

NOON: float = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def event(kind: str, **data: Any) -> Event:
    return Event(kind, {"type": kind, **data})


def record(
    route: str = "chat",
    *,
    time: float = NOON,
    reference: Sequence[Event] | None = None,
    subject: Sequence[Event] | None = None,
    turn: int | None = None,
) -> DivergenceRecord:
    """A record of a real comparison: by default the candidate drops one event."""
    if reference is None:
        reference = (event("agent_started"), event("agent_thinking"), event("agent_completed"))
    if subject is None:
        subject = (event("agent_started"), event("agent_completed"))
    divergences = compare(reference, subject, reference_status=200, subject_status=200)
    return DivergenceRecord(
        time=time,
        route=route,
        protocol="ndjson",
        primary="legacy",
        shadow="candidate",
        reference=reference,
        subject=subject,
        divergences=divergences.divergences,
        reference_status=200,
        subject_status=200,
        turn=turn,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[DivergenceStore]:
    store = DivergenceStore(tmp_path / "divergences.db")
    await store.start()
    yield store
    await store.close()


async def stored(store: DivergenceStore, *records: DivergenceRecord) -> None:
    for one in records:
        store.add(one)
    await store.flush()


# Round trip


async def test_records_come_back_newest_first_with_both_sequences_and_their_divergences(
    store: DivergenceStore,
) -> None:
    await stored(store, record(time=NOON, turn=1), record(time=NOON + 1, turn=2))

    newest, oldest = await store.recent()

    assert (newest["turn"], oldest["turn"]) == (2, 1)
    assert newest["id"] > oldest["id"]
    assert newest["time"] == "2023-11-14T22:13:21.000Z"
    assert newest["unix_time"] == NOON + 1
    assert newest["route"] == "chat"
    assert newest["protocol"] == "ndjson"
    assert (newest["primary"], newest["shadow"]) == ("legacy", "candidate")
    assert (newest["reference_status"], newest["subject_status"]) == (200, 200)
    assert newest["kinds"] == ["missing"]
    assert newest["divergences"] == [
        {
            "kind": "missing",
            "index_reference": 1,
            "index_subject": None,
            "event_type": "agent_thinking",
            "paths": [],
            "path_count": 0,
            "detail": "agent_thinking at reference position 1 has no counterpart in the subject",
        }
    ]
    assert newest["reference"] == [
        {"type": "agent_started", "data": {"type": "agent_started"}, "error": None},
        {"type": "agent_thinking", "data": {"type": "agent_thinking"}, "error": None},
        {"type": "agent_completed", "data": {"type": "agent_completed"}, "error": None},
    ]
    assert [e["type"] for e in newest["subject"]] == ["agent_started", "agent_completed"]
    assert not newest["reference_truncated"] and not newest["subject_truncated"]
    assert store.written == 2 and store.dropped == 0


async def test_recent_filters_by_route_and_honours_its_limit(store: DivergenceStore) -> None:
    await stored(store, *(record(route, turn=n) for n, route in enumerate("ababa")))

    assert [e["turn"] for e in await store.recent("a")] == [4, 2, 0]
    assert [e["turn"] for e in await store.recent("b")] == [3, 1]
    assert [e["turn"] for e in await store.recent(limit=2)] == [4, 3]
    assert await store.recent("nobody") == []


async def test_the_file_is_in_wal_mode_with_an_index_on_route_and_id(tmp_path: Path) -> None:
    store = DivergenceStore(tmp_path / "d.db")
    await store.start()
    await store.close()

    with sqlite3.connect(tmp_path / "d.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = db.execute("PRAGMA index_info(divergences_route_id)").fetchall()
        assert [name for _, _, name in columns] == ["route", "id"]
    db.close()


async def test_payloads_that_are_not_json_keep_their_place_without_failing_the_record(
    store: DivergenceStore,
) -> None:
    odd = (event("agent_started"), event("agent_completed", tokens=2**70))
    await stored(store, record(reference=odd, subject=odd[:1]))

    (entry,) = await store.recent()

    assert entry["reference"][1]["type"] == "agent_completed"
    assert "not JSON" in entry["reference"][1]["data"]["<not stored>"]
    assert store.written == 1 and store.failed == 0


# The endpoint


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, store: DivergenceStore) -> Any:
    app = web.Application()
    add_divergence_routes(app, store)
    return await aiohttp_client(app)


async def test_the_endpoint_serves_the_newest_divergences_of_a_route(
    api: Any, store: DivergenceStore
) -> None:
    await stored(store, record("chat", turn=1), record("search", turn=2), record("chat", turn=3))

    response = await api.get("/api/divergences", params={"route": "chat"})

    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert [e["turn"] for e in body["divergences"]] == [3, 1]
    assert body["divergences"][0] == (await store.recent("chat"))[0]


async def test_the_endpoint_answers_an_unknown_route_with_an_empty_list(api: Any) -> None:
    response = await api.get("/api/divergences", params={"route": "nobody"})

    assert response.status == 200
    assert await response.json() == {"divergences": []}


async def test_the_endpoint_shows_fifty_by_default_and_up_to_a_thousand(
    api: Any, store: DivergenceStore
) -> None:
    await stored(store, *(record(turn=n) for n in range(60)))

    default = await (await api.get("/api/divergences")).json()
    most = await (await api.get("/api/divergences", params={"limit": "1000"})).json()
    one = await (await api.get("/api/divergences", params={"limit": "1"})).json()

    assert len(default["divergences"]) == 50
    assert len(most["divergences"]) == 60
    assert [e["turn"] for e in one["divergences"]] == [59]


@pytest.mark.parametrize("limit", ["0", "1001", "abc", "-1", "", " 5", "1_0", "2.5", "٣"])
async def test_a_limit_outside_one_to_a_thousand_is_a_bad_request(api: Any, limit: str) -> None:
    response = await api.get("/api/divergences", params={"limit": limit})

    assert response.status == 400
    assert "limit" in (await response.json())["error"]


# Retention and caps


async def test_retention_keeps_only_the_newest_max_rows(tmp_path: Path) -> None:
    store = DivergenceStore(tmp_path / "d.db", max_rows=5)
    await store.start()
    try:
        await stored(store, *(record(turn=n) for n in range(3)))
        await stored(store, *(record(turn=n) for n in range(3, 9)))

        assert [e["turn"] for e in await store.recent(limit=100)] == [8, 7, 6, 5, 4]
    finally:
        await store.close()


async def test_a_long_sequence_is_stored_as_a_marked_prefix_of_at_most_max_events(
    store: DivergenceStore,
) -> None:
    long = [event("agent_thinking", n=n) for n in range(2000)]
    await stored(store, record(reference=long, subject=long[:1]))

    (entry,) = await store.recent()

    assert [e["data"]["n"] for e in entry["reference"]] == list(range(500))
    assert entry["reference_count"] == 2000 and entry["reference_truncated"]
    assert entry["subject_count"] == 1 and not entry["subject_truncated"]
    assert entry["divergence_count"] == 1999
    assert len(entry["divergences"]) == 1000 and entry["divergences_truncated"]


async def test_a_bulky_sequence_is_cut_to_the_byte_cap_keeping_whole_events(
    store: DivergenceStore,
) -> None:
    bulky = [event("chunk", n=n, text="x" * 100_000) for n in range(10)]
    await stored(store, record(reference=bulky, subject=bulky[:2]))

    (entry,) = await store.recent()

    assert [e["data"]["n"] for e in entry["reference"]] == [0, 1]
    assert len(orjson.dumps(entry["reference"])) <= 256 * 1024
    assert entry["reference_truncated"] and entry["reference_count"] == 10


async def test_an_event_larger_than_the_byte_cap_is_left_out_not_cut(tmp_path: Path) -> None:
    store = DivergenceStore(tmp_path / "d.db", max_side_bytes=1000)
    await store.start()
    try:
        huge = (event("agent_started", text="x" * 5000), event("agent_completed"))
        await stored(store, record(reference=huge, subject=huge[1:]))

        (entry,) = await store.recent()

        assert entry["reference"] == [] and entry["reference_truncated"]
        assert [e["type"] for e in entry["subject"]] == ["agent_completed"]
    finally:
        await store.close()


# Redaction


def test_redaction_replaces_top_level_nested_wildcard_and_list_index_fields() -> None:
    redaction = Redaction.of(["user_id", "profile.email", "*.token", "arguments.*", "hits.0"])
    data = {
        "user_id": "u-1",
        "profile": {"email": "a@example.com", "name": "Ann"},
        "tool": {"token": "secret", "name": "search"},
        "token": "top-level stays: * is exactly one level",
        "arguments": {"query": "flights", "when": {"day": 3}},
        "hits": ["first", "second"],
        "deep": {"inner": {"token": "two levels down stays"}},
    }

    assert redaction.data(data) == {
        "user_id": REDACTED,
        "profile": {"email": REDACTED, "name": "Ann"},
        "tool": {"token": REDACTED, "name": "search"},
        "token": "top-level stays: * is exactly one level",
        "arguments": {"query": REDACTED, "when": REDACTED},
        "hits": [REDACTED, "second"],
        "deep": {"inner": {"token": "two levels down stays"}},
    }


def test_redaction_leaves_the_original_payload_untouched_and_shares_what_did_not_change() -> None:
    data = {"user": {"email": "a@example.com"}, "other": {"big": [1, 2, 3]}}

    redacted = Redaction.of(["user.email"]).data(data)

    assert data == {"user": {"email": "a@example.com"}, "other": {"big": [1, 2, 3]}}
    assert redacted["other"] is data["other"]
    assert Redaction.of(["absent.path"]).data(data) is data


def test_a_redact_list_given_as_one_string_or_an_empty_segment_is_refused() -> None:
    with pytest.raises(TypeError):
        Redaction.of("user_id")
    with pytest.raises(ValueError):
        Redaction.of(["user..email"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc*"), inner, max_size=3)
    ),
    max_leaves=12,
)


def replaced_only(original: Any, redacted: Any) -> bool:
    """Whether ``redacted`` is ``original`` with some values replaced by ``REDACTED``
    and every other key, list item and value where it was."""
    if redacted is original or redacted == REDACTED:
        return True
    if isinstance(original, dict):
        return (
            isinstance(redacted, dict)
            and list(redacted) == list(original)
            and all(replaced_only(original[key], redacted[key]) for key in original)
        )
    if isinstance(original, list):
        return (
            isinstance(redacted, list)
            and len(redacted) == len(original)
            and all(map(replaced_only, original, redacted))
        )
    return bool(redacted == original)


@given(
    data=st.dictionaries(st.sampled_from("abc"), json_values, max_size=3),
    patterns=st.lists(
        st.lists(st.sampled_from(["a", "b", "*", "0", "1"]), min_size=1, max_size=3).map(".".join),
        max_size=3,
    ),
)
def test_redaction_only_replaces_values_so_sequences_still_line_up(
    data: dict[str, Any], patterns: list[str]
) -> None:
    assert replaced_only(data, Redaction.of(patterns).data(data))


async def test_stored_sequences_are_redacted_and_so_are_details_that_quote_redacted_values(
    tmp_path: Path,
) -> None:
    store = DivergenceStore(tmp_path / "d.db", redact=["user_id", "*.email", "arguments.*"])
    await store.start()
    try:
        reference = (
            event("agent_started", user_id="u-1", who={"email": "a@example.com"}),
            event("tool_executing", arguments={"city": "Oslo"}, step=1),
            event("agent_completed"),
        )
        subject = (
            event("agent_started", user_id="u-2", who={"email": "b@example.com"}),
            event("tool_executing", arguments={"city": "Bergen"}, step=2),
            error_event("malformed JSON: unexpected character", b'{"user_id": "u-2", oops'),
        )
        await stored(store, record(reference=reference, subject=subject))

        (entry,) = await store.recent()
    finally:
        await store.close()

    assert entry["reference"][0]["data"] == {
        "type": "agent_started",
        "user_id": REDACTED,
        "who": {"email": REDACTED},
    }
    assert entry["subject"][1]["data"]["arguments"] == {"city": REDACTED}
    assert entry["subject"][2]["data"]["excerpt"] == REDACTED
    assert entry["subject"][2]["error"] == "malformed JSON: unexpected character"
    text = orjson.dumps(entry).decode()
    for secret in ("u-1", "u-2", "a@example.com", "b@example.com", "Oslo", "Bergen"):
        assert secret not in text
    by_type = {(d["kind"], d["event_type"]): d for d in entry["divergences"]}
    assert by_type["payload", "agent_started"]["detail"] == REDACTED
    assert by_type["payload", "agent_started"]["paths"] == ["user_id", "who.email"]
    assert by_type["payload", "tool_executing"]["detail"] == REDACTED
    assert by_type["error", "_error"]["detail"].startswith("subject event 2 is an error")


@pytest.mark.parametrize(
    ("reference", "subject", "hidden"),
    [
        ({"step": 1}, {"step": 2}, False),
        ({"user": {"name": "Ann"}}, {"user": {"name": "Bob"}}, False),
        ({"user": {"email": "a@x"}}, {"user": {"email": "b@x"}}, True),
        (
            {"arguments": {"city": {"name": "Oslo"}}},
            {"arguments": {"city": {"name": "Rome"}}},
            True,
        ),
        ({"user": {"email": "a@x"}}, {}, True),
        ({"user": "Ann"}, {"user": "Bob"}, False),
    ],
    ids=["unrelated", "sibling", "at", "below", "above an object", "above a scalar"],
)
def test_a_payload_detail_is_hidden_exactly_when_it_may_quote_a_redacted_value(
    reference: dict[str, Any], subject: dict[str, Any], hidden: bool
) -> None:
    redaction = Redaction.of(["user.email", "arguments.*"])
    sides = (Event("t", reference),), (Event("t", subject),)
    (divergence,) = compare(*sides).divergences

    shown = redaction.divergence(divergence, *sides).detail

    assert (shown == REDACTED) is hidden
    assert (shown == divergence.detail) is not hidden


def test_an_error_detail_is_hidden_when_it_quotes_a_redacted_error_field() -> None:
    failing = (event("error", error={"message": "card 4111 declined"}),)
    (divergence,) = compare((), failing, error_types=("error",)).divergences
    assert "4111" in divergence.detail

    hidden = Redaction.of(["error.message"]).divergence(divergence, (), failing)
    kept = Redaction.of(["user_id"]).divergence(divergence, (), failing)

    assert hidden.detail == REDACTED
    assert kept.detail == divergence.detail


def test_without_the_sequences_every_detail_that_could_quote_a_value_is_hidden() -> None:
    divergence = Divergence(DivergenceKind.PAYLOAD, 0, 0, "t", ("step",), "t differs: 1 vs 2")

    assert Redaction.of(["user_id"]).divergence(divergence).detail == REDACTED
    assert Redaction.of([]).divergence(divergence).detail == divergence.detail


# The writer: bounded, never blocking, everything written on flush and close


async def test_a_full_queue_drops_and_counts_records_instead_of_waiting(tmp_path: Path) -> None:
    store = DivergenceStore(tmp_path / "d.db", max_pending=3)
    await store.start()
    try:
        for n in range(10):
            store.add(record(turn=n))
        # add() returned ten times without the writer getting a turn: nothing waited.
        assert (store.written, store.dropped) == (0, 7)

        await store.flush()

        assert store.written == 3
        assert [e["turn"] for e in await store.recent()] == [2, 1, 0]
    finally:
        await store.close()


async def test_close_writes_everything_added_and_later_records_are_dropped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.db"
    store = DivergenceStore(path)
    await store.start()
    for n in range(450):  # more than one batch
        store.add(record(turn=n))

    await store.close()
    store.add(record())

    assert (store.written, store.dropped) == (450, 1)
    reopened = DivergenceStore(path)
    await reopened.start()
    try:
        entries = await reopened.recent(limit=1000)
    finally:
        await reopened.close()
    assert [e["turn"] for e in entries] == list(range(449, -1, -1))


async def test_records_added_before_start_are_written_once_it_starts(tmp_path: Path) -> None:
    store = DivergenceStore(tmp_path / "d.db")
    store.add(record(turn=7))
    await store.start()
    try:
        await store.flush()
        assert [e["turn"] for e in await store.recent()] == [7]
    finally:
        await store.close()


async def test_two_stores_on_one_file_like_two_processes_both_write(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    first, second = DivergenceStore(path, max_rows=50), DivergenceStore(path, max_rows=50)
    await first.start()
    await second.start()
    try:
        for n in range(40):
            (first if n % 2 else second).add(record(turn=n))
        await first.flush()
        await second.flush()

        assert sorted(e["turn"] for e in await first.recent(limit=100)) == list(range(40))
        assert await second.recent(limit=100) == await first.recent(limit=100)

        for n in range(40, 70):
            (first if n % 2 else second).add(record(turn=n))
        await first.flush()
        await second.flush()

        kept = await second.recent(limit=100)
        ids = [e["id"] for e in kept]
        assert ids == list(range(ids[0], ids[0] - 50, -1))  # the newest fifty of both
        assert set(range(40, 70)) <= {e["turn"] for e in kept}
    finally:
        await first.close()
        await second.close()


async def test_a_record_that_cannot_be_stored_fails_alone_not_its_whole_batch(
    store: DivergenceStore, caplog: pytest.LogCaptureFixture
) -> None:
    await stored(store, record(turn=1), record(time=float("nan"), turn=2), record(turn=3))

    assert [e["turn"] for e in await store.recent()] == [3, 1]
    assert (store.written, store.failed) == (2, 1)
    assert "cannot be stored" in caplog.text


async def test_the_endpoint_answers_503_once_the_store_is_closed(
    api: Any, store: DivergenceStore
) -> None:
    await store.close()

    response = await api.get("/api/divergences")

    assert response.status == 503
    assert "error" in await response.json()


# Opening


async def test_an_in_memory_store_serves_what_it_was_given() -> None:
    store = DivergenceStore(":memory:")
    await store.start()
    try:
        await stored(store, record(turn=1))
        assert [e["turn"] for e in await store.recent()] == [1]
    finally:
        await store.close()


async def test_start_on_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "d.db"
    store = DivergenceStore(path)

    with pytest.raises(DivergenceStoreError, match=re.escape(str(path))):
        await store.start()
    await store.close()


async def test_start_on_a_directory_or_a_file_that_is_not_a_database_names_the_path(
    tmp_path: Path,
) -> None:
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_bytes(b"these are not the pages you are looking for " * 100)

    for path in (tmp_path, not_a_database):
        store = DivergenceStore(path)
        with pytest.raises(DivergenceStoreError, match=re.escape(str(path))):
            await store.start()
        await store.close()
