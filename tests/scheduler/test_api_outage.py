"""The HTTP API while its Redis hangs: a bounded 503, then at once service.

The scheduler here has a redis-server of its own, which the tests stop
with SIGSTOP (the process keeps its sockets and answers nothing, as a
hung or partitioned Redis does) and continue with SIGCONT.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from shared.localfleet import LocalFleet, local_fleet, redis_process
from tests.sandboxes import PROFILES

# What docs/operations.md promises, and what a test run may add to it.
ANSWER_BOUND_S = 5.0
MARGIN_S = 0.5


@pytest.fixture(scope="module")
def hung() -> Iterator[tuple[LocalFleet, subprocess.Popen[bytes]]]:
    """A scheduler alone on a redis-server that the tests may stop."""
    with (
        redis_process() as (url, redis),
        local_fleet(
            {"sh": PROFILES["cat-exit"]},
            redis_url=url,
            # Sweeps every second, so that a hang spans several of them.
            worker={"lease_ms": 2000, "heartbeat_ms": 500},
            start_worker=False,
        ) as fleet,
    ):
        yield fleet, redis


def _requests(fleet: LocalFleet, session_id: str) -> list[tuple[str, str, str]]:
    """Five kinds of request: (method, path, key), each touching Redis."""
    org, ops = fleet.api_key, fleet.operator_key
    return [
        ("POST", "/v1/sessions", org),
        ("GET", "/v1/sessions", org),
        ("GET", f"/v1/sessions/{session_id}", org),
        ("GET", "/v1/fleet", ops),
        ("DELETE", f"/v1/sessions/{session_id}", org),
    ]


async def _send(
    http: httpx.AsyncClient, method: str, path: str, key: str
) -> tuple[httpx.Response, float]:
    body = {"profile": "sh"} if method == "POST" else None
    started = time.monotonic()
    response = await http.request(
        method, path, json=body, headers={"Authorization": f"Bearer {key}"}
    )
    return response, time.monotonic() - started


class TestHungRedis:
    async def test_every_request_answers_unavailable_within_the_bound(
        self, hung: tuple[LocalFleet, subprocess.Popen[bytes]]
    ) -> None:
        """Five sequential requests of different kinds each answer 503
        ``unavailable`` within 5 s while Redis hangs, and succeed at once
        after it continues."""
        fleet, redis = hung
        async with httpx.AsyncClient(base_url=fleet.url, timeout=60) as http:
            created, _ = await _send(http, "POST", "/v1/sessions", fleet.api_key)
            session_id = created.json()["id"]
            requests = _requests(fleet, session_id)
            redis.send_signal(signal.SIGSTOP)
            try:
                during = [await _send(http, *request) for request in requests]
            finally:
                redis.send_signal(signal.SIGCONT)
            after = [await _send(http, *request) for request in requests]

        assert created.status_code == 201
        assert [r.status_code for r, _ in during] == [503] * 5
        assert {r.json()["error"]["code"] for r, _ in during} == {"unavailable"}
        assert {r.headers["Retry-After"] for r, _ in during} == {"1"}
        assert max(took for _, took in during) < ANSWER_BOUND_S + MARGIN_S
        assert [r.status_code for r, _ in after] == [201, 200, 200, 200, 200]
        assert max(took for _, took in after) < 1.0

    def test_timers_log_one_short_warning_per_outage(
        self, hung: tuple[LocalFleet, subprocess.Popen[bytes]]
    ) -> None:
        """The lease sweeper and the heartbeat watcher each log one warning
        with the error's type while Redis hangs, no traceback, and one line
        when it is back."""
        fleet, redis = hung
        # Timers still failing from an earlier hang recover first.
        time.sleep(3)
        before = len(fleet.log("scheduler").splitlines())

        redis.send_signal(signal.SIGSTOP)
        try:
            time.sleep(6)
        finally:
            redis.send_signal(signal.SIGCONT)
        time.sleep(3)
        lines = fleet.log("scheduler").splitlines()[before:]

        for event in ('"sweep.failed"', '"heartbeats.read_failed"'):
            ours = [line for line in lines if event in line]
            warnings = [line for line in ours if '"warning"' in line]
            assert len(warnings) == 1, ours
            assert '"error_type": "TimeoutError"' in warnings[0]
            assert sum('"recovered": true' in line for line in ours) == 1
        assert not any("Traceback" in line for line in lines)
