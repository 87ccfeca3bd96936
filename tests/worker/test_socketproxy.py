"""Specification of the Docker socket proxy, against the real Engine.

The rules are read first on request bodies alone, then through a proxy on
a socket of the test's own in front of the node's Engine, and last with a
whole fleet whose worker reaches the Engine only through a proxy process.
Containers the tests make on the Engine directly they also remove.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from shared.localfleet import LocalFleet, local_fleet, wait_for_worker
from shared.settings import AgentProfile
from tests.sandboxes import BUSYBOX_IMAGE, busybox_profile, run_session
from tests.worker.test_pool import session_field, talk, wait_pool
from worker.docker import LABEL_FLEET, SandboxSpec, container_config
from worker.socketproxy import CreatePolicy, SocketProxy

FLEET = "proxy-test"
ROOT = "/var/lib/acp-fleet/workspaces"
ENGINE = "unix:///var/run/docker.sock"


def engine(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI on the Engine's own socket, never through a proxy."""
    env = {name: value for name, value in os.environ.items() if name != "DOCKER_HOST"}
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, env=env
    )


def worker_body(**host_config: Any) -> dict[str, Any]:
    """A create body exactly as the worker builds one, HostConfig amended."""
    profile = AgentProfile.model_validate(busybox_profile("cat"))
    spec = SandboxSpec(
        session_id="s",
        profile_name="p",
        profile=profile,
        limits=profile.limits,
        image=BUSYBOX_IMAGE,
        workspace=f"{ROOT}/s/mnt",
    )
    body = container_config(spec, fleet=FLEET, node="n", seccomp="{}")
    body["HostConfig"].update(host_config)
    return body


class TestCreatePolicy:
    policy = CreatePolicy(fleet=FLEET, bind_roots=(ROOT,), bind_files=("/etc/ca.pem",))

    def test_the_workers_own_create_passes(self) -> None:
        """A hardened sandbox with its workspace bind is allowed."""
        assert self.policy.create_refusal(worker_body()) is None

    def test_a_create_without_the_fleets_label_is_refused(self) -> None:
        """No label, or another fleet's, is refused."""
        other = worker_body()
        other["Labels"][LABEL_FLEET] = "someone-else"

        assert "label" in str(self.policy.create_refusal({"Image": BUSYBOX_IMAGE}))
        assert "label" in str(self.policy.create_refusal(other))

    @pytest.mark.parametrize(
        ("host_config", "reason"),
        [
            ({"Privileged": True}, "privileged"),
            ({"CapAdd": ["SYS_ADMIN"]}, "CapAdd"),
            ({"Devices": [{"PathOnHost": "/dev/sda"}]}, "Devices"),
            ({"Binds": ["/:/host"]}, "Binds"),
            ({"NetworkMode": "host"}, "NetworkMode"),
            ({"PidMode": "host"}, "PidMode"),
            ({"IpcMode": "host"}, "IpcMode"),
            ({"UsernsMode": "host"}, "UsernsMode"),
            ({"NetworkMode": "container:abc"}, "NetworkMode"),
            (
                {"SecurityOpt": ["no-new-privileges:true", "seccomp=unconfined"]},
                "unconfined",
            ),
            (
                {"SecurityOpt": ["no-new-privileges:true", "apparmor:unconfined"]},
                "unconfined",
            ),
            ({"CapDrop": ["NET_RAW"]}, "CapDrop must include ALL"),
            ({"SecurityOpt": []}, "no-new-privileges"),
        ],
    )
    def test_widening_host_config_is_refused(
        self, host_config: dict[str, Any], reason: str
    ) -> None:
        """Privilege, capabilities, devices, host namespaces, lifted
        confinement and a missing hardening floor are each refused, even on
        a labelled create."""
        assert reason in str(self.policy.create_refusal(worker_body(**host_config)))

    @pytest.mark.parametrize(
        "source",
        ["/", "/etc", ROOT, f"{ROOT}/../../../etc", f"{ROOT}x/s", "/etc/ca.pem.d"],
    )
    def test_binds_outside_the_workspaces_are_refused(self, source: str) -> None:
        """Only paths strictly below the workspace root, in canonical form,
        and the named files may be bound."""
        mount = {"Type": "bind", "Source": source, "Target": "/w"}

        assert "mount" in str(self.policy.create_refusal(worker_body(Mounts=[mount])))

    def test_a_symlink_below_the_root_is_refused(self, tmp_path: Path) -> None:
        """A link in the workspace root pointing at / cannot be bound."""
        (tmp_path / "escape").symlink_to("/")
        policy = CreatePolicy(fleet=FLEET, bind_roots=(str(tmp_path),))
        mount = {"Type": "bind", "Source": str(tmp_path / "escape"), "Target": "/w"}

        assert policy.create_refusal(worker_body(Mounts=[mount])) is not None

    def test_volume_mounts_and_privileged_execs_are_refused(self) -> None:
        """A named volume mount and a privileged exec are refused."""
        volume = {"Type": "volume", "Source": "data", "Target": "/w"}

        assert self.policy.create_refusal(worker_body(Mounts=[volume])) is not None
        assert self.policy.exec_refusal({"Cmd": ["id"], "Privileged": True})
        assert self.policy.exec_refusal({"Cmd": ["id"]}) is None


