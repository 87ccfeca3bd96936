"""The ``acp-fleet`` command: start-up refusals and the operators' commands."""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.keys import Keys
from shared.localfleet import REPO, LocalFleet, local_fleet
from shared.store import SessionStore
from tests.cli import cli
from tests.sandboxes import PROFILES

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

    async def test_a_metrics_port_in_use_is_named_and_the_node_let_go(
        self, tmp_path: Path, redis_url: str
    ) -> None:
        """A worker whose metrics port another process holds names the
        setting and the address, exits 2, and leaves its node free for the
        next worker at once."""
        config = tmp_path / "fleet.toml"
        config.write_text(CONFIG + 'key_prefix = "fportbusy"\n')
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            env = clean_env(
                ACP_FLEET_REDIS_URL=redis_url,
                ACP_FLEET_WORKER__NODE="busy-port",
                ACP_FLEET_WORKER__METRICS_PORT=str(port),
            )

            stderr = refusal("worker", "--config", str(config), env=env)

        assert stderr.splitlines() == [
            f"acp-fleet: worker.metrics_port: cannot listen on 127.0.0.1:{port}:"
            " Address already in use"
        ]
        redis = Redis.from_url(redis_url)
        try:
            owner = await redis.exists(Keys("fportbusy").node_owner("busy-port"))
        finally:
            await redis.aclose()
        assert owner == 0


@pytest.fixture(scope="module")
def scheduler_alone(redis_url: str) -> Iterator[LocalFleet]:
    """A scheduler with no worker, and a node n1 known by one heartbeat."""
    with local_fleet(
        {"sh": PROFILES["cat-exit"]}, redis_url=redis_url, start_worker=False
    ) as fleet:
        asyncio.run(beat(fleet, "n1"))
        yield fleet


async def beat(fleet: LocalFleet, node: str) -> None:
    """Record one heartbeat of ``node`` as its worker would."""
    redis = Redis.from_url(fleet.redis_url)
    store = SessionStore(redis, keys=Keys(fleet.settings.key_prefix))
    fields = {"capacity": "1", "sessions": "0", "started_ms": "0", "draining": "0"}
    await store.beat_node(node, fields, ttl_ms=600_000)
    await redis.aclose()


class TestDrainCommand:
    """acp-fleet drain says when the request takes effect."""

    def test_a_drain_says_it_is_followed_at_the_next_heartbeat(
        self, scheduler_alone: LocalFleet
    ) -> None:
        """A drain is reported as requested, not shown as a table saying no."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)

        ran = cli("drain", "n1", "--url", scheduler_alone.url, env=env)

        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.decode() == (
            "drain requested; n1 stops claiming at its next heartbeat\n"
        )

    def test_an_undo_says_it_is_followed_at_the_next_heartbeat(
        self, scheduler_alone: LocalFleet
    ) -> None:
        """Withdrawing a drain is reported the same way."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)

        ran = cli("drain", "n1", "--undo", "--url", scheduler_alone.url, env=env)

        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.decode() == (
            "drain withdrawn; n1 claims again at its next heartbeat\n"
        )

    def test_an_unknown_node_is_one_line_and_exit_2(
        self, scheduler_alone: LocalFleet
    ) -> None:
        """A node that never sent a heartbeat is refused in one line."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)

        ran = cli("drain", "n2", "--url", scheduler_alone.url, env=env)

        assert ran.returncode == 2
        assert ran.stdout == b""
        assert ran.stderr.decode().startswith("acp-fleet: node_not_found: ")

    @pytest.mark.parametrize("name", ["x/../n1", "n1?x=1", "n1#x", "n1/"])
    async def test_a_name_is_one_node_never_a_path(
        self, scheduler_alone: LocalFleet, name: str
    ) -> None:
        """A name with /, ? or # is sent as one name: it is refused as an
        unknown node, and n1 is not drained."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)

        ran = cli("drain", name, "--url", scheduler_alone.url, env=env)

        assert ran.returncode == 2
        assert ran.stderr.decode().startswith("acp-fleet: node_not_found: ")
        redis = Redis.from_url(scheduler_alone.redis_url)
        keys = Keys(scheduler_alone.settings.key_prefix)
        try:
            assert await redis.exists(keys.node_drain("n1")) == 0
        finally:
            await redis.aclose()

    def test_an_empty_name_is_refused_before_any_call(self) -> None:
        """drain '' says the name is empty."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY="afo_x")

        ran = cli("drain", "", "--url", "http://127.0.0.1:1", env=env)

        assert ran.returncode == 2
        assert ran.stderr.decode() == "acp-fleet: drain: the node's name is empty\n"

    def test_nodes_shows_a_drain_requested_until_the_worker_follows(
        self, scheduler_alone: LocalFleet
    ) -> None:
        """Right after drain, before the node's worker has followed, nodes
        says requested, not no."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)
        url = scheduler_alone.url
        cli("drain", "n1", "--url", url, env=env)
        try:
            ran = cli("nodes", "--url", url, env=env)
        finally:
            cli("drain", "n1", "--undo", "--url", url, env=env)

        row = next(
            line for line in ran.stdout.decode().splitlines() if line.startswith("n1 ")
        )
        assert ran.returncode == 0, ran.stderr
        assert row.split()[3] == "requested"

    def test_nodes_still_prints_the_table(self, scheduler_alone: LocalFleet) -> None:
        """acp-fleet nodes lists the known node and the queue."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)

        ran = cli("nodes", "--url", scheduler_alone.url, env=env)

        assert ran.returncode == 0, ran.stderr
        lines = ran.stdout.decode().splitlines()
        assert lines[0].startswith("node")
        assert lines[1].startswith("n1")
        assert lines[-1].startswith("queue: 0 waiting")

    def test_nodes_into_a_closed_pipe_ends_quietly(
        self, scheduler_alone: LocalFleet
    ) -> None:
        """A reader that left before the table (``| true``) ends the command
        with status 1 and nothing on stderr, not a traceback."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=scheduler_alone.operator_key)
        url = scheduler_alone.url
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            ran = subprocess.run(
                [sys.executable, "-m", "shared.cli", "nodes", "--url", url],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.PIPE,
                env=env,
                cwd=REPO,
                timeout=60,
                check=False,
            )
        finally:
            os.close(write_end)

        assert ran.returncode == 1
        assert ran.stderr == b""


