"""User ids: bucketed exactly as Unleash does, and one that is not UTF-8 stops no worker.

A user id header whose bytes are not UTF-8 (``X-User-Id: a\\x80``) counts as no user id:
legacy serves, the request is relayed as it came, it is never bucketed, and
``strangler_invalid_user_ids_total`` counts it. murmur3's binding crashes the process when
handed a str with lone surrogates (how such bytes decode with surrogate escapes), so the
checks that could crash run in processes of their own: a crash fails the test, it does not
end the test run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from UnleashClient.utils import normalized_hash as sdk_normalized_hash

from flags.evaluation import is_utf8_text, normalized_hash
from tests.proxy_harness import flags_document, strangler_process, write_flags
from tests.raw_http import Seen, backend_app, bounded, read_head

ServerFactory = Callable[..., Awaitable[TestServer]]
REPO = Path(__file__).resolve().parent.parent
NOT_UTF8 = b"a\x80"

# --- the bucket is Unleash's ----------------------------------------------------------


# Hypothesis' text() leaves out surrogates (category Cs): every id it draws is valid.
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user_id=st.text(min_size=1, max_size=64), group_id=st.text(max_size=32))
def test_every_valid_unicode_user_id_gets_the_unleash_sdks_own_bucket(
    user_id: str, group_id: str
) -> None:
    assert is_utf8_text(user_id)
    assert normalized_hash(user_id, group_id) == sdk_normalized_hash(user_id, group_id)


NON_ASCII_IDS = ["é", "zoë-ünal", "日本語ユーザー", "👩‍💻", "Ωμέγα", "مرحبا", "\u00a0", "a\u0301"]


@pytest.mark.parametrize("user_id", NON_ASCII_IDS)
def test_a_non_ascii_user_id_gets_the_unleash_sdks_own_bucket(user_id: str) -> None:
    for group_id in ("ssot-dispatcher", "gr1", "组"):
        assert normalized_hash(user_id, group_id) == sdk_normalized_hash(user_id, group_id)


@pytest.mark.parametrize(
    ("text", "carried"),
    [
        ("user-1", True),
        ("", True),
        ("é日👩‍💻", True),
        ("a\udc80", False),  # b"a\x80" decoded with surrogate escapes
        ("\ud800", False),
        ("ok\udfffok", False),
    ],
)
def test_only_text_utf8_can_carry_is_a_user_id(text: str, carried: bool) -> None:
    assert is_utf8_text(text) is carried


# Each way a user id can reach murmur3, handed an id that was not UTF-8 on the wire, in a
# process of its own; each also decides for a valid id, which the flag (100 %) turns on.
ENTRY_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
entry, doc = sys.argv[1], Path(sys.argv[2])
bad, good = "a" + chr(0xDC80), "a"

def decide(is_enabled):
    return [is_enabled(bad), is_enabled(good)]

if entry == "normalized_hash":
    from flags.evaluation import normalized_hash
    try:
        normalized_hash(bad, "f")
        result = "hashed"
    except UnicodeEncodeError:
        result = "refused"
elif entry == "evaluation":
    from flags.document import parse_flags
    from flags.evaluation import is_enabled
    flags = parse_flags(doc.read_bytes())
    result = decide(lambda user: is_enabled(flags, "f", user))
elif entry == "file provider":
    from flags.file import FileFlagProvider
    async def main():
        provider = FileFlagProvider(doc)
        await provider.start()
        try:
            return decide(lambda user: provider.is_enabled("f", user))
        finally:
            await provider.close()
    result = asyncio.run(main())
else:
    from flags.unleash import UnleashFlagProvider
    provider = UnleashFlagProvider(
        url="http://127.0.0.1:9", client_token="x", bootstrap_file=doc, refresh_interval=3600
    )
    result = decide(lambda user: provider.is_enabled("f", user))
print(json.dumps(result))
"""


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("normalized_hash", "refused"),
        ("evaluation", [False, True]),
        ("file provider", [False, True]),
        ("unleash provider", [False, True]),
    ],
)
def test_no_way_to_murmur3_crashes_on_an_id_that_was_not_utf8(
    tmp_path: Path, entry: str, expected: object
) -> None:
    doc = write_flags(tmp_path / "flags.json", flags_document("f", rollout=100))
    done = subprocess.run(
        [sys.executable, "-c", ENTRY_SCRIPT, entry, str(doc)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{entry}: exit {done.returncode}\n{done.stderr}"
    assert json.loads(done.stdout.splitlines()[-1]) == expected


# --- over loopback, against a strangler process ----------------------------------------


def http_head(path: str, user: bytes) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: proxy.test\r\nX-User-Id: %b\r\n\r\n" % (path.encode(), user)


def upgrade_head(path: str, user: bytes) -> bytes:
    return (
        b"GET %b HTTP/1.1\r\nHost: proxy.test\r\nX-User-Id: %b\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), user)
    )


# (what, the route's metrics label, the request, the status it gets, the header's bytes
# as legacy gets them)
PATHS = [
    ("http on a route", "api", http_head("/api/x", NOT_UTF8), 200, NOT_UTF8),
    ("http on no route", "_unrouted", http_head("/elsewhere", NOT_UTF8), 200, NOT_UTF8),
    ("websocket, direct relay", "agent", upgrade_head("/ws/agent", NOT_UTF8), 101, NOT_UTF8),
    ("websocket, watched relay", "watched", upgrade_head("/ws/watched", NOT_UTF8), 101, NOT_UTF8),
]


def config(tmp_path: Path, legacy: str, candidate: str, provider: str) -> Path:
    write_flags(tmp_path / "flags.json", flags_document(rollout=100))
    unleash = (
        'provider = "unleash"\nurl = "http://127.0.0.1:9"\nclient_token = "x"\n'
        "refresh_interval = 3600\n"
        if provider == "unleash"
        else ""
    )
    path = tmp_path / "strangler.toml"
    path.write_text(
        f"""
[server]
port = 0
[admin]
port = 0
[backends]
legacy = "{legacy}"
candidate = "{candidate}"
[flags]
file = "flags.json"
{unleash}
[divergences]
path = "{tmp_path / "divergences.sqlite3"}"
[[routes]]
name = "api"
path = "/api"
protocol = "json"
flag = "ssot-dispatcher"
[[routes]]
name = "agent"
path = "/ws/agent"
protocol = "websocket"
flag = "ssot-dispatcher"
[[routes]]
name = "watched"
path = "/ws/watched"
protocol = "websocket"
flag = "ssot-dispatcher"
shadow = 1.0
"""
    )
    return path


async def status_and_backend(url: str, raw: bytes) -> tuple[int, str | None]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await bounded(asyncio.open_connection(host, int(port)))
    try:
        writer.write(raw)
        response = await read_head(reader)
        return response.status, response.get("X-Strangler-Backend")
    finally:
        writer.close()


def primary(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if "X-Strangler-Shadow" not in s.headers]


@pytest.mark.parametrize("provider", ["file", "unleash"])
async def test_an_id_that_is_not_utf8_is_served_by_legacy_on_every_path_and_the_proxy_survives(
    aiohttp_server: ServerFactory, tmp_path: Path, provider: str
) -> None:
    legacy_seen: list[Seen] = []
    candidate_seen: list[Seen] = []
    release = asyncio.Event()
    legacy = await aiohttp_server(backend_app(legacy_seen, release))
    candidate = await aiohttp_server(backend_app(candidate_seen, release))
    path = config(
        tmp_path,
        f"http://127.0.0.1:{legacy.port}",
        f"http://127.0.0.1:{candidate.port}",
        provider,
    )
    async with strangler_process(path) as proxy:
        for what, _, raw, status, relayed in PATHS:
            legacy_seen.clear()
            got = await status_and_backend(proxy.proxy_url, raw)
            await asyncio.sleep(0.05)
            assert proxy.proc.returncode is None, f"{what}: the proxy died\n{''.join(proxy.log)}"
            # The flag is at 100 %: only an id that counts as none stays on legacy.
            assert got == (status, "legacy"), what
            (seen,) = primary(legacy_seen)
            # Relayed as it came (the backend's aiohttp decodes it with surrogate escapes).
            assert seen.headers["X-User-Id"].encode("utf-8", "surrogateescape") == relayed, what
        # Valid ids, non-ASCII ones too, are bucketed (at 100 %: the candidate).
        for user in ("u-1", "zoë", "日本"):
            got = await status_and_backend(proxy.proxy_url, http_head("/api/x", user.encode()))
            assert got == (200, "candidate"), user
        expected = {label: 1.0 for _, label, _, _, _ in PATHS}
        counted: dict[str, float] = {}
        # Workers write their counts for the supervisor's /metrics once a second.
        for _ in range(50):
            async with aiohttp.ClientSession() as client:
                async with client.get(proxy.admin_url + "/metrics") as resp:
                    text = await resp.text()
            counted = {
                sample.labels["route"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "strangler_invalid_user_ids"
                for sample in family.samples
                if sample.name == "strangler_invalid_user_ids_total"
            }
            if counted == expected:
                break
            await asyncio.sleep(0.1)
    assert counted == expected
    release.set()


async def test_valid_non_ascii_ids_are_routed_as_the_unleash_sdk_buckets_them(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    legacy_seen: list[Seen] = []
    release = asyncio.Event()
    backend = await aiohttp_server(backend_app(legacy_seen, release))
    url = f"http://127.0.0.1:{backend.port}"
    path = config(tmp_path, url, url, "file")
    write_flags(tmp_path / "flags.json", flags_document(rollout=50))
    users = [f"{name}-{n}" for name in NON_ASCII_IDS for n in range(6)]
    # Both answers occur among them: the test tells a right bucket from a wrong one.
    assert {sdk_normalized_hash(user, "ssot-dispatcher") <= 50 for user in users} == {True, False}
    async with strangler_process(path) as proxy:
        for user in users:
            got = await status_and_backend(proxy.proxy_url, http_head("/api/x", user.encode()))
            on = sdk_normalized_hash(user, "ssot-dispatcher") <= 50
            assert got == (200, "candidate" if on else "legacy"), user
    release.set()