@pytest.fixture
async def proxy(docker_images: None) -> AsyncIterator[str]:
    """A proxy for fleet FLEET on a socket of its own; yields the socket."""
    with tempfile.TemporaryDirectory(prefix="acp-proxy-") as directory:
        path = f"{directory}/docker.sock"
        server = SocketProxy(
            policy=CreatePolicy(fleet=FLEET, bind_roots=(ROOT,)), upstream_url=ENGINE
        )
        await server.start(path)
        try:
            yield path
        finally:
            await server.close()


@pytest.fixture
def stranger() -> Iterator[str]:
    """A container without the fleet's label, made on the Engine directly."""
    name = "acp-proxy-stranger-" + secrets.token_hex(4)
    created = engine("create", "--name", name, BUSYBOX_IMAGE, "sleep", "60")
    assert created.returncode == 0, created.stderr
    try:
        yield created.stdout.strip()
    finally:
        engine("rm", "-f", name)


def client(path: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=path)
    return httpx.AsyncClient(transport=transport, base_url="http://docker/v1.41")


async def raw(path: str, head: str, body: bytes = b"") -> bytes:
    """Send one request on a fresh connection; return all that comes back."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(head.encode() + body)
    answer = await reader.read()
    writer.close()
    return answer


def message(response: httpx.Response) -> str:
    assert response.status_code == 403, response.text
    return str(response.json()["message"])


class TestProxyRefusals:
    async def test_an_unlabelled_create_is_refused_and_nothing_is_made(
        self, proxy: str
    ) -> None:
        """A create without the fleet's label answers 403 naming the call
        and the label; no container of that name exists afterwards."""
        name = "acp-proxy-refused-" + secrets.token_hex(4)
        async with client(proxy) as docker:
            response = await docker.post(
                "/containers/create", params={"name": name}, json={"Image": "x"}
            )

        assert message(response).startswith("POST /containers/create refused")
        assert f"{LABEL_FLEET}={FLEET}" in message(response)
        assert engine("inspect", name).returncode != 0

    @pytest.mark.parametrize(
        ("host_config", "reason"),
        [({"Privileged": True}, "privileged"), ({"NetworkMode": "host"}, "host")],
    )
    async def test_privileged_and_host_network_creates_are_refused(
        self, proxy: str, host_config: dict[str, Any], reason: str
    ) -> None:
        """A labelled create that asks for privilege or the host's network
        is refused before it reaches the Engine."""
        async with client(proxy) as docker:
            response = await docker.post(
                "/containers/create", json=worker_body(**host_config)
            )

        assert reason in message(response)

    @pytest.mark.parametrize(
        ("method", "call"),
        [
            ("GET", "json"),
            ("POST", "start"),
            ("POST", "attach?stream=1&stdin=1"),
            ("POST", "wait"),
            ("POST", "kill"),
            ("POST", "exec"),
            ("DELETE", ""),
        ],
    )
    async def test_calls_on_an_unlabelled_container_are_refused(
        self, proxy: str, stranger: str, method: str, call: str
    ) -> None:
        """Every allowed container call is refused on a container without
        the label, and the container is left as it was."""
        url = f"/containers/{stranger}/{call}".rstrip("/")
        body = {"Cmd": ["true"]} if call == "exec" else None
        async with client(proxy) as docker:
            response = await docker.request(method, url, json=body)

        assert "the container does not carry the label" in message(response)
        state = engine("inspect", "-f", "{{.State.Status}}", stranger)
        assert state.stdout.strip() == "created"

    @pytest.mark.parametrize(
        ("method", "url"),
        [
            ("GET", "/info"),
            ("GET", "/images/json"),
            ("POST", "/build"),
            ("DELETE", f"/images/{BUSYBOX_IMAGE}"),
            ("POST", "/containers/prune"),
            ("GET", "/events"),
            ("POST", "/volumes/create"),
            ("PUT", "/containers/abc/archive?path=/"),
            ("POST", "/networks/abc/connect"),
            ("GET", "/secrets"),
        ],
    )
    async def test_calls_outside_the_list_are_refused(
        self, proxy: str, method: str, url: str
    ) -> None:
        """Calls the worker never makes are refused whatever they carry."""
        async with client(proxy) as docker:
            response = await docker.request(method, url)

        assert message(response) == (
            f"{method} {url.split('?')[0]} refused by the fleet's Docker proxy: "
            "the call is not on the allow-list"
        )

    async def test_a_listing_needs_the_fleets_filter(self, proxy: str) -> None:
        """Containers are listed only with the fleet's label filter."""
        ours = json.dumps({"label": [f"{LABEL_FLEET}={FLEET}"]})
        async with client(proxy) as docker:
            everything = await docker.get("/containers/json", params={"all": 1})
            filtered = await docker.get("/containers/json", params={"filters": ours})

        assert "filter" in message(everything)
        assert filtered.status_code == 200
        assert isinstance(filtered.json(), list)

    async def test_a_dotted_or_encoded_path_is_refused(self, proxy: str) -> None:
        """A path that the Engine would clean into another call is refused."""
        head = "GET /v1.41/containers/x/../../info HTTP/1.1\r\nHost: d\r\n\r\n"
        encoded = "GET /v1.41/containers/x%2F..%2F..%2Finfo/json HTTP/1.1\r\n\r\n"

        netloc = "GET //docker/v1.41/info HTTP/1.1\r\n\r\n"

        for request in (head, encoded, netloc):
            answer = await raw(proxy, request)
            assert answer.startswith(b"HTTP/1.1 403 ")
            assert b"canonical" in answer

    async def test_a_malformed_body_length_is_refused(self, proxy: str) -> None:
        """A Content-Length that is not a number answers 400, not a crash."""
        head = "POST /v1.41/containers/create HTTP/1.1\r\nContent-Length: x\r\n\r\n"

        answer = await raw(proxy, head)

        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"malformed body length" in answer

    async def test_a_bare_line_feed_in_the_head_is_refused(self, proxy: str) -> None:
        """A header hiding a second line behind a bare LF is not forwarded."""
        head = "GET /v1.41/version HTTP/1.1\r\nX-A: 1\nContent-Length: 9\r\n\r\n"

        answer = await raw(proxy, head)

        assert answer.startswith(b"HTTP/1.1 400 ")

    async def test_refusals_are_logged_by_call_and_reason_without_the_body(
        self, proxy: str
    ) -> None:
        """Each refusal is one socketproxy.refused event; the body's
        contents never reach it."""
        with capture_logs() as logs:
            async with client(proxy) as docker:
                await docker.post(
                    "/containers/create", json={"Image": "x", "Env": ["KEY=hush"]}
                )

        refused = [entry for entry in logs if entry["event"] == "socketproxy.refused"]
        assert refused == [
            {
                "event": "socketproxy.refused",
                "log_level": "warning",
                "call": "POST /containers/create",
                "reason": f"the container does not carry the label "
                f"{LABEL_FLEET}={FLEET}",
            }
        ]

    async def test_a_missing_container_answers_the_engines_404(
        self, proxy: str
    ) -> None:
        """An unknown container is the Engine's own 404, so the worker can
        tell gone from refused."""
        async with client(proxy) as docker:
            response = await docker.get("/containers/acp-proxy-none-such/json")

        assert response.status_code == 404
        assert "No such container" in response.json()["message"]


