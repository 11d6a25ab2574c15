"""Contracts: a grammar over event types that every sequence must follow."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.contract import Contract, ContractError

DEMO = Contract.parse(
    "agent_started (agent_thinking | tool_executing tool_completed)* agent_completed"
)
STARTED, THINKING, EXECUTING, COMPLETED, DONE = (
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
)


@st.composite
def valid_turns(draw: st.DrawFn) -> list[str]:
    """Turns like the demo dispatchers': 1+ thinking chunks, then 0-3 tool pairs."""
    turn = [STARTED] + [THINKING] * draw(st.integers(1, 3))
    for _ in range(draw(st.integers(0, 3))):
        turn += [THINKING] * draw(st.integers(0, 2)) + [EXECUTING, COMPLETED]
    return [*turn, DONE]


@given(turn=valid_turns())
def test_the_demo_contract_accepts_every_valid_turn(turn: list[str]) -> None:
    result = DEMO.check(turn)
    assert result.ok and result.index is None and result.detail == ""


@given(turn=valid_turns())
def test_the_demo_contract_rejects_a_turn_without_agent_completed(turn: list[str]) -> None:
    result = DEMO.check(turn[:-1])
    assert not result.ok
    assert result.index == len(turn) - 1
    assert DONE in result.expected
    assert f"ends after {len(turn) - 1} events" in result.detail


def test_the_demo_contract_rejects_tool_completed_before_tool_executing() -> None:
    result = DEMO.check([STARTED, THINKING, COMPLETED, EXECUTING, DONE])
    assert (result.ok, result.index) == (False, 2)
    assert result.expected == (DONE, THINKING, EXECUTING)
    assert result.detail == (
        "event 2 is 'tool_completed', but the contract expects "
        "'agent_completed', 'agent_thinking' or 'tool_executing' there"
    )


def test_the_demo_contract_rejects_an_unknown_type_and_says_so() -> None:
    result = DEMO.check([STARTED, THINKING, "agent_paused", DONE])
    assert (result.ok, result.index) == (False, 2)
    assert "a type the contract does not know" in result.detail


def test_the_demo_contract_rejects_anything_after_the_end() -> None:
    result = DEMO.check([STARTED, DONE, THINKING])
    assert (result.ok, result.index, result.expected) == (False, 2, ())
    assert "expects nothing more there" in result.detail


def test_an_empty_sequence_is_told_what_should_come_first() -> None:
    result = DEMO.check([])
    assert (result.ok, result.index, result.expected) == (False, 0, (STARTED,))


@pytest.mark.parametrize(
    ("text", "good", "bad"),
    [
        ("a b? c", [["a", "c"], ["a", "b", "c"]], [["a", "b", "b", "c"]]),
        ("a+ | b*", [["a"], ["a", "a"], [], ["b", "b"]], [["a", "b"]]),
        ("(a b)+ c", [["a", "b", "c"], ["a", "b", "a", "b", "c"]], [["c"], ["a", "c"]]),
        ("a (b | c (d | e)?)* f", [["a", "c", "e", "b", "c", "f"]], [["a", "d", "f"]]),
        ('"a|b" "x*"', [["a|b", "x*"]], [["a", "b"], ["a|b", "x", "x"]]),
        ("tool.done", [["tool.done"]], [["toolXdone"]]),
        ("a** b", [["b"], ["a", "a", "b"]], [["a"]]),
    ],
)
def test_the_operators_mean_what_they_mean_in_regular_expressions(
    text: str, good: list[list[str]], bad: list[list[str]]
) -> None:
    contract = Contract.parse(text)
    assert all(contract.check(types).ok for types in good)
    assert not any(contract.check(types).ok for types in bad)


def test_a_grammar_that_would_make_a_backtracking_matcher_explode_is_checked_quickly() -> None:
    contract = Contract.parse("((a | a)* (a*)*)* b")
    result = contract.check(["a"] * 5000)
    assert (result.ok, result.index, result.expected) == (False, 5000, ("a", "b"))


def test_checks_remembered_along_the_way_do_not_change_later_answers() -> None:
    for _ in range(3):
        assert DEMO.check([STARTED, THINKING, DONE]).ok
        assert not DEMO.check([STARTED, COMPLETED]).ok


@pytest.mark.parametrize(
    ("text", "position", "reason"),
    [
        ("", 0, "expected an event type or '(' but found the end"),
        ("a (b c", 6, "expected ')' for the '(' opened at position 2"),
        ("a | | b", 4, "expected an event type or '(' but found '|'"),
        ("a b)", 3, "unbalanced ')'"),
        ("()", 1, "expected an event type or '(' but found ')'"),
        ("* a", 0, "expected an event type or '(' but found '*'"),
        ('a "b', 2, "unterminated quoted name"),
        ('a ""', 2, "empty quoted name"),
        ("(" * 100 + "a" + ")" * 100, 64, "parentheses nest deeper than 64"),
    ],
)
def test_bad_syntax_raises_a_contract_error_with_its_position(
    text: str, position: int, reason: str
) -> None:
    with pytest.raises(ContractError) as raised:
        Contract.parse(text)
    assert (raised.value.position, raised.value.reason) == (position, reason)
    assert str(raised.value) == f"contract {text!r}, position {position}: {reason}"
    assert isinstance(raised.value, ValueError)


def test_a_contract_knows_its_names_and_equals_another_parsed_from_the_same_text() -> None:
    assert DEMO.names == {STARTED, THINKING, EXECUTING, COMPLETED, DONE}
    assert Contract.parse(DEMO.text) == DEMO
