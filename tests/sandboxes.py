"""Agent profiles for behaviour tests, and a helper that runs one session."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from scheduler.client import End, FleetClient, SlowClient
from shared.localfleet import LocalFleet, agent_profile
from shared.wire import STDOUT

BUSYBOX_IMAGE = "acp-fleet/busybox:test"
MIB = 1024 * 1024

# C01: a 200,000-byte stdout line, a 70,000-byte stderr line, then 50,000
# euro signs on stdout with no final newline.
C01_SCRIPT = (
    'awk \'BEGIN { s = sprintf("%200000s", ""); gsub(/ /, "x", s); print s }\'; '
    'awk \'BEGIN { s = sprintf("%70000s", ""); gsub(/ /, "y", s); print s }\' >&2; '
    "awk 'BEGIN { for (i = 0; i < 50000; i++) printf \"\\342\\202\\254\" }'"
)
# C14: a 1 MiB session/update line, a small one, then 80 MiB with no newline.
C14_SCRIPT = (
    'printf \'{"jsonrpc":"2.0","method":"session/update","params":{"t":"\'; '
    "head -c 1048576 /dev/zero | tr '\\0' a; printf '\"}}\\n'; "
    'echo \'{"jsonrpc":"2.0","method":"small"}\'; '
    "head -c 83886080 /dev/zero | tr '\\0' b; sleep 60"
)
# C07: the probe reports the modes and owners of the tmpfs mounts, then
# writes a script into each writable, executable one and runs it.
C07_PROBE = (
    "stat -c '%n %a %u:%g' /tmp /home/agent /workspace; "
    "for d in /home/agent /workspace; do "
    "printf '#!/bin/sh\\necho ran in %s\\n' $d > $d/probe.sh && chmod +x $d/probe.sh "
    "&& $d/probe.sh; done; touch /probe 2>/dev/null || echo root read-only"
)


def busybox_profile(script: str, **limits: Any) -> dict[str, Any]:
    return {
        "image": BUSYBOX_IMAGE,
        "command": ["sh", "-c", script],
        "protocol": "raw",
        "limits": {"memory": "64m", "cpus": 1, "pids": 64, "lifetime_s": 120, **limits},
    }


PROFILES: dict[str, Any] = {
    "claude": agent_profile(),
    "cat-exit": busybox_profile("cat; echo done; exit 7"),
    "exit3": busybox_profile("exit 3"),
    "c01": busybox_profile(C01_SCRIPT),
    "c14": busybox_profile(C14_SCRIPT, memory="256m"),
    "oom": busybox_profile(
        "head -c 268435456 /dev/zero | tail -c 268435456 > /dev/null; exit 0"
    ),
    "sleep": busybox_profile("sleep 600"),
    # The forks run in a subshell; afterwards the agent uses builtins only,
    # since the sleepers hold every pid the limit allows.
    "forks": busybox_profile(
        "(for i in $(seq 100); do sleep 60 & done); echo alive; "
        "read x < /sys/fs/cgroup/pids/pids.max; echo $x; "
        'while read line; do echo "$line"; done'
    ),
    "pids-unlimited": busybox_profile(
        "cat /sys/fs/cgroup/pids/pids.max", pids="unlimited"
    ),
    "pids-minus-one": busybox_profile("cat /sys/fs/cgroup/pids/pids.max", pids=-1),
    "probe": busybox_profile(C07_PROBE + "; " + C07_PROBE),
    "wait-stdin": busybox_profile("cat", memory="1g"),
    "yes": busybox_profile("yes"),
    "inspect": busybox_profile(
        "grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
        "ls /sys/class/net; touch /root-write 2>&1; "
        "(unshare -U true || echo unshare refused) 2>/dev/null; id -u"
    ),
    # Each shell forks two more, forever; only the pids limit stops it.
    "fork-bomb": busybox_profile("b() { b | b & }; b; sleep 3; echo survived"),
    "secret": {
        **busybox_profile('test -n "$TOKEN" && cat'),
        "env_allowed": ["TOKEN"],
    },
}


@dataclass
class Ran:
    """What a client saw of one session."""

    session_id: str
    stdout: bytes = b""
    stderr: bytes = b""
    end: dict[str, Any] = field(default_factory=dict)
    view: dict[str, Any] = field(default_factory=dict)


async def run_session(
    fleet: LocalFleet,
    profile: str,
    *,
    stdin: bytes = b"",
    eof: bool = True,
    limits: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    org: str = "acme",
    timeout_s: float = 60,
) -> Ran:
    """Create a session, feed it ``stdin`` (then EOF), collect all it says."""
    async with FleetClient(fleet.url, fleet.api_keys[org]) as client:
        created = await client.create_session(profile, limits=limits, env=env)
        ran = Ran(session_id=created["id"])
        async with client.stdio(created["id"]) as stdio:
            if stdin:
                await stdio.send(stdin)
            if eof:
                await stdio.send_eof()
            async with asyncio.timeout(timeout_s):
                async for event in stdio.events():
                    if isinstance(event, End):
                        ran.end = event.message
                        break
                    if isinstance(event, SlowClient):
                        continue
                    if event.channel == STDOUT:
                        ran.stdout += event.data
                    else:
                        ran.stderr += event.data
        ran.view = await client.session(created["id"])
    return ran
