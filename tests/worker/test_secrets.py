"""Secrets: in the session they were given to, and nowhere else."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path

from scheduler.client import End, FleetClient
from shared.localfleet import LocalFleet
from shared.wire import STDOUT
from tests.sandboxes import run_session


def node_files_holding(value: str, *paths: Path) -> list[str]:
    """Files under ``paths`` on the node whose bytes contain ``value``."""
    found = subprocess.run(
        ["grep", "-rlF", "--", value, *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.split()


async def test_a_secret_reaches_its_session_only(fleet: LocalFleet) -> None:
    api_key = "sk-" + secrets.token_hex(16)
    token = "tok-" + secrets.token_hex(16)
    async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
        created = await client.create_session(
            "secret-file", env={"API_KEY": api_key, "TOKEN": token}
        )
        said = b""
        async with client.stdio(created["id"]) as stdio:
            async with asyncio.timeout(60):
                async for event in stdio.events():
                    assert not isinstance(event, End), said
                    if getattr(event, "channel", None) == STDOUT:
                        said += event.data
                    if b"token=" in said:
                        break
            # While it runs: nothing on the node's disk holds either value,
            # neither Docker's container state nor the fleet's files.
            container_id = await asyncio.to_thread(fleet_container, created["id"])
            on_disk = node_files_holding(
                api_key, Path("/var/lib/docker/containers"), fleet.workdir
            ) + node_files_holding(
                token, Path("/var/lib/docker/containers"), fleet.workdir
            )
            # Another session, of the same org, looking everywhere it can.
            other = await run_session(fleet, "snoop")
            await stdio.send_eof()
            async with asyncio.timeout(60):
                async for event in stdio.events():
                    if isinstance(event, End):
                        break

    text = said.decode()
    assert "env-key=[]" in text
    assert "file=/run/secrets/API_KEY" in text
    assert f"file-key=[{api_key}]" in text
    assert "mode=600 owner=1000" in text
    assert f"token=[{token}]" in text
    assert container_id
    assert on_disk == []
    assert other.view["cause"] == "agent_exit"
    assert other.stdout
    for value in (api_key, token):
        assert value.encode() not in other.stdout + other.stderr
        for name in ("scheduler", "worker"):
            assert value not in fleet.log(name), f"{name}'s log holds a secret"


def fleet_container(session_id: str) -> str:
    """The id of the session's container, read from Docker by its label."""
    for _ in range(50):
        listed = subprocess.run(
            [
                "docker",
                "ps",
                "-q",
                "--filter",
                f"label=io.acp-fleet.session={session_id}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if listed:
            return listed
        time.sleep(0.1)
    return ""
