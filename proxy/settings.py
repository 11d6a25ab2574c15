"""The one typed settings object, from a TOML file with environment overrides (I/O at load).

Every key of the TOML file can be overridden from the environment with the prefix
``STRANGLER_`` and ``__`` between nesting levels (``STRANGLER_ADMIN__TOKEN``; lists such
as ``STRANGLER_ROUTES`` take JSON). Unknown keys are errors, because a typo must not
silently disable a safety check. ``load_settings`` reports every problem at once, each
with its key and where it came from (the file, or the environment variable).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adapters.contract import Contract, ContractError
from adapters.normalise import Normaliser

ENV_PREFIX = "STRANGLER_"
ENV_DELIMITER = "__"

Protocol = Literal["websocket", "ndjson", "sse", "json"]
HTTP_METHODS = {"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE"}


def _backend_url(value: str) -> str:
    match = re.fullmatch(r"(https?)://([^/\s?#:]+|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?/?", value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a backend base URL: use http(s)://host[:port], "
            "with no path, query or fragment"
        )
    if match.group(3) is not None and not 0 < int(match.group(3)) < 65536:
        raise ValueError(f"{value!r}: port out of range")
    return value.rstrip("/")


BackendUrl = Annotated[str, AfterValidator(_backend_url)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_body_bytes: Annotated[int, Field(ge=0)] = 10 * 1024 * 1024
    max_ws_message_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 60.0
    upstream_connections: Annotated[int, Field(ge=1)] = 512
    shutdown_grace: Seconds = 20.0
    keepalive_timeout: Seconds = 75.0
    # A request head must be whole this long after it began (a new connection: after
    # it opened); a request body may go this long without a byte. Else 408 and close.
    header_timeout: Seconds = 20.0
    body_timeout: Seconds = 20.0


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8081
    token: SecretStr | None = None


class BackendSettings(_Section):
    legacy: BackendUrl
    candidate: BackendUrl


class IdentitySettings(_Section):
    header: Annotated[str, Field(min_length=1, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")] = (
        "X-User-Id"
    )


class FlagSettings(_Section):
    provider: Literal["file", "unleash"] = "file"
    file: Path | None = None
    poll_interval: Seconds = 1.0
    url: BackendUrl | None = None
    app_name: str = "strangler"
    client_token: SecretStr | None = None
    admin_token: SecretStr | None = None
    environment: str = "development"
    project: str = "default"
    refresh_interval: Annotated[int, Field(ge=1)] = 15


class CompareSettings(_Section):
    ignore: list[str] = Field(default_factory=list)
    canonical_ids: list[str] = Field(default_factory=list)
    coalesce: list[str] = Field(default_factory=list)
    presence_only: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _paths_compile(self) -> CompareSettings:
        try:
            Normaliser(
                ignore=self.ignore,
                canonical_ids=self.canonical_ids,
                coalesce=self.coalesce,
                presence_only=self.presence_only,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return self


class RollbackSettings(_Section):
    window_seconds: Seconds = 10.0
    min_samples: Annotated[int, Field(ge=1)] = 100
    max_mismatch_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.02
    max_latency_ratio: Annotated[float, Field(gt=0)] = 1.2
    failing_windows: Annotated[int, Field(ge=1)] = 2


class PromotionSettings(_Section):
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(min_length=1)
    healthy_windows: Annotated[int, Field(ge=1)] = 3

    @field_validator("steps")
    @classmethod
    def _ascending(cls, steps: list[float]) -> list[float]:
        if steps != sorted(set(steps)):
            raise ValueError("steps must be strictly ascending")
        return steps


class ShadowSettings(_Section):
    max_concurrent: Annotated[int, Field(ge=1)] = 256
    max_body_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024
    connections: Annotated[int, Field(ge=1)] = 256
    timeout: Seconds = 30.0
    drain_seconds: Seconds = 5.0
    # After this many shadows in a row fail (time out, cannot connect, break off)
    # against a backend, its shadows pause for breaker_seconds (0 turns this off).
    breaker_failures: Annotated[int, Field(ge=0)] = 5
    breaker_seconds: Seconds = 5.0
    # What one side of one exchange or WebSocket turn may hold for its comparison: past
    # either, recording stops and the comparison is counted as ignored.
    max_recorded_events: Annotated[int, Field(ge=1)] = 4096
    max_recorded_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024


class DivergenceSettings(_Section):
    path: Path = Path("strangler-divergences.sqlite3")
    max_rows: Annotated[int, Field(ge=1)] = 10_000
    redact: list[str] = Field(default_factory=list)


class RouteSettings(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    path: Annotated[str, Field(pattern=r"^/[^\s?#]*$")]
    protocol: Protocol
    flag: Annotated[str, Field(min_length=1)]
    shadow: Annotated[float, Field(ge=0, le=1)] = 0.0
    shadow_methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "OPTIONS"])
    shadow_target: Literal["other", "legacy"] = "other"
    event_type_field: str = "type"
    error_types: list[str] = Field(default_factory=list)
    contract: str | None = None
    user_field: str | None = None
    turn_end: list[str] = Field(default_factory=list)
    turn_idle_seconds: Seconds = 5.0
    compare: CompareSettings = Field(default_factory=CompareSettings)
    rollback: RollbackSettings = Field(default_factory=RollbackSettings)
    promotion: PromotionSettings | None = None

    @field_validator("contract")
    @classmethod
    def _parses(cls, contract: str | None) -> str | None:
        if contract is not None:
            try:
                Contract.parse(contract)
            except ContractError as exc:
                raise ValueError(str(exc)) from None
        return contract

    @field_validator("shadow_methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        upper = [m.upper() for m in methods]
        unknown = sorted(set(upper) - HTTP_METHODS)
        if unknown:
            raise ValueError(f"unknown HTTP methods {unknown}")
        return upper


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    backends: BackendSettings
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    flags: FlagSettings = Field(default_factory=FlagSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    divergences: DivergenceSettings = Field(default_factory=DivergenceSettings)
    routes: list[RouteSettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML data arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    key: str
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def load_settings(path: Path, environ: dict[str, str] | None = None) -> Settings:
    """Read, validate and cross-check the configuration, or raise ConfigError."""
    env = dict(os.environ if environ is None else environ)
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("(file)", "no such file", source)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("(file)", f"cannot read: {exc}", source)]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("(file)", f"invalid TOML: {exc}", source)]) from None

    def source_of(key: str) -> str:
        return _source_of(key, env, source)

    settings: Settings | None = None
    problems: list[ConfigProblem] = []
    try:
        settings = _with_environ(env, lambda: Settings(**data))
    except ValidationError as exc:
        for error in exc.errors():
            key = _dotted(error["loc"])
            problems.append(ConfigProblem(key, error["msg"], source_of(key)))
    # pydantic-settings refuses some unknown environment keys itself: name each once.
    named = {(p.key, p.source) for p in problems}
    problems.extend(p for p in _unknown_env_keys(env) if (p.key, p.source) not in named)
    checked = data if settings is None else settings.model_dump(mode="python")
    problems.extend(cross_check(checked, path.parent, source_of))
    if problems or settings is None:
        raise ConfigError(problems)
    return resolve_paths(settings, path.parent)


def cross_check(
    data: Mapping[str, Any], base_dir: Path, source_of: Callable[[str], str]
) -> list[ConfigProblem]:
    """Checks that span keys: unique route names, no overlapping paths, flags source.

    Works on plain data so that it also runs when field validation failed, and the
    user sees every problem in one go.
    """
    problems: list[ConfigProblem] = []
    routes = [r for r in data.get("routes") or [] if isinstance(r, Mapping)]
    seen_names: dict[str, int] = {}
    for index, route in enumerate(routes):
        name = route.get("name")
        if not isinstance(name, str):
            continue
        key = f"routes[{index}].name"
        if name in seen_names:
            message = f"duplicate route name {name!r} (also routes[{seen_names[name]}])"
            problems.append(ConfigProblem(key, message, source_of(key)))
        seen_names.setdefault(name, index)
    paths = [r.get("path") if isinstance(r.get("path"), str) else None for r in routes]
    for i, j in _overlapping(paths):
        key = f"routes[{j}].path"
        message = f"path {paths[j]!r} overlaps routes[{i}].path {paths[i]!r}"
        problems.append(ConfigProblem(key, message, source_of(key)))
    flags = data.get("flags") if isinstance(data.get("flags"), Mapping) else {}
    assert isinstance(flags, Mapping)
    provider = flags.get("provider", "file")
    file = flags.get("file")
    if provider == "file" and not file:
        key = "flags.file"
        problems.append(
            ConfigProblem(key, "required when flags.provider is 'file'", source_of(key))
        )
    if isinstance(file, str | Path) and file:
        flags_path = Path(file) if Path(file).is_absolute() else base_dir / file
        if not flags_path.is_file():
            key = "flags.file"
            problems.append(ConfigProblem(key, f"no such file: {flags_path}", source_of(key)))
    if provider == "unleash":
        for name in ("url", "client_token"):
            if not flags.get(name):
                key = f"flags.{name}"
                message = "required when flags.provider is 'unleash'"
                problems.append(ConfigProblem(key, message, source_of(key)))
    return problems


def resolve_paths(settings: Settings, base_dir: Path) -> Settings:
    """Make relative paths relative to the configuration file's directory."""
    flags = settings.flags
    if flags.file is None or flags.file.is_absolute():
        return settings
    resolved = flags.model_copy(update={"file": (base_dir / flags.file).resolve()})
    return settings.model_copy(update={"flags": resolved})


