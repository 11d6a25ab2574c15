"""``strangler demo`` runs end to end on loopback: it ramps the rollout, shadows and
compares every exchange, injects a candidate defect and clears it, and exits 0 with a
summary that says what the comparisons saw before, during and after the defect."""

from __future__ import annotations

import asyncio
import io
import re

import pytest

from proxy.demo import run_demo


def _kinds(listing: str) -> dict[str, int]:
    """``missing 37, payload 13`` as a dict."""
    return {kind: int(n) for kind, n in re.findall(r"(\w+) (\d+)", listing)}


@pytest.fixture(scope="module")
def summary() -> tuple[int, str]:
    """One run of the demo for every test here: it takes a few seconds."""
    out = io.StringIO()
    status = asyncio.run(run_demo(duration=6.0, live=False, users=24, time_scale=0.1, out=out))
    return status, out.getvalue()


@pytest.fixture(scope="module")
def text(summary: tuple[int, str]) -> str:
    return summary[1]


def _line(text: str, pattern: str) -> re.Match[str]:
    found = re.search(pattern, text, re.M)
    assert found is not None, f"no line matches {pattern!r} in:\n{text}"
    return found


def _after(text: str, heading: str, pattern: str) -> re.Match[str]:
    """The first match of ``pattern`` after the line that starts with ``heading``."""
    return _line(text[_line(text, "^" + heading).end() :], pattern)


def test_the_demo_exits_0(summary: tuple[int, str]) -> None:
    assert summary[0] == 0


def test_the_demo_prints_the_proxy_metrics_and_divergence_urls(text: str) -> None:
    _line(text, r"^proxy\s+http://127\.0\.0\.1:\d+$")
    _line(text, r"^metrics\s+http://127\.0\.0\.1:\d+/metrics$")
    _line(text, r"^divergences\s+http://127\.0\.0\.1:\d+/api/divergences$")
    _line(text, r"^admin token\s+\S{16,}$")  # the divergences need it


def test_the_rollout_moves_new_work_to_the_candidate_step_by_step(text: str) -> None:
    rows = re.findall(
        r"^\s+(\d+) %\s+(\d+)/(\d+)\s+\(\s*\d+ %\)\s+(\d+)\s+([\d.]+) %\s+(\d+)\s+(\d+)\s+(\d+)$",
        text,
        re.M,
    )
    assert [int(r[0]) for r in rows] == [0, 10, 50, 100]
    by_step = {int(r[0]): r for r in rows}
    assert int(by_step[0][1]) == 0  # nobody is served by the candidate at 0 %
    assert float(by_step[0][4]) == 0.0
    assert float(by_step[100][4]) > 50.0  # new work moves to the candidate at 100 %
    assert all(int(r[3]) > 0 for r in rows)  # traffic flowed at every step


def test_every_step_compares_and_only_the_defect_step_mismatches(text: str) -> None:
    rows = re.findall(r"^\s+(\d+) %\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)   ", text, re.M)
    by_step = {int(r[0]): [int(n) for n in r[1:]] for r in rows}
    assert sorted(by_step) == [0, 10, 50, 100]
    for step, (compared, match, mismatch, _ignored, error) in by_step.items():
        assert compared > 0, f"no comparison at {step} %"
        assert error == 0
        assert match + mismatch <= compared
    assert by_step[0][2] == by_step[10][2] == 0
    assert by_step[50][2] > 0


def test_before_the_defect_the_normalised_noise_gives_no_mismatch(text: str) -> None:
    found = _line(text, r"^before the defect: (\d+) comparisons, (\d+) mismatches")
    assert int(found[1]) > 0
    assert int(found[2]) == 0


def test_the_lost_events_show_as_missing_and_break_the_contract_on_candidate(
    text: str,
) -> None:
    found = _line(text, r"^during the defect: (\d+) comparisons, (\d+) mismatches")
    assert int(found[2]) > 0
    kinds = _kinds(_after(text, "during the defect", r"^  divergences by kind: (.*)$")[1])
    assert kinds.get("missing", 0) > 0
    contract = _after(text, "during the defect", r"^  contract violations: (.*)$")[1]
    assert _kinds(contract)["candidate"] > 0
    assert _kinds(contract)["legacy"] == 0


def test_the_leaked_user_id_is_an_isolation_violation_withheld_from_clients(text: str) -> None:
    isolation = _after(text, "during the defect", r"^  isolation violations: (.*);")[1]
    assert _kinds(isolation)["candidate"] > 0
    assert _kinds(isolation)["legacy"] == 0
    reached = _after(text, "during the defect", r"another user's events that reached a user: (\d+)")
    assert int(reached[1]) == 0


def test_users_see_no_failure_outside_the_defect_window(text: str) -> None:
    found = _line(
        text, r"^failed exchanges users saw outside the defect window: before (\d+), after (\d+)$"
    )
    assert (int(found[1]), int(found[2])) == (0, 0)


def test_once_cleared_the_candidate_matches_again(text: str) -> None:
    found = _line(text, r"^after the defect, from the end .*: (\d+) comparisons, (\d+) mismatches$")
    assert int(found[1]) > 0
    assert int(found[2]) == 0
