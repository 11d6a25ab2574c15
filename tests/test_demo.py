"""``strangler demo`` runs end to end on loopback and exits 0 with a summary."""

from __future__ import annotations

import io
import re

from proxy.demo import run_demo


async def test_the_demo_steps_the_rollout_and_ends_with_a_summary() -> None:
    out = io.StringIO()
    status = await run_demo(duration=4.0, live=False, users=24, time_scale=0.1, out=out)
    text = out.getvalue()
    assert status == 0
    assert re.search(r"^proxy\s+http://127\.0\.0\.1:\d+$", text, re.M)
    assert re.search(r"^metrics\s+http://127\.0\.0\.1:\d+/metrics$", text, re.M)
    rows = re.findall(
        r"^\s+(\d+) %\s+(\d+)/(\d+)\s+\(\s*\d+ %\)\s+(\d+)\s+([\d.]+) %\s+(\d+)\s+(\d+)$",
        text,
        re.M,
    )
    assert [int(r[0]) for r in rows] == [0, 10, 50, 100]
    by_step = {int(r[0]): r for r in rows}
    assert float(by_step[0][4]) == 0.0  # nobody on the candidate at 0 %
    assert int(by_step[0][1]) == 0
    assert float(by_step[100][4]) > 50.0  # new work moves to the candidate at 100 %
    assert all(int(r[3]) > 0 for r in rows)  # traffic flowed at every step
    assert all(int(r[6]) == 0 for r in rows)  # and none of it failed
