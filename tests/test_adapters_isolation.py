"""Isolation: an event naming another user never reaches a session."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.events import Event, error_event
from adapters.isolation import belongs_to, isolation_violations


def event(**data: Any) -> Event:
    return Event("agent_thinking", {"type": "agent_thinking", **data})


def test_an_event_naming_the_sessions_user_belongs_to_it() -> None:
    assert belongs_to(event(user_id="alice"), "user_id", "alice")


def test_an_event_naming_another_user_does_not() -> None:
    assert not belongs_to(event(user_id="mallory"), "user_id", "alice")


@pytest.mark.parametrize(
    ("value", "user"),
    [(True, "True"), (1.0, "1"), (["alice"], "alice"), ({"id": "alice"}, "alice"), ("", "alice")],
)
def test_any_other_value_names_another_user(value: object, user: str) -> None:
    assert not belongs_to(event(user_id=value), "user_id", user)


def test_a_missing_or_null_user_field_names_no_other_user_and_passes() -> None:
    assert belongs_to(event(), "user_id", "alice")
    assert belongs_to(event(user_id=None), "user_id", "alice")


def test_a_numeric_user_id_is_read_as_its_decimal_text() -> None:
    assert belongs_to(event(user_id=42), "user_id", "42")
    assert not belongs_to(event(user_id=42), "user_id", "43")


def test_a_dotted_user_field_reaches_into_nested_objects() -> None:
    assert not belongs_to(event(meta={"user": "mallory"}), "meta.user", "alice")
    assert belongs_to(event(meta={"user": "alice"}), "meta.user", "alice")
    assert belongs_to(event(meta="flat"), "meta.user", "alice")


def test_isolation_violations_are_the_positions_of_other_users_events() -> None:
    events = [
        event(user_id="alice"),
        event(user_id="mallory"),
        error_event("malformed JSON"),
        event(),
        event(user_id="eve"),
    ]
    assert isolation_violations(events, "user_id", "alice") == [1, 4]
