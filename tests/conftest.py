"""Fixtures shared by the suite: a real Redis, a real Docker Engine, a fleet.

Integration tests never skip: when Docker, Redis or the test images are
missing they fail, naming what to run (``make setup``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from shared.localfleet import AGENT_IMAGE, LocalFleet, local_fleet, redis_server
from tests.sandboxes import BUSYBOX_IMAGE, PROFILES


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A throw-away redis-server for the whole run."""
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def docker_images() -> None:
    """Fail, not skip, when the Engine or the test images are missing."""
    for image in (BUSYBOX_IMAGE, AGENT_IMAGE, "acp-fleet/nosh:test"):
        found = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, check=False
        )
        if found.returncode != 0:
            pytest.fail(
                f"Docker image {image} is missing or the Engine is down: "
                f"{found.stderr.decode().strip()}; run 'make setup'"
            )


@pytest.fixture(scope="session")
def fleet(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A scheduler and a worker running every test profile."""
    with local_fleet(
        PROFILES,
        redis_url=redis_url,
        orgs={
            "acme": {"max_sessions": 64, "sessions_per_minute": 100_000},
            "beta": {"max_sessions": 4, "sessions_per_minute": 100_000},
        },
        worker={"max_sessions": 32, "kill_grace_s": 1.0},
    ) as running:
        yield running
