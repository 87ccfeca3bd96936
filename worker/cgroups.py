"""A sandbox's pids counter, read from the node's cgroup filesystem.

Docker reports OOM kills but not forks refused at the pids limit; the
kernel counts those in the cgroup's ``pids.events``. The container's cgroup
is removed the moment its init exits, so the count is read while the
sandbox runs, not after.
"""

from __future__ import annotations

from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def known_pids_events(container_id: str) -> Path | None:
    """The ``pids.events`` of a container where Docker's drivers put it.

    Docker's cgroupfs and systemd drivers, on cgroup v1 and v2, name the
    container's cgroup after its id; this spares a Docker call per session.
    None for any other layout (a custom cgroup parent, say).
    """
    candidates = (
        f"pids/docker/{container_id}",
        f"pids/system.slice/docker-{container_id}.scope",
        f"docker/{container_id}",
        f"system.slice/docker-{container_id}.scope",
    )
    for candidate in candidates:
        path = _CGROUP_ROOT / candidate / "pids.events"
        if path.exists():
            return path

    return None


def pids_events_path(pid: int, *, proc: Path = Path("/proc")) -> Path | None:
    """The ``pids.events`` file of the cgroup that process ``pid`` is in.

    Handles cgroup v1 (the ``pids`` controller's own hierarchy) and v2 (the
    unified one); None when the process is gone or has no pids controller.
    """
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return _CGROUP_ROOT / "pids" / path.lstrip("/") / "pids.events"
        if controllers == "":
            unified = _CGROUP_ROOT / path.lstrip("/") / "pids.events"
    if unified is not None and unified.exists():
        return unified

    return None


def forks_refused(events: Path) -> int | None:
    """Forks the kernel refused at the limit so far; None once the file is gone."""
    try:
        text = events.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "max":
            return int(value)

    return 0
