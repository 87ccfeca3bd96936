"""A whole fleet on this machine: Redis, a scheduler and a worker.

The demo, the end-to-end tests and the benchmarks start the fleet exactly
as an operator would, as separate ``acp-fleet`` processes reading one
settings file, so that every hop is the production path.
"""

from __future__ import annotations

import ctypes
import functools
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from scheduler.auth import key_digest
from shared.errors import FleetError
from shared.settings import FleetSettings, load_settings

AGENT_IMAGE = "acp-fleet/claude-code-acp:0.16.2"
AGENT_COMMAND = [
    "/usr/local/bin/node",
    "/opt/agent/node_modules/@zed-industries/claude-code-acp/dist/index.js",
]
REPO = Path(__file__).resolve().parent.parent
# How long a process stopped with SIGTERM has to exit, beyond a worker's
# drain grace, before it is killed.
STOP_WAIT_S = 30


# The longest path a unix socket's address holds on Linux, less its NUL.
_UNIX_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1
# Loaded here, not in the forked child, where loading could take a lock
# another thread of the parent held at the fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _terminated_with_parent() -> None:
    """In a fleet's child before it runs: have Linux send it SIGTERM when
    the process that started it dies, so that a test run or benchmark
    killed outright leaves no scheduler, worker or Redis running. A worker
    so stopped drains and removes its sandboxes, as on any SIGTERM."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def agent_profile(**overrides: Any) -> dict[str, Any]:
    """The claude-code-acp profile, as a settings table."""
    profile: dict[str, Any] = {
        "image": AGENT_IMAGE,
        "command": AGENT_COMMAND,
        "env": {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"},
        "env_allowed": ["ANTHROPIC_API_KEY"],
        "limits": {"memory": "1g", "cpus": 1, "pids": 256, "lifetime_s": 600},
    }
    return {**profile, **overrides}


@dataclass
class LocalFleet:
    """Handles to a running local fleet."""

    url: str
    api_keys: dict[str, str]
    operator_key: str
    redis_url: str
    config_path: Path
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each process's ``acp-fleet`` command, by name.
    commands: dict[str, str] = field(default_factory=dict)

    @property
    def api_key(self) -> str:
        """The API key of the first organisation."""
        return next(iter(self.api_keys.values()))

    @property
    def settings(self) -> FleetSettings:
        """The settings every process of this fleet reads."""
        return load_settings(self.config_path)

    @property
    def worker_metrics_url(self) -> str:
        """Where Prometheus would scrape this fleet's worker."""
        return f"http://127.0.0.1:{self.settings.worker.metrics_port}/metrics"

    def log(self, name: str) -> str:
        """Return what process ``name`` wrote so far."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start an ``acp-fleet`` process with this fleet's settings."""
        command = [sys.executable, "-m", "shared.cli", *args]
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [*command, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                preexec_fn=_terminated_with_parent,
            )
        self.processes[name] = process
        self.commands[name] = args[0]
        return process

    def stop(self, name: str, *, kill: bool = False) -> None:
        """Stop process ``name``: SIGTERM and wait, or SIGKILL.

        A worker stopped with SIGTERM drains: its sessions run on for its
        drain grace, then end and have their sandboxes removed. It is given
        that long and more, so that it is not killed with sandboxes left.
        """
        process = self.processes[name]
        wait_s = STOP_WAIT_S
        if self.commands.get(name) == "worker":
            wait_s += self.settings.worker.drain_grace_s
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Forgotten only once stopped: a stop cut short can be made again.
        del self.processes[name]
        self.commands.pop(name, None)


def write_settings(path: Path, settings: Mapping[str, Any]) -> None:
    """Write a settings table as a TOML file."""
    path.write_text(tomli_w.dumps(dict(settings)))


@contextmanager
def redis_server(
    port: int | None = None, *, unix_socket: Path | None = None
) -> Iterator[str]:
    """Run a throw-away ``redis-server`` on loopback, or on ``unix_socket``
    alone; yield its URL."""
    with redis_process(port, unix_socket=unix_socket) as (url, _):
        yield url