class TestProxiedContainer:
    async def test_a_labelled_container_runs_with_stdin_eof_and_its_exit_code(
        self, proxy: str
    ) -> None:
        """Create, hijacked attach, start, half-closed stdin, wait and
        remove all pass; output written after stdin's EOF arrives."""
        body = worker_body()
        body["Cmd"] = ["sh", "-c", "cat; echo after-eof; exit 4"]
        body["HostConfig"]["Mounts"] = []
        async with client(proxy) as docker:
            created = await docker.post("/containers/create", json=body)
            container_id = created.json()["Id"]
            try:
                reader, writer = await asyncio.open_unix_connection(proxy)
                writer.write(
                    f"POST /v1.41/containers/{container_id}/attach?stream=1&stdin=1"
                    "&stdout=1&stderr=1 HTTP/1.1\r\nHost: docker\r\n"
                    "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                started = await docker.post(f"/containers/{container_id}/start")
                writer.write(b"piped\n")
                writer.write_eof()
                output = await asyncio.wait_for(reader.read(), 30)
                writer.close()
                waited = await docker.post(f"/containers/{container_id}/wait")
            finally:
                removed = await docker.delete(
                    f"/containers/{container_id}", params={"force": 1}
                )

        assert head.startswith(b"HTTP/1.1 101 ")
        assert started.status_code == 204
        # Each frame: stream 1 (stdout), three zero bytes, a 4-byte length.
        assert output == (
            b"\x01\x00\x00\x00\x00\x00\x00\x06piped\n"
            b"\x01\x00\x00\x00\x00\x00\x00\x0aafter-eof\n"
        )
        assert waited.json()["StatusCode"] == 4
        assert removed.status_code == 204


@pytest.fixture(scope="module")
def proxied(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A fleet whose worker reaches the Engine only through a proxy process."""
    with tempfile.TemporaryDirectory(prefix="acp-proxy-") as directory:
        socket_path = f"{directory}/docker.sock"
        pooled = {**busybox_profile('echo "ready"; cat'), "pool": {"size": 1}}
        netted = {
            **busybox_profile('echo "proxy=${HTTP_PROXY:+set}"; ls /sys/class/net'),
            "network": {"mode": "egress", "allow": ["example.invalid"]},
        }
        with local_fleet(
            {
                "cat-exit": busybox_profile("cat; echo done; exit 7"),
                "echo": pooled,
                "egress": netted,
            },
            redis_url=redis_url,
            orgs={"acme": {"max_sessions": 8, "sessions_per_minute": 10_000}},
            worker={
                "docker_url": f"unix://{socket_path}",
                "heartbeat_ms": 500,
                "egress": {"proxy_port": 0},
            },
            start_worker=False,
        ) as fleet:
            fleet.start("docker-proxy", "docker-proxy", "--listen", socket_path)
            wait_for_socket(fleet, socket_path)
            fleet.start("worker", "worker")
            try:
                wait_for_worker(fleet)
                yield fleet
            finally:
                fleet.stop("worker")
                # The worker removes its network through the proxy when it
                # stops; this only catches what a failed stop left behind.
                engine("network", "rm", egress_network(fleet))


def egress_network(fleet: LocalFleet) -> str:
    return f"{fleet.settings.fleet}-egress-{fleet.settings.worker.node}"


def wait_for_socket(fleet: LocalFleet, path: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not Path(path).is_socket():
        if time.monotonic() > deadline:
            raise AssertionError(fleet.log("docker-proxy")[-4000:])
        time.sleep(0.05)


class TestFleetThroughTheProxy:
    async def test_a_cold_session_runs_through_the_proxy(
        self, proxied: LocalFleet
    ) -> None:
        """A cold start through the proxy relays stdin, delivers its EOF,
        and ends with the agent's exit code; the proxy refused nothing."""
        ran = await run_session(proxied, "cat-exit", stdin=b"through\n")

        # The worker has no other way to the Engine than the proxy's socket.
        docker_url = proxied.settings.worker.docker_url
        assert "/acp-proxy-" in docker_url
        assert docker_url.endswith("/docker.sock")
        assert ran.stdout == b"through\ndone\n"
        assert (ran.end["cause"], ran.end["exit_code"]) == ("agent_exit", 7)
        assert await session_field(proxied, ran.session_id, "start") == "cold"
        assert "socketproxy.refused" not in proxied.log("docker-proxy")

    async def test_a_warm_claim_runs_through_the_proxy(
        self, proxied: LocalFleet
    ) -> None:
        """The pool fills (its readiness check is an exec) and a claim of
        a warm member runs to its end through the proxy."""
        await wait_pool(proxied, "echo", ready=1)

        session_id, output, end = await talk(proxied, {})

        assert await session_field(proxied, session_id, "start") == "warm"
        assert output == b"ready\nover\n"
        assert (end.cause, end.exit_code) == ("agent_exit", 0)
        assert "socketproxy.refused" not in proxied.log("docker-proxy")

    async def test_an_egress_sandbox_joins_the_network_made_through_the_proxy(
        self, proxied: LocalFleet
    ) -> None:
        """The worker created its labelled internal network through the
        proxy, and an egress sandbox on it starts and ends normally."""
        labels = engine(
            "network", "inspect", "-f", "{{json .Labels}}", egress_network(proxied)
        )

        ran = await run_session(proxied, "egress")

        assert json.loads(labels.stdout)[LABEL_FLEET] == proxied.settings.fleet
        assert ran.stdout.decode().splitlines() == ["proxy=set", "eth0", "lo"]
        assert (ran.end["cause"], ran.end["exit_code"]) == ("agent_exit", 0)
        assert "socketproxy.refused" not in proxied.log("docker-proxy")
