"""What comparing one agent turn costs the proxy: decode, normalise and compare, timed with timeit.

One realistic five-event turn (``agent_started``, ``agent_thinking``, ``tool_executing``,
``tool_completed``, ``agent_completed``), shaped like the demo dispatcher's events (uuid
run and tool-call ids, an ISO timestamp, ``seq``, tool arguments and result, a thinking
text and an answer), is rendered twice as NDJSON, as legacy and candidate would send it:
the same turn with different ids, timestamps, duration and thinking text. One comparison
is what the proxy does once both sides of a shadowed exchange ended: each side's lines
fed to an ``NdjsonDecoder`` one chunk per line (as the backend wrote them), both
sequences normalised with the demo route's rules, and ``compare`` on the two. The
contract check of both sequences, which the proxy also runs per exchange, is timed
apart, as are a mismatching turn (a changed tool result: the slow path that names the
field) and each step alone, so the report says where the time goes.

Pure CPU, no I/O beyond printing: ``python bench/compare_cost.py`` prints a table;
``--json`` prints one ``BENCH_JSON {...}`` line for ``bench/run.py``. Each figure is
the median of ``--repeat`` timeit runs of ``--number`` calls, in microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from adapters import Contract, Event, NdjsonDecoder, Normaliser, compare

# The demo dispatcher's route rules (tests/shadow_harness.py): what legitimately differs
# between two runs of one turn.
RULES: dict[str, list[str]] = {
    "ignore": ["timestamp", "seq", "duration_ms", "*.duration_ms"],
    "canonical_ids": ["run_id", "tool_call_id"],
    "coalesce": ["agent_thinking"],
    "presence_only": ["text", "*.text"],
}
CONTRACT = "agent_started (agent_thinking | tool_executing tool_completed)* agent_completed"
TARGET_US = 50.0


def turn(seed: int, thought: str, result: dict[str, Any] | None = None) -> list[bytes]:
    """One five-event turn as NDJSON lines; ``seed`` sets everything that differs per run."""
    run_id = str(uuid.UUID(int=seed * 7919 + 1))
    call_id = str(uuid.UUID(int=seed * 104_729 + 3))
    user = "user-42-1337"
    hits = result or {
        "hits": [
            {
                "title": "Refund policy, part 1",
                "url": "https://docs.example.org/refund-policy/4211",
                "score": 0.97,
            },
            {
                "title": "Refund policy, part 2",
                "url": "https://docs.example.org/refund-policy/4212",
                "score": 0.86,
            },
        ]
    }
    events: list[dict[str, Any]] = [
        {"type": "agent_started", "prompt": "Find the refund policy"},
        {"type": "agent_thinking", "text": thought},
        {
            "type": "tool_executing",
            "tool_call_id": call_id,
            "tool": "search",
            "arguments": {"query": "find the refund policy", "limit": 2},
        },
        {
            "type": "tool_completed",
            "tool_call_id": call_id,
            "tool": "search",
            "result": hits,
            "duration_ms": round(100 + seed % 200 + 0.123, 3),
        },
        {
            "type": "agent_completed",
            "answer": "About Find the refund policy: 2 result(s) for 'find the refund policy'.",
            "tool_calls": 1,
        },
    ]
    lines = []
    for seq, event in enumerate(events):
        stamp = f"2026-11-24T23:{seed % 60:02}:{seq:02}.{seed % 1000:03}Z"
        document = {
            "type": event["type"],
            "user_id": user,
            "run_id": run_id,
            "seq": seq,
            "timestamp": stamp,
        }
        document.update(event)
        lines.append(orjson.dumps(document) + b"\n")
    return lines


def decode(lines: list[bytes]) -> list[Event]:
    decoder = NdjsonDecoder(event_type_field="type")
    events: list[Event] = []
    for line in lines:
        events += decoder.feed(line)
    return events + decoder.close()


def per_call_us(function: Callable[[], object], number: int, repeat: int) -> float:
    runs = timeit.Timer(function).repeat(repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6


def measure(number: int, repeat: int) -> dict[str, Any]:
    normaliser = Normaliser(**RULES)
    contract = Contract.parse(CONTRACT)
    legacy = turn(1, "Let me check which tool fits.")
    candidate = turn(2, "First I'll look at the request.")
    changed = turn(2, "First I'll look at the request.", {"hits": []})
    legacy_events, candidate_events = decode(legacy), decode(candidate)
    legacy_norm = normaliser.normalise(legacy_events)
    candidate_norm = normaliser.normalise(candidate_events)

    def comparison(subject: list[bytes]) -> bool:
        reference = normaliser.normalise(decode(legacy))
        other = normaliser.normalise(decode(subject))
        return compare(reference, other, reference_status=200, subject_status=200).matched

    if not comparison(candidate):
        raise SystemExit("the two renderings of one turn should match after normalisation")
    if comparison(changed):
        raise SystemExit("a changed tool result should not match")
    if not contract.check([e.type for e in legacy_events]).ok:
        raise SystemExit("the turn should follow the contract")

    def contracts() -> None:
        contract.check([e.type for e in legacy_events])
        contract.check([e.type for e in candidate_events])

    figures = {
        "match_us": per_call_us(lambda: comparison(candidate), number, repeat),
        "mismatch_us": per_call_us(lambda: comparison(changed), number, repeat),
        "decode_two_us": per_call_us(lambda: (decode(legacy), decode(candidate)), number, repeat),
        "normalise_two_us": per_call_us(
            lambda: (normaliser.normalise(legacy_events), normaliser.normalise(candidate_events)),
            number,
            repeat,
        ),
        "compare_us": per_call_us(lambda: compare(legacy_norm, candidate_norm), number, repeat),
        "contract_two_us": per_call_us(contracts, number, repeat),
    }
    return {
        **figures,
        "bytes_per_side": sum(len(line) for line in legacy),
        "events": len(legacy),
        "number": number,
        "repeat": repeat,
        "target_us": TARGET_US,
        "met": figures["match_us"] <= TARGET_US,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=5000, help="calls per timeit run")
    parser.add_argument("--repeat", type=int, default=7, help="timeit runs; the median counts")
    parser.add_argument("--json", action="store_true", help="one BENCH_JSON line")
    args = parser.parse_args(argv)
    result = measure(args.number, args.repeat)
    if args.json:
        print("BENCH_JSON " + orjson.dumps(result).decode())
        return 0
    print(f"one five-event turn, {result['bytes_per_side']} bytes of NDJSON per side")
    for key, label in (
        ("match_us", "decode + normalise + compare, matching turn"),
        ("mismatch_us", "decode + normalise + compare, changed tool result"),
        ("decode_two_us", "  decode both sides"),
        ("normalise_two_us", "  normalise both sides"),
        ("compare_us", "  compare (matching)"),
        ("contract_two_us", "contract check of both sides"),
    ):
        print(f"{label:<52} {result[key]:7.1f} µs")
    print(f"target <= {TARGET_US:g} µs: {'met' if result['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
