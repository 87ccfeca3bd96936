"""What operators read: Prometheus endpoints and logs of a running fleet.

Each test runs a known set of sessions through a real fleet and compares
scrapes taken before and after: the module's fleet serves every test, so
only differences are exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from scheduler.client import ApiError, FleetClient
from shared.keys import Keys
from shared.localfleet import REPO, LocalFleet, local_fleet
from shared.settings import FleetSettings
from shared.store import SessionStore
from shared.telemetry import exported_names
from tests.sandboxes import PROFILES, busybox_profile, run_session

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MIB = 1024 * 1024
BACKLOG_BYTES = 64 * 1024
# The worker's phases, labelled warm or cold; the scheduler times admission.
PHASES = ("queue_wait", "claim", "sandbox_ready", "first_byte")
STARTUP = "fleet_session_startup_duration_seconds_count"
ENDS = "fleet_session_ends_total"
# Opens a DockerRuntime on the socket named by argv[1], as a worker does at
# start, and prints this process' metrics.
OPEN_DOCKER = """
import asyncio, sys
from prometheus_client import generate_latest
from shared.errors import SandboxError
from shared.telemetry import configure_metrics
from worker.docker import DockerRuntime

async def main():
    runtime = DockerRuntime("unix://" + sys.argv[1])
    try:
        await runtime.open()
    except SandboxError:
        pass
    await runtime.close()

configure_metrics("probe")
asyncio.run(main())
print(generate_latest().decode())
"""
NOBODY = 65534


@pytest.fixture(scope="module")
def metered(redis_url: str, docker_images: None) -> Iterator[LocalFleet]:
    """A fleet with a warm pool, a failing pool and short timers."""
    profiles = {
        name: PROFILES[name]
        for name in ("exit3", "oom", "yes", "fill-workspace", "pids-out")
    }
    with local_fleet(
        {
            **profiles,
            "echo": {
                **busybox_profile("echo ready; cat"),
                # Two members and a long quiet period: one claim leaves one
                # member for seconds, so the gauge can be read in between.
                "pool": {"size": 2, "max_age_s": 600, "refill_quiet_ms": 3000},
            },
            "lines": busybox_profile("printf 'a\\nbb\\n' >&2; printf 'a\\nbb\\nccc'"),
            "sleep": busybox_profile("sleep 600"),
            "brief-life": busybox_profile("sleep 600", lifetime_s=1),
            "brief-idle": busybox_profile("sleep 600", idle_timeout_s=1),
            "bad-cpuset": busybox_profile("true", cpuset="7"),
            "nosh": {
                **busybox_profile(""),
                "image": "acp-fleet/nosh:test",
                "command": ["/bin/busybox", "true"],
                "pool": {"size": 1, "failures_before_backoff": 2},
            },
        },
        redis_url=redis_url,
        orgs={
            "acme": {"max_sessions": 20, "sessions_per_minute": 10_000},
            "pair": {"max_sessions": 1, "sessions_per_minute": 10_000},
        },
        worker={
            "heartbeat_ms": 500,
            "lease_ms": 2000,
            "kill_grace_s": 1.0,
            "eof_grace_s": 1.0,
            "backlog_bytes": BACKLOG_BYTES,
        },
    ) as fleet:
        yield fleet


def scrape(url: str) -> Samples:
    """Every sample at ``url``, keyed by name and labels."""
    text = httpx.get(url, timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(
                (k, v)
                for k, v in sample.labels.items()
                if not k.startswith("otel_")
                and k not in ("job", "instance", "service_name")
            )
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class Scrapes:
    """Both endpoints of a fleet scraped once now, to compare with later."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        self.before = self.now()

    def now(self) -> tuple[Samples, Samples]:
        """The worker's samples and the scheduler's, in that order."""
        fleet = self.fleet
        return scrape(fleet.worker_metrics_url), scrape(f"{fleet.url}/metrics")

    def grown(self, name: str, label: str) -> dict[str, float]:
        """How much each ``label`` value's ``name`` grew since creation, on
        both endpoints together, from one scrape of each; those that did
        not grow are left out."""
        after = self.now()
        grown: dict[str, float] = {}
        for now, then in zip(after, self.before, strict=True):
            for (sample, labels), total in now.items():
                named = dict(labels).get(label)
                if sample != name or named is None:
                    continue
                grown[named] = (
                    grown.get(named, 0) + total - then.get((sample, labels), 0)
                )
        return {named: amount for named, amount in grown.items() if amount}

    def delta(self, name: str, **labels: str) -> float:
        """How much ``name`` grew on both endpoints together since creation."""
        after = self.now()
        return sum(
            value(now, name, **labels) - value(then, name, **labels)
            for now, then in zip(after, self.before, strict=True)
        )


