"""The one module that talks to the Docker Engine.

Containers are created from a ``SandboxSpec`` with the hardened defaults of
the design, attached before they start, and removed by their id. Every
aiodocker error is turned into ``SandboxError`` here, and every call on the
Engine made for a session is a ``docker.<call>`` span of its trace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import aiodocker
import aiohttp

from shared.errors import SandboxError
from shared.settings import AgentProfile, Limits
from shared.telemetry import worker_metrics
from shared.tracing import traced

LABEL_FLEET = "io.acp-fleet.fleet"
LABEL_NODE = "io.acp-fleet.node"
LABEL_SESSION = "io.acp-fleet.session"
LABEL_POOL = "io.acp-fleet.pool"
# The process-count ulimit counts every process of the agent uid on the
# host, across sandboxes, so it is only a node-wide backstop; PidsLimit is
# the per-sandbox bound.
NPROC_BACKSTOP = 65_536
_READ_BYTES = 256 * 1024
# Where an operator's CA bundle appears inside an egress sandbox.
CA_BUNDLE_PATH = "/etc/acp-fleet/ca.pem"
# Kinds of Engine errors for the error counter: a handful, not statuses.
_STATUS_KINDS = {403: "permission_denied", 404: "not_found", 409: "conflict"}
_NOT_CONNECTED = 900


def seccomp_profile() -> str:
    """Return the seccomp profile shipped with the worker, as JSON text."""
    text = resources.files("worker").joinpath("seccomp.json").read_text()
    # Compact it: Docker takes the profile inline in SecurityOpt.
    return json.dumps(json.loads(text), separators=(",", ":"))


@dataclass(frozen=True)
class SandboxNetwork:
    """The network a sandbox joins: none at all, or the node's egress one."""

    # A Docker network name; "none" gives the sandbox loopback only.
    name: str = "none"
    # A CA bundle on the node, mounted read-only at CA_BUNDLE_PATH.
    ca_bundle: str | None = None


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create one session's sandbox."""

    session_id: str
    profile_name: str
    profile: AgentProfile
    limits: Limits
    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    # The node's mount of the sandbox's workspace filesystem; None puts a
    # tmpfs there instead, whose files go with the container.
    workspace: str | None = None
    network: SandboxNetwork = field(default_factory=SandboxNetwork)


def container_config(
    spec: SandboxSpec,
    *,
    fleet: str,
    node: str,
    seccomp: str,
    apparmor: str | None = None,
) -> dict[str, Any]:
    """Return the Engine API body that creates ``spec``'s hardened container."""
    profile, limits = spec.profile, spec.limits
    uid, gid = profile.user.split(":")

    # uid= and gid= make each tmpfs the agent's. runc 1.1 then chmods a
    # tmpfs to the mode of the image directory it covers, so mode= only
    # holds where the image has no such directory.
    def tmpfs(size_bytes: int, mode: str, *, executable: bool) -> str:
        exec_flag = "exec" if executable else "noexec"
        return (
            f"rw,nosuid,nodev,{exec_flag},size={size_bytes},"
            f"uid={uid},gid={gid},mode={mode}"
        )

    env = {"HOME": profile.home, **profile.env, **spec.env}
    tmpfs_mounts = {
        "/tmp": tmpfs(  # noqa: S108 - a private tmpfs, not the host's /tmp
            limits.tmp_bytes, "1777", executable=False
        ),
        "/run": tmpfs(8 * 1024**2, "0755", executable=False),
        profile.home: tmpfs(limits.home_bytes, "0700", executable=True),
    }
    mounts: list[dict[str, Any]] = []
    if spec.workspace is None:
        tmpfs_mounts[profile.workdir] = tmpfs(
            limits.workspace_bytes, "0755", executable=True
        )
    else:
        mounts.append(
            {
                "Type": "bind",
                "Source": spec.workspace,
                "Target": profile.workdir,
                "ReadOnly": False,
                "BindOptions": {"Propagation": "rprivate"},
            }
        )
    host_config: dict[str, Any] = {}
    if limits.cpuset:
        host_config["CpusetCpus"] = limits.cpuset
    if limits.cpu_shares:
        host_config["CpuShares"] = limits.cpu_shares
    if limits.io:
        host_config.update(limits.io.host_config())
    if apparmor:
        host_config["SecurityOpt"] = [f"apparmor={apparmor}"]
    network = spec.network
    if network.ca_bundle:
        # OpenSSL-based clients read the first, node the second.
        env |= {"SSL_CERT_FILE": CA_BUNDLE_PATH, "NODE_EXTRA_CA_CERTS": CA_BUNDLE_PATH}
    return {
        "Image": spec.image,
        "Cmd": profile.command or None,
        "User": profile.user,
        "WorkingDir": profile.workdir,
        "Env": [f"{name}={value}" for name, value in env.items()],
        "Labels": {
            LABEL_FLEET: fleet,
            LABEL_NODE: node,
            LABEL_SESSION: spec.session_id,
            LABEL_POOL: spec.profile_name,
        },
        # stdin EOF reaches the agent only when stdin is opened once and the
        # attach socket is half-closed; a TTY would rewrite line endings.
        "OpenStdin": True,
        "StdinOnce": True,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "NetworkDisabled": network.name == "none",
        "HostConfig": {
            "NetworkMode": network.name,
            "CapDrop": ["ALL"],
            "SecurityOpt": [
                "no-new-privileges:true",
                f"seccomp={seccomp}",
                *host_config.pop("SecurityOpt", []),
            ],
            "ReadonlyRootfs": True,
            "Tmpfs": tmpfs_mounts,
            "Mounts": mounts + _mounts(network),
            # An init as PID 1 reaps zombies and forwards SIGTERM, so a stop
            # does not wait out its whole timeout.
            "Init": True,
            "Memory": limits.memory_bytes,
            "MemorySwap": limits.memory_bytes,
            "OomKillDisable": False,
            "PidsLimit": limits.pids_limit,
            "NanoCpus": limits.nano_cpus,
            "Ulimits": [
                {"Name": "nofile", "Soft": limits.nofile, "Hard": limits.nofile},
                {"Name": "nproc", "Soft": NPROC_BACKSTOP, "Hard": NPROC_BACKSTOP},
            ],
            "LogConfig": {"Type": "none", "Config": {}},
            "AutoRemove": False,
            "RestartPolicy": {"Name": "no"},
            **host_config,
        },
    }


