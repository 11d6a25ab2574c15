"""Flags documents whose routing values cannot be trusted are refused, feature and field named."""

from __future__ import annotations

from typing import Any

import pytest

from flags.document import FlagsDocumentError, parse_flags
from flags.validation import document_problems, is_rollout

FLAG = "ssot-dispatcher"


def document(*strategies: dict[str, Any], others: int = 0) -> dict[str, Any]:
    """A document whose feature ``FLAG`` comes after ``others`` sound features."""
    features: list[dict[str, Any]] = [
        {"name": f"other-{i}", "enabled": True, "strategies": [{"name": "default"}]}
        for i in range(others)
    ]
    features.append({"name": FLAG, "enabled": True, "strategies": list(strategies)})
    return {"version": 1, "features": features}


def flexible(rollout: object = "50", **more: object) -> dict[str, Any]:
    parameters = {"rollout": rollout, "stickiness": "userId", "groupId": FLAG, **more}
    return {"name": "flexibleRollout", "parameters": parameters, "constraints": []}


@pytest.mark.parametrize(
    ("rollout", "shown"),
    [
        ("fifty", '"fifty"'),
        ("125", '"125"'),
        ("101", '"101"'),
        ("-5", '"-5"'),
        ("50.0", '"50.0"'),
        (" 50", '" 50"'),
        ("+50", '"+50"'),
        ("", '""'),
        ("0100", '"0100"'),
        ("\u0663", '"\u0663"'),  # ARABIC-INDIC DIGIT THREE: a digit, not an ASCII one
        ("9" * 5000, '"' + "9" * 76 + "..."),  # shown bounded, and int() never sees it
        # A JSON number is refused: Unleash serves strings and its SDK reads 50 as 0 %.
        (50, "50"),
        (50.5, "50.5"),
        (True, "true"),
        (None, "null"),
        ([50], "[50]"),
    ],
)
def test_a_rollout_that_is_not_a_string_of_digits_from_0_to_100_is_refused(
    rollout: object, shown: str
) -> None:
    problems = document_problems(document(flexible(rollout), others=3))
    assert problems == [
        f'features[3] "{FLAG}": strategies[0].parameters.rollout: {shown}'
        " is not an integer from 0 to 100 (a string of digits, as Unleash serves it)"
    ]


@pytest.mark.parametrize("rollout", ["0", "1", "50", "99", "100", "007"])
def test_a_rollout_from_0_to_100_as_unleash_serves_it_is_accepted(rollout: str) -> None:
    assert is_rollout(rollout)
    assert document_problems(document(flexible(rollout))) == []
    assert parse_flags(document(flexible(rollout))).get(FLAG) is not None


@pytest.mark.parametrize(
    ("strategy", "field", "shown"),
    [
        (
            {"name": "gradualRolloutUserId", "parameters": {"percentage": "fifty"}},
            "percentage",
            '"fifty"',
        ),
        ({"name": "gradualRolloutUserId", "parameters": {}}, "percentage", "missing"),
        (
            {"name": "gradualRolloutRandom", "parameters": {"percentage": "200"}},
            "percentage",
            '"200"',
        ),
        ({"name": "gradualRolloutSessionId", "parameters": {"percentage": 5}}, "percentage", "5"),
        ({"name": "flexibleRollout", "parameters": {"stickiness": "userId"}}, "rollout", "missing"),
    ],
)
def test_every_rollout_strategy_has_its_percentage_checked(
    strategy: dict[str, Any], field: str, shown: str
) -> None:
    [problem] = document_problems(document(strategy))
    assert problem.startswith(f'features[0] "{FLAG}": strategies[0].parameters.{field}: {shown} ')


