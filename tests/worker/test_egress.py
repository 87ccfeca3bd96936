"""Specification of egress: the proxy's rules, then sandboxes that use it.

The proxy is tested on loopback against a server of the test's own; the
sandbox tests run a whole fleet whose egress profile may reach one of two
busybox web servers on a Docker network the test creates. Nothing outside
this machine is ever contacted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from scheduler.client import ApiError, FleetClient
from shared.localfleet import LocalFleet, local_fleet
from shared.models import EgressRecord
from shared.settings import EgressConfig, NetworkPolicy
from tests.sandboxes import BUSYBOX_IMAGE, busybox_profile, run_session
from tests.worker.test_pool import session_field, wait_pool
from worker.egress import EgressProxy

SESSION = "0" * 31 + "1"


@dataclass
class Upstream:
    """A loopback server that answers every request with what it received."""

    port: int
    received: list[bytes] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server_side = Upstream(port=0)

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            server_side.received.append(head)
            body = b"upstream says hello\n"
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 20\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    server_side.port = server.sockets[0].getsockname()[1]
    async with server:
        yield server_side


@dataclass
class Proxy:
    """A running proxy, the env it gave one session, and what it recorded."""

    proxy: EgressProxy
    env: dict[str, str]
    records: list[EgressRecord]

    @property
    def authorization(self) -> str:
        userinfo = self.env["HTTP_PROXY"].split("//", 1)[1].rsplit("@", 1)[0]
        return base64.b64encode(userinfo.encode()).decode()

    async def send(
        self, head: str, *, authorization: str | None = None, after: bytes = b""
    ) -> bytes:
        """Send one request head (and ``after`` it) through the proxy;
        return all it answers."""
        credential = self.authorization if authorization is None else authorization
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        lines = head.replace("\n", "\r\n")
        auth = f"Proxy-Authorization: Basic {credential}\r\n" if credential else ""
        writer.write((lines + auth + "\r\n").encode() + after)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        return answer


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[Proxy]:
    records: list[EgressRecord] = []

    async def record(session_id: str, entry: EgressRecord) -> None:
        assert session_id == SESSION
        records.append(entry)

    config = EgressConfig(
        hosts={"upstream.test": "127.0.0.1", "a.wild.test": "127.0.0.1"}
    )
    egress = EgressProxy(config=config, record=record)
    await egress.start("127.0.0.1", 0)
    policy = NetworkPolicy(
        mode="egress",
        allow=["upstream.test", "*.wild.test", "127.0.0.1"],
        ports=[upstream.port, 80],
    )
    env = egress.register(SESSION, policy)
    yield Proxy(proxy=egress, env=env, records=records)
    await egress.close()


class TestProxyRules:
    """The proxy carries a session's connection only to what it may reach."""

    async def test_env_points_at_the_proxy_with_session_credentials(
        self, proxy: Proxy
    ) -> None:
        """All four proxy variables carry the session id and a secret."""
        url = proxy.env["HTTPS_PROXY"]

        assert url.startswith(f"http://{SESSION}:")
        assert url.endswith(f"@127.0.0.1:{proxy.proxy.port}")
        names = ("HTTP_PROXY", "http_proxy", "https_proxy")
        assert all(proxy.env[name] == url for name in names)
        assert proxy.env["NO_PROXY"] == "localhost,127.0.0.1"

    async def test_connect_to_a_listed_name_tunnels_and_counts_bytes(
        self, proxy: Proxy, upstream: Upstream
    ) -> None:
        """CONNECT to an exactly listed name opens a tunnel to its address."""
        target = f"upstream.test:{upstream.port}"
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"

        # What follows the head is the tunnel's first bytes.
        tunnelled = await proxy.send(
            f"CONNECT {target} HTTP/1.1\nHost: {target}\n",
            after=b"GET / HTTP/1.0\r\n\r\n",
        )
        await asyncio.sleep(0.05)

        assert tunnelled.startswith(established)
        assert tunnelled.endswith(b"upstream says hello\n")
        last = proxy.records[-1]
        assert (last.verdict, last.host, last.address) == (
            "allowed",
            "upstream.test",
            "127.0.0.1",
        )
        assert last.bytes_up == len(b"GET / HTTP/1.0\r\n\r\n")
        assert last.bytes_down == len(tunnelled) - len(established)

    async def test_absolute_uri_is_forwarded_with_the_checked_host(
        self, proxy: Proxy, upstream: Upstream
    ) -> None:
        """A GET is sent in origin form, Host rewritten, credentials dropped."""
        url = f"http://upstream.test:{upstream.port}/path?q=1"

        answer = await proxy.send(f"GET {url} HTTP/1.1\nHost: other.test\n")

        assert answer.endswith(b"upstream says hello\n")
        head = upstream.received[-1].decode()
        assert head.startswith("GET /path?q=1 HTTP/1.1\r\n")
        assert f"Host: upstream.test:{upstream.port}\r\n" in head
        assert "other.test" not in head
        assert "Proxy-Authorization" not in head
        assert "Connection: close" in head

    @pytest.mark.parametrize(
        ("target", "reason"),
        [
            ("denied.test:{port}", "not_listed"),
            ("upstream.test:9", "port_not_allowed"),
            ("127.0.0.2:{port}", "ip_not_listed"),
            ("169.254.169.254:80", "ip_not_listed"),
            ("a.wild.test:{port}", "non_public_address"),
        ],
    )
    async def test_refusals_answer_403_and_are_recorded(
        self, proxy: Proxy, upstream: Upstream, target: str, reason: str
    ) -> None:
        """Unlisted names, ports and addresses, and wildcards leading to
        loopback, are refused with 403 and recorded with their reason."""
        target = target.format(port=upstream.port)

        answer = await proxy.send(f"CONNECT {target} HTTP/1.1\n")

        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert [(r.verdict, r.reason) for r in proxy.records] == [("refused", reason)]
        assert upstream.received == []

    async def test_a_listed_ip_literal_is_reached_though_not_public(
        self, proxy: Proxy, upstream: Upstream
    ) -> None:
        """An address listed exactly is the operator's explicit choice."""
        url = f"http://127.0.0.1:{upstream.port}/"

        answer = await proxy.send(f"GET {url} HTTP/1.1\n")

        assert answer.endswith(b"upstream says hello\n")
        assert [(r.verdict, r.reason) for r in proxy.records] == [("allowed", "listed")]

    @pytest.mark.parametrize("credential", ["", "d3Jvbmc6c2VjcmV0", "!!"])
    async def test_wrong_credentials_get_407_and_no_record(
        self, proxy: Proxy, upstream: Upstream, credential: str
    ) -> None:
        """Missing, unknown or malformed credentials are refused before any
        policy is looked at; no session can be charged with them."""
        answer = await proxy.send(
            f"CONNECT upstream.test:{upstream.port} HTTP/1.1\n",
            authorization=credential,
        )

        assert answer.startswith(b"HTTP/1.1 407 ")
        assert b'Proxy-Authenticate: Basic realm="acp-fleet"' in answer
        assert proxy.records == []

    async def test_unregister_ends_open_tunnels_and_the_credentials(
        self, proxy: Proxy, upstream: Upstream
    ) -> None:
        """After unregister, an open tunnel is closed and recorded, and the
        session's credentials no longer open anything."""
        target = f"upstream.test:{upstream.port}"
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy.port)
        writer.write(
            f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Basic "
            f"{proxy.authorization}\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")

        await proxy.proxy.unregister(SESSION)
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        again = await proxy.send(f"CONNECT {target} HTTP/1.1\n")

        assert rest == b""
        assert [r.verdict for r in proxy.records] == ["allowed"]
        assert again.startswith(b"HTTP/1.1 407 ")


