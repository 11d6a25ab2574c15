"""The real-services fixtures work against the real servers: Unleash and Prometheus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pytest_aiohttp import AiohttpServer

if TYPE_CHECKING:
    # tests/conftest.py loads it as a plugin, so that pytest rewrites its asserts.
    from tests.services_fixtures import PrometheusLauncher, QueryResult, UnleashAdmin

pytestmark = pytest.mark.services


def test_a_flag_created_at_25_percent_is_served_by_the_client_api_with_rollout_25(
    unleash_admin: UnleashAdmin, unleash_flag_name: str
) -> None:
    flag = unleash_admin.create_rollout_flag(25, name=unleash_flag_name)

    feature = unleash_admin.wait_for_client_state(flag.name, enabled=True, rollout=25)

    [strategy] = feature["strategies"]
    assert strategy["name"] == "flexibleRollout"
    assert strategy["parameters"] == {
        "rollout": "25",
        "stickiness": "userId",
        "groupId": flag.name,
    }


def test_a_new_percentage_and_a_switch_off_reach_the_client_api(
    unleash_admin: UnleashAdmin, unleash_flag_name: str
) -> None:
    flag = unleash_admin.create_rollout_flag(5, name=unleash_flag_name)

    unleash_admin.set_rollout(flag, 50)
    unleash_admin.wait_for_client_state(flag.name, enabled=True, rollout=50)
    unleash_admin.disable(flag.name)
    unleash_admin.wait_for_client_state(flag.name, enabled=False, rollout=50)


@pytest.mark.parametrize("percent", [-1, 101, True, 12.5])
def test_a_percentage_outside_0_to_100_is_refused_before_reaching_the_server(
    unleash_admin: UnleashAdmin, percent: int
) -> None:
    with pytest.raises(ValueError, match="0 to 100"):
        unleash_admin.add_rollout("never-created", percent)


def test_the_client_specification_has_the_flexible_rollout_cases(client_spec_dir: Path) -> None:
    spec = json.loads((client_spec_dir / "10-flexible-rollout-strategy.json").read_text())

    assert spec["tests"], "the flexible rollout specification has no test cases"


async def test_prometheus_scrapes_a_loopback_metrics_endpoint_and_answers_queries(
    aiohttp_server: AiohttpServer, prometheus: PrometheusLauncher
) -> None:
    registry = CollectorRegistry()
    hits = Counter("harness_hits", "Hits counted by the harness test.", registry=registry)
    hits.inc(7)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    prom = prometheus([f"127.0.0.1:{server.port}"])

    def has_a_sample(result: QueryResult) -> bool:
        return len(result) == 1

    [sample] = await prom.wait_for_async("harness_hits_total", has_a_sample)

    assert sample["value"][1] == "7"
    assert sample["metric"]["job"] == "target0"
    assert sample["metric"]["instance"] == f"127.0.0.1:{server.port}"
