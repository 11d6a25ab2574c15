"""Comparison of two normalised event sequences, the reference (legacy's) against the
subject (the candidate's), whichever of them served: this module owns their alignment,
the classification of each divergence, and the equality of payloads as JSON values. It
is pure: sequences in, a frozen ``Comparison`` out.
"""

from __future__ import annotations

import bisect
import difflib
import enum
import reprlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from adapters.events import Event


class DivergenceKind(enum.StrEnum):
    """What kind of difference a divergence is.

    - ``missing``: an event of the reference has no counterpart in the subject;
    - ``extra``: an event of the subject has no counterpart in the reference;
    - ``order``: a missing and an extra event of the same type with equal payloads, which
      is one event that moved; reported once, instead of the pair;
    - ``payload``: aligned events whose payloads differ, with every differing dotted path
      (list items by index), including fields present on one side only;
    - ``status``: the HTTP statuses differ (when both are known);
    - ``error``: an event that stands for a failure on either side;
    - ``timeout``: a side timed out.
    """

    MISSING = "missing"
    EXTRA = "extra"
    ORDER = "order"
    PAYLOAD = "payload"
    STATUS = "status"
    ERROR = "error"
    TIMEOUT = "timeout"

    __hash__ = str.__hash__  # str's C hash in the slot (see proxy.routing.Backend)


@dataclass(frozen=True, slots=True)
class Divergence:
    """One difference. Indices point into the sequences as given to ``compare``; a side
    the divergence has no event on has ``None``."""

    kind: DivergenceKind
    index_reference: int | None
    index_subject: int | None
    event_type: str | None
    paths: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Comparison:
    """The outcome: every divergence, in the order of the sequences."""

    divergences: tuple[Divergence, ...] = ()

    @property
    def matched(self) -> bool:
        return not self.divergences

    @property
    def kinds(self) -> frozenset[DivergenceKind]:
        return frozenset(divergence.kind for divergence in self.divergences)


MATCHED: Final = Comparison()

# Above this many cells the exact alignment's table costs too much; difflib's heuristic
# matcher takes over for such long sequences.
_EXACT_ALIGNMENT_CELLS: Final = 2500
_MAX_PAIRING_COMPARISONS: Final = 2500
_DETAIL_PATHS: Final = 5
_DETAIL_VALUE_CHARS: Final = 60
_SORTED: Final = orjson.OPT_SORT_KEYS
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT: Final = _Absent()


def compare(
    reference: Sequence[Event],
    subject: Sequence[Event],
    *,
    reference_status: int | None = None,
    subject_status: int | None = None,
    reference_timed_out: bool = False,
    subject_timed_out: bool = False,
    error_types: Collection[str] = (),
) -> Comparison:
    """Compare the subject's sequence with the reference's, both already normalised.

    The sequences are aligned by event type with a longest common subsequence, not index
    by index, so one lost event is one divergence rather than a cascade; a missing and an
    extra event that are the same event moved become one ``order`` divergence. Error
    events (``Event.error`` set, or a type in ``error_types``, such as a backend's own
    ``"error"``) are reported as ``error`` and kept out of the alignment, so they are
    never also missing or extra. A side that timed out sent a truncated prefix: the
    other side's events past the last aligned pair are not reported as missing (or
    extra); one ``timeout`` divergence says how many went uncompared instead.

    Payloads are compared as JSON values: object key order does not matter, ``1``
    equals ``1.0``, but ``true`` never equals ``1``. The equal case, by far the most
    common, takes a fast path: same length, same types, and payloads equal by Python's
    comparison and by orjson's canonical bytes, all at C speed. Divergences come in the
    order of the sequences: ``status`` first, ``timeout`` last."""
    if (
        reference_status == subject_status
        and not reference_timed_out
        and not subject_timed_out
        and len(reference) == len(subject)
        and _all_same(reference, subject, error_types)
    ):
        return MATCHED
    return _Comparer(reference, subject, error_types).run(
        reference_status, subject_status, reference_timed_out, subject_timed_out
    )