# The agent fetches the allowed page, then the denied one, then tries the
# server directly, bypassing the proxy; each step prints its exit status.
# (This busybox's wget crashes when given -T, so no timeout is set.)
AGENT_SCRIPT = (
    "wget -q -O- http://allowed.test/; echo allowed=$?; "
    "wget -q -O- http://denied.test/ 2>&1; echo denied=$?; "
    "nc -w 3 $SERVER_IP 80 </dev/null 2>&1; echo direct=$?"
)
PAGE = "allowed-content"


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@dataclass
class WebServer:
    """A busybox httpd on a bridge network of the test's own."""

    network: str
    container: str
    address: str


@pytest.fixture(scope="module")
def web_server(docker_images: None) -> Iterator[WebServer]:
    network = "acpf-egress-test-" + secrets.token_hex(4)
    docker("network", "create", network)
    container = ""
    try:
        container = docker(
            "run", "-d", "--network", network,
            "--network-alias", "allowed.test", "--network-alias", "denied.test",
            BUSYBOX_IMAGE, "sh", "-c",
            f"mkdir /www && echo {PAGE} > /www/index.html && httpd -f -p 80 -h /www",
        )  # fmt: skip
        address = docker(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container,
        )  # fmt: skip
        yield WebServer(network=network, container=container, address=address)
    finally:
        if container:
            docker("rm", "-f", container)
        docker("network", "rm", network)