def _mounts(network: SandboxNetwork) -> list[dict[str, Any]]:
    if not network.ca_bundle:
        return []
    return [
        {
            "Type": "bind",
            "Source": network.ca_bundle,
            "Target": CA_BUNDLE_PATH,
            "ReadOnly": True,
        }
    ]


@dataclass(frozen=True)
class ExitState:
    """What Docker says about a container that stopped."""

    exit_code: int
    oom_killed: bool
    error: str


class AttachedStdio:
    """The raw, hijacked attach connection of one container.

    aiodocker's attach stream cannot half-close: its close shuts both
    directions and loses output written after stdin's EOF. This keeps the
    socket's two halves apart.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @property
    def alive(self) -> bool:
        """False once the container closed its side of the connection."""
        return not self._reader.at_eof() and not self._writer.is_closing()

    async def read(self) -> bytes:
        """Return the next chunk of multiplexed output; b"" at end of stream."""
        return await self._reader.read(_READ_BYTES)

    async def write(self, data: bytes) -> None:
        """Write to the agent's stdin, waiting while the socket is full."""
        self._writer.write(data)
        await self._writer.drain()

    def close_stdin(self) -> None:
        """Half-close the socket: the agent reads EOF, output keeps flowing."""
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    def abort(self) -> None:
        """Drop the connection and any stdin not yet written.

        A graceful close would wait to flush stdin to an agent that may
        never read it again; by the time a run ends there is no one to
        deliver it to.
        """
        self._writer.transport.abort()


