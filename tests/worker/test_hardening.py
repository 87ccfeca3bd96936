"""What an agent can reach from inside its sandbox: as little as possible."""

from __future__ import annotations

import asyncio

from shared.localfleet import LocalFleet
from shared.settings import AgentProfile
from tests.sandboxes import ROOT_DISK_NUMBERS, run_session
from worker.docker import SandboxSpec, container_config
from worker.main import host_has_apparmor


class TestSandboxFromInside:
    async def test_no_capabilities_no_privilege_gain_no_network(
        self, fleet: LocalFleet
    ) -> None:
        """Capabilities are zero, NoNewPrivs is 1, seccomp filters, the root
        filesystem refuses writes, loopback is the only interface, and the
        agent runs as uid 1000."""
        ran = await run_session(fleet, "inspect")

        lines = ran.stdout.decode().splitlines()
        status = dict(line.split(":\t") for line in lines[:5])
        assert status["CapPrm"] == status["CapEff"] == "0000000000000000"
        assert status["CapBnd"] == "0000000000000000"
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"
        assert lines[5:] == [
            "lo",
            "touch: /root-write: Read-only file system",
            "unshare refused",
            "1000",
        ]

    async def test_a_fork_bomb_stops_at_the_pids_limit(self, fleet: LocalFleet) -> None:
        """A fork bomb is held at the limit; another session runs meanwhile."""
        # No EOF: on a loaded node the bomb could outlast the EOF grace.
        bomb = asyncio.create_task(
            run_session(fleet, "fork-bomb", eof=False, timeout_s=60)
        )
        await asyncio.sleep(1)

        bystander = await run_session(fleet, "cat-exit", stdin=b"fine\n")
        ran = await bomb

        assert bystander.stdout == b"fine\ndone\n"
        assert b"Resource temporarily unavailable" in ran.stderr
        assert (ran.stdout, ran.end["cause"], ran.end["exit_code"]) == (
            b"survived\n",
            "agent_exit",
            0,
        )
        assert ran.view["detail"].endswith("forks refused at the pids limit of 64")

    async def test_cpu_set_weight_and_io_throttles_reach_the_cgroups(
        self, fleet: LocalFleet
    ) -> None:
        ran = await run_session(fleet, "io-limits")

        cpus, shares, throttle = ran.stdout.decode().splitlines()
        assert (cpus, shares) == ("0", "512")
        assert throttle == f"{ROOT_DISK_NUMBERS} 1048576"


class TestContainerConfig:
    """Options that depend on the node, checked in the Engine's request body."""

    def spec(self, **limits: object) -> SandboxSpec:
        profile = AgentProfile.model_validate(
            {
                "image": "img",
                "command": ["agent"],
                "limits": {"memory": "64m", "cpus": 1, "pids": 64, **limits},
            }
        )
        return SandboxSpec(
            session_id="s",
            profile_name="p",
            profile=profile,
            limits=profile.limits,
            image="img",
            workspace="/var/lib/acp-fleet/workspaces/x/mnt",
        )

    def test_apparmor_is_named_only_where_the_node_has_it(self) -> None:
        with_it = container_config(
            self.spec(), fleet="f", node="n", seccomp="{}", apparmor="docker-default"
        )
        without = container_config(self.spec(), fleet="f", node="n", seccomp="{}")

        assert "apparmor=docker-default" in with_it["HostConfig"]["SecurityOpt"]
        assert not any(
            "apparmor" in option for option in without["HostConfig"]["SecurityOpt"]
        )
        assert without["HostConfig"]["SecurityOpt"][0] == "no-new-privileges:true"
        # This node has no AppArmor, so the worker names no profile here.
        assert host_has_apparmor() is False

    def test_the_workspace_is_a_bind_of_its_own_filesystem(self) -> None:
        config = container_config(self.spec(), fleet="f", node="n", seccomp="{}")

        assert "/workspace" not in config["HostConfig"]["Tmpfs"]
        assert config["HostConfig"]["Mounts"] == [
            {
                "Type": "bind",
                "Source": "/var/lib/acp-fleet/workspaces/x/mnt",
                "Target": "/workspace",
                "ReadOnly": False,
                "BindOptions": {"Propagation": "rprivate"},
            }
        ]

    def test_io_and_cpu_options_appear_only_when_set(self) -> None:
        plain = container_config(self.spec(), fleet="f", node="n", seccomp="{}")
        tuned = container_config(
            self.spec(
                cpuset="0-1",
                cpu_shares=256,
                io={"device": "/dev/sda", "read_iops": 100, "write_bps": 4096},
            ),
            fleet="f",
            node="n",
            seccomp="{}",
        )

        for name in ("CpusetCpus", "CpuShares", "BlkioDeviceReadIOps"):
            assert name not in plain["HostConfig"]
        assert tuned["HostConfig"]["CpusetCpus"] == "0-1"
        assert tuned["HostConfig"]["CpuShares"] == 256
        assert tuned["HostConfig"]["BlkioDeviceReadIOps"] == [
            {"Path": "/dev/sda", "Rate": 100}
        ]
        assert tuned["HostConfig"]["BlkioDeviceWriteBps"] == [
            {"Path": "/dev/sda", "Rate": 4096}
        ]
        assert "BlkioDeviceReadBps" not in tuned["HostConfig"]
