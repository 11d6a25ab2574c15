"""Decide whether a flag is on for a user, exactly as Unleash does (pure).

Only the strategies that route by user are honoured: ``default``, ``userWithId``,
``gradualRolloutUserId`` and ``flexibleRollout`` with ``userId`` or ``default``
stickiness, with their constraints and segments. A decision never depends on chance:
without a user id a rollout strategy is off, where Unleash would bucket at random.
Unknown strategies and constraint operators are off, which keeps users on legacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import mmh3

from flags.document import Constraint, Feature, FlagSet, Strategy

_ROLLOUT_STRATEGIES = ("flexibleRollout", "gradualRolloutUserId")


def normalized_hash(identifier: str, group_id: str, modulus: int = 100) -> int:
    """Unleash's bucket: murmur3 (seed 0) of ``groupId:identifier``, modulo, plus 1.

    murmur3 runs over the text's UTF-8 bytes, as the SDK's (``mmh3.hash`` of a str)
    does; encoded here, strictly, because mmh3 handed a str that UTF-8 cannot carry
    (lone surrogates, which is how bytes that were not UTF-8 decode with surrogate
    escapes) crashes the process. Such text raises UnicodeEncodeError instead.
    """
    key = f"{group_id}:{identifier}".encode()
    return int(mmh3.hash(key, 0, signed=False)) % modulus + 1


def is_utf8_text(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8: no lone surrogates, which is how bytes that were
    not UTF-8 decode with surrogate escapes (``headers.from_wire``). The listener decodes
    the user id strictly, so none comes from the wire; this keeps one a caller made from
    reaching code that hands a str to murmur3 unchecked (the Unleash SDK's)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_enabled(
    flags: FlagSet,
    name: str,
    user_id: str | None,
    static_context: Mapping[str, str] | None = None,
) -> bool:
    """True when the flag is on for this user; missing or disabled flags are off.

    ``static_context`` carries the fields that are the same for every request of this
    replica (``environment``, ``appName``) for constraints that name them.
    """
    feature = flags.get(name)
    if feature is None or not feature.enabled:
        return False
    if not feature.strategies:
        return True
    context: dict[str, str] = dict(static_context) if static_context else {}
    if user_id:
        # An id UTF-8 cannot carry is bucketed nobody (see _bucket), never hashed.
        context["userId"] = user_id
    return any(_strategy_on(feature, s, context, flags) for s in feature.strategies)


def rollout_percent(flags: FlagSet, name: str) -> float:
    """The share of users the flag sends to the candidate, for display and metrics.

    A disabled or missing flag is 0; a ``default`` strategy without constraints is 100;
    otherwise the largest rollout among its user rollout strategies.
    """
    feature = flags.get(name)
    if feature is None or not feature.enabled:
        return 0.0
    if not feature.strategies:
        return 100.0
    best = 0.0
    for strategy in feature.strategies:
        if strategy.name == "default" and not strategy.constraints and not strategy.segments:
            return 100.0
        if strategy.name in _ROLLOUT_STRATEGIES:
            best = max(best, float(_percentage(strategy)))
    return best


def _strategy_on(
    feature: Feature, strategy: Strategy, context: Mapping[str, str], flags: FlagSet
) -> bool:
    if not _constraints_hold(strategy, context, flags):
        return False
    params = strategy.parameters
    user_id = context.get("userId")
    if strategy.name == "default":
        return True
    if strategy.name == "userWithId":
        ids = {part.strip() for part in params.get("userIds", "").split(",")}
        return user_id is not None and user_id in ids
    if strategy.name == "gradualRolloutUserId":
        percentage = _percentage(strategy)
        group_id = params.get("groupId", "")
        return user_id is not None and percentage > 0 and _bucket(user_id, group_id) <= percentage
    if strategy.name == "flexibleRollout":
        stickiness = params.get("stickiness", "default") or "default"
        if stickiness not in ("default", "userId") or user_id is None:
            return False
        percentage = _percentage(strategy)
        group_id = params.get("groupId") or feature.name
        return percentage > 0 and _bucket(user_id, group_id) <= percentage
    return False


def _bucket(user_id: str, group_id: str) -> int:
    # A user or group id UTF-8 cannot carry buckets nobody (normalized_hash refuses to
    # hand it to murmur3): 101 is above every percentage, so the strategy is off.
    try:
        return normalized_hash(user_id, group_id)
    except UnicodeEncodeError:
        return 101


def _percentage(strategy: Strategy) -> int:
    raw = strategy.parameters.get(
        "rollout" if strategy.name == "flexibleRollout" else "percentage", "0"
    )
    try:
        return int(float(raw))
    except ValueError:
        return 0


def _constraints_hold(strategy: Strategy, context: Mapping[str, str], flags: FlagSet) -> bool:
    constraints = list(strategy.constraints)
    for segment_id in strategy.segments:
        segment = flags.segments.get(segment_id)
        if segment is None:
            return False
        constraints.extend(segment)
    return all(_constraint_holds(c, context) for c in constraints)


def _constraint_holds(constraint: Constraint, context: Mapping[str, str]) -> bool:
    value = context.get(constraint.context_name)
    result = _operator_holds(constraint, value)
    return not result if constraint.inverted else result


def _operator_holds(c: Constraint, value: str | None) -> bool:
    op = c.operator
    if op == "IN":
        return value is not None and value in c.values
    if op == "NOT_IN":
        return value is None or value not in c.values
    if value is None:
        return False
    if op in ("STR_CONTAINS", "STR_STARTS_WITH", "STR_ENDS_WITH"):
        subject = value.lower() if c.case_insensitive else value
        candidates = [v.lower() if c.case_insensitive else v for v in c.values]
        if op == "STR_CONTAINS":
            return any(v in subject for v in candidates)
        if op == "STR_STARTS_WITH":
            return any(subject.startswith(v) for v in candidates)
        return any(subject.endswith(v) for v in candidates)
    if op.startswith("NUM_") and c.value is not None:
        try:
            left, right = float(value), float(c.value)
        except ValueError:
            return False
        return {
            "NUM_EQ": left == right,
            "NUM_GT": left > right,
            "NUM_GTE": left >= right,
            "NUM_LT": left < right,
            "NUM_LTE": left <= right,
        }.get(op, False)
    return False
