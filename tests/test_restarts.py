"""When a dead worker is started again, and how its end is named (pure)."""

from __future__ import annotations

import pytest

from proxy.restarts import MAX_DELAY, STABLE_SECONDS, exit_cause, next_restart


@pytest.mark.parametrize(
    ("quick_deaths", "lived", "expected"),
    [
        # A worker that served a while: started again at once, the count starts afresh.
        (0, 3600.0, (0, 0.0)),
        (7, STABLE_SECONDS, (0, 0.0)),
        # One death soon after start is not yet a loop: at once too.
        (0, 0.1, (1, 0.0)),
        # Then the delay doubles from a quarter second...
        (1, 0.1, (2, 0.25)),
        (2, 0.1, (3, 0.5)),
        (3, 9.9, (4, 1.0)),
        (4, 0.0, (5, 2.0)),
        # ...up to its bound, however long the loop lasts.
        (8, 0.1, (9, MAX_DELAY)),
        (10_000, 0.1, (10_001, MAX_DELAY)),
    ],
)
def test_a_worker_is_started_again_at_once_unless_it_keeps_dying_soon_after_start(
    quick_deaths: int, lived: float, expected: tuple[int, float]
) -> None:
    assert next_restart(quick_deaths, lived) == expected


@pytest.mark.parametrize(
    ("returncode", "cause"),
    [
        (-11, "SIGSEGV"),
        (-9, "SIGKILL"),
        (-6, "SIGABRT"),
        (0, "exit 0"),
        (1, "exit 1"),
        (-99, "signal 99"),
    ],
)
def test_how_a_worker_ended_is_named_by_its_signal_or_exit_status(
    returncode: int, cause: str
) -> None:
    assert exit_cause(returncode) == cause
