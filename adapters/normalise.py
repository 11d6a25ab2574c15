"""Normalisation of an event sequence before comparison: this module owns a route's rules
for what is noise (ignored fields, canonical ids, coalesced runs, presence-only fields)
and their compilation into a matcher over dotted field paths. It is pure: a sequence
in, a new sequence out, the same every time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from adapters.events import Event

PRESENT: Final = "<present>"
WILDCARD: Final = "*"


# The rules as plain ints, lower winning when several match one field (enum members
# cost a lookup each on the hot path).
_IGNORE: Final = 0
_PRESENCE: Final = 1
_CANONICAL: Final = 2


@dataclass(eq=False, slots=True)
class _Node:
    """A node of the pattern trie: the patterns ending here and the segments below."""

    children: dict[str, _Node] = field(default_factory=dict)
    ends: list[tuple[int, int, str]] = field(default_factory=list)  # rule, order, pattern


@dataclass(eq=False, slots=True)
class _State:
    """Where a walk stands: every trie node the path so far matches, determinised."""

    rule: int | None = None
    namespace: str = ""
    literal: dict[str, _State] = field(default_factory=dict)
    named: tuple[tuple[str, _State], ...] = ()  # literal's items, for iteration
    wildcard: _State | None = None
    # Keys of an object visited in sorted order: a * below may number ids.
    ordered: bool = False
    walks: bool = False  # anything below can match


_CONTAINERS: Final = (dict, list)


class _Removed:
    """What an ignored field becomes on its way out of a walk."""


_REMOVED: Final = _Removed()


@dataclass(frozen=True, slots=True)
class Normaliser:
    """A route's normalisation rules, compiled once; ``normalise`` applies them.

    Field paths are dotted; ``*`` matches exactly one level, and list items are levels named
    by their index (``hits.*.score``, ``hits.0.url``), so ``*.duration_ms`` matches
    ``tool.duration_ms`` but neither ``duration_ms`` nor ``a.b.duration_ms``, and a bare
    ``timestamp`` matches only the top-level field (a key that itself holds a dot cannot be
    named). Paths apply to an event's payload; its type, kept on ``Event.type``, is never
    changed, which is why the normaliser needs no type field name. Four rules, in order:

    1. ``coalesce``: a run of consecutive events of one listed type becomes its first event,
       whatever the run's length (so the number of ``agent_thinking`` chunks never counts,
       and their later contents are dropped with them). This happens first, so the dropped
       events' fields never take part in the id numbering below.
    2. ``ignore``: matching fields are removed.
    3. ``presence_only``: matching values become ``PRESENT``; only whether the field is
       there is compared.
    4. ``canonical_ids``: matching values are renamed by order of first appearance across
       the whole sequence, per pattern: the first ``run_id`` value seen becomes
       ``"run_id#1"``, the next different one ``"run_id#2"``, and a value seen again gets
       the name it got before. Within an event fields are visited by key, sorted wherever a
       ``*`` is involved, so the numbering never depends on the order of a JSON object's keys.

    When several patterns match one field, ``ignore`` wins over ``presence_only``, which
    wins over ``canonical_ids``; among canonical id patterns, the first configured. Error
    events are left alone, never coalesced (they are compared as errors). Events are never
    modified: changed payloads are copies sharing what did not change. ``PRESENT`` is a
    plain string so that normalised payloads stay JSON for the divergence log.
    """

    ignore: Sequence[str] = ()
    canonical_ids: Sequence[str] = ()
    coalesce: Sequence[str] = ()
    presence_only: Sequence[str] = ()
    _root: _State = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("ignore", "canonical_ids", "coalesce", "presence_only"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a list of strings, not the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        for pattern in (*self.ignore, *self.canonical_ids, *self.presence_only):
            check_path(pattern)
        object.__setattr__(self, "_root", self._compile())

    def normalise(self, events: Iterable[Event]) -> tuple[Event, ...]:
        """The sequence with the rules applied; pure and deterministic."""
        coalesce = self.coalesce
        root = self._root
        walks = root.walks
        names: dict[str, dict[object, str]] = {}
        out: list[Event] = []
        previous: str | None = None
        for event in events:
            kind = event.type
            if kind == previous and kind in coalesce and event.error is None:
                continue
            previous = kind
            if walks and event.error is None:
                data = _walk_object(event.data, root, names)
                if data is not event.data:
                    event = Event(kind, data, event.error)
            out.append(event)
        return tuple(out)

    def _compile(self) -> _State:
        root = _Node()
        rules = (
            (_IGNORE, self.ignore),
            (_PRESENCE, self.presence_only),
            (_CANONICAL, self.canonical_ids),
        )
        for rule, patterns in rules:
            for order, pattern in enumerate(patterns):
                node = root
                for segment in pattern.split("."):
                    node = node.children.setdefault(segment, _Node())
                node.ends.append((rule, order, pattern))
        states: dict[frozenset[int], _State] = {}
        start = _determinise([root], states)
        _mark_ordered(start, {})
        return start


def check_path(pattern: str) -> None:
    """Raise ValueError unless ``pattern`` is a dotted path of non-empty segments."""
    if not isinstance(pattern, str) or not pattern or "" in pattern.split("."):
        raise ValueError(f"{pattern!r} is not a dotted field path (like 'a.b' or '*.b')")


def _determinise(nodes: list[_Node], states: dict[frozenset[int], _State]) -> _State:
    key = frozenset(map(id, nodes))
    if key in states:
        return states[key]
    state = states[key] = _State()
    ends = sorted(end for node in nodes for end in node.ends)
    if ends:
        state.rule, _, state.namespace = ends[0]
    stars = [node.children[WILDCARD] for node in nodes if WILDCARD in node.children]
    segments = sorted({s for node in nodes for s in node.children if s != WILDCARD})
    for segment in segments:
        below = [node.children[segment] for node in nodes if segment in node.children]
        state.literal[segment] = _determinise(below + stars, states)
    state.named = tuple(state.literal.items())
    if stars:
        state.wildcard = _determinise(stars, states)
    state.walks = bool(segments or stars)
    return state


def _mark_ordered(state: _State, seen: dict[int, bool]) -> bool:
    """Mark states whose wildcard can reach a canonical id; return whether this one can."""
    if id(state) in seen:
        return seen[id(state)]
    reaches = state.rule == _CANONICAL
    for child in state.literal.values():
        reaches |= _mark_ordered(child, seen)
    if state.wildcard is not None:
        state.ordered = _mark_ordered(state.wildcard, seen)
        reaches |= state.ordered
    seen[id(state)] = reaches
    return reaches


def _replaced(
    obj: Mapping[str, Any], copy: dict[str, Any] | None, key: str, new: Any
) -> dict[str, Any]:
    """``obj`` copied on first write (``copy``), with ``key`` set to ``new`` or removed."""
    if copy is None:
        copy = dict(obj)
    if new is _REMOVED:
        del copy[key]
    else:
        copy[key] = new
    return copy


def _walk_object(
    obj: Mapping[str, Any], state: _State, names: dict[str, dict[object, str]]
) -> Mapping[str, Any]:
    copy: dict[str, Any] | None = None
    # First the fields the patterns name, in the trie's (sorted) order...
    for key, child in state.named:
        if key not in obj:
            continue
        old = obj[key]
        new = _apply(child, old, names)
        if new is not old:
            copy = _replaced(obj, copy, key, new)
    wildcard = state.wildcard
    if wildcard is None:
        return obj if copy is None else copy
    # ...then every other field, for the *: only containers matter unless the * itself
    # is a rule's last segment.
    literal = state.literal
    fields = sorted(obj.items(), key=_first) if state.ordered else list(obj.items())
    leaf = wildcard.rule is not None
    for key, old in fields:
        if key in literal or not (leaf or isinstance(old, _CONTAINERS)):
            continue
        new = _apply(wildcard, old, names)
        if new is not old:
            copy = _replaced(obj, copy, key, new)
    return obj if copy is None else copy


def _apply(state: _State, value: Any, names: dict[str, dict[object, str]]) -> Any:
    """The value a field matched by ``state`` takes: ``_REMOVED`` for an ignored one."""
    rule = state.rule
    if rule is None:
        if state.walks and isinstance(value, _CONTAINERS):
            return _walk(value, state, names)
        return value
    if rule == _IGNORE:
        return _REMOVED
    if rule == _PRESENCE:
        return PRESENT
    return _canonical_name(state.namespace, value, names)


def _walk(value: Any, state: _State, names: dict[str, dict[object, str]]) -> Any:
    if isinstance(value, dict):
        return _walk_object(value, state, names)
    # A list: its items are levels named by their index.
    items: list[Any] | None = None
    removed = 0
    literal, wildcard = state.literal, state.wildcard
    for index, old in enumerate(value):
        child = literal.get(str(index), wildcard) if literal else wildcard
        if child is None:
            continue
        new = _apply(child, old, names)
        if new is old:
            continue
        if items is None:
            items = list(value)
        if new is _REMOVED:
            del items[index - removed]
            removed += 1
        else:
            items[index - removed] = new
    return value if items is None else items


def _first(item: tuple[str, Any]) -> str:
    return item[0]


def _canonical_name(namespace: str, value: object, names: dict[str, dict[object, str]]) -> str:
    table = names.setdefault(namespace, {})
    key = value if type(value) is str else _identity(value)
    name = table.get(key)
    if name is None:
        name = table[key] = f"{namespace}#{len(table) + 1}"
    return name


def _identity(value: object) -> object:
    """A hashable stand-in for an id that is not a string, tagged by its JSON type so
    that 1, 1.0, true and "1" stay different ids."""
    if value is None or isinstance(value, bool | int | float):
        return (type(value).__name__, value)
    try:
        return (type(value).__name__, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    except TypeError:  # not JSON, or nested deeper than orjson goes
        return (type(value).__name__, "unencodable")
