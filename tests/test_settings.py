"""Configuration: TOML keys, environment overrides, and errors that name key and file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import ConfigError, load_settings
from tests.proxy_harness import flags_document, write_flags

GOOD = """
[server]
host = "127.0.0.1"
port = 8080

[admin]
host = "127.0.0.1"
port = 8081
token = "change-me"

[backends]
legacy = "http://127.0.0.1:9001"
candidate = "http://127.0.0.1:9002"

[identity]
header = "X-User-Id"

[flags]
provider = "file"
file = "flags.json"

[[routes]]
name = "agent"
path = "/ws/agent"
protocol = "websocket"
flag = "ssot-dispatcher"
shadow = 1.0
shadow_methods = ["GET", "HEAD", "OPTIONS"]
event_type_field = "type"
contract = "agent_started (agent_thinking | tool_executing tool_completed)* agent_completed"
user_field = "user_id"

[routes.compare]
ignore = ["timestamp", "*.duration_ms"]
canonical_ids = ["run_id", "tool_call_id"]
coalesce = ["agent_thinking"]
presence_only = ["text", "*.text"]

[routes.rollback]
window_seconds = 10
min_samples = 100
max_mismatch_rate = 0.01
max_error_rate = 0.02
max_latency_ratio = 1.2
failing_windows = 2

[routes.promotion]
steps = [1, 5, 25, 50, 100]
healthy_windows = 3
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_flags(tmp_path / "flags.json", flags_document())
    path = tmp_path / "strangler.toml"
    path.write_text(GOOD)
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return [str(p) for p in info.value.problems]


def test_the_documented_configuration_loads_with_every_key(config: Path) -> None:
    settings = load_settings(config, {})
    assert settings.server.port == 8080
    assert settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == "change-me"
    assert settings.backends.candidate == "http://127.0.0.1:9002"
    assert settings.flags.file == config.parent / "flags.json"
    route = settings.routes[0]
    assert route.compare.canonical_ids == ["run_id", "tool_call_id"]
    assert route.rollback.failing_windows == 2
    assert route.promotion is not None and route.promotion.steps == [1, 5, 25, 50, 100]


def test_every_key_can_be_overridden_from_the_environment(config: Path) -> None:
    settings = load_settings(
        config,
        {
            "STRANGLER_SERVER__PORT": "9999",
            "STRANGLER_ADMIN__TOKEN": "from-env",
            "STRANGLER_BACKENDS__CANDIDATE": "http://10.0.0.2:80",
            "STRANGLER_IDENTITY__HEADER": "X-Account",
            "STRANGLER_ROUTES": json.dumps(
                [{"name": "api", "path": "/api", "protocol": "json", "flag": "f"}]
            ),
        },
    )
    assert settings.server.port == 9999
    assert settings.server.host == "127.0.0.1"  # the rest of the section still comes from the file
    assert settings.admin.port == 8081
    assert settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == "from-env"
    assert settings.backends.candidate == "http://10.0.0.2:80"
    assert settings.identity.header == "X-Account"
    assert [r.name for r in settings.routes] == ["api"]


def test_secrets_are_not_shown_when_settings_are_printed(config: Path) -> None:
    settings = load_settings(config, {})
    assert "change-me" not in repr(settings)


def test_unknown_keys_are_refused_with_key_and_file(config: Path) -> None:
    config.write_text(GOOD.replace("port = 8080", "port = 8080\nprot = 1"))
    assert problems(config) == [f"{config}: server.prot: Extra inputs are not permitted"]
    config.write_text(GOOD.replace("max_mismatch_rate", "max_missmatch_rate"))
    assert any("routes[0].rollback.max_missmatch_rate" in p for p in problems(config))


def test_an_unknown_environment_key_is_refused_and_named(config: Path) -> None:
    found = problems(config, {"STRANGLER_SERVER__PROT": "1"})
    assert found == [
        "environment STRANGLER_SERVER__PROT: server.prot: Extra inputs are not permitted"
    ]
    found = problems(config, {"STRANGLER_SRVER__PORT": "1"})
    assert found == ["environment STRANGLER_SRVER__PORT: srver.port: unknown key"]


