"""Pytest plugin for the real services that `make test` runs the suite with.

tests/services/run-with-services.sh starts PostgreSQL and an Unleash server on loopback
and describes them in STRANGLER_TEST_* environment variables; this module turns those into
session fixtures: the Unleash server with a small synchronous Admin API client, the
Unleash client specification folder, and a factory that starts a real Prometheus with the
scrape targets a test names (those are only known inside the test, so Prometheus is
started here rather than by the script). All of it is I/O. A fixture whose environment is
missing fails the test with a pointer to `make test`: these tests never skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

ENV_UNLEASH_URL = "STRANGLER_TEST_UNLEASH_URL"
ENV_UNLEASH_ADMIN_TOKEN = "STRANGLER_TEST_UNLEASH_ADMIN_TOKEN"
ENV_UNLEASH_CLIENT_TOKEN = "STRANGLER_TEST_UNLEASH_CLIENT_TOKEN"
ENV_CLIENT_SPEC_DIR = "STRANGLER_TEST_CLIENT_SPEC_DIR"
ENV_PROMETHEUS = "STRANGLER_TEST_PROMETHEUS"

JsonObject = dict[str, Any]
QueryResult = list[Any]


def require_env(name: str) -> str:
    """The value of a variable set by run-with-services.sh; fails the test when unset."""
    value = os.environ.get(name, "")
    if not value:
        pytest.fail(
            f"{name} is not set. Tests that use the real services (Unleash, PostgreSQL, "
            "Prometheus) run under `make test`, or under "
            "`tests/services/run-with-services.sh CMD` after tests/services/install.sh.",
            pytrace=False,
        )
    return value


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- Unleash --------------------------------------------------------------------------


class UnleashAdminError(RuntimeError):
    """The Unleash server refused an Admin or client API call."""


@dataclass(frozen=True)
class UnleashServer:
    """Where the test Unleash server is and the tokens that it was started with."""

    url: str
    admin_token: str
    client_token: str
    project: str = "default"
    environment: str = "development"  # the environment of client_token

    def admin(self, timeout: float = 5.0) -> UnleashAdmin:
        return UnleashAdmin(self, timeout=timeout)


@dataclass(frozen=True)
class RolloutFlag:
    """A flag with one flexibleRollout strategy, as created by UnleashAdmin."""

    name: str
    strategy_id: str


def validate_percent(percent: int) -> int:
    # Unleash itself accepts any rollout string, 250 or -1 included.
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"rollout percent must be an integer from 0 to 100, got {percent!r}")
    return percent


class UnleashAdmin:
    """Synchronous client for the parts of the Unleash Admin API that tests drive.

    Flags live in the server's project and environment (default, development). The
    client API reflects a change after up to about a second, so a test that needs the
    change visible calls wait_for_client_state instead of asserting at once. In an async
    test, run the blocking calls with asyncio.to_thread.
    """

    def __init__(self, server: UnleashServer, timeout: float = 5.0) -> None:
        self.server = server
        self.timeout = timeout

    # Names

    @staticmethod
    def unique_flag_name(prefix: str = "flag") -> str:
        """A flag name no other test uses: the prefix made URL-friendly, plus a random part."""
        stem = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-")[:60] or "flag"
        return f"{stem}-{uuid.uuid4().hex[:12]}"

    # Writes

    def create_flag(self, name: str) -> str:
        self._admin("POST", self._features_path(), {"name": name, "type": "release"})
        return name

    def add_rollout(self, flag: str, percent: int) -> RolloutFlag:
        """Adds a flexibleRollout strategy, sticky on userId, grouped by the flag name."""
        body = {
            "name": "flexibleRollout",
            "constraints": [],
            "parameters": {
                "rollout": str(validate_percent(percent)),  # a number is refused with 400
                "stickiness": "userId",
                "groupId": flag,
            },
        }
        created = self._admin("POST", f"{self._environment_path(flag)}/strategies", body)
        return RolloutFlag(name=flag, strategy_id=str(created["id"]))

    def set_rollout(self, flag: RolloutFlag, percent: int) -> None:
        patch = [
            {
                "op": "replace",
                "path": "/parameters/rollout",
                "value": str(validate_percent(percent)),
            }
        ]
        path = f"{self._environment_path(flag.name)}/strategies/{flag.strategy_id}"
        self._admin("PATCH", path, patch)

    def enable(self, flag: str) -> None:
        """Switches the flag on in the environment.

        A flag without strategies gets the project's default strategy (100 %).
        """
        self._admin("POST", f"{self._environment_path(flag)}/on")

    def disable(self, flag: str) -> None:
        """Switches the flag off in the environment; idempotent, as a rollback must be."""
        self._admin("POST", f"{self._environment_path(flag)}/off")

    def create_rollout_flag(
        self, percent: int, *, name: str | None = None, enabled: bool = True
    ) -> RolloutFlag:
        """Creates a flag (a unique name unless given) at percent, switched on by default."""
        validate_percent(percent)
        flag_name = self.create_flag(name or self.unique_flag_name())
        flag = self.add_rollout(flag_name, percent)
        if enabled:
            self.enable(flag_name)
        return flag

    # Client API, as the SDKs see it

    def client_features(self) -> JsonObject:
        return self._request("GET", "/api/client/features", self.server.client_token)

    def client_feature(self, flag: str) -> JsonObject | None:
        features: list[JsonObject] = self.client_features().get("features", [])
        return next((feature for feature in features if feature.get("name") == flag), None)

    def wait_for_client_state(
        self,
        flag: str,
        *,
        enabled: bool | None = None,
        rollout: int | None = None,
        timeout: float = 10.0,
    ) -> JsonObject:
        """Polls the client API until the flag is served in the given state; returns it.

        rollout: some flexibleRollout strategy of the flag has this percentage.
        """
        if rollout is not None:
            validate_percent(rollout)
        deadline = time.monotonic() + timeout
        while True:
            feature = self.client_feature(flag)
            if feature is not None and _feature_matches(feature, enabled, rollout):
                return feature
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"the client API did not serve {flag!r} with enabled={enabled} "
                    f"rollout={rollout} within {timeout:g} s; last seen: {feature!r}"
                )
            time.sleep(0.1)

    # Plumbing

    def _features_path(self) -> str:
        return f"/api/admin/projects/{self.server.project}/features"

    def _environment_path(self, flag: str) -> str:
        quoted = urllib.parse.quote(flag, safe="")
        return f"{self._features_path()}/{quoted}/environments/{self.server.environment}"

    def _admin(self, method: str, path: str, body: object = None) -> JsonObject:
        return self._request(method, path, self.server.admin_token, body)

    def _request(self, method: str, path: str, token: str, body: object = None) -> JsonObject:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server.url.rstrip("/") + path,
            data=data,
            method=method,
            headers={
                "Authorization": token,
                "Accept": "application/json",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise UnleashAdminError(f"{method} {path}: HTTP {error.code}: {detail}") from None
        if not raw.strip():
            return {}
        decoded = json.loads(raw)
        return decoded if isinstance(decoded, dict) else {"items": decoded}


def _feature_matches(feature: JsonObject, enabled: bool | None, rollout: int | None) -> bool:
    if enabled is not None and bool(feature.get("enabled")) != enabled:
        return False
    if rollout is None:
        return True
    return any(
        strategy.get("name") == "flexibleRollout"
        and str(strategy.get("parameters", {}).get("rollout")) == str(rollout)
        for strategy in feature.get("strategies", [])
    )


# --- Prometheus -----------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus failed to start or refused a query."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One endpoint for Prometheus to scrape, each in its own job."""

    address: str  # host:port
    metrics_path: str = "/metrics"
    job: str | None = None  # default: target0, target1, ... in the order given

    @classmethod
    def parse(cls, value: ScrapeTarget | str) -> ScrapeTarget:
        """Accepts a ScrapeTarget, "host:port", "host:port/path" or "http://host:port/path"."""
        if isinstance(value, ScrapeTarget):
            return value
        parsed = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
        if not parsed.netloc or parsed.port is None:
            raise ValueError(f"scrape target must be host:port[/path], got {value!r}")
        return cls(address=parsed.netloc, metrics_path=parsed.path or "/metrics")


