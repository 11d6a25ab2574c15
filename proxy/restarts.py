"""When a worker process that died is started again, and how its end is told (pure).

A worker that ran for a while and died is started again at once: the proxy must serve
within a second of a crash. One that dies again soon after starting (a crash loop:
a poisonous input repeated, a resource gone) is started again after a delay that
doubles each time, up to ``MAX_DELAY``, so that a loop never spins the CPU; a run that
lasts ``STABLE_SECONDS`` resets the count.
"""

from __future__ import annotations

import signal

STABLE_SECONDS = 10.0
FIRST_BACKOFF = 0.25
MAX_DELAY = 30.0


def next_restart(quick_deaths: int, lived: float) -> tuple[int, float]:
    """The count of quick deaths in a row after this one, and the delay before restarting.

    ``quick_deaths`` counts the deaths in a row before this one that each came within
    ``STABLE_SECONDS`` of their start; ``lived`` is how long the dead process ran.
    The first quick death restarts at once too (one crash is not a loop).
    """
    if lived >= STABLE_SECONDS:
        return 0, 0.0
    quick = quick_deaths + 1
    if quick == 1:
        return quick, 0.0
    doublings = min(quick - 2, 16)  # bounded: a float of 2 ** 10000 overflows
    return quick, min(MAX_DELAY, FIRST_BACKOFF * 2**doublings)


def exit_cause(returncode: int) -> str:
    """``SIGSEGV`` for a process killed by a signal, ``exit 1`` for one that exited.

    ``returncode`` is as ``os.waitstatus_to_exitcode`` gives it: negative for a signal.
    The answer is a metric label: a small, fixed set of values.
    """
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"
