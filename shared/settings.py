"""Settings: one TOML file, overridden field by field from the environment.

The file is named by ``--config`` or ``ACP_FLEET_CONFIG``; a variable such as
``ACP_FLEET_WORKER__LEASE_MS=5000`` overrides ``[worker] lease_ms``. Every
invalid value stops start-up with a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError
from redis.connection import parse_url

from shared.allowlist import is_ip_literal, normalise_host, parse_host_pattern
from shared.errors import ConfigError
from shared.limits import parse_memory_bytes, parse_nano_cpus, parse_pids_limit

CONFIG_VERSION = 1
ENV_PREFIX = "ACP_FLEET_"

MemoryBytes = Annotated[int, BeforeValidator(parse_memory_bytes)]
NanoCpus = Annotated[int, BeforeValidator(parse_nano_cpus)]
PidsLimit = Annotated[int, BeforeValidator(parse_pids_limit)]
_NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_number(annotation: Any) -> bool:
    """True for ``int``, ``float`` and unions of them with None."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_number(arg) for arg in get_args(annotation))
    return annotation in (int, float)


def _refuse_booleans(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Refuse ``true`` and ``false`` for a number: pydantic would read 1 and 0.

    The environment gives strings, which a number field still parses, so
    strict mode would refuse every override; booleans only come from TOML.
    """
    field = model.model_fields[str(info.field_name)]
    if isinstance(value, bool) and _is_number(field.annotation):
        raise ValueError("expected a number, not the boolean true or false")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_booleans(cls, value, info)


class IoLimits(_Strict):
    """Block-I/O throttles on one device of the node (the blkio controller)."""

    device: str = Field(pattern=r"^/dev/[A-Za-z0-9/_.-]+$")
    read_bps: int | None = Field(None, ge=1024)
    write_bps: int | None = Field(None, ge=1024)
    read_iops: int | None = Field(None, ge=1)
    write_iops: int | None = Field(None, ge=1)

    def host_config(self) -> dict[str, list[dict[str, str | int]]]:
        """The Engine's HostConfig fields for these throttles."""
        fields = {
            "BlkioDeviceReadBps": self.read_bps,
            "BlkioDeviceWriteBps": self.write_bps,
            "BlkioDeviceReadIOps": self.read_iops,
            "BlkioDeviceWriteIOps": self.write_iops,
        }
        return {
            name: [{"Path": self.device, "Rate": rate}]
            for name, rate in fields.items()
            if rate is not None
        }


class Limits(_Strict):
    """Resource limits of one sandbox; a session may narrow, never widen them."""

    memory_bytes: MemoryBytes = Field(alias="memory")
    nano_cpus: NanoCpus = Field(alias="cpus")
    pids_limit: PidsLimit = Field(alias="pids")
    lifetime_s: int = Field(3600, gt=0, le=7 * 24 * 3600)
    # No stdio either way and no client attached for this long ends it.
    idle_timeout_s: int = Field(900, gt=0, le=7 * 24 * 3600)
    nofile: int = Field(4096, ge=64, le=1_048_576)
    tmp_bytes: MemoryBytes = Field(64 * 1024**2, alias="tmp_size")
    home_bytes: MemoryBytes = Field(256 * 1024**2, alias="home_size")
    workspace_bytes: MemoryBytes = Field(512 * 1024**2, alias="workspace_size")
    # CPUs the sandbox may run on ("0-1", "2,3") and its relative weight
    # when CPUs are contended; None leaves the Engine's defaults.
    cpuset: str | None = Field(None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    cpu_shares: int | None = Field(None, ge=2, le=262_144)
    io: IoLimits | None = None


class PoolConfig(_Strict):
    """Ready sandboxes kept per node for a profile, so starts skip Docker."""

    # 0 disables the pool: every session starts its own container.
    size: int = Field(0, ge=0, le=1024)
    # Members older than this are replaced, so none runs on stale state.
    max_age_s: int = Field(3600, ge=10)
    # Consecutive failed refills before the pool backs off to cold starts.
    failures_before_backoff: int = Field(3, ge=1)
    backoff_max_s: float = Field(300.0, gt=0, le=24 * 3600)
    # Refills wait for this long a pause in claims, unless the pool is down
    # to a quarter: a container start costs the CPU that claims need.
    refill_quiet_ms: int = Field(250, ge=0)


class NetworkPolicy(_Strict):
    """Where a profile's sandboxes may connect: nowhere, or through the proxy.

    ``egress`` puts the sandbox on the node's internal network, whose only
    way out is the worker's proxy, and the proxy admits only the hosts in
    ``allow`` on the ports in ``ports``.
    """

    mode: Literal["none", "egress"] = "none"
    allow: list[str] = Field(default_factory=list)
    # Strict, so that TOML true is not read as port 1.
    ports: list[Annotated[int, Field(strict=True)]] = Field(
        default_factory=lambda: [80, 443]
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _never_host(cls, mode: Any) -> Any:
        # Said apart from the generic "none or egress": someone asking for
        # host networking should learn it is refused on purpose.
        if mode == "host":
            raise ValueError(
                "host networking is never offered: a sandbox on the host's "
                "network could reach every service of the node; use 'egress' "
                "with an allow-list, or 'none'"
            )
        return mode

    @field_validator("allow")
    @classmethod
    def _host_patterns(cls, entries: list[str]) -> list[str]:
        return [parse_host_pattern(entry) for entry in entries]

    @field_validator("ports")
    @classmethod
    def _port_numbers(cls, ports: list[int]) -> list[int]:
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port (1 to 65535)")
        return ports

    @model_validator(mode="after")
    def _allow_fits_mode(self) -> NetworkPolicy:
        if self.mode == "egress" and not self.allow:
            raise ValueError(
                "egress with an empty allow list refuses every connection; "
                "list the hosts the agent needs, or use mode 'none'"
            )
        if self.mode == "none" and self.allow:
            raise ValueError(
                "allow only applies to mode 'egress'; with mode 'none' the "
                "sandbox has no network at all"
            )
        return self


class AgentProfile(_Strict):
    """An operator-named way to run one agent image."""

    image: str = Field(min_length=1)
    command: list[str] = Field(default_factory=list)
    workdir: str = "/workspace"
    home: str = "/home/agent"
    user: str = Field("1000:1000", pattern=r"^[1-9]\d*:[1-9]\d*$")
    protocol: Literal["acp", "raw"] = "acp"
    allow_fs: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    env_allowed: list[str] = Field(default_factory=list)
    max_line_bytes: int = Field(16 * 1024**2, ge=4096, le=256 * 1024**2)
    # Allowed variables delivered as files on the sandbox's /run tmpfs
    # (NAME_FILE names the file) instead of in the environment.
    secret_files: list[str] = Field(default_factory=list)
    # Applied where the node has AppArmor; Docker's own profile by default.
    apparmor_profile: str = Field("docker-default", pattern=r"^[A-Za-z0-9_.-]+$")
    limits: Limits
    pool: PoolConfig = Field(default_factory=lambda: PoolConfig())
    network: NetworkPolicy = Field(default_factory=lambda: NetworkPolicy())

    @model_validator(mode="after")
    def _pool_needs_command(self) -> AgentProfile:
        if self.pool.size and not self.command:
            raise ValueError(
                "a warm pool starts the agent through a launcher, so the "
                "profile must name its command"
            )
        return self

    @model_validator(mode="after")
    def _secrets_are_allowed(self) -> AgentProfile:
        stray = sorted(set(self.secret_files) - set(self.env_allowed))
        if stray:
            raise ValueError(
                f"secret_files names {', '.join(stray)}, which env_allowed "
                "does not allow"
            )
        if self.env_allowed and not self.command:
            # Per-session values reach the agent through the launcher, which
            # needs the command; Docker's Env would put them on its disk.
            raise ValueError(
                "env_allowed needs the profile's command: per-session values "
                "reach the agent through a launcher, never the container config"
            )
        return self

    @field_validator("workdir", "home")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"{path!r} must be an absolute path inside the sandbox")
        return path

    @field_validator("env_allowed", "env", "secret_files")
    @classmethod
    def _variable_names(cls, names: Any) -> Any:
        for name in names:
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return names


class OrgConfig(_Strict):
    """One organisation: its hashed API key and its admission limits."""

    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_sessions: int = Field(ge=1, le=100_000)
    sessions_per_minute: int = Field(ge=1, le=1_000_000)


class OperatorConfig(_Strict):
    """An operator: may list nodes and the queue, and drain nodes."""

    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SchedulerConfig(_Strict):
    """The HTTP API and stdio gateway."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    queue_max_depth: int = Field(1000, ge=1)
    token_ttl_s: int = Field(3600, ge=10)
    # How long an admitted session may wait in the queue before its quota
    # slot lapses; longer than any sane queue wait, short enough to heal.
    queue_slot_ttl_s: int = Field(600, ge=10)
    # A workspace archive uploaded before a session starts, at most this big.
    workspace_upload_max_bytes: MemoryBytes = Field(
        64 * 1024**2, alias="workspace_upload_max"
    )
    # An upload slower than this is cut off, so it cannot hold a worker slot.
    workspace_upload_timeout_s: float = Field(60.0, gt=0, le=3600)
    # Per-message deflate on the stdio WebSocket. Off: compressing and
    # inflating each message on both ends costs more of a round trip than
    # the relay's own work, and links to backends are rarely short of bytes.
    ws_compression: bool = False


class EgressConfig(_Strict):
    """The node's egress proxy, started when a profile uses mode egress."""

    # The proxy listens on the internal network's gateway; 0 picks a port.
    proxy_port: int = Field(3128, ge=0, le=65535)
    # The internal network sandboxes join; "{fleet}-egress-{node}" if unset.
    network: str | None = Field(None, pattern=_NAME_RE)
    # A PEM bundle on the node, for operators who terminate TLS in front of
    # the fleet: mounted read-only and named by SSL_CERT_FILE and
    # NODE_EXTRA_CA_CERTS. The proxy itself never intercepts TLS.
    ca_bundle: str | None = None
    # Static name-to-address entries consulted before DNS, like /etc/hosts;
    # tests use them to point names at servers they started.
    hosts: dict[str, str] = Field(default_factory=dict)
    connect_timeout_s: float = Field(10.0, gt=0, le=300)
    # A tunnel with no byte either way for this long is closed.
    idle_timeout_s: float = Field(300.0, gt=0, le=24 * 3600)
    # Connection records kept per session; older ones are trimmed.
    records_max: int = Field(1000, ge=10, le=100_000)

    @field_validator("ca_bundle")
    @classmethod
    def _absolute_bundle(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError(f"{path!r} must be an absolute path on the node")
        return path

    @field_validator("hosts")
    @classmethod
    def _addresses(cls, hosts: dict[str, str]) -> dict[str, str]:
        for name, address in hosts.items():
            # A wildcard or an address here is never looked up, so the
            # entry would silently do nothing.
            if not _is_one_host_name(name):
                raise ValueError(
                    f"{name!r} is not a host name such as 'pypi.org'; each "
                    "entry maps one name to an IP address"
                )
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(
                    f"{name!r} maps to {address!r}, which is not an IP address"
                ) from None
        return {normalise_host(name): address for name, address in hosts.items()}


class WorkerConfig(_Strict):
    """One worker per node."""

    node: str = Field(default_factory=socket.gethostname, pattern=_NAME_RE)
    max_sessions: int = Field(16, ge=1, le=4096)
    docker_url: str = Field(default_factory=lambda: _default_docker_url())
    lease_ms: int = Field(10_000, ge=1000)
    heartbeat_ms: int = Field(2_000, ge=100)
    # arq polls its queue: a session waits half of this on average.
    poll_delay_ms: int = Field(5, ge=1, le=5000)
    eof_grace_s: float = Field(5.0, gt=0, le=300)
    kill_grace_s: float = Field(2.0, gt=0, le=300)
    reconcile_interval_s: float = Field(30.0, gt=0)
    # On SIGTERM the worker stops claiming and lets sessions run this long
    # before it ends the rest as drained.
    drain_grace_s: int = Field(30, ge=0, le=24 * 3600)
    # Output no client has acknowledged, per session; past it the relay
    # stops reading from the agent until the client catches up.
    backlog_bytes: int = Field(8 * 1024**2, ge=64 * 1024)
    # Each sandbox's workspace is a filesystem image under this directory,
    # mounted on the node and bound into the sandbox.
    workspace_root: str = "/var/lib/acp-fleet/workspaces"
    # Formatted, mounted workspaces kept ready per size for cold starts,
    # which then skip mkfs and mount; each costs only its used blocks.
    workspace_spares: int = Field(2, ge=0, le=64)
    # A fetched workspace is kept in Redis as a tar archive up to this size.
    workspace_archive_max_bytes: MemoryBytes = Field(
        64 * 1024**2, alias="workspace_archive_max"
    )
    # Prometheus scrapes the worker here; 0 turns the endpoint off.
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    egress: EgressConfig = Field(default_factory=lambda: EgressConfig())

    @field_validator("docker_url")
    @classmethod
    def _docker_url(cls, url: str) -> str:
        return _engine_address(url)

    @field_validator("workspace_root")
    @classmethod
    def _absolute_root(cls, path: str) -> str:
        return _absolute_path(path)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerConfig:
        # Three heartbeats per lease let one be late without losing the lease.
        if self.heartbeat_ms * 3 > self.lease_ms:
            raise ValueError(
                f"heartbeat_ms ({self.heartbeat_ms}) must be at most a third of "
                f"lease_ms ({self.lease_ms}) so that one late heartbeat does not "
                "lose the lease"
            )
        return self


class TelemetryConfig(_Strict):
    """Where traces go; metrics are scraped from each process instead."""

    # An OTLP/HTTP collector's base URL ("http://collector:4318"); spans go
    # to its /v1/traces. Unset, OTEL_EXPORTER_OTLP_ENDPOINT still applies;
    # with neither, nothing is traced.
    otlp_endpoint: str | None = None

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if not url:
            # An empty variable in the environment turns tracing off.
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", url):
            raise ValueError(
                f"{url!r} is not an http:// or https:// URL; give the "
                "collector's OTLP/HTTP base URL, such as http://collector:4318"
            )
        return url


class DockerProxyConfig(_Strict):
    """The allow-listing proxy that alone holds the Docker Engine's socket."""

    # The unix socket the worker's docker_url names, e.g. in a shared volume.
    listen_path: str = "/run/acp-fleet/docker.sock"
    # Owner and group read-write: the worker runs as root or in the group.
    listen_mode: str = Field("0660", pattern=r"^0[0-7]{3}$")
    # The Engine itself; only the proxy may be given this.
    upstream_url: str = "unix:///var/run/docker.sock"
    # A container found labelled stays trusted this long; ids are never reused.
    label_cache_s: float = Field(5.0, ge=0, le=300)
    # Create bodies carry the seccomp profile inline (about 10 KiB).
    max_body_bytes: int = Field(4 * 1024**2, ge=64 * 1024, le=64 * 1024**2)

    @field_validator("listen_path")
    @classmethod
    def _absolute_listen_path(cls, path: str) -> str:
        return _absolute_path(path)

    @field_validator("upstream_url")
    @classmethod
    def _engine_url(cls, url: str) -> str:
        return _engine_address(url)


def _engine_address(url: str) -> str:
    """Refuse a Docker Engine address that the Docker client cannot dial."""
    if not re.fullmatch(r"unix:///\S+|(tcp|http)://[^/\s]+:\d+/?", url):
        raise ValueError(
            f"{url!r} is not an Engine address; accepted: unix:///path or "
            "tcp://host:port"
        )
    return url


_REDIS_FORMS = (
    "accepted: redis://[[user]:password@]host[:port][/db], the same with "
    "rediss:// for TLS, or unix:///path/to/redis.sock[?db=N]"
)


def _redis_address(url: str) -> str:
    """Refuse a Redis URL that redis-py and arq would fail on at start-up.

    The URL is never echoed: it may hold the password.
    """
    split = urlsplit(url)
    if split.scheme not in ("redis", "rediss", "unix"):
        scheme = f"scheme {split.scheme}://" if split.scheme else "no scheme"
        raise ValueError(f"the URL has {scheme}; {_REDIS_FORMS}")
    if split.scheme == "unix" and not split.path.startswith("/"):
        raise ValueError(f"a unix:// URL needs the socket's path; {_REDIS_FORMS}")
    if split.scheme != "unix" and not re.fullmatch(r"/?\d*", split.path):
        raise ValueError(f"the database must be a number; {_REDIS_FORMS}")
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"{str(exc).rstrip('.')}; {_REDIS_FORMS}") from None
    return url


def _is_one_host_name(name: str) -> bool:
    host = normalise_host(name)
    if "*" in host or is_ip_literal(host):
        return False
    try:
        parse_host_pattern(host)
    except ValueError:
        return False
    return True


def _absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must be an absolute path on the node")
    return path


def _default_docker_url() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


class FleetSettings(BaseSettings):
    """Everything a scheduler replica or a worker needs to run."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    config_version: int
    fleet: str = Field("acp-fleet", pattern=_NAME_RE)
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("acpf", pattern=r"^[a-z0-9_-]{1,32}$")
    token_secret: SecretStr = Field(min_length=32)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    orgs: dict[str, OrgConfig] = Field(default_factory=dict)
    operators: dict[str, OperatorConfig] = Field(default_factory=dict)
    profiles: dict[str, AgentProfile] = Field(default_factory=dict)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    docker_proxy: DockerProxyConfig = Field(default_factory=DockerProxyConfig)

    @field_validator("config_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != CONFIG_VERSION:
            raise ValueError(
                f"version {version} is not supported; accepted: {CONFIG_VERSION}"
            )
        return version

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_booleans(cls, value, info)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        return _redis_address(url)

    @field_validator("orgs", "operators", "profiles")
    @classmethod
    def _names(cls, table: dict[str, Any]) -> dict[str, Any]:
        for name in table:
            if not re.fullmatch(_NAME_RE, name):
                raise ValueError(
                    f"{name!r} is not a valid name: use lower-case letters, "
                    "digits, '.', '_' or '-', starting with a letter or digit"
                )
        return table

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init arguments; the environment wins.
        return env_settings, init_settings


def load_settings(path: str | Path | None = None) -> FleetSettings:
    """Load the settings file and apply environment overrides.

    Args:
        path: the TOML file; ``ACP_FLEET_CONFIG`` when None.

    Raises:
        ConfigError: the file is missing or unreadable, or a field is invalid.
    """
    path = path or os.environ.get(f"{ENV_PREFIX}CONFIG")
    data: dict[str, Any] = {}
    if path:
        data = _read_toml(Path(path))
    source = str(path) if path else "the environment"
    if path:
        source += " (and ACP_FLEET_* variables)"
    _refuse_private_keys(data, source=source)
    _refuse_quoted_version(data, source=source)
    try:
        return FleetSettings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=source)) from exc
    except SettingsError as exc:
        raise ConfigError(_describe_environment_error(exc)) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config file {path} is not valid TOML: line {line} is not UTF-8 text"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason = str(exc)
        # Python 3.11 gives no line for an error at the end of the document,
        # an unterminated string for one; the last line is where it is.
        if "(at end of document)" in reason:
            last = f"(at end of document, line {len(text.splitlines()) or 1})"
            reason = reason.replace("(at end of document)", last)
        raise ConfigError(f"config file {path} is not valid TOML: {reason}") from exc


def _refuse_private_keys(data: dict[str, Any], *, source: str) -> None:
    """Refuse top-level keys that pydantic-settings would take as its own
    options: ``_env_prefix`` in a file would silently change which
    variables override it."""
    private = sorted(key for key in data if key.startswith("_"))
    if private:
        lines = [f"  {key}: is not a known setting" for key in private]
        raise ConfigError("\n".join([f"invalid settings in {source}:", *lines]))


def _refuse_quoted_version(data: dict[str, Any], *, source: str) -> None:
    """Refuse a ``config_version`` the file gives as anything but an integer.

    The environment can only give a string, so the field itself stays lax;
    a file has integers, and a quoted version there is a mistake.
    """
    version = data.get("config_version")
    if version is None or (isinstance(version, int) and not isinstance(version, bool)):
        return
    reason = (
        f"must be the integer {CONFIG_VERSION}, written without quotes "
        f"(config_version = {CONFIG_VERSION}) (got {_cut(repr(version))})"
    )
    raise ConfigError(f"invalid settings in {source}:\n  config_version: {reason}")


def _describe_environment_error(exc: SettingsError) -> str:
    """Name the field and the variables of a table given as malformed JSON."""
    # pydantic-settings names the top-level field only in its message.
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match[1] if match else "(unknown field)"
    prefix = f"{ENV_PREFIX}{field}".upper()
    names = sorted(name for name in os.environ if name.upper().startswith(prefix))
    variables = ", ".join(names) or "an ACP_FLEET_* variable"
    return (
        "invalid settings in the environment:\n"
        f"  {field}: {variables} must hold JSON for this table, or name one "
        "field each (ACP_FLEET_WORKER__LEASE_MS=5000)"
    )


# A Redis URL may carry its password.
_SECRET_WORDS = ("secret", "key", "env", "token", "redis_url")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def describe_validation_error(exc: ValidationError, *, source: str) -> str:
    """Render each error as ``field.path: reason``, never echoing secrets."""
    lines = [f"invalid settings in {source}:"]
    for error in exc.errors():
        field = ".".join(_toml_key(part) for part in error["loc"]) or "(root)"
        reason = error["msg"].removeprefix("Value error, ")
        shown = error.get("input")
        secret = any(word in field.lower() for word in _SECRET_WORDS)
        if error["type"] == "extra_forbidden":
            reason = "is not a known setting"
        elif isinstance(shown, str | int | float) and not secret:
            reason = f"{reason} (got {_cut(repr(shown))})"
        lines.append(f"  {field}: {reason}")

    return "\n".join(lines)


def _toml_key(part: str | int) -> str:
    """One part of a dotted path as TOML writes it: quoted unless bare."""
    text = str(part)
    return text if _BARE_KEY.fullmatch(text) else json.dumps(text)


def _cut(text: str, limit: int = 80) -> str:
    """``text`` cut short, so a huge value cannot flood the message."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