class PrometheusServer:
    """A running Prometheus on loopback, with helpers for its HTTP query API."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, directory: Path, log: IO[bytes]
    ) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.directory = directory
        self.config_path = directory / "prometheus.json"
        self.log_path = directory / "prometheus.log"
        self._log = log

    def query(self, promql: str, timeout: float = 5.0) -> QueryResult:
        """Instant query through /api/v1/query; returns data.result."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload: JsonObject = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise PrometheusError(f"query {promql!r}: HTTP {error.code}: {detail}") from None
        if payload.get("status") != "success":
            raise PrometheusError(f"query {promql!r}: {payload}")
        result: QueryResult = payload["data"]["result"]
        return result

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[QueryResult], bool] = bool,
        timeout: float = 15.0,
        interval: float = 0.2,
    ) -> QueryResult:
        """Polls query(promql) until predicate(result) holds (by default: not empty).

        Blocks: a test whose scrape targets run on its own event loop uses wait_for_async.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(self._timeout_message(promql, result, timeout))
            time.sleep(interval)

    async def query_async(self, promql: str) -> QueryResult:
        return await asyncio.to_thread(self.query, promql)

    async def wait_for_async(
        self,
        promql: str,
        predicate: Callable[[QueryResult], bool] = bool,
        within: float = 15.0,
        interval: float = 0.2,
    ) -> QueryResult:
        """wait_for that leaves the event loop free to serve the scrapes meanwhile.

        Gives up after `within` seconds with an AssertionError that shows the last result
        and the health of every target.
        """
        deadline = time.monotonic() + within
        while True:
            result = await self.query_async(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                targets = await asyncio.to_thread(self._target_health)
                raise AssertionError(self._timeout_message(promql, result, within, targets))
            await asyncio.sleep(interval)

    def targets(self) -> list[JsonObject]:
        """Active targets with their scrape health and last error (/api/v1/targets)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as response:
            payload: JsonObject = json.loads(response.read())
        active: list[JsonObject] = payload["data"]["activeTargets"]
        return active

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        # The samples are of no use after the test; the config and log stay for a look.
        shutil.rmtree(self.directory / "data", ignore_errors=True)

    def _target_health(self) -> list[str]:
        try:
            return [
                f"{t['scrapeUrl']} {t['health']} {t.get('lastError', '')}".strip()
                for t in self.targets()
            ]
        except (OSError, KeyError, ValueError) as error:
            return [f"targets unavailable: {error}"]

    def _timeout_message(
        self,
        promql: str,
        result: QueryResult,
        timeout: float,
        targets: list[str] | None = None,
    ) -> str:
        health = self._target_health() if targets is None else targets
        return (
            f"{promql!r} did not reach the expected result within {timeout:g} s; "
            f"last result: {result!r}; targets: {health}"
        )