async def wait_for(check: Callable[[], Any], *, timeout_s: float = 30) -> Any:
    """Poll ``check`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.1)
    return result


async def wait_ended(fleet: LocalFleet, session_id: str, org: str = "acme") -> str:
    """Wait for the session to end; return its cause."""
    async with FleetClient(fleet.url, fleet.api_keys[org]) as client:
        for _ in range(300):
            view = await client.session(session_id)
            if view["state"] == "ended":
                return str(view["cause"])
            await asyncio.sleep(0.1)
    raise AssertionError(f"session {session_id} never ended")


async def wait_running(fleet: LocalFleet, session_id: str, org: str = "acme") -> None:
    async with FleetClient(fleet.url, fleet.api_keys[org]) as client:
        for _ in range(300):
            if (await client.session(session_id))["state"] == "running":
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"session {session_id} never ran")


def worker_gauge(fleet: LocalFleet, name: str, **labels: str) -> float:
    return value(scrape(fleet.worker_metrics_url), name, **labels)


async def wait_pool_ready(fleet: LocalFleet) -> None:
    await wait_for(lambda: worker_gauge(fleet, "fleet_pool_size", pool="echo") == 2)


class TestStartMetrics:
    async def test_warm_and_cold_starts_are_counted_apart_in_every_phase(
        self, metered: LocalFleet
    ) -> None:
        """One warm and one cold start add one each to starts, to every
        worker phase and to queue wait, under their own label; admission
        is timed twice by the scheduler, by profile."""
        await wait_pool_ready(metered)
        scrapes = Scrapes(metered)

        warm = await run_session(metered, "echo")
        # Narrowed limits keep a session out of the pool: a cold start.
        cold = await run_session(metered, "echo", limits={"memory": "32m"})

        assert warm.stdout == cold.stdout == b"ready\n"
        for start in ("warm", "cold"):
            assert scrapes.delta("fleet_session_starts_total", start=start) == 1
            for phase in PHASES:
                assert scrapes.delta(STARTUP, phase=phase, start=start) == 1, phase
            assert (
                scrapes.delta(
                    "fleet_queue_wait_duration_seconds_count",
                    profile="echo",
                    start=start,
                )
                == 1
            )
        assert scrapes.delta("fleet_pool_claims_total", pool="echo", outcome="hit") == 1
        assert scrapes.delta("fleet_pool_claims_total", outcome="miss") == 0
        assert scrapes.delta(STARTUP, phase="admission", profile="echo") == 2
        admission_s = scrapes.delta(
            "fleet_session_startup_duration_seconds_sum", phase="admission"
        )
        assert 0 < admission_s < 1

    async def test_admissions_and_refusals_are_counted_by_reason_and_org(
        self, metered: LocalFleet
    ) -> None:
        """An org at its one-session quota is refused once, counted as such."""
        scrapes = Scrapes(metered)

        async with FleetClient(metered.url, metered.api_keys["pair"]) as client:
            held = await client.create_session("sleep")
            with pytest.raises(ApiError) as refused:
                await client.create_session("sleep")
            await client.cancel(held["id"])
        await wait_ended(metered, held["id"], org="pair")

        assert refused.value.code == "org_concurrency"
        admitted = scrapes.delta(
            "fleet_admissions_total", outcome="admitted", org="pair"
        )
        assert admitted == 1
        concurrency = scrapes.delta(
            "fleet_admissions_total", outcome="org_concurrency", org="pair"
        )
        assert concurrency == 1


class TestEndMetrics:
    @pytest.mark.parametrize(
        ("profile", "cause", "stdin"),
        [
            ("oom", "oom_killed", b""),
            ("exit3", "agent_exit", b""),
            ("fill-workspace", "disk_full", b"go\n"),
            ("bad-cpuset", "start_failed", b""),
        ],
    )
    async def test_each_end_is_counted_once_by_its_cause(
        self, metered: LocalFleet, profile: str, cause: str, stdin: bytes
    ) -> None:
        """One session of each kind adds exactly one end, under its cause."""
        scrapes = Scrapes(metered)

        # No EOF: each ends by itself, and this fleet's one-second EOF grace
        # could end a slow one first, under another cause.
        ran = await run_session(metered, profile, stdin=stdin, eof=False)

        assert ran.view["cause"] == cause
        assert scrapes.delta(ENDS, cause=cause) == 1
        assert scrapes.delta(ENDS) == 1

    async def test_an_agent_failing_at_the_pids_limit_is_counted_once(
        self, metered: LocalFleet
    ) -> None:
        """A pids_exhausted end adds one end under its cause."""
        scrapes = Scrapes(metered)

        # No EOF: this fleet's one-second EOF grace would end it first.
        ran = await run_session(metered, "pids-out", eof=False)

        assert ran.view["cause"] == "pids_exhausted"
        assert scrapes.delta(ENDS, cause="pids_exhausted") == 1
        assert scrapes.delta(ENDS) == 1

    async def test_timers_and_cancellation_are_counted_by_cause(
        self, metered: LocalFleet
    ) -> None:
        """Lifetime, idle timeout and a cancel each add one end of their own."""
        scrapes = Scrapes(metered)

        async with FleetClient(metered.url, metered.api_key) as client:
            ids = [
                (await client.create_session(name))["id"]
                for name in ("brief-life", "brief-idle", "sleep")
            ]
            await wait_running(metered, ids[2])
            await client.cancel(ids[2])
        causes = [await wait_ended(metered, session_id) for session_id in ids]

        assert causes == ["lifetime_exceeded", "idle_timeout", "cancelled"]
        for cause in causes:
            assert scrapes.delta(ENDS, cause=cause) == 1
        assert scrapes.delta(ENDS) == 3
        assert scrapes.delta("fleet_container_lifetime_seconds_count") == 3
        # The lifetime session's container lived at least its second.
        assert scrapes.delta("fleet_container_lifetime_seconds_sum") >= 1

    async def test_a_session_whose_owner_died_is_counted_once_as_worker_lost(
        self, metered: LocalFleet
    ) -> None:
        """A session claimed by a node that never renews is ended by a sweep
        and counted exactly once, on whichever endpoint swept it."""
        settings = metered.settings
        redis = Redis.from_url(metered.redis_url)
        store = SessionStore(redis, keys=Keys(settings.key_prefix))
        scrapes = Scrapes(metered)

        # Waiting for an upload, the session is in no worker's queue: the
        # test's own claim, as a node that dies at once, is the only one.
        async with FleetClient(metered.url, metered.api_key) as client:
            created = await client.create_session("sleep", upload=True)
        claim = await store.claim(created["id"], node="ghost", lease_ms=1000)
        cause = await wait_ended(metered, created["id"])
        await redis.aclose()

        assert claim is not None
        assert cause == "worker_lost"
        assert scrapes.delta(ENDS, cause="worker_lost") == 1
        assert scrapes.delta(ENDS) == 1


class TestRelayMetrics:
    async def test_bytes_and_messages_are_counted_each_way(
        self, metered: LocalFleet
    ) -> None:
        """Bytes grow by exactly what was relayed, messages by its lines."""
        await wait_pool_ready(metered)
        scrapes = Scrapes(metered)

        lines = await run_session(metered, "lines")
        echoed = await run_session(metered, "echo", stdin=b"hello\nworld\n")

        assert lines.stdout == b"a\nbb\nccc"
        assert echoed.stdout == b"ready\nhello\nworld\n"
        out = {"direction": "out", "stream": "stdout"}
        err = {"direction": "out", "stream": "stderr"}
        into = {"direction": "in", "stream": "stdin"}
        assert scrapes.delta("fleet_relay_bytes_total", **out) == 8 + 18
        assert scrapes.delta("fleet_relay_bytes_total", **err) == 5
        assert scrapes.delta("fleet_relay_bytes_total", **into) == 12
        assert scrapes.delta("fleet_relay_messages_total", **out) == 3 + 3
        assert scrapes.delta("fleet_relay_messages_total", **err) == 2
        assert scrapes.delta("fleet_relay_messages_total", **into) == 2

    async def test_a_stalled_client_is_one_slow_client_event_and_a_backlog(
        self, metered: LocalFleet
    ) -> None:
        """A client that reads nothing makes one slow-client event; the
        backlog gauge shows the unacknowledged output until it ends."""
        scrapes = Scrapes(metered)

        async with FleetClient(metered.url, metered.api_key) as client:
            created = await client.create_session("yes")
            async with client.stdio(created["id"]):
                await wait_for(lambda: scrapes.delta("fleet_relay_slow_clients_total"))
                await asyncio.sleep(1)
                backlog = worker_gauge(metered, "fleet_relay_backlog_bytes")
                events = scrapes.delta("fleet_relay_slow_clients_total")
            await client.cancel(created["id"])
        await wait_ended(metered, created["id"])

        assert events == 1
        assert backlog >= BACKLOG_BYTES
        assert worker_gauge(metered, "fleet_relay_backlog_bytes") == 0
        assert scrapes.delta(ENDS, cause="cancelled") == 1


class TestPoolMetrics:
    async def test_pool_size_and_refill_failures_are_reported(
        self, metered: LocalFleet
    ) -> None:
        """The healthy pool shows its members, the failing one none and its
        refill failures; a warm claim takes one member out of the healthy one."""
        await wait_pool_ready(metered)
        failures = await wait_for(
            lambda: (
                worker_gauge(metered, "fleet_pool_refill_failures_total", pool="nosh")
                >= 2
            )
        )

        assert failures
        assert worker_gauge(metered, "fleet_pool_size", pool="nosh") == 0
        async with FleetClient(metered.url, metered.api_key) as client:
            created = await client.create_session("echo")
            await wait_running(metered, created["id"])
            assert worker_gauge(metered, "fleet_pool_size", pool="echo") == 1
            await client.cancel(created["id"])
        await wait_ended(metered, created["id"])

    async def test_a_claim_on_an_empty_pool_is_a_miss_and_starts_cold(
        self, metered: LocalFleet
    ) -> None:
        """A session of the pool that never fills is one miss and one cold
        start, and no hit."""
        scrapes = Scrapes(metered)

        ran = await run_session(metered, "nosh")

        assert ran.view["cause"] == "agent_exit"
        claims = "fleet_pool_claims_total"
        assert scrapes.delta(claims, pool="nosh", outcome="miss") == 1
        assert scrapes.delta(claims, pool="nosh", outcome="hit") == 0
        assert scrapes.delta("fleet_session_starts_total", start="cold") == 1


class TestNodeMetrics:
    async def test_sessions_running_are_counted_by_org_and_node(
        self, metered: LocalFleet
    ) -> None:
        """A running session adds one to its org and node until it ends."""
        node = metered.settings.worker.node
        scrapes = Scrapes(metered)

        async with FleetClient(metered.url, metered.api_keys["pair"]) as client:
            created = await client.create_session("sleep")
            await wait_running(metered, created["id"], org="pair")
            during = scrapes.delta("fleet_sessions_running", org="pair", node=node)
            await client.cancel(created["id"])
        await wait_ended(metered, created["id"], org="pair")

        assert during == 1
        assert scrapes.delta("fleet_sessions_running", org="pair") == 0

    async def test_workspace_disk_used_follows_a_filling_agent(
        self, metered: LocalFleet
    ) -> None:
        """An agent that fills its 16 MiB workspace shows in the disk gauge."""
        used = "fleet_workspace_disk_used_bytes"
        before = worker_gauge(metered, used)

        async with FleetClient(metered.url, metered.api_key) as client:
            created = await client.create_session("fill-workspace")
            async with client.stdio(created["id"]) as stdio:
                await wait_for(lambda: worker_gauge(metered, used) - before > 14 * MIB)
                capacity = worker_gauge(metered, "fleet_workspace_disk_capacity_bytes")
                await stdio.send(b"done\n")
        await wait_ended(metered, created["id"])

        assert capacity >= 15 * MIB
        assert worker_gauge(metered, used) - before < MIB

    async def test_heartbeat_age_is_reported_per_node(
        self, metered: LocalFleet
    ) -> None:
        """The scheduler shows a live node's age under a second and a
        silent node's as the time since its last heartbeat."""
        settings: FleetSettings = metered.settings
        keys = Keys(settings.key_prefix)
        redis = Redis.from_url(metered.redis_url)
        ghost = "ghost-" + secrets.token_hex(3)
        seconds, micros = await redis.time()
        silent_since_ms = int(seconds) * 1000 + int(micros) // 1000 - 12_000
        await redis.hset(keys.node(ghost), mapping={"heartbeat_ms": silent_since_ms})
        await redis.zadd(keys.nodes, {ghost: silent_since_ms})
        url = f"{metered.url}/metrics"
        name = "fleet_node_heartbeat_age_seconds"

        ages = await wait_for(lambda: ghost_seen(scrape(url), name, ghost))
        await redis.delete(keys.node(ghost))
        await redis.zrem(keys.nodes, ghost)
        await redis.aclose()

        assert 12 <= value(ages, name, node=ghost) < 15
        assert 0 <= value(ages, name, node=settings.worker.node) < 1.5