@contextmanager
def redis_process(
    port: int | None = None, *, unix_socket: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run a throw-away ``redis-server``; yield its URL and its process,
    for tests that stop, continue or kill it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FleetError(
            "redis-server is not installed; install it (Debian: apt-get install "
            "redis-server) or set ACP_FLEET_REDIS_URL to a running Redis."
        )
    address: int | Path
    if unix_socket is None:
        address = port or free_port()
        listen = ["--port", str(address), "--bind", "127.0.0.1"]
        url = f"redis://127.0.0.1:{address}/0"
    else:
        path_bytes = len(os.fsencode(unix_socket))
        if path_bytes > _UNIX_PATH_MAX:
            raise FleetError(
                f"the unix socket path {unix_socket} is {path_bytes} bytes, over "
                f"the {_UNIX_PATH_MAX} a socket's address holds; choose a "
                "shorter folder (TMPDIR)"
            )
        listen = ["--port", "0", "--unixsocket", str(unix_socket)]
        listen += ["--unixsocketperm", "700"]
        url = f"unix://{unix_socket}"
        address = unix_socket
    # Its log is kept to tell why it stopped, should it not start.
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [binary, *listen, "--save", "", "--appendonly", "no"],
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_terminated_with_parent,
        )
        try:
            try:
                wait_listening(address, process, "redis-server")
            except FleetError as exc:
                output.seek(0)
                said = output.read()[-2000:].decode(errors="replace")
                raise FleetError(f"{exc}\n{said}") from None
            yield url, process
        finally:
            # A stopped server would not act on the SIGTERM until continued.
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(timeout=10)


@contextmanager
def local_fleet(
    profiles: Mapping[str, Any],
    *,
    redis_url: str | None = None,
    orgs: Mapping[str, Mapping[str, int]] | None = None,
    worker: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    telemetry: Mapping[str, Any] | None = None,
    start_worker: bool = True,
) -> Iterator[LocalFleet]:
    """Start a scheduler and a worker (and Redis, unless given); yield handles."""
    with _maybe_redis(redis_url) as url:
        workdir = new_folder()
        orgs = orgs or {"demo": {"max_sessions": 8, "sessions_per_minute": 600}}
        api_keys = {org: "afk_" + secrets.token_urlsafe(24) for org in orgs}
        operator_key = "afo_" + secrets.token_urlsafe(24)
        port = free_port()
        settings = {
            "config_version": 1,
            "redis_url": url,
            "key_prefix": "f" + secrets.token_hex(4),
            "token_secret": secrets.token_hex(32),
            "log_format": "json",
            "orgs": {
                org: {"key_sha256": key_digest(api_keys[org]), **limits}
                for org, limits in orgs.items()
            },
            "operators": {"ops": {"key_sha256": key_digest(operator_key)}},
            "scheduler": {"host": "127.0.0.1", "port": port, **(scheduler or {})},
            "worker": {
                "node": "node-" + secrets.token_hex(3),
                "metrics_port": free_port(),
                "workspace_root": str(workdir / "workspaces"),
                **(worker or {}),
            },
            "profiles": dict(profiles),
            "telemetry": dict(telemetry or {}),
        }
        config_path = workdir / "fleet.toml"
        write_settings(config_path, settings)
        fleet = LocalFleet(
            url=f"http://127.0.0.1:{port}",
            api_keys=api_keys,
            operator_key=operator_key,
            redis_url=url,
            config_path=config_path,
            workdir=workdir,
        )
        try:
            scheduler_process = fleet.start("scheduler", "scheduler")
            wait_listening(port, scheduler_process, "scheduler", log=fleet)
            if start_worker:
                fleet.start("worker", "worker")
                wait_for_worker(fleet)
            yield fleet
        finally:
            _clean_up(fleet)