@pytest.mark.parametrize(
    "name", ["flexibleRolout", "FlexibleRollout", "myCustomStrategy", "", None, 3]
)
def test_a_strategy_unleash_does_not_define_is_refused(name: object) -> None:
    problems = document_problems(document({"name": name, "parameters": {"rollout": "50"}}))
    assert len(problems) == 1
    assert problems[0].startswith(f'features[0] "{FLAG}": strategies[0].name: ')
    assert "is not a strategy Unleash defines" in problems[0]


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "userWithId",
        "gradualRolloutUserId",
        "gradualRolloutSessionId",
        "gradualRolloutRandom",
        "flexibleRollout",
        "remoteAddress",
        "applicationHostname",
    ],
)
def test_every_strategy_unleash_defines_is_accepted(name: str) -> None:
    parameters = {"rollout": "10", "percentage": "10", "stickiness": "default"}
    assert document_problems(document({"name": name, "parameters": parameters})) == []


@pytest.mark.parametrize("stickiness", ["userid", "user_id", "tenantId", 1, None])
def test_a_stickiness_unleash_does_not_define_is_refused(stickiness: object) -> None:
    [problem] = document_problems(document(flexible("50", stickiness=stickiness)))
    assert problem.startswith(f'features[0] "{FLAG}": strategies[0].parameters.stickiness: ')
    assert "is not a stickiness Unleash defines" in problem


@pytest.mark.parametrize("stickiness", ["default", "userId", "sessionId", "random", ""])
def test_a_stickiness_unleash_defines_is_accepted(stickiness: str) -> None:
    assert document_problems(document(flexible("50", stickiness=stickiness))) == []


def test_every_problem_of_a_document_is_reported_at_once() -> None:
    doc = document(flexible("fifty"), flexible("50", stickiness="nope"), {"name": "typo"})
    doc["features"].insert(0, {"name": "first", "enabled": True, "strategies": [flexible("125")]})
    with pytest.raises(FlagsDocumentError) as refused:
        parse_flags(doc)
    assert [p.split(": ")[0:2] for p in refused.value.problems] == [
        ['features[0] "first"', "strategies[0].parameters.rollout"],
        [f'features[1] "{FLAG}"', "strategies[0].parameters.rollout"],
        [f'features[1] "{FLAG}"', "strategies[1].parameters.stickiness"],
        [f'features[1] "{FLAG}"', "strategies[2].name"],
    ]
    assert str(refused.value) == "; ".join(refused.value.problems)


@pytest.mark.parametrize("operator", ["STR_CONTAIN", "in", "EQUALS", "", None, 3])
def test_a_constraint_operator_unleash_does_not_define_is_refused(operator: object) -> None:
    strategy = flexible("100")
    strategy["constraints"] = [{"contextName": "userId", "operator": operator, "values": ["u"]}]
    problems = document_problems(document(strategy))
    assert len(problems) == 1
    assert problems[0].startswith(f'features[0] "{FLAG}": strategies[0].constraints[0].operator: ')
    assert problems[0].endswith("is not an operator Unleash defines")


def test_a_segment_constraint_with_an_unknown_operator_is_refused() -> None:
    doc = document(flexible("100"))
    doc["segments"] = [{"id": 1, "constraints": [{"contextName": "x", "operator": "LIKE"}]}]
    assert document_problems(doc) == [
        'segments[0].constraints[0].operator: "LIKE" is not an operator Unleash defines'
    ]


def test_a_strategy_naming_a_segment_the_document_lacks_is_refused() -> None:
    strategy = flexible("100")
    strategy["segments"] = [1, 7]
    doc = document(strategy)
    doc["segments"] = [{"id": 1, "constraints": []}]
    assert document_problems(doc) == [
        f'features[0] "{FLAG}": strategies[0].segments[1]: segment 7 is not in the document'
    ]


@pytest.mark.parametrize("operator", ["IN", "NOT_IN", "STR_CONTAINS", "NUM_GTE", "SEMVER_EQ"])
def test_operators_unleash_defines_and_present_segments_are_accepted(operator: str) -> None:
    strategy = flexible("100")
    strategy["constraints"] = [{"contextName": "userId", "operator": operator, "values": ["1"]}]
    strategy["segments"] = [1]
    doc = document(strategy)
    doc["segments"] = [{"id": 1, "constraints": [{"contextName": "a", "operator": operator}]}]
    assert document_problems(doc) == []
