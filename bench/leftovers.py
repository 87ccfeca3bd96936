"""Containers a benchmark makes outside the fleet, and what one killed
outright leaves of them.

Each carries the id of the benchmark's process in a label; a benchmark
starting removes those whose process is gone. (The fleet's own containers
are its worker's to reconcile.)
"""

from __future__ import annotations

import json
import os
from typing import Any

from shared.localfleet import process_running
from worker.docker import DockerRuntime

PID_LABEL = "io.acp-fleet.bench-pid"


def owned(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with this process' label on the container."""
    return {
        **config,
        "Labels": {**config.get("Labels", {}), PID_LABEL: str(os.getpid())},
    }


async def remove_leftovers(runtime: DockerRuntime) -> int:
    """Remove the containers of benchmarks that no longer run; return how
    many there were."""
    found = await runtime.docker.containers.list(
        all=True, filters=json.dumps({"label": [PID_LABEL]})
    )
    removed = 0
    for container in found:
        pid = container["Labels"].get(PID_LABEL, "")
        if pid.isdecimal() and not process_running(int(pid)):
            await runtime.remove(container.id)
            removed += 1
    return removed
