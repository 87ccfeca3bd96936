"""The Docker Engine module's own guarantees, against the real Engine."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.errors import SandboxError
from shared.settings import AgentProfile
from tests.sandboxes import BUSYBOX_IMAGE, busybox_profile
from worker.docker import DockerRuntime, SandboxSpec, container_config, seccomp_profile

# Cancels land from before the request leaves to after the Engine answers.
CANCEL_AFTER_S = (0.0, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.04)


@pytest.fixture
async def runtime(docker_images: None) -> AsyncIterator[DockerRuntime]:
    """A runtime on the node's Engine."""
    opened = DockerRuntime("unix:///var/run/docker.sock")
    await opened.open()
    yield opened
    await opened.close()


def containers_named(prefix: str) -> list[str]:
    listed = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"name={prefix}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()


class TestCreate:
    async def test_a_cancelled_create_leaves_no_container(
        self, runtime: DockerRuntime
    ) -> None:
        """A create cancelled at any moment leaves nothing behind."""
        profile = AgentProfile.model_validate(busybox_profile("true"))
        spec = SandboxSpec("cancel", "cancel", profile, profile.limits, BUSYBOX_IMAGE)
        config = container_config(
            spec, fleet="test", node="test", seccomp=seccomp_profile()
        )
        prefix = f"test-cancel-{secrets.token_hex(4)}"
        created = 0

        for index, delay_s in enumerate(CANCEL_AFTER_S):
            task = asyncio.create_task(runtime.create(config, name=f"{prefix}-{index}"))
            await asyncio.sleep(delay_s)
            task.cancel()
            try:
                await task
                created += 1
                await runtime.remove(task.result())
            except asyncio.CancelledError:
                pass

        assert containers_named(prefix) == []
        # Some cancels must have landed before the create finished.
        assert created < len(CANCEL_AFTER_S)


class TestOpen:
    async def test_an_engine_never_reached_is_named_by_its_url(
        self, tmp_path: Path
    ) -> None:
        """A socket with no Engine behind it is reported at the configured URL."""
        url = f"unix://{tmp_path}/no-engine.sock"
        runtime = DockerRuntime(url)

        with pytest.raises(SandboxError) as refused:
            await runtime.open()

        assert str(refused.value) == (
            f"Docker Engine unreachable at {url}: No such file or directory"
        )
        assert "localhost" not in str(refused.value)
