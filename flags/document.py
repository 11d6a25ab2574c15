"""The Unleash client-API features document as frozen values (pure).

A flags file is exactly what an Unleash server's client API serves
(``{"version": 1, "features": [...], "segments": [...]}``), so a team can export it
from Unleash and route offline with the same decisions. Parsing is strict about the
shape that routing depends on and names the offending path in every error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from flags.validation import document_problems, feature_label


class FlagsDocumentError(ValueError):
    """The features document is malformed or unsound; each problem names its path inside it.

    ``problems`` lists them one by one (``strangler check`` prints a line each); the
    message joins them.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    def within(self, source: object) -> FlagsDocumentError:
        """The same problems, each prefixed with where the document came from."""
        return FlagsDocumentError(*(f"{source}: {problem}" for problem in self.problems))


@dataclass(frozen=True, slots=True)
class Constraint:
    context_name: str
    operator: str
    values: tuple[str, ...] = ()
    value: str | None = None
    inverted: bool = False
    case_insensitive: bool = False


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    constraints: tuple[Constraint, ...] = ()
    segments: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    enabled: bool
    strategies: tuple[Strategy, ...] = ()


@dataclass(frozen=True, slots=True)
class FlagSet:
    """One consistent snapshot of every feature; swapped whole on reload."""

    features: Mapping[str, Feature] = field(default_factory=dict)
    segments: Mapping[int, tuple[Constraint, ...]] = field(default_factory=dict)

    def get(self, name: str) -> Feature | None:
        return self.features.get(name)


def parse_flags(raw: bytes | str | Mapping[str, Any]) -> FlagSet:
    """Parse and validate a features document given as JSON text or a decoded mapping.

    A structural problem stops the parse at once; the values routing depends on are
    then checked all together (``flags.validation``), so one error lists every one.
    """
    if isinstance(raw, bytes | str):
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise FlagsDocumentError(f"not valid JSON: {exc}") from exc
    else:
        doc = raw
    if not isinstance(doc, Mapping):
        raise FlagsDocumentError("the document must be a JSON object with 'features'")
    features_raw = doc.get("features")
    if not isinstance(features_raw, list):
        raise FlagsDocumentError("features: must be a list")
    features: dict[str, Feature] = {}
    for index, item in enumerate(features_raw):
        feature = _parse_feature(item, index)
        if feature.name in features:
            label = feature_label(index, feature.name)
            raise FlagsDocumentError(f"{label}: name: duplicate feature")
        features[feature.name] = feature
    segments: dict[int, tuple[Constraint, ...]] = {}
    for index, item in enumerate(_list(doc.get("segments", []), "segments")):
        where = f"segments[{index}]"
        segment = _mapping(item, where)
        seg_id = segment.get("id")
        if not isinstance(seg_id, int):
            raise FlagsDocumentError(f"{where}.id: must be an integer")
        segments[seg_id] = _parse_constraints(
            segment.get("constraints", []), f"{where}.constraints"
        )
    problems = document_problems(doc)
    if problems:
        raise FlagsDocumentError(*problems)
    return FlagSet(features=features, segments=segments)


def _parse_feature(item: object, index: int) -> Feature:
    raw = _mapping(item, f"features[{index}]")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise FlagsDocumentError(f"features[{index}].name: must be a non-empty string")
    # Past the name, a problem names the feature too: "features[3] "agent": enabled".
    where = f"{feature_label(index, name)}: "
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise FlagsDocumentError(f"{where}enabled: must be true or false")
    strategies = tuple(
        _parse_strategy(s, f"{where}strategies[{i}]")
        for i, s in enumerate(_list(raw.get("strategies", []), f"{where}strategies"))
    )
    return Feature(name=name, enabled=enabled, strategies=strategies)


def _parse_strategy(item: object, where: str) -> Strategy:
    raw = _mapping(item, where)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise FlagsDocumentError(f"{where}.name: must be a non-empty string")
    params_raw = raw.get("parameters") or {}
    params = _mapping(params_raw, f"{where}.parameters")
    parameters = {str(k): _scalar_text(v) for k, v in params.items()}
    segments_raw = _list(raw.get("segments") or [], f"{where}.segments")
    if not all(isinstance(s, int) for s in segments_raw):
        raise FlagsDocumentError(f"{where}.segments: must be a list of segment ids")
    return Strategy(
        name=name,
        parameters=parameters,
        constraints=_parse_constraints(raw.get("constraints") or [], f"{where}.constraints"),
        segments=tuple(segments_raw),
    )


def _parse_constraints(item: object, where: str) -> tuple[Constraint, ...]:
    constraints = []
    for index, raw_item in enumerate(_list(item, where)):
        path = f"{where}[{index}]"
        raw = _mapping(raw_item, path)
        context_name = raw.get("contextName")
        operator = raw.get("operator")
        if not isinstance(context_name, str) or not isinstance(operator, str):
            raise FlagsDocumentError(f"{path}: needs string contextName and operator")
        values = _list(raw.get("values") or [], f"{path}.values")
        value = raw.get("value")
        constraints.append(
            Constraint(
                context_name=context_name,
                operator=operator,
                values=tuple(_scalar_text(v) for v in values),
                value=None if value is None else _scalar_text(value),
                inverted=bool(raw.get("inverted", False)),
                case_insensitive=bool(raw.get("caseInsensitive", False)),
            )
        )
    return tuple(constraints)


def _scalar_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _mapping(item: object, where: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise FlagsDocumentError(f"{where}: must be an object")
    return item


def _list(item: object, where: str) -> list[Any]:
    if not isinstance(item, list):
        raise FlagsDocumentError(f"{where}: must be a list")
    return item