class DockerRuntime:
    """Sandboxes on this node's Docker Engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._docker: aiodocker.Docker | None = None
        self._api_version = "v1.41"

    async def open(self) -> None:
        """Connect and learn the Engine's API version."""
        # aiohttp's default pool of 100 connections is held by long-lived
        # attach and wait calls; past it every call would block for good.
        split = urlsplit(self.url)
        if split.scheme == "unix":
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                split.path, limit=0
            )
            base = "unix://localhost"
        else:
            connector = aiohttp.TCPConnector(limit=0)
            base = self.url
        self._docker = aiodocker.Docker(url=base, connector=connector)
        try:
            version = await self._call(self.docker.version())
        except SandboxError:
            # Nothing else will close the client of an Engine never reached.
            await self.close()
            raise
        self._api_version = "v" + str(version["ApiVersion"])

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeError("DockerRuntime.open() was not awaited")
        return self._docker

    async def close(self) -> None:
        """Close the client and the connector it was given."""
        if self._docker is not None:
            await self._docker.close()
            await self._docker.connector.close()

    @traced("docker.image_digest")
    async def image_digest(self, image: str) -> str:
        """Return the repository digest of ``image``, or its id when it has none."""
        info = await self._call(self.docker.images.inspect(image))
        digests = info.get("RepoDigests") or []
        return str(digests[0] if digests else info["Id"])

    @traced("docker.create")
    async def create(self, config: Mapping[str, Any], *, name: str) -> str:
        """Create a container and return its id.

        Cancelled midway, it removes what the Engine made before it raises:
        a create the Engine has begun completes without its caller.
        """
        creating = asyncio.ensure_future(
            self._call(self.docker.containers.create(dict(config), name=name))
        )
        try:
            container = await asyncio.shield(creating)
        except asyncio.CancelledError:
            await asyncio.wait([creating])
            if not creating.cancelled() and creating.exception() is None:
                await self.remove(str(creating.result().id))
            raise
        return str(container.id)

    @traced("docker.attach")
    async def attach(self, container_id: str) -> AttachedStdio:
        """Open the container's stdio; call before start to miss nothing."""
        split = urlsplit(self.url)
        try:
            if split.scheme == "unix":
                reader, writer = await asyncio.open_unix_connection(split.path)
            else:
                reader, writer = await asyncio.open_connection(
                    split.hostname, split.port
                )
            request = (
                f"POST /{self._api_version}/containers/{container_id}/attach"
                "?stream=1&stdin=1&stdout=1&stderr=1 HTTP/1.1\r\n"
                "Host: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError) as exc:
            _count_error(exc)
            raise SandboxError(
                f"attach to {container_id} failed: {exc}", container_id=container_id
            ) from exc
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if status not in (b"101", b"200"):
            writer.close()
            raise SandboxError(
                f"attach to {container_id} answered {head.splitlines()[0]!r}",
                container_id=container_id,
            )

        return AttachedStdio(reader, writer)

    @traced("docker.start")
    async def start(self, container_id: str) -> None:
        """Start a created container."""
        container = self.docker.containers.container(container_id)
        await self._call(container.start(), container_id=container_id)

    @traced("docker.wait_exit")
    async def wait_exit(self, container_id: str) -> ExitState:
        """Wait until the container is not running, then report how it ended."""
        container = self.docker.containers.container(container_id)
        await self._call(
            container.wait(condition="not-running"), container_id=container_id
        )
        info = await self._call(container.show(), container_id=container_id)
        state = info["State"]
        return ExitState(
            exit_code=int(state["ExitCode"]),
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
        )

    @traced("docker.run_check")
    async def run_check(
        self, container_id: str, command: list[str], *, user: str, timeout_s: float
    ) -> int:
        """Run ``command`` inside a running container; return its exit code."""
        container = self.docker.containers.container(container_id)
        execution = await self._call(
            container.exec(command, stdout=True, stderr=True, user=user),
            container_id=container_id,
        )
        # Detached: its output is not needed, only whether it succeeded.
        await self._call(
            execution.start(detach=True, timeout=timeout_s), container_id=container_id
        )
        for _ in range(int(timeout_s / 0.01)):
            info = await self._call(execution.inspect(), container_id=container_id)
            if not info.get("Running"):
                return int(info.get("ExitCode") or 0)
            await asyncio.sleep(0.01)
        raise SandboxError(
            f"check in {container_id} timed out", container_id=container_id
        )

    @traced("docker.running")
    async def running(self, container_id: str) -> bool:
        """True while Docker reports the container running."""
        state = await self._state(container_id)
        return bool(state and state.get("Running"))

    @traced("docker.init_pid")
    async def init_pid(self, container_id: str) -> int | None:
        """The node's pid of the container's init; None once it has stopped."""
        state = await self._state(container_id)
        return int(state.get("Pid") or 0) or None if state else None

    async def _state(self, container_id: str) -> dict[str, Any] | None:
        """The container's ``State``; None when it is gone."""
        container = self.docker.containers.container(container_id)
        try:
            info = await self._call(container.show(), container_id=container_id)
        except SandboxError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(info["State"])

    @traced("docker.kill")
    async def kill(self, container_id: str, signal: str) -> bool:
        """Send ``signal``; False when the container was no longer running."""
        container = self.docker.containers.container(container_id)
        try:
            await self._call(container.kill(signal=signal), container_id=container_id)
        except SandboxError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    @traced("docker.remove")
    async def remove(self, container_id: str) -> None:
        """Remove the container and its anonymous volumes; gone is fine."""
        container = self.docker.containers.container(container_id)
        try:
            await self._call(
                container.delete(force=True, v=True), container_id=container_id
            )
        except SandboxError as exc:
            if exc.status != 404:
                raise

    @traced("docker.ensure_internal_network")
    async def ensure_internal_network(
        self, name: str, *, labels: Mapping[str, str]
    ) -> str:
        """Create the internal network ``name`` unless it exists; return its
        gateway address, where the host is reachable from the network.

        Raises:
            SandboxError: a network of that name exists but has a route out.
        """
        try:
            info = await self._call(self.docker.networks.get(name))
            details = await self._call(info.show())
        except SandboxError as exc:
            if exc.status != 404:
                raise
            details = await self._create_internal_network(name, labels)
        if not details.get("Internal"):
            raise SandboxError(
                f"network {name!r} exists but is not internal, so sandboxes on "
                "it could bypass the egress proxy; remove it or name another "
                "one in worker.egress.network"
            )

        return _gateway(name, details)

    async def _create_internal_network(
        self, name: str, labels: Mapping[str, str]
    ) -> dict[str, Any]:
        config = {
            "Name": name,
            "Driver": "bridge",
            # No route out: the host's gateway address is all it reaches.
            "Internal": True,
            "CheckDuplicate": True,
            "Labels": dict(labels),
            # Sandboxes on it must not reach one another either.
            "Options": {"com.docker.network.bridge.enable_icc": "false"},
        }
        network = await self._call(self.docker.networks.create(config))
        details: dict[str, Any] = await self._call(network.show())
        return details

    @traced("docker.remove_network")
    async def remove_network(self, name: str) -> bool:
        """Remove a network; False when sandboxes still use it. Gone is fine."""
        try:
            network = await self._call(self.docker.networks.get(name))
            await self._call(network.delete())
        except SandboxError as exc:
            if exc.status == 404:
                return True
            if exc.status in (403, 409):
                return False
            raise
        return True

    @traced("docker.labelled")
    async def labelled(self, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Return every container, running or not, carrying all ``labels``."""
        filters = {"label": [f"{name}={value}" for name, value in labels.items()]}
        containers = await self._call(
            self.docker.containers.list(all=True, filters=json.dumps(filters))
        )
        return [c._container for c in containers]

    async def _call(self, awaitable: Any, *, container_id: str | None = None) -> Any:
        try:
            return await awaitable
        except aiodocker.DockerError as exc:
            _count_error(exc)
            message = exc.message if isinstance(exc.message, str) else str(exc)
            if exc.status == _NOT_CONNECTED:
                # aiodocker names the placeholder host it dials a unix
                # socket by, not the address the operator configured.
                message = f"Docker Engine unreachable at {self.url}: {_reason(exc)}"
            raise SandboxError(
                message, status=exc.status, container_id=container_id
            ) from exc
        except aiohttp.ClientError as exc:
            _count_error(exc)
            raise SandboxError(
                f"Docker Engine unreachable at {self.url}: {exc}",
                container_id=container_id,
            ) from exc


def error_kind(exc: BaseException) -> str:
    """Name what went wrong with an Engine call in a word an alert can use."""
    if any(isinstance(cause, PermissionError) for cause in _causes(exc)):
        # EACCES on the Engine's socket: the worker may not use it, which
        # is a deployment error, not an Engine that is down.
        return "permission_denied"
    # aiodocker reports a connection that failed as status 900.
    if isinstance(exc, aiodocker.DockerError) and exc.status != _NOT_CONNECTED:
        status = int(exc.status)
        return _STATUS_KINDS.get(status, "engine" if status >= 500 else "refused")
    return "unreachable"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, what it was raised from, and aiohttp's socket error in each."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        if isinstance(os_error := getattr(link, "os_error", None), OSError):
            chain.append(os_error)
        link = link.__cause__ or link.__context__
    return chain


def _reason(exc: BaseException) -> str:
    """The socket error behind a failed connection, in the system's words."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return str(exc)


def _count_error(exc: BaseException) -> None:
    worker_metrics().docker_errors.add(1, {"kind": error_kind(exc)})


def _gateway(name: str, details: Mapping[str, Any]) -> str:
    for pool in (details.get("IPAM") or {}).get("Config") or []:
        if pool.get("Gateway"):
            return str(pool["Gateway"])
    raise SandboxError(f"network {name!r} has no gateway address")
