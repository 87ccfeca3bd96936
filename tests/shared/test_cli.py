"""The ``acp-fleet`` command's start-up: a bad setting is a message, not a trace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli import cli

SECRET = "s" * 40
CONFIG = f'config_version = 1\ntoken_secret = "{SECRET}"\n'


def clean_env(**variables: str) -> dict[str, str]:
    """The caller's environment without ACP_FLEET_*, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_FLEET_")}
    return {**env, **variables}


def refusal(*args: str, env: dict[str, str]) -> str:
    """Run the command, expect the config-error exit, return its stderr."""
    ran = cli(*args, env=env)

    assert ran.returncode == 2, ran.stderr.decode()
    stderr = ran.stderr.decode()
    assert "Traceback" not in stderr
    assert stderr.startswith("acp-fleet: ")
    return stderr


class TestStartUpErrors:
    """Each service refuses bad settings before it starts anything."""

    @pytest.mark.parametrize("service", ["scheduler", "worker"])
    def test_a_redis_url_without_a_scheme_is_named(
        self, tmp_path: Path, service: str
    ) -> None:
        """ACP_FLEET_REDIS_URL=notaurl names redis_url and the accepted forms."""
        config = tmp_path / "fleet.toml"
        config.write_text(CONFIG)
        env = clean_env(ACP_FLEET_REDIS_URL="notaurl")

        stderr = refusal(service, "--config", str(config), env=env)

        assert "  redis_url: the URL has no scheme; accepted: redis://" in stderr
        assert "rediss://" in stderr
        assert "unix://" in stderr

    def test_a_redis_password_is_never_echoed(self, tmp_path: Path) -> None:
        """A refused Redis URL is described without repeating its password."""
        config = tmp_path / "fleet.toml"
        config.write_text(CONFIG)
        env = clean_env(ACP_FLEET_REDIS_URL="http://:hunter2-password@redis/0")

        stderr = refusal("scheduler", "--config", str(config), env=env)

        assert "redis_url: the URL has scheme http://" in stderr
        assert "hunter2" not in stderr

    def test_a_directory_as_config_is_named(self, tmp_path: Path) -> None:
        """--config naming a directory says it cannot be read."""
        stderr = refusal("scheduler", "--config", str(tmp_path), env=clean_env())

        assert f"config file {tmp_path} cannot be read: Is a directory" in stderr

    def test_a_config_that_is_not_utf8_names_its_line(self, tmp_path: Path) -> None:
        """A config file with bytes that are not UTF-8 names the line."""
        config = tmp_path / "fleet.toml"
        config.write_bytes(CONFIG.encode() + b"# caf\xe9\n")

        stderr = refusal("worker", "--config", str(config), env=clean_env())

        assert "is not valid TOML: line 3 is not UTF-8 text" in stderr

    def test_a_bad_docker_url_is_named(self, tmp_path: Path) -> None:
        """A worker.docker_url that is no Engine address names the field."""
        config = tmp_path / "fleet.toml"
        config.write_text(CONFIG)
        env = clean_env(ACP_FLEET_WORKER__DOCKER_URL="localhost")

        stderr = refusal("worker", "--config", str(config), env=env)

        assert "  worker.docker_url: 'localhost' is not an Engine address" in stderr
        assert "unix:///path or tcp://host:port" in stderr
