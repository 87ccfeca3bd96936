"""Specification of settings loading: the TOML file, the environment, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import FleetSettings, load_settings

NEVER_SHOWN = "token-secret-that-must-never-be-shown-0123"
HEADER = f'config_version = 1\ntoken_secret = "{NEVER_SHOWN}"\n'
PROFILE = """
[profiles.coder]
image = "agent:1"
[profiles.coder.limits]
memory = "{memory}"
cpus = "0.5"
pids = {pids}
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's ACP_FLEET_* variables out of every test."""
    for name in list(os.environ):
        if name.startswith("ACP_FLEET_"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value)


class TestLoadSettings:
    """load_settings turns a TOML file and the environment into FleetSettings."""

    def test_minimal_file(self, tmp_path: Path) -> None:
        """A file with a version and a token secret loads with the defaults."""
        path = write_config(tmp_path, HEADER)

        settings = load_settings(path)

        assert isinstance(settings, FleetSettings)
        assert settings.config_version == 1
        assert settings.token_secret.get_secret_value() == NEVER_SHOWN
        assert settings.key_prefix == "acpf"
        assert settings.worker.lease_ms == 10_000
        assert settings.worker.heartbeat_ms == 2_000
        assert settings.orgs == {}

    def test_profile_limits_are_parsed(self, tmp_path: Path) -> None:
        """A profile's memory, cpus and pids are stored in Docker's units."""
        path = write_config(
            tmp_path, HEADER + PROFILE.format(memory="2.5g", pids='"unlimited"')
        )

        limits = load_settings(path).profiles["coder"].limits

        assert limits.memory_bytes == 2684354560
        assert limits.nano_cpus == 500000000
        assert limits.pids_limit == -1

    def test_path_from_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a path, ACP_FLEET_CONFIG names the file."""
        path = write_config(tmp_path, HEADER + 'fleet = "from-env-path"\n')
        monkeypatch.setenv("ACP_FLEET_CONFIG", str(path))

        assert load_settings().fleet == "from-env-path"

    def test_unsupported_version(self, tmp_path: Path) -> None:
        """config_version 2 is refused naming the field and the accepted version."""
        path = write_config(tmp_path, HEADER.replace("= 1", "= 2", 1))

        message = load_error(path)

        assert "config_version: version 2 is not supported; accepted: 1" in message

    def test_quoted_version_is_refused(self, tmp_path: Path) -> None:
        """config_version "1", a string in the file, is refused as one."""
        path = write_config(tmp_path, HEADER.replace("= 1", '= "1"', 1))

        message = load_error(path)

        assert (
            "config_version: must be the integer 1, written without quotes" in message
        )
        assert "(got '1')" in message

    def test_version_from_environment_is_read(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ACP_FLEET_CONFIG_VERSION=1, a string as every variable, is accepted."""
        monkeypatch.setenv("ACP_FLEET_CONFIG_VERSION", "1")
        monkeypatch.setenv("ACP_FLEET_TOKEN_SECRET", NEVER_SHOWN)

        assert load_settings().config_version == 1

    @pytest.mark.parametrize(
        ("text", "field"),
        [
            ("config_version = true\n", "config_version"),
            ("[worker]\nmax_sessions = true\n", "worker.max_sessions"),
            ("[worker]\neof_grace_s = true\n", "worker.eof_grace_s"),
            ("[scheduler]\nport = false\n", "scheduler.port"),
            (PROFILE.format(memory="1g", pids="true"), "profiles.coder.limits.pids"),
            (
                PROFILE.format(memory="1g", pids=64) + "nofile = true\n",
                "profiles.coder.limits.nofile",
            ),
            (
                PROFILE.format(memory="1g", pids=64)
                + "[profiles.coder.pool]\nsize = true\n",
                "profiles.coder.pool.size",
            ),
        ],
    )
    def test_booleans_are_not_numbers(
        self, tmp_path: Path, text: str, field: str
    ) -> None:
        """true or false for a number is refused naming the field, never read as 1."""
        header = (
            HEADER.replace("config_version = 1\n", "") if "version" in text else HEADER
        )
        path = write_config(tmp_path, header + text)

        message = load_error(path)

        assert f"  {field}: " in message
        assert "boolean" in message

    def test_boolean_port_in_a_list_is_refused(self, tmp_path: Path) -> None:
        """An egress port given as true is refused, not taken as port 1."""
        text = (
            PROFILE.format(memory="1g", pids=64)
            + '[profiles.coder.network]\nmode = "egress"\nallow = ["pypi.org"]\n'
            + "ports = [true]\n"
        )
        path = write_config(tmp_path, HEADER + text)

        message = load_error(path)

        assert "profiles.coder.network.ports.0: " in message

    @pytest.mark.parametrize(
        "url",
        [
            "redis://127.0.0.1:6379/0",
            "redis://:pw@redis",
            "rediss://user:pw@redis.example:6380/2",
            "unix:///run/redis/redis.sock?db=1",
        ],
    )
    def test_redis_urls_of_each_scheme_are_read(self, tmp_path: Path, url: str) -> None:
        """redis://, rediss:// and unix:// URLs are accepted as given."""
        path = write_config(tmp_path, HEADER + f'redis_url = "{url}"\n')

        assert load_settings(path).redis_url == url

    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("notaurl", "the URL has no scheme"),
            ("http://redis:6379", "the URL has scheme http://"),
            ("unix://", "a unix:// URL needs the socket's path"),
            ("redis://redis/zero", "the database must be a number"),
            ("redis://redis:port", "Port could not be cast to integer"),
        ],
    )
    def test_bad_redis_urls_name_the_field_and_forms(
        self, tmp_path: Path, url: str, reason: str
    ) -> None:
        """A Redis URL redis-py cannot use is refused naming the accepted forms."""
        path = write_config(tmp_path, HEADER + f'redis_url = "{url}"\n')

        message = load_error(path)

        assert f"  redis_url: {reason}" in message
        assert "accepted: redis://" in message
        assert "(got " not in message

    def test_bad_docker_url_names_the_field(self, tmp_path: Path) -> None:
        """A worker.docker_url that is no Engine address names the accepted forms."""
        path = write_config(tmp_path, HEADER + '[worker]\ndocker_url = "npipe:x"\n')

        message = load_error(path)

        assert "  worker.docker_url: 'npipe:x' is not an Engine address" in message

    def test_invalid_profile_memory(self, tmp_path: Path) -> None:
        """A bad memory size is refused naming its path and the accepted forms."""
        path = write_config(tmp_path, HEADER + PROFILE.format(memory="10x", pids=64))

        message = load_error(path)

        assert "profiles.coder.limits.memory: '10x' is not a memory size" in message
        assert "512m, 512M, 1g, 1Gi, 1GB, 2 GiB or 2.5g" in message

    def test_zero_pids_limit(self, tmp_path: Path) -> None:
        """A pids limit of 0 is refused at validation, pointing to 'unlimited'."""
        path = write_config(tmp_path, HEADER + PROFILE.format(memory="1g", pids=0))

        message = load_error(path)

        assert "profiles.coder.limits.pids: 0 is ambiguous" in message
        assert "'unlimited'" in message

    @pytest.mark.parametrize(
        ("extra", "field"),
        [("colour = 1\n", "colour"), ("[worker]\nlease = 5\n", "worker.lease")],
    )
    def test_unknown_key(self, tmp_path: Path, extra: str, field: str) -> None:
        """An unknown key is refused by its dotted name."""
        path = write_config(tmp_path, HEADER + extra)

        message = load_error(path)

        assert f"  {field}: is not a known setting" in message

    @pytest.mark.parametrize(
        ("extra", "field"),
        [
            ('"" = 1\n', '""'),
            ('[orgs."a.b"]\nmax_sessions = 1\n', 'orgs."a.b".key_sha256'),
        ],
    )
    def test_keys_that_are_not_bare_are_quoted(
        self, tmp_path: Path, extra: str, field: str
    ) -> None:
        """An empty or dotted key is named in quotes, as TOML writes it."""
        path = write_config(tmp_path, HEADER + extra)

        message = load_error(path)

        assert f"  {field}: " in message
        assert "(root)" not in message

    def test_missing_file(self, tmp_path: Path) -> None:
        """A file that does not exist is a ConfigError naming it."""
        path = tmp_path / "absent.toml"

        message = load_error(path)

        assert message == f"config file {path} does not exist"

    def test_malformed_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is a ConfigError naming it."""
        path = write_config(tmp_path, HEADER + "[worker\n")

        message = load_error(path)

        assert message.startswith(f"config file {path} is not valid TOML: ")

    def test_unterminated_string_names_its_line(self, tmp_path: Path) -> None:
        """An error at the end of the document still names the line."""
        path = write_config(tmp_path, HEADER + 'fleet = "open')

        message = load_error(path)

        assert message.startswith(f"config file {path} is not valid TOML: ")
        assert "line 3" in message

    def test_text_that_is_not_utf8(self, tmp_path: Path) -> None:
        """A file with bytes that are not UTF-8 is a ConfigError naming the line."""
        path = tmp_path / "fleet.toml"
        path.write_bytes(HEADER.encode() + b'fleet = "\xff"\n')

        message = load_error(path)

        assert message == (
            f"config file {path} is not valid TOML: line 3 is not UTF-8 text"
        )

    def test_unreadable_path(self, tmp_path: Path) -> None:
        """A path that names a directory is a ConfigError naming it."""
        message = load_error(tmp_path)

        assert message.startswith(f"config file {tmp_path} cannot be read: ")

    @pytest.mark.parametrize("key", ["_env_prefix", "_secrets_dir", "_env_file"])
    def test_settings_library_options_are_unknown_keys(
        self, tmp_path: Path, key: str
    ) -> None:
        """A key pydantic-settings would take as its option is refused by name."""
        path = write_config(tmp_path, HEADER + f'{key} = "X_"\n')

        message = load_error(path)

        assert f"  {key}: is not a known setting" in message

    def test_environment_overrides_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ACP_FLEET_WORKER__LEASE_MS wins over the file, other fields stay."""
        path = write_config(
            tmp_path, HEADER + "[worker]\nlease_ms = 9000\nheartbeat_ms = 1000\n"
        )
        monkeypatch.setenv("ACP_FLEET_WORKER__LEASE_MS", "5000")

        worker = load_settings(path).worker

        assert worker.lease_ms == 5000
        assert worker.heartbeat_ms == 1000

    def test_malformed_environment_value(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An environment value that is not JSON is a ConfigError naming it."""
        path = write_config(tmp_path, HEADER)
        monkeypatch.setenv("ACP_FLEET_ORGS", "{not json")

        message = load_error(path)

        assert "  orgs: ACP_FLEET_ORGS must hold JSON" in message

    def test_malformed_nested_environment_value(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A nested table given as broken JSON names its field and variable."""
        path = write_config(tmp_path, HEADER)
        monkeypatch.setenv("ACP_FLEET_WORKER__EGRESS", "{not json")

        message = load_error(path)

        assert "  worker: ACP_FLEET_WORKER__EGRESS must hold JSON" in message

    def test_huge_value_is_cut_short(self, tmp_path: Path) -> None:
        """A long invalid value is quoted cut short, not whole."""
        path = write_config(tmp_path, HEADER + f'fleet = "{"X" * 100_000}"\n')

        message = load_error(path)

        assert "  fleet: " in message
        assert len(message) < 500

    def test_short_secret_not_echoed(self, tmp_path: Path) -> None:
        """A too-short token_secret is refused without showing its value."""
        path = write_config(tmp_path, 'config_version = 1\ntoken_secret = "hunter2"\n')

        message = load_error(path)

        assert "token_secret: " in message
        assert "hunter2" not in message

    def test_short_secret_from_environment_not_echoed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A too-short token_secret from the environment is not shown either."""
        path = write_config(tmp_path, HEADER)
        monkeypatch.setenv("ACP_FLEET_TOKEN_SECRET", "env-hunter2")

        message = load_error(path)

        assert "token_secret: " in message
        assert "env-hunter2" not in message
        assert NEVER_SHOWN not in message

    def test_bad_key_digest_not_echoed(self, tmp_path: Path) -> None:
        """A malformed key_sha256 is refused without showing its value."""
        org = (
            '[orgs.acme]\nkey_sha256 = "sk-live-do-not-print"\n'
            "max_sessions = 2\nsessions_per_minute = 10\n"
        )
        path = write_config(tmp_path, HEADER + org)

        message = load_error(path)

        assert "orgs.acme.key_sha256: " in message
        assert "sk-live-do-not-print" not in message
        assert NEVER_SHOWN not in message

    def test_heartbeat_above_third_of_lease(self, tmp_path: Path) -> None:
        """heartbeat_ms above a third of lease_ms is refused."""
        path = write_config(
            tmp_path, HEADER + "[worker]\nlease_ms = 10000\nheartbeat_ms = 3334\n"
        )

        message = load_error(path)

        assert (
            "  worker: heartbeat_ms (3334) must be at most a third of lease_ms (10000)"
            in message
        )

    def test_heartbeat_at_third_of_lease(self, tmp_path: Path) -> None:
        """heartbeat_ms just within a third of lease_ms is accepted."""
        path = write_config(
            tmp_path, HEADER + "[worker]\nlease_ms = 10000\nheartbeat_ms = 3333\n"
        )

        assert load_settings(path).worker.heartbeat_ms == 3333


class TestNetworkPolicy:
    """A profile's network is none by default, egress on request, never host."""

    NETWORK = '[profiles.coder.network]\nmode = "{mode}"\nallow = {allow}\n'

    def network_config(self, tmp_path: Path, mode: str, allow: str = "[]") -> Path:
        network = self.NETWORK.format(mode=mode, allow=allow)
        profile = PROFILE.format(memory="1g", pids=64)
        return write_config(tmp_path, HEADER + profile + network)

    def test_default_is_no_network(self, tmp_path: Path) -> None:
        """A profile that says nothing about its network gets none."""
        path = write_config(tmp_path, HEADER + PROFILE.format(memory="1g", pids=64))

        network = load_settings(path).profiles["coder"].network

        assert (network.mode, network.allow, network.ports) == ("none", [], [80, 443])

    def test_egress_keeps_canonical_entries(self, tmp_path: Path) -> None:
        """Egress entries are stored lower-case, without a trailing dot."""
        path = self.network_config(
            tmp_path, "egress", '["API.Example.com.", "*.pypi.org", "203.0.113.7"]'
        )

        network = load_settings(path).profiles["coder"].network

        assert network.allow == ["api.example.com", "*.pypi.org", "203.0.113.7"]

    def test_host_mode_is_refused_as_never_offered(self, tmp_path: Path) -> None:
        """mode host is refused, naming the field and saying it is never offered."""
        path = self.network_config(tmp_path, "host")

        message = load_error(path)

        assert "profiles.coder.network.mode: host networking is never offered" in (
            message
        )

    @pytest.mark.parametrize("entry", ["foo.*.com", "*example.com", "*", "*.com"])
    def test_bad_wildcard_is_refused(self, tmp_path: Path, entry: str) -> None:
        """A wildcard anywhere but a leading '*.' over two labels is refused."""
        path = self.network_config(tmp_path, "egress", f'["{entry}"]')

        message = load_error(path)

        assert f"profiles.coder.network.allow: {entry!r}" in message

    def test_egress_without_hosts_is_refused(self, tmp_path: Path) -> None:
        """Egress with an empty allow list is refused: it could reach nothing."""
        path = self.network_config(tmp_path, "egress")

        message = load_error(path)

        assert "profiles.coder.network: egress with an empty allow list" in message

    @pytest.mark.parametrize("name", ["", "*", "*.pypi.org", "203.0.113.9", "a b"])
    def test_worker_hosts_are_single_names(self, tmp_path: Path, name: str) -> None:
        """A static host entry keyed by no name, a wildcard or an address is
        refused: it would never be looked up."""
        worker = f'[worker.egress.hosts]\n"{name}" = "203.0.113.7"\n'
        path = write_config(tmp_path, HEADER + worker)

        message = load_error(path)

        assert f"worker.egress.hosts: {name!r} is not a host name" in message

    def test_worker_hosts_must_map_to_addresses(self, tmp_path: Path) -> None:
        """A static host entry that is not an IP address is refused by name."""
        worker = '[worker.egress.hosts]\n"pypi.org" = "somewhere"\n'
        path = write_config(tmp_path, HEADER + worker)

        message = load_error(path)

        assert "worker.egress.hosts: 'pypi.org' maps to 'somewhere'" in message


class TestDockerProxyConfig:
    """The socket proxy's settings: defaults, sizes, and Engine addresses."""

    def test_defaults_listen_in_run_and_forward_to_the_engine(
        self, tmp_path: Path
    ) -> None:
        """Without a table the proxy listens on /run/acp-fleet/docker.sock."""
        proxy = load_settings(write_config(tmp_path, HEADER)).docker_proxy

        assert proxy.listen_path == "/run/acp-fleet/docker.sock"
        assert proxy.upstream_url == "unix:///var/run/docker.sock"
        assert (proxy.listen_mode, proxy.max_body_bytes) == ("0660", 4 * 1024**2)

    def test_sizes_and_addresses_are_read(self, tmp_path: Path) -> None:
        """A body bound in bytes and a TCP Engine are accepted."""
        table = (
            "[docker_proxy]\nmax_body_bytes = 8388608\n"
            'upstream_url = "tcp://127.0.0.1:2375"\nlisten_path = "/s/d.sock"\n'
        )

        proxy = load_settings(write_config(tmp_path, HEADER + table)).docker_proxy

        assert (proxy.max_body_bytes, proxy.upstream_url) == (
            8 * 1024**2,
            "tcp://127.0.0.1:2375",
        )

    @pytest.mark.parametrize(
        ("line", "field"),
        [
            ('listen_path = "docker.sock"', "docker_proxy.listen_path"),
            ('upstream_url = "/var/run/docker.sock"', "docker_proxy.upstream_url"),
            ('listen_mode = "666"', "docker_proxy.listen_mode"),
            ("max_body_bytes = 1024", "docker_proxy.max_body_bytes"),
        ],
    )
    def test_bad_values_name_the_field(
        self, tmp_path: Path, line: str, field: str
    ) -> None:
        """A relative socket, an address without scheme, a mode without
        its leading zero or a tiny body bound is refused, naming the field."""
        path = write_config(tmp_path, HEADER + f"[docker_proxy]\n{line}\n")

        assert f"  {field}: " in load_error(path)
