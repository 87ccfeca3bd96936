"""Containers a benchmark makes outside the fleet, and what one killed
outright leaves of them.

Each carries the id of the benchmark's process in a label; a benchmark
starting removes those whose process is gone. (The fleet's own containers
are its worker's to reconcile.)
"""

from __future__ import annotations

import os
from typing import Any

from shared.localfleet import process_running
from worker.docker import LABEL_FLEET, DockerRuntime

# The fleet label every benchmark's own containers carry.
BENCH_FLEET = "bench"
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
    removed = 0
    for container in await runtime.labelled({LABEL_FLEET: BENCH_FLEET}):
        pid = container["Labels"].get(PID_LABEL, "")
        if pid.isdecimal() and not process_running(int(pid)):
            await runtime.remove(container["Id"])
            removed += 1
    return removed