class PrometheusLauncher:
    """Starts Prometheus servers on free loopback ports and stops them all at teardown.

    Call it with the targets to scrape: `prometheus(["127.0.0.1:8081"])`. Scrapes and rule
    evaluation run every second, but the first sample lands about 6 s after the start:
    Prometheus 2.42 hands discovered targets to its scrape loop on a fixed 5 s tick (its
    --scrape.discovery-reload-interval does not shorten it). Tests that need many
    scrapes share one server (prometheus_session) with targets that live as long.
    """

    def __init__(self, binary: Path, base_dir: Path) -> None:
        self.binary = binary
        self.base_dir = base_dir
        self._servers: list[PrometheusServer] = []

    def __call__(
        self,
        targets: Sequence[ScrapeTarget | str],
        *,
        rule_files: Sequence[Path] = (),
        ready_timeout: float = 15.0,
    ) -> PrometheusServer:
        parsed = [ScrapeTarget.parse(target) for target in targets]
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(Path(path).resolve()) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": target.job or f"target{index}",
                    "metrics_path": target.metrics_path,
                    "static_configs": [{"targets": [target.address]}],
                }
                for index, target in enumerate(parsed)
            ],
        }
        # A free port can be taken between choosing it and binding it: try another.
        last_error: PrometheusError | None = None
        for _attempt in range(3):
            try:
                server = self._start(config, ready_timeout)
            except PrometheusError as error:
                if "address already in use" not in str(error):
                    raise
                last_error = error
                continue
            self._servers.append(server)
            return server
        assert last_error is not None
        raise last_error

    def stop_all(self) -> None:
        while self._servers:
            self._servers.pop().stop()

    def _start(self, config: JsonObject, ready_timeout: float) -> PrometheusServer:
        directory = self.base_dir / f"prometheus-{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        (directory / "data").mkdir()
        # YAML is a superset of JSON: no YAML library needed.
        (directory / "prometheus.json").write_text(json.dumps(config, indent=2))
        port = _free_loopback_port()
        command = [
            str(self.binary),
            f"--config.file={directory / 'prometheus.json'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            # Dies with this pytest process even when it is killed before teardown. Only
            # from the main thread: the signal fires when the spawning thread exits.
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        log = (directory / "prometheus.log").open("wb")
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Out of the terminal's process group: Ctrl-C reaches pytest, whose teardown
            # then stops Prometheus.
            start_new_session=True,
        )
        server = PrometheusServer(process, port, directory, log)
        try:
            _wait_until_ready(server, ready_timeout)
        except BaseException:
            server.stop()
            raise
        return server


