"""Flag documents, Unleash-compatible bucketing, and the file provider's reloads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flags.document import FlagsDocumentError, parse_flags
from flags.evaluation import is_enabled, normalized_hash, rollout_percent
from flags.file import MAX_DOCUMENT_BYTES, FileFlagProvider
from flags.unleash import UnleashFlagProvider
from proxy.routing import Backend, RouteTable, choose_backend
from proxy.settings import RouteSettings
from tests.proxy_harness import flags_document, make_settings, running_proxy, write_flags

FLAG = "ssot-dispatcher"


def test_the_bucket_is_murmur3_of_group_and_user_as_unleash_computes_it() -> None:
    # Values from the Unleash client specification's normalized-hash examples.
    assert normalized_hash("123", "gr1") == 73
    assert normalized_hash("999", "groupX") == 25


@pytest.mark.parametrize(
    ("strategy", "user", "expected"),
    [
        ({"name": "default"}, "anyone", True),
        ({"name": "userWithId", "parameters": {"userIds": "a, b,c"}}, "b", True),
        ({"name": "userWithId", "parameters": {"userIds": "a,b"}}, "z", False),
        ({"name": "flexibleRollout", "parameters": {"rollout": "100"}}, "u", True),
        ({"name": "flexibleRollout", "parameters": {"rollout": "0"}}, "u", False),
        (
            {
                "name": "flexibleRollout",
                "parameters": {"rollout": "100", "stickiness": "sessionId"},
            },
            "u",
            False,
        ),
        ({"name": "gradualRolloutUserId", "parameters": {"percentage": "100"}}, "u", True),
        # Defined by Unleash, but not by user: held off (no user routes by address).
        ({"name": "remoteAddress", "parameters": {"IPs": "127.0.0.1"}}, "u", False),
        (
            {
                "name": "default",
                "constraints": [{"contextName": "userId", "operator": "IN", "values": ["x"]}],
            },
            "x",
            True,
        ),
        (
            {
                "name": "default",
                "constraints": [
                    {"contextName": "userId", "operator": "IN", "values": ["x"], "inverted": True}
                ],
            },
            "x",
            False,
        ),
        (
            {
                "name": "default",
                "constraints": [
                    {
                        "contextName": "userId",
                        "operator": "STR_STARTS_WITH",
                        "values": ["BETA-"],
                        "caseInsensitive": True,
                    }
                ],
            },
            "beta-7",
            True,
        ),
    ],
)
def test_strategies_decide_as_unleash_does(
    strategy: dict[str, Any], user: str, expected: bool
) -> None:
    flags = parse_flags({"features": [{"name": FLAG, "enabled": True, "strategies": [strategy]}]})
    assert is_enabled(flags, FLAG, user) is expected


def test_a_disabled_or_missing_flag_is_off_and_an_enabled_flag_without_strategies_is_on() -> None:
    flags = parse_flags(
        {
            "features": [
                {"name": "off", "enabled": False, "strategies": [{"name": "default"}]},
                {"name": "bare", "enabled": True, "strategies": []},
            ]
        }
    )
    assert not is_enabled(flags, "off", "u")
    assert not is_enabled(flags, "missing", "u")
    assert is_enabled(flags, "bare", "u")
    assert rollout_percent(flags, "off") == 0
    assert rollout_percent(flags, "bare") == 100


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ({"features": {}}, "features"),
        ({"features": [{"enabled": True}]}, "features[0].name"),
        ({"features": [{"name": "a", "enabled": "yes"}]}, 'features[0] "a": enabled'),
        (
            {"features": [{"name": "a", "strategies": [{"parameters": {}}]}]},
            'features[0] "a": strategies[0].name',
        ),
        ({"features": [{"name": "a"}, {"name": "a"}]}, 'features[1] "a": name: duplicate'),
    ],
)
def test_a_malformed_document_is_refused_with_the_path_inside_it(
    document: dict[str, Any], where: str
) -> None:
    with pytest.raises(FlagsDocumentError, match=where.replace("[", r"\[").replace("]", r"\]")):
        parse_flags(document)


def test_no_user_id_means_legacy_even_at_100_percent() -> None:
    routes = RouteTable(
        [RouteSettings(name="agent", path="/ws/agent", protocol="websocket", flag=FLAG)]
    )
    route = routes.match("/ws/agent")
    flags = parse_flags(flags_document(rollout=100))
    assert choose_backend(route, None, lambda f, u: is_enabled(flags, f, u)) is Backend.LEGACY
    assert choose_backend(route, "", lambda f, u: is_enabled(flags, f, u)) is Backend.LEGACY
    assert choose_backend(route, "u", lambda f, u: is_enabled(flags, f, u)) is Backend.CANDIDATE
    assert choose_backend(None, "u", lambda f, u: True) is Backend.LEGACY


def test_routes_match_path_prefixes_on_segment_boundaries() -> None:
    routes = RouteTable(
        [
            RouteSettings(name="agent", path="/ws/agent/", protocol="websocket", flag=FLAG),
            RouteSettings(name="api", path="/api", protocol="json", flag=FLAG),
        ]
    )
    assert routes.match("/ws/agent") is routes.by_name["agent"]
    assert routes.match("/ws/agent/42") is routes.by_name["agent"]
    assert routes.match("/ws/agentx") is None
    assert routes.match("/api/v1") is routes.by_name["api"]
    assert routes.match("/apix") is None


USER_IDS = [f"user-{i}" for i in range(100_000)]


async def test_100000_users_at_25_percent_go_exactly_where_the_unleash_sdk_sends_them(
    tmp_path: Path,
) -> None:
    path = write_flags(tmp_path / "flags.json", flags_document(rollout=25))
    ours = FileFlagProvider(path)
    # The official SDK, bootstrapped from the same file, offline.
    sdk = UnleashFlagProvider(
        url="http://127.0.0.1:9", client_token="unused", bootstrap_file=path, refresh_interval=3600
    )
    await ours.start()
    try:
        theirs = {u for u in USER_IDS if sdk.is_enabled(FLAG, u)}
    finally:
        await ours.close()
    mine = {u for u in USER_IDS if ours.is_enabled(FLAG, u)}
    assert mine == theirs
    assert 24_000 < len(mine) < 26_000


def test_raising_the_percentage_never_moves_a_candidate_user_back() -> None:
    at_25 = parse_flags(flags_document(rollout=25))
    at_50 = parse_flags(flags_document(rollout=50))
    on_25 = {u for u in USER_IDS if is_enabled(at_25, FLAG, u)}
    on_50 = {u for u in USER_IDS if is_enabled(at_50, FLAG, u)}
    assert on_25 < on_50
    assert 49_000 < len(on_50) < 51_000


async def test_a_broken_flags_file_keeps_the_last_good_flags(tmp_path: Path) -> None:
    path = write_flags(tmp_path / "flags.json", flags_document(rollout=100))
    provider = FileFlagProvider(path, poll_interval=3600)
    await provider.start()
    try:
        assert provider.is_enabled(FLAG, "u")
        path.write_text('{"features": [ broken')
        assert provider.reload_if_changed() is False
        assert provider.reload_errors == 1
        assert provider.is_enabled(FLAG, "u")
        write_flags(path, flags_document(rollout=0))
        assert provider.reload_if_changed() is True
        assert not provider.is_enabled(FLAG, "u")
    finally:
        await provider.close()


async def test_a_missing_or_malformed_flags_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(FlagsDocumentError, match=r"missing\.json"):
        await FileFlagProvider(tmp_path / "missing.json").start()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"features": "nope"}))
    with pytest.raises(FlagsDocumentError, match=r"bad\.json: features"):
        await FileFlagProvider(bad).start()


async def test_no_request_fails_while_the_flags_file_is_rewritten(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    async def backend(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    path = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    routes = [{"name": "api", "path": "/api", "protocol": "json", "flag": FLAG}]
    settings = make_settings(url, url, path, routes=routes)
    statuses: list[int] = []
    backends: set[str] = set()
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as client:
        provider = proxy.flags
        assert isinstance(provider, FileFlagProvider)
        stop = asyncio.Event()

        async def traffic(worker: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                headers = {"X-User-Id": f"user-{worker}-{i % 50}"}
                async with client.get(proxy.proxy_url + "/api/x", headers=headers) as resp:
                    statuses.append(resp.status)
                    backends.add(resp.headers["X-Strangler-Backend"])

        workers = [asyncio.create_task(traffic(w)) for w in range(8)]
        for rollout in (10, 50, 100, 0, 25, 75, 100):
            reloaded = asyncio.create_task(provider.wait_for_reload())
            write_flags(path, flags_document(rollout=rollout))
            await reloaded
        stop.set()
        await asyncio.gather(*workers)
    assert len(statuses) > 50
    assert set(statuses) == {200}
    assert backends == {"legacy", "candidate"}
    assert provider.reloads == 7


def unsound_document(rollout: str = "fifty") -> dict[str, Any]:
    return flags_document(rollout=rollout)  # type: ignore[arg-type]


async def test_an_unsound_document_on_reload_keeps_the_last_good_flags_logged_and_counted_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refused: list[None] = []
    loaded: list[float] = []
    path = write_flags(tmp_path / "flags.json", flags_document(rollout=100))
    provider = FileFlagProvider(
        path,
        poll_interval=3600,
        on_invalid=lambda: refused.append(None),
        on_loaded=loaded.append,
    )
    await provider.start()
    try:
        assert provider.is_enabled(FLAG, "u") and len(loaded) == 1
        for rollout in ("fifty", "125"):
            write_flags(path, unsound_document(rollout))
            assert provider.reload_if_changed() is False
            assert provider.reload_if_changed() is False  # the same file: not again
            assert provider.is_enabled(FLAG, "u")  # 100 % still, not 0 %
            assert provider.rollout_percent(FLAG) == 100
        assert len(refused) == 2 and provider.reload_errors == 2
        assert len(loaded) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 2
        assert f'features[0] "{FLAG}": strategies[0].parameters.rollout: "fifty"' in errors[0]
        assert '"125" is not an integer from 0 to 100' in errors[1]
        assert "last good flags stay in force" in errors[0]
        write_flags(path, flags_document(rollout=0))
        assert provider.reload_if_changed() is True
        assert not provider.is_enabled(FLAG, "u") and len(loaded) == 2
    finally:
        await provider.close()


def oversized(path: Path) -> Path:
    """A features document over MAX_DOCUMENT_BYTES: sound JSON, padded by a description."""
    document = flags_document(rollout=0)
    document["features"][0]["description"] = "x" * MAX_DOCUMENT_BYTES
    path.write_text(json.dumps(document))
    return path


async def test_a_flags_document_over_the_size_bound_is_refused_before_it_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(FlagsDocumentError, match=r"big\.json: \d+ bytes, over the"):
        await FileFlagProvider(oversized(tmp_path / "big.json")).start()
    refused: list[None] = []
    path = write_flags(tmp_path / "flags.json", flags_document(rollout=100))
    provider = FileFlagProvider(path, poll_interval=3600, on_invalid=lambda: refused.append(None))
    await provider.start()
    try:
        oversized(path)
        assert provider.reload_if_changed() is False
        assert provider.reload_if_changed() is False  # reported once
        assert provider.is_enabled(FLAG, "u") and len(refused) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "over the" in errors[0]
        write_flags(path, flags_document(rollout=0))
        assert provider.reload_if_changed() is True
        assert not provider.is_enabled(FLAG, "u")
    finally:
        await provider.close()


async def test_an_unsound_file_refuses_to_start_unless_a_last_good_document_is_given(
    tmp_path: Path,
) -> None:
    path = write_flags(tmp_path / "flags.json", unsound_document())
    with pytest.raises(FlagsDocumentError, match=r'flags\.json: features\[0\] "ssot-dispatcher"'):
        await FileFlagProvider(path).start()
    # A worker started again while the file is unsound starts from the proxy's last good.
    refused: list[None] = []
    last_good = json.dumps(flags_document(rollout=100)).encode()
    provider = FileFlagProvider(path, fallback=last_good, on_invalid=lambda: refused.append(None))
    await provider.start()
    try:
        assert provider.ready and provider.is_enabled(FLAG, "u")
        assert len(refused) == 1
        assert provider.reload_if_changed() is False and len(refused) == 1
    finally:
        await provider.close()


async def test_the_unleash_provider_refuses_an_unsound_fetched_document_and_keeps_the_last_good(
    aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A loopback server speaking the client API: what it serves is what the SDK fetches.
    served = {"document": flags_document(rollout=100)}
    fetches: list[int] = []

    async def features(request: web.Request) -> web.Response:
        fetches.append(1)
        return web.json_response(served["document"])

    async def accepted(request: web.Request) -> web.Response:
        return web.Response(status=202)

    app = web.Application()
    app.router.add_get("/api/client/features", features)
    app.router.add_post("/api/client/{tail:.*}", accepted)
    server = await aiohttp_server(app)
    refused: list[None] = []
    bootstrap = write_flags(tmp_path / "flags.json", flags_document(rollout=0))
    provider = UnleashFlagProvider(
        url=f"http://127.0.0.1:{server.port}",
        client_token="token",
        refresh_interval=1,
        bootstrap_file=bootstrap,
        on_invalid=lambda: refused.append(None),
    )
    await provider.start()
    try:
        await until(lambda: provider.is_enabled(FLAG, "u"))
        served["document"] = unsound_document()
        seen = len(fetches)
        await until(lambda: len(fetches) >= seen + 2)  # refused, then fetched again
        assert provider.is_enabled(FLAG, "u")  # the SDK's engine kept the last good
        assert provider.rollout_percent(FLAG) == 100
        # Served again unchanged (this server sends no ETag): reported once.
        assert len(refused) == 1
        [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert f'features[0] "{FLAG}": strategies[0].parameters.rollout: "fifty"' in error
        served["document"] = flags_document(rollout=0)
        await until(lambda: not provider.is_enabled(FLAG, "u"))
    finally:
        await provider.close()


async def until(check: Any, within: float = 15.0) -> None:
    """Wait, boundedly, for what a background poll brings about."""
    for _ in range(int(within / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check(), f"not true within {within} s"


def test_an_unsound_unleash_bootstrap_file_refuses_to_start_unless_a_last_good_is_given(
    tmp_path: Path,
) -> None:
    bootstrap = write_flags(tmp_path / "flags.json", unsound_document("125"))
    offline = {"url": "http://127.0.0.1:9", "client_token": "unused", "refresh_interval": 3600}
    with pytest.raises(FlagsDocumentError, match=r'flags\.json: features\[0\] "ssot-dispatcher"'):
        UnleashFlagProvider(bootstrap_file=bootstrap, **offline)  # type: ignore[arg-type]
    refused: list[None] = []
    provider = UnleashFlagProvider(
        bootstrap_file=bootstrap,
        fallback=json.dumps(flags_document(rollout=100)).encode(),
        on_invalid=lambda: refused.append(None),
        **offline,  # type: ignore[arg-type]
    )
    assert provider.is_enabled(FLAG, "u") and provider.rollout_percent(FLAG) == 100
    assert len(refused) == 1