@pytest.fixture(scope="module")
def egress_fleet(redis_url: str, web_server: WebServer) -> Iterator[LocalFleet]:
    """A fleet whose egress profiles may reach allowed.test and nothing else.

    The proxy runs on the host, where Docker's names for the server do not
    resolve, so the worker's static hosts map names it; both names point at
    the same server, so only the policy tells them apart.
    """
    profile = {
        **busybox_profile(AGENT_SCRIPT),
        "env": {"SERVER_IP": web_server.address},
        "network": {"mode": "egress", "allow": ["allowed.test"]},
    }
    hosts = {"allowed.test": web_server.address, "denied.test": web_server.address}
    with local_fleet(
        {"egress": profile, "egress-warm": {**profile, "pool": {"size": 1}}},
        redis_url=redis_url,
        orgs={
            "acme": {"max_sessions": 8, "sessions_per_minute": 1000},
            "beta": {"max_sessions": 8, "sessions_per_minute": 1000},
        },
        worker={"egress": {"proxy_port": 0, "hosts": hosts}},
    ) as fleet:
        network = f"{fleet.settings.fleet}-egress-{fleet.settings.worker.node}"
        try:
            yield fleet
        finally:
            fleet.stop("worker")
            # The worker removes its network when it stops; this only
            # catches what a failed stop left behind.
            subprocess.run(["docker", "network", "rm", network], capture_output=True)


class TestEgressSandbox:
    """A sandbox in egress mode reaches exactly its allow-list, via the proxy."""

    async def check_session(self, fleet: LocalFleet, profile: str, address: str) -> str:
        """Run one session of ``profile``; check its output and its records."""
        ran = await run_session(fleet, profile, timeout_s=60)

        output = ran.stdout.decode()
        assert f"{PAGE}\nallowed=0\n" in output
        assert "403 Forbidden" in output
        assert "denied=1\n" in output
        assert "direct=1\n" in output
        assert ran.end["cause"] == "agent_exit"
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            view = await client.egress(ran.session_id)
        # Records are written as connections close, so their order is not
        # part of the contract; what each says is.
        records = sorted(
            (r["verdict"], r["host"], r["port"], r["reason"]) for r in view["records"]
        )
        assert records == [
            ("allowed", "allowed.test", 80, "listed"),
            ("refused", "denied.test", 80, "not_listed"),
        ]
        allowed = next(r for r in view["records"] if r["verdict"] == "allowed")
        assert allowed["bytes_down"] > len(PAGE)
        assert allowed["address"] == address
        return ran.session_id

    async def test_a_cold_sandbox_reaches_only_the_allowed_host(
        self, egress_fleet: LocalFleet, web_server: WebServer
    ) -> None:
        """The allowed page arrives through the proxy, the denied host gets
        403, the server's address is unreachable directly, and the records
        show one allowed and one refused connection."""
        session_id = await self.check_session(
            egress_fleet, "egress", web_server.address
        )

        assert await session_field(egress_fleet, session_id, "start") == "cold"

    async def test_a_warm_sandbox_gets_the_proxy_through_its_launcher(
        self, egress_fleet: LocalFleet, web_server: WebServer
    ) -> None:
        """A pool member on the internal network receives its proxy
        credentials with the session and behaves exactly like a cold one."""
        await wait_pool(egress_fleet, "egress-warm", ready=1)

        session_id = await self.check_session(
            egress_fleet, "egress-warm", web_server.address
        )

        assert await session_field(egress_fleet, session_id, "start") == "warm"

    async def test_the_egress_network_is_internal_and_isolates_sandboxes(
        self, egress_fleet: LocalFleet
    ) -> None:
        """The worker's network has no route out and no sandbox-to-sandbox
        traffic."""
        settings = egress_fleet.settings
        network = f"{settings.fleet}-egress-{settings.worker.node}"

        info = json.loads(docker("network", "inspect", network))[0]

        assert info["Internal"] is True
        assert info["Options"]["com.docker.network.bridge.enable_icc"] == "false"

    async def test_records_are_read_like_the_session(
        self, egress_fleet: LocalFleet
    ) -> None:
        """The owner's key and the session token read the records; another
        organisation is told the session does not exist."""
        async with FleetClient(egress_fleet.url, egress_fleet.api_keys["acme"]) as c:
            created = await c.create_session("egress")
            await c.cancel(created["id"])
        token_client = FleetClient(egress_fleet.url, created["token"])
        other = FleetClient(egress_fleet.url, egress_fleet.api_keys["beta"])

        async with token_client, other:
            by_token = await token_client.egress(created["id"])
            with pytest.raises(ApiError) as refused:
                await other.egress(created["id"])

        assert by_token["id"] == created["id"]
        assert refused.value.status == 404