class TestKeysFromTheEnvironment:
    @pytest.mark.parametrize("command", [["nodes"], ["top", "--once"]])
    @pytest.mark.parametrize("key", ["afo_abc\n", "afo_a bc", "afo_é"])
    def test_a_key_no_header_can_carry_is_named_before_any_call(
        self, command: list[str], key: str
    ) -> None:
        """An operator key with a line break, a space or a letter outside
        ASCII is refused in one line naming the variable, not reported as
        a scheduler that cannot be reached."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY=key)

        ran = cli(*command, "--url", "http://127.0.0.1:1", env=env)

        assert ran.returncode == 2
        assert ran.stderr.decode().splitlines() == [
            "acp-fleet: ACP_FLEET_OPERATOR_KEY holds a character no key has"
            " (keys are printable ASCII, without spaces or line breaks)"
        ]

    def test_an_organisation_key_is_checked_by_connect(self) -> None:
        """connect names ACP_FLEET_API_KEY when its key cannot be sent."""
        env = clean_env(ACP_FLEET_API_KEY="afk_abc\r\n")

        ran = cli("connect", "--profile", "p", "--url", "http://127.0.0.1:1", env=env)

        assert ran.returncode == 2
        assert ran.stderr.decode().startswith(
            "acp-fleet connect: ACP_FLEET_API_KEY holds a character no key has"
        )


class TestUnknownArguments:
    @pytest.mark.parametrize(
        "args", [["top"], ["nodes"], ["worker"], ["connect", "--profile", "p"]]
    )
    def test_the_command_own_usage_is_shown(self, args: list[str]) -> None:
        """An option a command does not take is refused with exit 2 and
        that command's usage, not the list of commands."""
        command = args[0]
        ran = cli(*args, "--bogus", env=clean_env())

        stderr = ran.stderr.decode()
        assert ran.returncode == 2
        assert stderr.startswith(f"usage: acp-fleet {command} ")
        assert stderr.splitlines()[-1] == (
            f"acp-fleet {command}: error: unrecognized arguments: --bogus"
        )


class TestSchedulerUrl:
    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("http://[::1", "Invalid IPv6 URL"),
            ("http://127.0.0.1:99999", "Port out of range 0-65535"),
            ("localhost:8080", "the scheme is not http or https"),
            ("http://", "it names no host"),
            ("http://127.0.0.1:", "the port is empty"),
            (
                "http://user:pw@127.0.0.1:8080",
                "it holds a user or password; the key is sent instead",
            ),
            ("http://127.0.0.1:8080?x=1", "it has a query or a fragment"),
            ("http://127.0.0.1:8080#f", "it has a query or a fragment"),
        ],
    )
    @pytest.mark.parametrize(
        "command",
        [["top", "--once"], ["nodes"], ["drain", "n1"], ["connect", "--profile", "p"]],
    )
    def test_a_url_that_is_none_is_refused_by_name(
        self, command: list[str], url: str, reason: str
    ) -> None:
        """A malformed --url is one usage error naming it and why, exit 2,
        no traceback."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY="afo_x")

        ran = cli(*command, "--url", url, env=env)

        last = ran.stderr.decode().splitlines()[-1]
        assert ran.returncode == 2
        assert "Traceback" not in ran.stderr.decode()
        assert last == (
            f"acp-fleet {command[0]}: error: argument --url: expected the"
            f" scheduler's URL, such as http://127.0.0.1:8080, not {url!r}: {reason}"
        )

    def test_one_from_the_environment_is_checked_too(self) -> None:
        """ACP_FLEET_URL is the default --url, refused the same way."""
        env = clean_env(ACP_FLEET_OPERATOR_KEY="afo_x", ACP_FLEET_URL="ftp://x")

        ran = cli("nodes", env=env)

        assert ran.returncode == 2
        assert "argument --url: expected the scheduler's URL" in ran.stderr.decode()


class _Answering(http.server.BaseHTTPRequestHandler):
    """Answers every request 200 with the server's ``body``."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_service() -> Iterator[http.server.ThreadingHTTPServer]:
    """A service on loopback that answers any JSON it is given."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class TestAnotherServiceAtTheUrl:
    @pytest.mark.parametrize("body", [b"{}", b"[]", b"null", b'{"nodes": 3}'])
    @pytest.mark.parametrize("command", [["nodes"], ["drain", "n1"], ["top", "--once"]])
    def test_json_that_is_no_fleet_view_is_named_as_such(
        self,
        other_service: http.server.ThreadingHTTPServer,
        command: list[str],
        body: bytes,
    ) -> None:
        """A service that answers 200 with other JSON is reported as not a
        scheduler, exit 2: no table, no traceback, no drain said done."""
        other_service.body = body  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{other_service.server_address[1]}"
        env = clean_env(ACP_FLEET_OPERATOR_KEY="afo_x")

        ran = cli(*command, "--url", url, env=env)

        assert ran.returncode == 2
        assert ran.stdout == b""
        assert (
            ran.stderr.decode()
            .splitlines()[-1]
            .endswith(f"{url} does not answer as an ACP Fleet scheduler")
        )
