"""A route's contract, a grammar over event types that every sequence, primary and
shadow, must follow: this module owns its syntax, its compilation to an automaton, and
the check of a sequence against it, which says where the sequence went wrong. It is
pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn

_OPERATORS: Final = frozenset("()|*+?")
_QUOTE: Final = '"'
_MAX_NESTING: Final = 64
_MAX_REMEMBERED: Final = 4096


class ContractError(ValueError):
    """Bad contract syntax; ``position`` is the 0-based offset in the text."""

    def __init__(self, reason: str, position: int, text: str) -> None:
        super().__init__(f"contract {text!r}, position {position}: {reason}")
        self.reason = reason
        self.position = position
        self.text = text


@dataclass(frozen=True, slots=True)
class ContractResult:
    """A check's outcome. When it fails, ``index`` is the first event at which the
    sequence stops being the start of a valid sentence (the sequence's length when it
    merely ends too early) and ``expected`` what the contract would have taken there."""

    ok: bool
    index: int | None = None
    expected: tuple[str, ...] = ()
    detail: str = ""


_VALID: Final = ContractResult(True)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "name", one of the operators, or "end"
    text: str
    position: int


@dataclass(eq=False, slots=True)
class _Automaton:
    """The NFA: per state its epsilon moves and at most one labelled move."""

    epsilon: list[list[int]] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    target: list[int] = field(default_factory=list)

    def add(self) -> int:
        self.epsilon.append([])
        self.label.append(None)
        self.target.append(-1)
        return len(self.label) - 1

    def closure(self, states: list[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(states)
        while stack:
            for following in self.epsilon[stack.pop()]:
                if following not in seen:
                    seen.add(following)
                    stack.append(following)
        return frozenset(seen)


_Fragment = tuple[int, int]  # start state, end state


@dataclass(frozen=True, slots=True)
class Contract:
    """A parsed contract; build it with ``Contract.parse``.

    The grammar is a regular expression over whole type names::

        agent_started (agent_thinking | tool_executing tool_completed)* agent_completed

    Names stand for themselves, whitespace separates a sequence, ``|`` separates
    alternatives (it binds loosest), parentheses group, and postfix ``*``, ``+`` and ``?``
    repeat the item before them. A name is any run of characters other than whitespace and
    ``( ) | * + ? "``; a name holding those can be written in double quotes (``"a|b"``).
    ``Contract.parse`` raises ``ContractError`` with the position of bad syntax.

    It compiles to a Thompson NFA whose state sets are determinised as the checks meet them
    (and remembered, up to a bound), so a check costs a dictionary look-up per event,
    whatever the grammar, with no backtracking; event names are never interpreted as
    syntax. Walking the events one by one also tells where a sequence stops being the
    beginning of any valid sentence and what the contract would have taken there.
    """

    text: str
    names: frozenset[str] = field(compare=False)
    _automaton: _Automaton = field(repr=False, compare=False)
    _start: frozenset[int] = field(repr=False, compare=False)
    _accept: int = field(repr=False, compare=False)
    # Determinised moves met so far: (state set, name) -> state set. A cache only.
    _moves: dict[tuple[frozenset[int], str], frozenset[int]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def parse(cls, text: str) -> Contract:
        automaton = _Automaton()
        parser = _Parser(text, automaton)
        start, accept = parser.parse()
        return cls(text, frozenset(parser.names), automaton, automaton.closure([start]), accept)

    def check(self, types: Sequence[str]) -> ContractResult:
        """Whether the sequence of event types is a sentence of the contract."""
        states = self._start
        for index, name in enumerate(types):
            following = self._move(states, name) if name in self.names else frozenset()
            if not following:
                expected = self._expected(states)
                if name in self.names:
                    detail = f"event {index} is {name!r}, but the contract expects"
                else:
                    detail = f"event {index} is {name!r}, a type the contract does not know;"
                    detail += " it expects"
                detail += f" {_choice(expected)} there"
                return ContractResult(False, index, expected, detail)
            states = following
        if self._accept in states:
            return _VALID
        expected = self._expected(states)
        if types:
            detail = f"the sequence ends after {len(types)} events, but the contract expects"
            detail += f" {_choice(expected)} next"
        else:
            detail = f"the sequence is empty, but the contract expects {_choice(expected)} first"
        return ContractResult(False, len(types), expected, detail)

    @property
    def terminal_types(self) -> frozenset[str]:
        """Event types that end every sentence they appear in (``agent_completed`` in the
        demo grammar): after one, the contract accepts and expects nothing more. A turn
        that breaks the contract still ends at one of them."""
        automaton = self._automaton
        verdict: dict[str, bool] = {}
        for state, label in enumerate(automaton.label):
            if label is None:
                continue
            after = automaton.closure([automaton.target[state]])
            ends = self._accept in after and not self._expected(after)
            verdict[label] = verdict.get(label, True) and ends
        return frozenset(name for name, ends in verdict.items() if ends)

    def finished(self, types: Sequence[str]) -> bool:
        """True when the sequence is a complete sentence that no further event can extend.

        A WebSocket turn ends there (``agent_completed`` in the demo grammar) without
        waiting for an idle timeout.
        """
        states = self._start
        for name in types:
            if name not in self.names:
                return False
            states = self._move(states, name)
            if not states:
                return False
        return self._accept in states and not self._expected(states)

    def _move(self, states: frozenset[int], name: str) -> frozenset[int]:
        key = (states, name)
        known = self._moves.get(key)
        if known is not None:
            return known
        automaton = self._automaton
        targets = [automaton.target[s] for s in states if automaton.label[s] == name]
        following = automaton.closure(targets)
        if len(self._moves) < _MAX_REMEMBERED:
            self._moves[key] = following
        return following

    def _expected(self, states: frozenset[int]) -> tuple[str, ...]:
        labels = self._automaton.label
        return tuple(sorted({label for s in states if (label := labels[s]) is not None}))


def _choice(names: tuple[str, ...]) -> str:
    if not names:
        return "nothing more"
    quoted = [repr(name) for name in names]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


class _Parser:
    """Recursive descent over the tokens, building NFA fragments as it goes:

    alternation := sequence ("|" sequence)*
    sequence    := repeated+
    repeated    := atom ("*" | "+" | "?")*
    atom        := name | "(" alternation ")"
    """

    def __init__(self, text: str, automaton: _Automaton) -> None:
        self.text = text
        self.automaton = automaton
        self.tokens = _tokens(text)
        self.at = 0
        self.depth = 0
        self.names: set[str] = set()

    def parse(self) -> tuple[int, int]:
        fragment = self.alternation()
        token = self.peek()
        if token.kind != "end":
            reason = "unbalanced ')'" if token.kind == ")" else f"unexpected {token.text!r}"
            self.fail(reason, token)
        start, end = fragment
        return start, end

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def fail(self, reason: str, token: _Token) -> NoReturn:
        raise ContractError(reason, token.position, self.text)

    def alternation(self) -> _Fragment:
        branches = [self.sequence()]
        while self.peek().kind == "|":
            self.take()
            branches.append(self.sequence())
        if len(branches) == 1:
            return branches[0]
        automaton = self.automaton
        start, end = automaton.add(), automaton.add()
        for branch_start, branch_end in branches:
            automaton.epsilon[start].append(branch_start)
            automaton.epsilon[branch_end].append(end)
        return start, end

    def sequence(self) -> _Fragment:
        token = self.peek()
        if token.kind not in ("name", "("):
            what = "the end" if token.kind == "end" else repr(token.text)
            self.fail(f"expected an event type or '(' but found {what}", token)
        start, end = self.repeated()
        while self.peek().kind in ("name", "("):
            following_start, following_end = self.repeated()
            self.automaton.epsilon[end].append(following_start)
            end = following_end
        return start, end

    def repeated(self) -> _Fragment:
        inner_start, inner_end = self.atom()
        while self.peek().kind in ("*", "+", "?"):
            operator = self.take().kind
            automaton = self.automaton
            start, end = automaton.add(), automaton.add()
            automaton.epsilon[start].append(inner_start)
            if operator != "+":
                automaton.epsilon[start].append(end)  # zero times
            if operator != "?":
                automaton.epsilon[inner_end].append(inner_start)  # once more
            automaton.epsilon[inner_end].append(end)
            inner_start, inner_end = start, end
        return inner_start, inner_end

    def atom(self) -> _Fragment:
        token = self.take()
        if token.kind == "name":
            self.names.add(token.text)
            automaton = self.automaton
            start, end = automaton.add(), automaton.add()
            automaton.label[start] = token.text
            automaton.target[start] = end
            return start, end
        # sequence() only calls here on a name or "(".
        self.depth += 1
        if self.depth > _MAX_NESTING:
            self.fail(f"parentheses nest deeper than {_MAX_NESTING}", token)
        fragment = self.alternation()
        closing = self.take()
        if closing.kind != ")":
            self.fail(f"expected ')' for the '(' opened at position {token.position}", closing)
        self.depth -= 1
        return fragment


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    at, length = 0, len(text)
    while at < length:
        char = text[at]
        if char.isspace():
            at += 1
        elif char in _OPERATORS:
            tokens.append(_Token(char, char, at))
            at += 1
        elif char == _QUOTE:
            close = text.find(_QUOTE, at + 1)
            if close < 0:
                raise ContractError("unterminated quoted name", at, text)
            if close == at + 1:
                raise ContractError("empty quoted name", at, text)
            tokens.append(_Token("name", text[at + 1 : close], at))
            at = close + 1
        else:
            start = at
            while at < length and not (
                text[at].isspace() or text[at] in _OPERATORS or text[at] == _QUOTE
            ):
                at += 1
            tokens.append(_Token("name", text[start:at], start))
    tokens.append(_Token("end", "", length))
    return tokens