def ghost_seen(samples: Samples, name: str, node: str) -> Samples | None:
    """The samples if they show ``node``'s heartbeat age, else None."""
    return samples if value(samples, name, node=node) else None


class TestDockerMetrics:
    async def test_a_container_the_engine_refuses_counts_one_docker_error(
        self, metered: LocalFleet
    ) -> None:
        """A create the Engine refuses is one Docker error of its kind."""
        scrapes = Scrapes(metered)

        ran = await run_session(metered, "bad-cpuset")
        errors = scrapes.grown("fleet_docker_errors_total", "kind")

        assert ran.view["cause"] == "start_failed"
        # The nosh pool's spares exit at once, so its refills fail with 409
        # on a timer of their own, which this session's window may catch.
        errors.pop("conflict", None)
        assert errors == {"refused": 1}


class TestDockerErrorKinds:
    def test_a_socket_the_worker_may_not_open_counts_as_permission_denied(
        self, tmp_path: Path
    ) -> None:
        """A worker refused by the Engine socket's mode counts one
        permission_denied error, not an unreachable Engine."""
        path = tmp_path / "docker.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen()
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o600)
        # Root ignores a socket's mode; without these capabilities it obeys.
        drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]

        probe = subprocess.run(
            [*drop, sys.executable, "-c", OPEN_DOCKER, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        listener.close()

        samples: Samples = {}
        for family in text_string_to_metric_families(probe.stdout):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        errors = "fleet_docker_errors_total"
        assert value(samples, errors, kind="permission_denied") == 1
        assert value(samples, errors) == 1


class TestMetrics:
    async def test_session_ends_starts_and_admissions_are_counted(
        self, fleet: LocalFleet
    ) -> None:
        """One OOM session and one exit are counted once each, by cause."""
        scrapes = Scrapes(fleet)

        await run_session(fleet, "oom")
        await run_session(fleet, "exit3")

        assert scrapes.delta(ENDS, cause="oom_killed") == 1
        assert scrapes.delta(ENDS, cause="agent_exit") == 1
        assert scrapes.delta("fleet_session_starts_total", start="cold") == 2
        assert scrapes.delta(STARTUP, phase="queue_wait") == 2
        assert scrapes.delta(STARTUP, phase="sandbox_ready") == 2
        assert scrapes.delta("fleet_admissions_total", outcome="admitted") == 2


class TestLogs:
    async def test_secrets_and_payloads_reach_no_log_line(
        self, fleet: LocalFleet
    ) -> None:
        """A session's secret variable and its stdio appear in no log."""
        secret = "sk-" + secrets.token_hex(16)
        payload = "payload-" + secrets.token_hex(16)

        ran = await run_session(
            fleet, "secret", env={"TOKEN": secret}, stdin=f"{payload}\n".encode()
        )

        assert ran.stdout == f"{payload}\n".encode()
        logs = fleet.log("worker") + fleet.log("scheduler")
        assert ran.session_id in logs
        assert secret not in logs
        assert payload not in logs

    async def test_each_session_ends_with_one_summary_line(
        self, fleet: LocalFleet
    ) -> None:
        """The worker logs one session.ended line with cause and phase times."""
        ran = await run_session(fleet, "exit3")

        lines = [
            json.loads(line)
            for line in fleet.log("worker").splitlines()
            if ran.session_id in line and '"session.ended"' in line
        ]

        assert len(lines) == 1
        summary = lines[0]
        assert (summary["cause"], summary["exit_code"]) == ("agent_exit", 3)
        assert summary["start"] == "cold"
        assert summary["queue_wait_ms"] >= 0
        assert summary["claim_ms"] >= 0
        assert summary["sandbox_ready_ms"] > 0
        assert summary["life_ms"] >= summary["sandbox_ready_ms"]


class TestShippedMonitoring:
    def test_alerts_and_dashboard_name_only_exported_metrics(self) -> None:
        """Every metric the alert rules and the dashboard query exists."""
        docs = REPO / "docs"
        rules = yaml.safe_load((docs / "alerts.yml").read_text())
        exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
        dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
        exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]

        named = {name for expr in exprs for name in re.findall(r"fleet_[a-z_]+", expr)}

        assert len(exprs) >= 14
        assert named <= exported_names(), named - exported_names()
