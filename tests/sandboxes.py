"""Agent profiles for behaviour tests, and a helper that runs one session."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.client import End, FleetClient, SlowClient
from shared.localfleet import LocalFleet, agent_profile
from shared.wire import STDOUT

BUSYBOX_IMAGE = "acp-fleet/busybox:test"
MIB = 1024 * 1024


def root_disk() -> tuple[str, str]:
    """The whole disk under Docker's data, as (/dev/name, major:minor).

    Block-I/O throttles apply to whole disks, not partitions.
    """
    device = os.stat("/var/lib/docker" if os.path.isdir("/var/lib/docker") else "/")
    sysfs = Path(f"/sys/dev/block/{os.major(device.st_dev)}:{os.minor(device.st_dev)}")
    if (sysfs / "partition").exists():
        sysfs = sysfs.resolve().parent
    else:
        sysfs = sysfs.resolve()
    return f"/dev/{sysfs.name}", (sysfs / "dev").read_text().strip()


ROOT_DISK, ROOT_DISK_NUMBERS = root_disk()

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
    # Six seconds of output of its own, then its stdin echoed, then exit 7.
    "ticks-cat": busybox_profile(
        "i=1; while [ $i -le 60 ]; do echo tick $i; sleep 0.1; i=$((i+1)); done; "
        "cat; echo done; exit 7"
    ),
    "exit3": busybox_profile("exit 3"),
    "c01": busybox_profile(C01_SCRIPT),
    "c14": busybox_profile(C14_SCRIPT, memory="256m"),
    # One child asks for 256 MiB at once and is the OOM killer's first
    # choice, and nothing else allocates after it, so the shell lives to
    # exit 0. (With a head | tail pipeline as the child, one test run in
    # many ended 137: the OOM killer had taken the shell too.)
    "oom": busybox_profile(
        "(echo 1000 > /proc/self/oom_score_adj;"
        " exec dd if=/dev/zero of=/dev/null bs=256M count=1) 2>/dev/null; exit 0"
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
    # Echoes what the ACP guard lets through to the agent.
    "acp-echo": {**busybox_profile("cat"), "protocol": "acp"},
    # A tool that forks until the kernel refuses, then fails the agent.
    "pids-out": busybox_profile(
        "sleep 2 & s=$!; (while :; do sleep 30 & done); wait $s; exit 1"
    ),
    "probe": busybox_profile(C07_PROBE + "; " + C07_PROBE),
    "wait-stdin": busybox_profile("cat", memory="1g"),
    "count-stdin": busybox_profile("wc -c"),
    "yes": busybox_profile("yes"),
    "inspect": busybox_profile(
        "grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
        "ls /sys/class/net; touch /root-write 2>&1; "
        "(unshare -U true || echo unshare refused) 2>/dev/null; id -u"
    ),
    # Each shell forks two more, forever; only the pids limit stops it.
    # The sleeper is forked before the bomb: once the bomb holds every pid,
    # ash exits on any fork of its own, so after it only builtins may run.
    "fork-bomb": busybox_profile(
        "sleep 3 & s=$!; b() { b | b & }; b; wait $s; echo survived"
    ),
    "secret": {
        **busybox_profile('test -n "$TOKEN" && cat'),
        "env_allowed": ["TOKEN"],
    },
    # API_KEY arrives as a file; TOKEN in the environment. The agent shows
    # where each is, then echoes stdin until EOF.
    "secret-file": {
        **busybox_profile(
            'echo "env-key=[$API_KEY]"; echo "file=$API_KEY_FILE"; '
            'echo "file-key=[$(cat "$API_KEY_FILE")]"; '
            "stat -c 'mode=%a owner=%u' \"$API_KEY_FILE\"; "
            'echo "token=[$TOKEN]"; cat'
        ),
        "env_allowed": ["TOKEN", "API_KEY"],
        "secret_files": ["API_KEY"],
    },
    # Looks for any trace of another session's secret, from inside.
    "snoop": busybox_profile(
        "ls /run/secrets 2>&1; env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'"
    ),
    # Fills its 16 MiB workspace, reports, then waits to be told to exit.
    "fill-workspace": busybox_profile(
        "dd if=/dev/zero of=/workspace/fill bs=1048576 count=64 2>&1; rc=$?; "
        'echo "dd=$rc"; df -k /workspace | tail -1; read line; exit $rc',
        workspace_size="16m",
    ),
    # Reads what was put into the workspace, changes it, lists it.
    "edit-workspace": busybox_profile(
        "cat /workspace/in.txt; echo changed > /workspace/out.txt; "
        "mkdir /workspace/sub && echo deep > /workspace/sub/file; "
        "stat -c '%n %u' /workspace/in.txt /workspace/out.txt"
    ),
    "io-limits": busybox_profile(
        "cat /sys/fs/cgroup/cpuset/cpuset.cpus /sys/fs/cgroup/cpu/cpu.shares "
        "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device",
        cpuset="0",
        cpu_shares=512,
        io={"device": ROOT_DISK, "write_bps": 1048576},
    ),
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