def normalised_prefix(path: str) -> str:
    return path.rstrip("/") or "/"


def _overlapping(paths: Sequence[str | None]) -> Iterable[tuple[int, int]]:
    prefixes = [None if p is None else normalised_prefix(p) for p in paths]
    for j, b in enumerate(prefixes):
        for i in range(j):
            a = prefixes[i]
            if a is None or b is None:
                continue
            if a == b or a == "/" or b == "/" or b.startswith(a + "/") or a.startswith(b + "/"):
                yield i, j


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(root)"


def _source_of(key: str, env: dict[str, str], file_source: str) -> str:
    """The environment variable that set ``key`` (or one of its parents), else the file."""
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for depth in range(len(parts), 0, -1):
        name = ENV_PREFIX + ENV_DELIMITER.join(parts[:depth]).upper()
        for env_name in env:
            if env_name.upper() == name:
                return f"environment {env_name}"
    return file_source


_SECTIONS = set(Settings.model_fields)


def _unknown_env_keys(env: dict[str, str]) -> list[ConfigProblem]:
    problems = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(ENV_PREFIX + "TEST_"):
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        model: type[BaseModel] | None = Settings
        for part in parts:
            if model is None:
                break
            field = model.model_fields.get(part)
            if field is None:
                problems.append(
                    ConfigProblem(".".join(parts), "unknown key", f"environment {name}")
                )
                break
            annotation = field.annotation
            model = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
    return problems


def _with_environ(env: dict[str, str], build: Callable[[], Settings]) -> Settings:
    # pydantic-settings reads os.environ; swap it in only for the build.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return build()
    finally:
        os.environ.clear()
        os.environ.update(saved)