def _wait_until_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log_tail = server.log_path.read_text(errors="replace")[-3000:]
            raise PrometheusError(
                f"prometheus exited with status {server.process.returncode}:\n{log_tail}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    log_tail = server.log_path.read_text(errors="replace")[-3000:]
    raise PrometheusError(f"prometheus not ready at {server.url} after {timeout:g} s:\n{log_tail}")


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def unleash() -> UnleashServer:
    """The Unleash server started by run-with-services.sh (checked healthy)."""
    server = UnleashServer(
        url=require_env(ENV_UNLEASH_URL).rstrip("/"),
        admin_token=require_env(ENV_UNLEASH_ADMIN_TOKEN),
        client_token=require_env(ENV_UNLEASH_CLIENT_TOKEN),
    )
    try:
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
            response.read()
    except OSError as error:
        pytest.fail(f"the Unleash server at {server.url} does not answer: {error}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def unleash_admin(unleash: UnleashServer) -> UnleashAdmin:
    return unleash.admin()


@pytest.fixture
def unleash_flag_name(request: pytest.FixtureRequest) -> str:
    """A flag name unique to this test (and this run): the test's name plus a random part."""
    return UnleashAdmin.unique_flag_name(request.node.name.removeprefix("test_"))


@pytest.fixture(scope="session")
def client_spec_dir() -> Path:
    """The specifications folder of npm @unleash/client-specification."""
    path = Path(require_env(ENV_CLIENT_SPEC_DIR))
    if not path.is_dir():
        pytest.fail(f"{ENV_CLIENT_SPEC_DIR}={path} is not a directory", pytrace=False)
    return path


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    path = Path(require_env(ENV_PROMETHEUS))
    if not os.access(path, os.X_OK):
        pytest.fail(f"{ENV_PROMETHEUS}={path} is not executable", pytrace=False)
    return path


@pytest.fixture
def prometheus(
    prometheus_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusLauncher]:
    """Starts Prometheus servers for this test: `prometheus(["127.0.0.1:PORT"])`."""
    launcher = PrometheusLauncher(prometheus_binary, tmp_path_factory.mktemp("prometheus"))
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def prometheus_session(
    prometheus_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusLauncher]:
    """Like prometheus, for session-scoped fixtures: servers live until the session ends."""
    launcher = PrometheusLauncher(prometheus_binary, tmp_path_factory.mktemp("prometheus"))
    try:
        yield launcher
    finally:
        launcher.stop_all()
