"""Routing against the Unleash client specification and a real Unleash server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flags.document import parse_flags
from flags.evaluation import is_enabled
from flags.provider import FlagProvider
from flags.unleash import UnleashFlagProvider
from proxy.settings import Settings
from tests.proxy_harness import flags_document, running_proxy, write_flags
from tests.services_fixtures import UnleashAdmin, UnleashServer

ServerFactory = Callable[..., Awaitable[TestServer]]
SPEC_FILES = ("03-gradual-rollout-user-id-strategy.json", "10-flexible-rollout-strategy.json")
pytestmark = pytest.mark.services


@pytest.fixture
async def backend_url(aiohttp_server: ServerFactory) -> str:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


def spec_cases(spec: dict[str, Any]) -> Iterator[tuple[str, str, bool, str]]:
    for case in spec["tests"]:
        if "userId" in case["context"]:
            yield (
                case["toggleName"],
                case["context"]["userId"],
                case["expectedResult"],
                case["description"],
            )


def settings_for(
    backend_url: str, flags_file: Path, flag_names: list[str], **flags: Any
) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": 0},
        admin={"host": "127.0.0.1", "port": 0},
        backends={"legacy": backend_url, "candidate": backend_url},
        flags={"provider": "file", "file": flags_file, **flags},
        routes=[
            {"name": f"t{i}", "path": f"/t{i}", "protocol": "json", "flag": name}
            for i, name in enumerate(flag_names)
        ],
    )


@pytest.mark.parametrize("provider", ["file", "unleash-sdk-offline"])
@pytest.mark.parametrize("spec_file", SPEC_FILES)
async def test_the_client_specification_cases_with_a_user_id_hold_for_real_requests(
    client_spec_dir: Path, backend_url: str, tmp_path: Path, spec_file: str, provider: str
) -> None:
    spec = json.loads((client_spec_dir / spec_file).read_text())
    flags_file = write_flags(tmp_path / "flags.json", spec["state"])
    names = [feature["name"] for feature in spec["state"]["features"]]
    settings = settings_for(backend_url, flags_file, names)
    sdk: FlagProvider | None = None
    if provider != "file":
        # The official SDK, bootstrapped from the spec's state, its server unreachable.
        sdk = UnleashFlagProvider(
            url="http://127.0.0.1:9",
            client_token="unused",
            bootstrap_file=flags_file,
            refresh_interval=3600,
        )
    cases = list(spec_cases(spec))
    assert len(cases) >= 4
    async with running_proxy(settings, flags=sdk) as proxy, aiohttp.ClientSession() as client:
        for flag, user, expected, description in cases:
            route = f"/t{names.index(flag)}/anything"
            async with client.get(proxy.proxy_url + route, headers={"X-User-Id": user}) as resp:
                assert resp.status == 200
                backend = resp.headers["X-Strangler-Backend"]
            assert backend == ("candidate" if expected else "legacy"), description


async def eventually(check: Callable[[], bool], within: float = 15.0) -> None:
    """Wait for something outside the test's control (an SDK poll), boundedly."""
    for _ in range(int(within / 0.1)):
        if check():
            return
        await asyncio.sleep(0.1)
    assert check(), f"not true within {within} s"


async def test_the_unleash_provider_follows_the_server_and_keeps_candidate_users(
    unleash: UnleashServer,
    unleash_admin: UnleashAdmin,
    unleash_flag_name: str,
    backend_url: str,
    tmp_path: Path,
) -> None:
    flag = await asyncio.to_thread(unleash_admin.create_rollout_flag, 25, name=unleash_flag_name)
    await asyncio.to_thread(unleash_admin.wait_for_client_state, flag.name, rollout=25)
    # The bootstrap file says 0 %: the server's 25 % must win once the SDK has synced.
    bootstrap = write_flags(tmp_path / "flags.json", flags_document(flag.name, rollout=0))
    settings = settings_for(
        backend_url,
        bootstrap,
        [flag.name],
        provider="unleash",
        url=unleash.url,
        client_token=unleash.client_token,
        refresh_interval=1,
    )
    users = [f"user-{i}" for i in range(400)]
    expected_25 = {
        u for u in users if is_enabled(parse_flags(flags_document(flag.name, 25)), flag.name, u)
    }
    expected_50 = {
        u for u in users if is_enabled(parse_flags(flags_document(flag.name, 50)), flag.name, u)
    }

    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as client:

        async def candidates() -> set[str]:
            found = set()
            for user in users:
                headers = {"X-User-Id": user}
                async with client.get(proxy.proxy_url + "/t0/x", headers=headers) as resp:
                    assert resp.status == 200
                    if resp.headers["X-Strangler-Backend"] == "candidate":
                        found.add(user)
            return found

        assert proxy.flags.name == "unleash"
        await eventually(lambda: proxy.flags.rollout_percent(flag.name) == 25)
        on_25 = await candidates()
        assert on_25 == expected_25

        await asyncio.to_thread(unleash_admin.set_rollout, flag, 50)
        await eventually(lambda: proxy.flags.rollout_percent(flag.name) == 50)
        on_50 = await candidates()
        assert on_50 == expected_50
        assert on_25 <= on_50  # raising the percentage moved nobody back

        await asyncio.to_thread(unleash_admin.disable, flag.name)
        await eventually(lambda: proxy.flags.rollout_percent(flag.name) == 0)
        assert await candidates() == set()


async def test_the_unleash_provider_is_ready_from_its_bootstrap_while_the_server_is_down(
    backend_url: str, tmp_path: Path
) -> None:
    bootstrap = write_flags(tmp_path / "flags.json", flags_document("f", rollout=100))
    settings = settings_for(
        backend_url,
        bootstrap,
        ["f"],
        provider="unleash",
        url="http://127.0.0.1:9",
        client_token="default:development.x",
        refresh_interval=1,
    )
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.admin_url + "/readyz") as resp:
            assert resp.status == 200
        async with client.get(proxy.proxy_url + "/t0/x", headers={"X-User-Id": "u"}) as resp:
            assert resp.headers["X-Strangler-Backend"] == "candidate"