def _all_same(
    reference: Sequence[Event], subject: Sequence[Event], error_types: Collection[str]
) -> bool:
    for a, b in zip(reference, subject, strict=True):
        if a.type != b.type or a.error is not None or b.error is not None:
            return False
        if not _payloads_equal(a.data, b.data):
            return False
    return not error_types or all(event.type not in error_types for event in reference)


def _payloads_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal as JSON values? Python's ``!=`` rules out most differences at C speed (what
    it finds different differs as JSON too); canonical bytes then confirm equality, since
    Python also finds ``True == 1``; when those differ (``1`` and ``1.0``, or a payload
    orjson cannot encode), the path-by-path walk has the last word."""
    try:
        if a != b:
            return False
    except RecursionError:  # nesting deeper than Python compares
        return not payload_differences(a, b)
    try:
        if orjson.dumps(a, option=_SORTED) == orjson.dumps(b, option=_SORTED):
            return True
    except TypeError:  # orjson.JSONEncodeError is one
        pass
    return not payload_differences(a, b)


class _Comparer:
    """The slow path: alignment and classification for sequences that differ."""

    def __init__(
        self, reference: Sequence[Event], subject: Sequence[Event], error_types: Collection[str]
    ) -> None:
        self.reference = reference
        self.subject = subject
        self.error_types = error_types
        self.any_errors = False

    def is_error(self, event: Event) -> bool:
        return event.error is not None or event.type in self.error_types

    def run(
        self,
        reference_status: int | None,
        subject_status: int | None,
        reference_timed_out: bool,
        subject_timed_out: bool,
    ) -> Comparison:
        out: list[Divergence] = []
        if (
            reference_status is not None
            and subject_status is not None
            and reference_status != subject_status
        ):
            detail = f"reference status {reference_status}, subject status {subject_status}"
            out.append(Divergence(DivergenceKind.STATUS, None, None, None, (), detail))

        ref = [i for i, event in enumerate(self.reference) if not self.is_error(event)]
        sub = [j for j, event in enumerate(self.subject) if not self.is_error(event)]
        self.any_errors = len(ref) < len(self.reference) or len(sub) < len(self.subject)
        types_ref = [self.reference[i].type for i in ref]
        types_sub = [self.subject[j].type for j in sub]
        steps = [
            (None if a is None else ref[a], None if b is None else sub[b])
            for a, b in _align(types_ref, types_sub)
        ]

        # A timed-out side is a prefix: the other side's tail past the last aligned pair
        # never had the chance to match, so it is counted in the timeout, not reported.
        unseen_ref: list[int] = []
        unseen_sub: list[int] = []
        if subject_timed_out or reference_timed_out:
            last_pair = max(
                (k for k, (i, j) in enumerate(steps) if i is not None and j is not None),
                default=-1,
            )
            tail = steps[last_pair + 1 :]
            if subject_timed_out:
                unseen_ref = [i for i, _ in tail if i is not None]
            if reference_timed_out:
                unseen_sub = [j for _, j in tail if j is not None]
        hidden = set(unseen_ref), set(unseen_sub)

        missing = [i for i, j in steps if j is None and i is not None and i not in hidden[0]]
        extra = [j for i, j in steps if i is None and j is not None and j not in hidden[1]]
        moved_to = self.moves(missing, extra) if missing and extra else {}
        moved = set(moved_to.values())

        # Divergences are listed by where they occur: each step of the alignment has a place.
        placed: list[tuple[float, Divergence]] = []
        for k, (i, j) in enumerate(steps):
            found: Divergence | None = None
            if i is not None and j is not None:
                found = self.payload(i, j)
            elif i is not None:
                if i in moved_to:
                    found = self.moved(i, moved_to[i])
                elif i not in hidden[0]:
                    found = self.missing(i)
            elif j is not None and j not in moved and j not in hidden[1]:
                found = self.extra(j)
            if found is not None:
                placed.append((k, found))
        if self.any_errors:
            placed += self.errors(steps)
        placed.sort(key=lambda item: item[0])
        out.extend(divergence for _, divergence in placed)

        if subject_timed_out:
            out.append(self.timeout("subject", "reference", len(self.subject), unseen_ref))
        if reference_timed_out:
            out.append(self.timeout("reference", "subject", len(self.reference), unseen_sub))
        return Comparison(tuple(out))

    def moves(self, missing: list[int], extra: list[int]) -> dict[int, int]:
        """Pair each missing event with a moved copy of it among the extra ones. Payload
        comparisons are capped: past the cap, long sequences keep missing and extra."""
        by_type: dict[str, list[int]] = {}
        for j in extra:
            by_type.setdefault(self.subject[j].type, []).append(j)
        moved_to: dict[int, int] = {}
        budget = _MAX_PAIRING_COMPARISONS
        for gone in missing:
            if budget <= 0:
                break
            event = self.reference[gone]
            candidates = by_type.get(event.type, [])
            for position, added in enumerate(candidates[:budget]):
                budget -= 1
                if _payloads_equal(event.data, self.subject[added].data):
                    moved_to[gone] = added
                    del candidates[position]
                    break
        return moved_to

    def errors(self, steps: list[tuple[int | None, int | None]]) -> list[tuple[float, Divergence]]:
        """Error divergences, each placed just before the first step past it on its side."""
        placed: list[tuple[float, Divergence]] = []
        sides = ((0, "reference", self.reference), (1, "subject", self.subject))
        for column, side, events in sides:
            stepped = [(k, step[column]) for k, step in enumerate(steps)]
            on_side = [(k, index) for k, index in stepped if index is not None]
            positions = [index for _, index in on_side]
            for index, event in enumerate(events):
                if self.is_error(event):
                    after = bisect.bisect_left(positions, index)
                    k = on_side[after][0] if after < len(on_side) else len(steps)
                    placed.append((k - 0.5, self.error(side, index)))
        return placed

    def error(self, side: str, index: int) -> Divergence:
        event = (self.reference if side == "reference" else self.subject)[index]
        reason = event.error or _render(event.data.get("error", event.type))
        detail = f"{side} event {index} is an error: {reason}"
        at_ref, at_sub = (index, None) if side == "reference" else (None, index)
        return Divergence(DivergenceKind.ERROR, at_ref, at_sub, event.type, (), detail)

    def payload(self, i: int, j: int) -> Divergence | None:
        a, b = self.reference[i], self.subject[j]
        if _payloads_equal(a.data, b.data):
            return None
        differences = payload_differences(a.data, b.data)
        if not differences:
            return None
        shown = "; ".join(
            f"{path}: {_render(left)} vs {_render(right)}"
            for path, left, right in differences[:_DETAIL_PATHS]
        )
        if len(differences) > _DETAIL_PATHS:
            shown += f"; and {len(differences) - _DETAIL_PATHS} more"
        paths = tuple(path for path, _, _ in differences)
        detail = f"{a.type} differs (reference {i}, subject {j}): {shown}"
        return Divergence(DivergenceKind.PAYLOAD, i, j, a.type, paths, detail)

    def moved(self, i: int, j: int) -> Divergence:
        kind = self.reference[i].type
        detail = f"{kind} moved from reference position {i} to subject position {j}"
        return Divergence(DivergenceKind.ORDER, i, j, kind, (), detail)

    def missing(self, i: int) -> Divergence:
        kind = self.reference[i].type
        detail = f"{kind} at reference position {i} has no counterpart in the subject"
        return Divergence(DivergenceKind.MISSING, i, None, kind, (), detail)

    def extra(self, j: int) -> Divergence:
        kind = self.subject[j].type
        detail = f"{kind} at subject position {j} has no counterpart in the reference"
        return Divergence(DivergenceKind.EXTRA, None, j, kind, (), detail)

    def timeout(self, side: str, other: str, length: int, unseen: list[int]) -> Divergence:
        detail = f"the {side} timed out after {length} events"
        if unseen:
            detail += f"; {len(unseen)} {other} events after it were not compared"
        first = unseen[0] if unseen else None
        at_ref, at_sub = (first, length) if side == "subject" else (length, first)
        return Divergence(DivergenceKind.TIMEOUT, at_ref, at_sub, None, (), detail)


def _align(a: list[str], b: list[str]) -> Iterator[tuple[int | None, int | None]]:
    """The alignment as steps in order: (i, j) a pair, (i, None) only in ``a``,
    (None, j) only in ``b``; pairs have equal types and form a longest common
    subsequence (exactly for short sequences, heuristically beyond)."""
    n, m = len(a), len(b)
    start = 0
    while start < n and start < m and a[start] == b[start]:
        start += 1
    end_a, end_b = n, m
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    for k in range(start):
        yield k, k
    middle_a, middle_b = a[start:end_a], b[start:end_b]
    if len(middle_a) * len(middle_b) <= _EXACT_ALIGNMENT_CELLS:
        middle = _lcs_steps(middle_a, middle_b)
    else:
        middle = _difflib_steps(middle_a, middle_b)
    for x, y in middle:
        yield (None if x is None else x + start), (None if y is None else y + start)
    for k in range(n - end_a):
        yield end_a + k, end_b + k


def _lcs_steps(a: list[str], b: list[str]) -> Iterator[tuple[int | None, int | None]]:
    n, m = len(a), len(b)
    # longest[i][j]: the LCS length of a[i:] and b[j:].
    longest = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = longest[i], longest[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = below[j + 1] + 1 if a[i] == b[j] else max(below[j], row[j + 1])
    i = j = 0
    while i < n and j < m:
        if a[i] == b[j]:
            yield i, j
            i += 1
            j += 1
        elif longest[i + 1][j] >= longest[i][j + 1]:
            yield i, None
            i += 1
        else:
            yield None, j
            j += 1
    for k in range(i, n):
        yield k, None
    for k in range(j, m):
        yield None, k


def _difflib_steps(a: list[str], b: list[str]) -> Iterator[tuple[int | None, int | None]]:
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    i = j = 0
    for block in matcher.get_matching_blocks():
        for k in range(i, block.a):
            yield k, None
        for k in range(j, block.b):
            yield None, k
        for k in range(block.size):
            yield block.a + k, block.b + k
        i, j = block.a + block.size, block.b + block.size


def payload_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every dotted path where two payloads differ as JSON values, sorted, with the value
    on each side (a side without the field has an ``absent`` marker)."""
    found: list[tuple[tuple[str | int, ...], Any, Any]] = []
    # An explicit stack: payloads may nest deeper than Python's recursion limit.
    stack: list[tuple[tuple[str | int, ...], Any, Any]] = [((), a, b)]
    while stack:
        path, left, right = stack.pop()
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            for key in left.keys() | right.keys():
                at_left, at_right = left.get(key, _ABSENT), right.get(key, _ABSENT)
                # Most fields are equal scalars of one type: settle those without a push.
                same_type = type(at_left) is type(at_right)
                if at_left is at_right or (
                    same_type and type(at_left) in _SCALARS and at_left == at_right
                ):
                    continue
                stack.append(((*path, key), at_left, at_right))
        elif isinstance(left, list) and isinstance(right, list):
            for index in range(max(len(left), len(right))):
                stack.append(
                    (
                        (*path, index),
                        left[index] if index < len(left) else _ABSENT,
                        right[index] if index < len(right) else _ABSENT,
                    )
                )
        elif not _same_scalar(left, right):
            found.append((path, left, right))
    # List indices sort as numbers: items.2 before items.10.
    found.sort(key=lambda difference: [(type(s) is str, s) for s in difference[0]])
    return [(".".join(map(str, path)), left, right) for path, left, right in found]


def _same_scalar(a: object, b: object) -> bool:
    if type(a) is type(b):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return False


def _render(value: object) -> str:
    if value is _ABSENT:
        return "absent"
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # not JSON, or nested too deep: reprlib bounds the depth
        text = reprlib.repr(value)
    if len(text) > _DETAIL_VALUE_CHARS:
        text = text[: _DETAIL_VALUE_CHARS - 1] + "…"
    return text
