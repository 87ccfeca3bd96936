"""The benchmarks refuse values a run cannot use before they start a fleet."""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import subprocess
import sys
from typing import Any

import pytest

from shared.localfleet import REPO
from tests.sandboxes import BUSYBOX_IMAGE
from worker.docker import LABEL_FLEET, DockerRuntime


class TestArguments:
    @pytest.mark.parametrize(
        ("script", "args", "named"),
        [
            ("relay.py", ["--round-trips", "1"], "--round-trips"),
            ("relay.py", ["--mib", "-1"], "--mib"),
            ("relay.py", ["--mib", "99999999999999999999"], "--mib"),
            ("admission.py", ["--seconds", "0"], "--seconds"),
            ("admission.py", ["--seconds", "0.001"], "--seconds"),
            ("admission.py", ["--seconds", "nan"], "--seconds"),
            ("startup.py", ["--sessions", "0"], "--sessions"),
            ("startup.py", ["--burst", "-3"], "--burst"),
        ],
    )
    def test_a_value_out_of_range_is_refused_by_name(
        self, script: str, args: list[str], named: str
    ) -> None:
        """Exit 2 with one line naming the option and its range, and nothing
        started: no line on stdout."""
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / script), *args],
            capture_output=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )

        assert done.returncode == 2
        assert done.stdout == b""
        last = done.stderr.decode().splitlines()[-1]
        assert f"error: argument {named}: expected " in last
        assert repr(args[-1]) in last


class TestLeftovers:
    async def test_containers_of_benchmarks_gone_are_removed(
        self, docker_images: None
    ) -> None:
        """A container labelled for a process that has exited is removed,
        running or not; one labelled for a running process stays."""
        leftovers = _bench_module("leftovers")
        ended = await asyncio.create_subprocess_exec("true")
        await ended.wait()
        runtime = DockerRuntime("unix:///var/run/docker.sock")
        await runtime.open()
        made = []
        try:
            for pid, command in ((ended.pid, "sleep 600"), (ended.pid, "true")):
                config = leftovers.owned(_config(command))
                config["Labels"][leftovers.PID_LABEL] = str(pid)
                made.append(await runtime.create(config, name=_name()))
            await runtime.start(made[0])
            made.append(
                await runtime.create(leftovers.owned(_config("true")), name=_name())
            )

            removed = await leftovers.remove_leftovers(runtime)
            left = {c["Id"] for c in await runtime.labelled({})}
        finally:
            for container_id in made:
                await runtime.remove(container_id)
            await runtime.close()

        assert removed >= 2
        assert made[0] not in left
        assert made[1] not in left
        assert made[2] in left


def _bench_module(name: str) -> Any:
    """A module of ``bench/``, which runs as scripts rather than a package."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(command: str) -> dict[str, Any]:
    """A container as the benchmarks label theirs."""
    return {
        "Image": BUSYBOX_IMAGE,
        "Cmd": ["sh", "-c", command],
        "Labels": {LABEL_FLEET: "bench"},
    }


def _name() -> str:
    return f"test-leftover-{secrets.token_hex(4)}"
