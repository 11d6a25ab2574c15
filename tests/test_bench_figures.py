"""How the benchmark turns its runs into the ratios its targets are judged on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("strangler_bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def run(bench: Any, path: str, rate: float, round_: int, workload: str = "ndjson") -> Any:
    return bench.Measurement(workload=workload, path=path, unit="req/s", rate=rate, round=round_)


def test_each_round_is_compared_with_itself_then_the_median_taken(bench: Any) -> None:
    # Strangler is 10 % slower than nginx in two rounds (the machine slower in round 1
    # than in round 0), and 12 % faster in round 2. The ratio of the median runs pairs
    # strangler's round 0 with nginx's round 2 and reads 1.06; the median of the rounds'
    # own ratios reads 0.9.
    rounds = [
        run(bench, "nginx-w1", 20_000, 0),
        run(bench, "strangler", 18_000, 0),
        run(bench, "nginx-w1", 14_000, 1),
        run(bench, "strangler", 12_600, 1),
        run(bench, "nginx-w1", 17_000, 2),
        run(bench, "strangler", 19_040, 2),
    ]
    medians = bench.median_measurements(rounds)
    against_medians = bench.ratio(
        bench.find(medians, "ndjson", "strangler"), bench.find(medians, "ndjson", "nginx-w1")
    )
    assert against_medians == pytest.approx(18_000 / 17_000)
    assert bench.round_ratios(rounds, "ndjson", "strangler", "nginx-w1") == pytest.approx(
        [0.9, 0.9, 1.12]
    )
    assert bench.paired_ratio(medians, rounds, "ndjson", "strangler", "nginx-w1") == (
        pytest.approx(0.9)
    )


def test_a_round_missing_one_side_is_left_out(bench: Any) -> None:
    rounds = [
        run(bench, "direct", 100.0, 0),
        run(bench, "strangler", 70.0, 0),
        run(bench, "strangler", 10.0, 1),  # direct failed in this round
        run(bench, "direct", 0.0, 2),  # a zero rate is no denominator
        run(bench, "strangler", 5.0, 2),
        run(bench, "direct", 100.0, 3, workload="json"),  # another workload
        run(bench, "strangler", 1.0, 3, workload="json"),
    ]
    assert bench.round_ratios(rounds, "ndjson", "strangler", "direct") == [0.7]
    assert bench.paired_ratio([], rounds, "ndjson", "strangler", "direct") == 0.7


def test_without_rounds_the_medians_are_compared(bench: Any) -> None:
    medians = [run(bench, "strangler", 90.0, -1), run(bench, "nginx", 100.0, -1)]
    assert bench.paired_ratio(medians, [], "ndjson", "strangler", "nginx") == 0.9
    assert bench.paired_ratio(medians, [], "ndjson", "strangler", "direct") is None


def test_targets_carry_the_paired_ratio_and_each_rounds_figure(bench: Any) -> None:
    rounds = []
    for number, (nginx, strangler) in enumerate([(100.0, 95.0), (60.0, 54.0), (90.0, 72.0)]):
        rounds += [
            run(bench, "nginx-w1", nginx, number),
            run(bench, "strangler", strangler, number),
            run(bench, "direct", 2 * nginx, number),
        ]
    medians = bench.median_measurements(rounds)
    rows = bench.evaluate_targets(medians, rounds, ["strangler"], {"strangler": "nginx-w1"})
    ndjson = next(r for r in rows if r["target"] == "ndjson_vs_nginx")
    assert ndjson["against"] == "nginx-w1"
    assert ndjson["rounds"] == pytest.approx([0.95, 0.9, 0.8])
    assert ndjson["value"] == pytest.approx(0.9)
    assert ndjson["met"] is True  # 0.9 is the threshold; the ratio of medians says 0.8
    table = bench.comparisons(medians, rounds, {"strangler": "nginx-w1"})
    row = next(r for r in table if r["path"] == "strangler")
    assert row["vs_nginx"] == pytest.approx(0.9)
    assert row["vs_direct"] == pytest.approx(0.45)


def test_each_strangler_is_compared_with_the_nginx_running_as_many_workers(bench: Any) -> None:
    paths = [
        bench.PathInfo("direct", "direct"),
        bench.PathInfo("nginx-w1", "nginx (1 worker)", processes=1),
        bench.PathInfo("nginx", "nginx (2 workers)", processes=2),
        bench.PathInfo("strangler", "strangler (1 worker)", workers=1),
        bench.PathInfo("strangler-w2", "strangler (2 workers)", workers=2),
        bench.PathInfo("strangler-w4", "strangler (4 workers)", workers=4),
    ]
    assert bench.nginx_peers(paths) == {
        "strangler": "nginx-w1",
        "strangler-w2": "nginx",
        "strangler-w4": "nginx",  # no nginx ran four workers: the one per CPU
    }