def test_a_bad_value_from_the_environment_names_the_variable(config: Path) -> None:
    found = problems(config, {"STRANGLER_SERVER__PORT": "eighty"})
    assert len(found) == 1
    assert found[0].startswith("environment STRANGLER_SERVER__PORT: server.port:")


@pytest.mark.parametrize(
    "url",
    ["ftp://host", "http://", "127.0.0.1:9001", "http://h:99999", "http://h/path", "http://h?q"],
)
def test_bad_backend_urls_are_refused(config: Path, url: str) -> None:
    config.write_text(GOOD.replace('"http://127.0.0.1:9002"', f'"{url}"'))
    found = problems(config)
    assert len(found) == 1 and found[0].startswith(f"{config}: backends.candidate:")


def test_a_missing_flags_file_is_refused(config: Path) -> None:
    (config.parent / "flags.json").unlink()
    assert problems(config) == [
        f"{config}: flags.file: no such file: {config.parent / 'flags.json'}"
    ]


def test_duplicate_route_names_and_overlapping_paths_are_refused_together(config: Path) -> None:
    extra = """
[[routes]]
name = "agent"
path = "/ws/agent/v2"
protocol = "websocket"
flag = "f"

[[routes]]
name = "other"
path = "/ws/agent"
protocol = "ndjson"
flag = "f"
"""
    config.write_text(GOOD + extra + "\n[server.extra]\n")
    found = problems(config)
    assert f"{config}: routes[1].name: duplicate route name 'agent' (also routes[0])" in found
    assert any(
        p.startswith(f"{config}: routes[1].path: path '/ws/agent/v2' overlaps") for p in found
    )
    assert any(p.startswith(f"{config}: routes[2].path: path '/ws/agent' overlaps") for p in found)


def test_invalid_toml_is_refused_with_the_file(config: Path) -> None:
    config.write_text("[server\nport = 1")
    found = problems(config)
    assert len(found) == 1 and found[0].startswith(f"{config}: (file): invalid TOML")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


def test_check_reports_every_error_and_exits_1(config: Path) -> None:
    config.write_text(
        GOOD.replace("port = 8080", "port = 8080\nprot = 1")
        .replace('"http://127.0.0.1:9002"', '"nope"')
        .replace('file = "flags.json"', 'file = "gone.json"')
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert all(line.startswith(f"error: {config}: ") for line in lines)
    assert "server.prot" in result.stderr
    assert "backends.candidate" in result.stderr
    assert "flags.file" in result.stderr


def test_check_accepts_a_good_configuration(config: Path) -> None:
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {config}")


def test_check_reports_a_malformed_flags_file(config: Path) -> None:
    (config.parent / "flags.json").write_text('{"features": [{"name": 3}]}')
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert "flags.file" in result.stderr and "features[0].name" in result.stderr


def test_run_refuses_a_bad_configuration_before_listening(config: Path) -> None:
    config.write_text(GOOD.replace('protocol = "websocket"', 'protocol = "grpc"'))
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}: routes[0].protocol" in result.stderr


@pytest.mark.parametrize("rollout", ["fifty", "125", "-1", "50.5"])
def test_check_refuses_a_rollout_that_is_not_an_integer_from_0_to_100(
    config: Path, rollout: str
) -> None:
    flags_file = write_flags(config.parent / "flags.json", flags_document(rollout=rollout))  # type: ignore[arg-type]
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'error: {config}: flags.file: {flags_file}: features[0] "ssot-dispatcher":'
        f' strategies[0].parameters.rollout: "{rollout}" is not an integer from 0 to 100'
        " (a string of digits, as Unleash serves it)"
    ]


def test_check_reports_a_route_whose_flag_is_not_in_the_flags_file(config: Path) -> None:
    write_flags(config.parent / "flags.json", flags_document("another-flag"))
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {config}: routes[0].flag: route 'agent': flag 'ssot-dispatcher' is not in"
        f" {config.parent / 'flags.json'}"
    ]


def test_run_refuses_an_unsound_flags_file_and_names_it(config: Path) -> None:
    write_flags(config.parent / "flags.json", flags_document(rollout="fifty"))  # type: ignore[arg-type]
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    assert 'flags.json: features[0] "ssot-dispatcher": strategies[0].parameters.rollout' in (
        result.stderr
    )
