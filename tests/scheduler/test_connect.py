"""``acp-fleet connect`` as an editor or a script runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import IO

import pytest

from shared.localfleet import LocalFleet
from tests.cli import cli


def connect(
    fleet: LocalFleet, stdin: int | IO[bytes], *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run connect against ``fleet`` with acme's key."""
    env = {**os.environ, "ACP_FLEET_API_KEY": fleet.api_keys["acme"]}
    return cli("connect", "--url", fleet.url, *args, env=env, stdin=stdin)


class TestConnect:
    def test_stdin_from_a_file_reaches_the_agent(
        self, fleet: LocalFleet, tmp_path: Path
    ) -> None:
        """A file's bytes and its end arrive; connect exits with the agent."""
        source = tmp_path / "in.txt"
        source.write_bytes(b"hello\n")

        with source.open("rb") as stdin:
            done = connect(fleet, stdin, "--profile", "cat-exit")

        assert done.stdout == b"hello\ndone\n"
        assert done.returncode == 7

    def test_stdin_from_dev_null_is_an_immediate_eof(self, fleet: LocalFleet) -> None:
        """With /dev/null as stdin the agent sees EOF at once."""
        done = connect(fleet, subprocess.DEVNULL, "--profile", "cat-exit")

        assert done.stdout == b"done\n"
        assert done.returncode == 7

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--profile", "nope"], b"unknown_profile"),
            (["--session", "0" * 32, "--token", "a.b.c"], b"invalid_token"),
        ],
    )
    def test_refusals_are_one_line_and_exit_2(
        self, fleet: LocalFleet, args: list[str], message: bytes
    ) -> None:
        """A refused request prints its reason, no traceback, and exits 2."""
        done = connect(fleet, subprocess.DEVNULL, *args)

        assert done.returncode == 2
        assert message in done.stderr
        assert b"Traceback" not in done.stderr

    def test_an_unreachable_scheduler_is_reported_plainly(
        self, fleet: LocalFleet
    ) -> None:
        """A scheduler that does not answer is named, without a traceback."""
        env = {**os.environ, "ACP_FLEET_API_KEY": "k"}
        url = "http://127.0.0.1:1"

        done = cli("connect", "--url", url, "--profile", "cat-exit", env=env)

        assert done.returncode == 2
        assert b"cannot reach http://127.0.0.1:1" in done.stderr
        assert b"Traceback" not in done.stderr


class TestOperatorCommands:
    def test_nodes_and_drain_speak_to_the_api(self, fleet: LocalFleet) -> None:
        """'nodes' lists the worker; 'drain' and 'drain --undo' answer 0."""
        env = {**os.environ, "ACP_FLEET_OPERATOR_KEY": fleet.operator_key}
        node = fleet.settings.worker.node

        listing = cli("nodes", "--url", fleet.url, env=env)
        drained = cli("drain", node, "--url", fleet.url, env=env)
        resumed = cli("drain", node, "--undo", "--url", fleet.url, env=env)

        assert listing.returncode == 0, listing.stderr
        assert node.encode() in listing.stdout
        assert b"queue:" in listing.stdout
        assert (drained.returncode, resumed.returncode) == (0, 0)

    def test_nodes_without_an_operator_key_explains(self, fleet: LocalFleet) -> None:
        """Without a key the command says which variable to set."""
        env = {k: v for k, v in os.environ.items() if k != "ACP_FLEET_OPERATOR_KEY"}

        done = cli("nodes", "--url", fleet.url, env=env)

        assert done.returncode == 2
        assert b"ACP_FLEET_OPERATOR_KEY" in done.stderr