def _clean_up(fleet: LocalFleet) -> None:
    """Stop the fleet's processes, unmount and remove its folder.

    A signal's exception (Ctrl-C, or a SIGTERM handler's ``SystemExit``)
    that lands in a step is held while that step is done again and the
    rest follow, then raised: stopping midway would leave processes,
    mounts and the folder with the fleet's secrets behind.
    """
    steps: list[Callable[[], object]] = [
        *(functools.partial(fleet.stop, name) for name in list(fleet.processes)),
        functools.partial(_unmount_under, fleet.workdir),
        functools.partial(shutil.rmtree, fleet.workdir, ignore_errors=True),
    ]
    held: BaseException | None = None
    for step in steps:
        while True:
            try:
                step()
                break
            except (KeyboardInterrupt, SystemExit) as exc:
                held = held or exc
    if held is not None:
        raise held


# A local fleet's folder holds its secrets, its logs and its workspaces.
# Each is named for the process that made it, so that one killed outright
# leaves a folder the next local fleet can tell abandoned and remove.
_FOLDER_PREFIX = "acp-fleet-"


def new_folder() -> Path:
    """A private folder of this process', for a local fleet or its Redis;
    first remove those of processes that are gone."""
    remove_abandoned_folders(Path(tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-"))


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new private folder, removed on the way out."""
    folder = new_folder()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned_folders(root: Path) -> list[Path]:
    """Remove this user's local-fleet folders under ``root`` whose process
    no longer runs; return them."""
    removed = []
    for folder in root.glob(f"{_FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(_FOLDER_PREFIX).partition("-")[0]
        if not pid.isdecimal() or process_running(int(pid)):
            continue
        try:
            found = folder.lstat()
        except FileNotFoundError:
            continue
        if found.st_uid != os.getuid() or not stat.S_ISDIR(found.st_mode):
            continue
        _unmount_under(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def process_running(pid: int) -> bool:
    """Whether a process of id ``pid`` runs, this user's or another's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process.
        return True
    return True


def _unmount_under(directory: Path) -> None:
    """Unmount what a killed worker left mounted below ``directory``."""
    prefix = str(directory) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [
            line.split()[1] for line in mounts if line.split()[1].startswith(prefix)
        ]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def wait_for_worker(
    fleet: LocalFleet, *, starts: int = 1, timeout_s: float = 30
) -> None:
    """Wait until the worker has logged its ``starts``-th start."""
    deadline = time.monotonic() + timeout_s
    while fleet.log("worker").count('"worker.started"') < starts:
        process = fleet.processes["worker"]
        if process.poll() is not None or time.monotonic() > deadline:
            raise FleetError(
                "the worker did not start:\n" + fleet.log("worker")[-4000:]
            )
        time.sleep(0.05)


@contextmanager
def _maybe_redis(redis_url: str | None) -> Iterator[str]:
    url = redis_url or os.environ.get("ACP_FLEET_REDIS_URL")
    if url:
        yield url
        return
    with redis_server() as started:
        yield started


def wait_listening(
    address: int | Path,
    process: subprocess.Popen[bytes],
    name: str,
    *,
    log: LocalFleet | None = None,
    timeout_s: float = 30,
) -> None:
    """Wait until ``process`` takes connections on ``address``: a port on
    loopback, or a unix socket's path."""
    where = f"port {address}" if isinstance(address, int) else str(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.log(name)[-4000:] if log else ""
            raise FleetError(f"{name} exited with {process.returncode}\n{tail}")
        try:
            _probe(address)
            return
        except OSError:
            time.sleep(0.05)
    raise FleetError(f"{name} did not listen on {where} within {timeout_s} s")


def _probe(address: int | Path) -> None:
    """Connect to ``address`` once and hang up; raise OSError if refused."""
    if isinstance(address, int):
        socket.create_connection(("127.0.0.1", address), timeout=0.2).close()
        return
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(address))
