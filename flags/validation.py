"""What a features document must say for routing to be trusted (pure).

The structure (objects, lists, names) is checked while parsing (``flags.document``);
this module checks the values that decide who goes where, over the decoded JSON, and
returns every problem at once, each naming the feature and the field:

- a rollout (``flexibleRollout`` ``rollout``, ``gradualRollout*`` ``percentage``) is a
  string of digits from 0 to 100, as Unleash serves it. A JSON number is refused: the
  Unleash Admin API refuses one, and the official SDK's engine reads ``50`` (and
  ``"125"``, ``"50.0"``, ``" 50"``) as 0 % without a warning, so a document holding one
  would route differently under the ``file`` and ``unleash`` providers;
- a strategy is one Unleash defines (a typo, or a custom strategy no client here
  implements, would silently keep every user on legacy);
- a stickiness is one Unleash defines;
- a constraint's operator is one Unleash defines (a typo would hold the strategy off for
  everyone while the rollout still reads as its percentage), and a strategy's segments
  are in the document (a missing one holds it off too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# The strategies an Unleash server defines; routing decides by the user-keyed ones
# (default, userWithId, gradualRolloutUserId, flexibleRollout) and holds the others off.
KNOWN_STRATEGIES = frozenset(
    {
        "default",
        "userWithId",
        "gradualRolloutUserId",
        "gradualRolloutSessionId",
        "gradualRolloutRandom",
        "flexibleRollout",
        "remoteAddress",
        "applicationHostname",
    }
)
KNOWN_STICKINESS = frozenset({"default", "userId", "sessionId", "random"})
# The constraint operators Unleash defines; routing evaluates the string and number ones
# and holds the date and semver ones off (no request carries such a context field).
KNOWN_OPERATORS = frozenset(
    {
        "IN",
        "NOT_IN",
        "STR_CONTAINS",
        "STR_STARTS_WITH",
        "STR_ENDS_WITH",
        "NUM_EQ",
        "NUM_GT",
        "NUM_GTE",
        "NUM_LT",
        "NUM_LTE",
        "DATE_AFTER",
        "DATE_BEFORE",
        "SEMVER_EQ",
        "SEMVER_GT",
        "SEMVER_LT",
    }
)

_ROLLOUT_PARAMETER = {
    "flexibleRollout": "rollout",
    "gradualRolloutUserId": "percentage",
    "gradualRolloutSessionId": "percentage",
    "gradualRolloutRandom": "percentage",
}


def feature_label(index: int, name: object) -> str:
    """``features[3] "ssot-dispatcher"``: where a feature is, and which one."""
    if isinstance(name, str) and name:
        return f"features[{index}] {_shown(name)}"
    return f"features[{index}]"


def document_problems(doc: Mapping[str, Any]) -> list[str]:
    """Every value in the document that routing cannot trust; empty when it is sound."""
    features = doc.get("features")
    if not isinstance(features, list):
        return []  # a structural problem, reported by the parser
    problems: list[str] = []
    raw_segments = doc.get("segments")
    segments = raw_segments if isinstance(raw_segments, list) else []
    segment_ids = {s.get("id") for s in segments if isinstance(s, Mapping)}
    for index, segment in enumerate(segments):
        if isinstance(segment, Mapping):
            problems.extend(constraint_problems(segment, f"segments[{index}]"))
    for index, feature in enumerate(features):
        if not isinstance(feature, Mapping):
            continue
        label = feature_label(index, feature.get("name"))
        strategies = feature.get("strategies") or []
        if not isinstance(strategies, list):
            continue
        for position, strategy in enumerate(strategies):
            if isinstance(strategy, Mapping):
                where = f"{label}: strategies[{position}]"
                problems.extend(strategy_problems(strategy, where))
                problems.extend(constraint_problems(strategy, where))
                problems.extend(segment_problems(strategy, where, segment_ids))
    return problems


def segment_problems(strategy: Mapping[str, Any], where: str, known: set[object]) -> list[str]:
    """The segments a strategy names that the document does not hold."""
    wanted = strategy.get("segments")
    return [
        f"{where}.segments[{at}]: segment {_shown(segment_id)} is not in the document"
        for at, segment_id in enumerate(wanted if isinstance(wanted, list) else [])
        if segment_id not in known
    ]


def constraint_problems(holder: Mapping[str, Any], where: str) -> list[str]:
    """The constraints of a strategy or a segment whose operator Unleash does not define."""
    constraints = holder.get("constraints")
    problems = []
    for index, constraint in enumerate(constraints if isinstance(constraints, list) else []):
        if not isinstance(constraint, Mapping):
            continue  # a structural problem, reported by the parser
        operator = constraint.get("operator")
        if operator not in KNOWN_OPERATORS:
            problems.append(
                f"{where}.constraints[{index}].operator: {_shown(operator)} is not an"
                " operator Unleash defines"
            )
    return problems


def strategy_problems(strategy: Mapping[str, Any], where: str) -> list[str]:
    """The problems of one strategy; ``where`` prefixes each."""
    name = strategy.get("name")
    if name not in KNOWN_STRATEGIES:
        known = ", ".join(sorted(KNOWN_STRATEGIES))
        return [f"{where}.name: {_shown(name)} is not a strategy Unleash defines ({known})"]
    parameters = strategy.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        return []  # a structural problem, reported by the parser
    problems = []
    rollout_key = _ROLLOUT_PARAMETER.get(str(name))
    if rollout_key is not None:
        value = parameters.get(rollout_key)
        if not is_rollout(value):
            shown = "missing" if rollout_key not in parameters else _shown(value)
            problems.append(
                f"{where}.parameters.{rollout_key}: {shown} is not an integer from 0 to 100"
                " (a string of digits, as Unleash serves it)"
            )
    if name == "flexibleRollout" and "stickiness" in parameters:
        stickiness = parameters["stickiness"]
        # Unleash serves an empty stickiness for "default" on older documents.
        if stickiness != "" and stickiness not in KNOWN_STICKINESS:
            known = ", ".join(sorted(KNOWN_STICKINESS))
            problems.append(
                f"{where}.parameters.stickiness: {_shown(stickiness)} is not a stickiness"
                f" Unleash defines ({known})"
            )
    return problems


def is_rollout(value: object) -> bool:
    """One to three ASCII digits whose value is 0 to 100 (``"007"`` is 7, as Unleash reads it)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 3
        and value.isascii()
        and value.isdigit()
        and int(value) <= 100
    )


def _shown(value: object) -> str:
    """A value as it reads in the JSON document, bounded so a huge one cannot flood a log."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
