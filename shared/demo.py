"""``acp-fleet demo``: one real ACP session through the whole fleet.

A backend's part (create the session over HTTP) and an editor's part (speak
ACP through ``connect`` with the session token) are played by this module;
everything in between is the production path with the real agent.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

from acp import PROTOCOL_VERSION, Client, RequestError, text_block
from acp.schema import (
    ClientCapabilities,
    DeniedOutcome,
    FileSystemCapabilities,
    RequestPermissionResponse,
)
from acp.stdio import spawn_agent_process

from scheduler.client import FleetClient
from shared.errors import FleetError
from shared.localfleet import AGENT_IMAGE, REPO, LocalFleet, agent_profile, local_fleet


@dataclass
class RecordingClient:
    """An ACP client that records what the agent sends and grants nothing."""

    updates: list[Any] = field(default_factory=list)

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        self.updates.append(update)

    async def request_permission(self, *_: Any, **__: Any) -> RequestPermissionResponse:
        return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))

    async def write_text_file(self, *_: Any, **__: Any) -> None:
        raise RequestError.method_not_found("fs/write_text_file")

    async def read_text_file(self, *_: Any, **__: Any) -> None:
        raise RequestError.method_not_found("fs/read_text_file")

    async def create_terminal(self, *_: Any, **__: Any) -> None:
        raise RequestError.method_not_found("terminal/create")


@dataclass
class Exchange:
    """What the ACP client saw, with client-side timings in seconds."""

    agent_name: str = ""
    acp_session_id: str = ""
    prompt_error: RequestError | None = None
    stop_reason: str | None = None
    connect_exit: int | None = None
    steps_s: dict[str, float] = field(default_factory=dict)


async def drive_acp(
    fleet: LocalFleet, session_id: str, token: str, prompt: str
) -> Exchange:
    """Run initialize, session/new and session/prompt through ``connect``."""
    exchange = Exchange()
    with (fleet.workdir / "connect.log").open("ab") as stderr_log:
        await _drive(exchange, fleet, session_id, token, prompt, stderr_log)
    return exchange


async def _drive(
    exchange: Exchange,
    fleet: LocalFleet,
    session_id: str,
    token: str,
    prompt: str,
    stderr_log: Any,
) -> None:
    command = [sys.executable, "-m", "shared.cli", "connect", "--url", fleet.url]
    command += ["--session", session_id, "--token", token]
    started = time.perf_counter()
    async with spawn_agent_process(
        cast(Client, RecordingClient()),
        command[0],
        *command[1:],
        cwd=REPO,
        transport_kwargs={"stderr": stderr_log},
    ) as (conn, process):
        # The client offers fs and terminal; the fleet withdraws both so the
        # agent cannot reach this machine through them.
        capabilities = ClientCapabilities(
            fs=FileSystemCapabilities(read_text_file=True, write_text_file=True),
            terminal=True,
        )
        init = await conn.initialize(
            protocol_version=PROTOCOL_VERSION, client_capabilities=capabilities
        )
        exchange.steps_s["initialize"] = time.perf_counter() - started
        info = init.agent_info
        exchange.agent_name = f"{info.name} {info.version}" if info else "unknown"

        mark = time.perf_counter()
        new = await conn.new_session(cwd=os.getcwd(), mcp_servers=[])
        exchange.steps_s["session/new"] = time.perf_counter() - mark
        exchange.acp_session_id = new.session_id

        mark = time.perf_counter()
        try:
            done = await conn.prompt(
                session_id=new.session_id, prompt=[text_block(prompt)]
            )
            exchange.stop_reason = str(done.stop_reason)
        except RequestError as exc:
            exchange.prompt_error = exc
        exchange.steps_s["session/prompt"] = time.perf_counter() - mark
        assert process.stdin is not None
        process.stdin.close()
        exchange.connect_exit = await asyncio.wait_for(process.wait(), 60)


def ensure_agent_image() -> None:
    """Build the agent image from local files when Docker lacks it."""
    try:
        subprocess.run(["docker", "version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FleetError(
            "the Docker Engine does not answer; run 'make setup' (installs and "
            "starts it) or start dockerd"
        ) from exc
    found = subprocess.run(
        ["docker", "image", "inspect", AGENT_IMAGE], capture_output=True, check=False
    )
    if found.returncode != 0:
        print(f"building {AGENT_IMAGE} from local files ...", flush=True)
        subprocess.run(
            ["bash", str(REPO / "images/build.sh"), "--only", "agent"], check=True
        )


async def _session(
    fleet: LocalFleet, prompt: str
) -> tuple[dict[str, Any], Exchange, float]:
    env = {}
    if os.environ.get("ANTHROPIC_API_KEY"):
        env["ANTHROPIC_API_KEY"] = os.environ["ANTHROPIC_API_KEY"]
    async with FleetClient(fleet.url, fleet.api_key) as backend:
        mark = time.perf_counter()
        created = await backend.create_session("claude", env=env)
        create_s = time.perf_counter() - mark
        exchange = await drive_acp(fleet, created["id"], created["token"], prompt)
        view = await backend.session(created["id"])
        for _ in range(100):
            if view["state"] == "ended":
                break
            await asyncio.sleep(0.1)
            view = await backend.session(created["id"])
    return view, exchange, create_s


def _report(view: dict[str, Any], exchange: Exchange, create_s: float) -> None:
    t = view["timings"]

    def span(start: str, end: str) -> str:
        if t.get(start) is None or t.get(end) is None:
            return "-"
        return f"{t[end] - t[start]:>7d} ms"

    print(f"\nsession {view['id']} on {view['node']} ({view['image_digest'][:19]})")
    print(f"agent:            {exchange.agent_name}")
    print(f"ACP session:      {exchange.acp_session_id}")
    if exchange.prompt_error is not None:
        err = exchange.prompt_error
        print(f"session/prompt:   JSON-RPC error {err.code} {str(err)!r}")
    else:
        print(f"session/prompt:   answered, stop reason {exchange.stop_reason}")
    print(
        f"ended:            {view['cause']} (exit {view['exit_code']}, "
        f"OOM {view['oom_killed']}); connect exited {exchange.connect_exit}"
    )
    print("\nphase                                  time")
    print(f"POST /v1/sessions (admission)      {create_s * 1000:>7.0f} ms")
    print(f"queue wait (admitted -> claimed)   {span('admitted_ms', 'claimed_ms')}")
    print(
        f"sandbox start (claimed -> ready)   {span('claimed_ms', 'sandbox_ready_ms')}"
    )
    agent_start = span("sandbox_ready_ms", "first_byte_ms")
    print(f"agent start (ready -> first byte)  {agent_start}")
    for step, seconds in exchange.steps_s.items():
        print(f"{step + ' round trip':<35}{seconds * 1000:>7.0f} ms")
    print(f"session life (admitted -> ended)   {span('admitted_ms', 'ended_ms')}")


def run_demo(*, prompt: str) -> int:
    """Run the demo; return 0 when the exchange went as the fleet promises."""
    ensure_agent_image()
    print("starting Redis, a scheduler and a worker ...", flush=True)
    with local_fleet({"claude": agent_profile()}) as fleet:
        view, exchange, create_s = asyncio.run(_session(fleet, prompt))
        _report(view, exchange, create_s)
    expected_error = (
        exchange.prompt_error is None or exchange.prompt_error.code == -32000
    )
    ok = bool(exchange.acp_session_id) and expected_error and view["state"] == "ended"
    print(
        "\ndemo " + ("succeeded" if ok else "FAILED") + "; fleet stopped and cleaned up"
    )
    return 0 if ok else 1
