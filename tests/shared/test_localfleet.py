"""The local fleet's clean-up, which tests, the demo and benchmarks rely on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import localfleet
from shared.errors import FleetError
from shared.localfleet import LocalFleet, redis_server


def _fleet(workdir: Path) -> LocalFleet:
    """A fleet of two sleeping processes and a folder, with no services."""
    fleet = LocalFleet(
        url="http://127.0.0.1:1",
        api_keys={},
        operator_key="",
        redis_url="redis://127.0.0.1:1/0",
        config_path=workdir / "fleet.toml",
        workdir=workdir,
    )
    for name in ("scheduler", "other"):
        fleet.processes[name] = subprocess.Popen(["sleep", "600"])
    (workdir / "fleet.toml").write_text("token_secret = 'kept from no one'\n")
    return fleet


class TestCleanUp:
    def test_an_interrupt_midway_is_raised_once_all_is_cleaned(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Ctrl-C during the first stop: that stop is made again, the other
        process stops too, the folder goes, and then Ctrl-C is raised."""
        workdir = tmp_path / "fleet"
        workdir.mkdir()
        fleet = _fleet(workdir)
        processes = list(fleet.processes.values())
        stop = LocalFleet.stop
        interrupted: list[str] = []

        def stop_once_interrupted(self: LocalFleet, name: str) -> None:
            if not interrupted:
                interrupted.append(name)
                raise KeyboardInterrupt
            stop(self, name)

        monkeypatch.setattr(LocalFleet, "stop", stop_once_interrupted)

        with pytest.raises(KeyboardInterrupt):
            localfleet._clean_up(fleet)

        assert interrupted == ["scheduler"]
        assert [process.poll() for process in processes] == [-15, -15]
        assert fleet.processes == {}
        assert not workdir.exists()


class TestRedisOnASocket:
    def test_a_path_too_long_for_a_socket_is_refused_by_its_length(
        self, tmp_path: Path
    ) -> None:
        """A socket path past what an address holds is named, with its
        length, before any server starts."""
        path = tmp_path / ("s" * 120)

        server = redis_server(unix_socket=path)

        with pytest.raises(FleetError, match=r"is \d+ bytes, over the 107"):
            server.__enter__()

    def test_a_server_that_does_not_start_says_why(self, tmp_path: Path) -> None:
        """The server's own reason comes with the error."""
        path = tmp_path / "missing" / "redis.sock"

        server = redis_server(unix_socket=path)

        with pytest.raises(FleetError, match="Failed opening Unix socket"):
            server.__enter__()


def _running(pid: int) -> bool:
    """True while ``pid`` runs: neither gone nor a zombie left unreaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class TestKilledParent:
    def test_a_parent_killed_outright_takes_its_redis_with_it(self) -> None:
        """SIGKILL to the process that started a local Redis, which runs no
        clean-up of its own, still ends the server."""
        parent = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time\n"
                "from shared.localfleet import redis_process\n"
                "with redis_process() as (url, redis):\n"
                "    print(redis.pid, flush=True)\n"
                "    time.sleep(600)\n",
            ],
            stdout=subprocess.PIPE,
            cwd=Path(localfleet.__file__).parent.parent,
        )
        assert parent.stdout is not None
        with parent.stdout:
            redis_pid = int(parent.stdout.readline())
        assert _running(redis_pid)

        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)

        assert not _running(redis_pid)


class TestAbandonedFolders:
    def test_only_folders_of_processes_gone_are_removed(self, tmp_path: Path) -> None:
        """A folder named for a process that has exited goes, with what is
        in it; one named for a running process, one of another name and a
        file of the same shape stay."""
        ended = subprocess.Popen(["true"])
        ended.wait()
        gone = tmp_path / f"acp-fleet-{ended.pid}-abc"
        (gone / "workspaces").mkdir(parents=True)
        (gone / "fleet.toml").write_text("token_secret = 'of a dead fleet'\n")
        running = tmp_path / f"acp-fleet-{os.getpid()}-def"
        running.mkdir()
        other = tmp_path / "acp-fleet-x1-ghi"
        other.mkdir()
        a_file = tmp_path / f"acp-fleet-{ended.pid}-file"
        a_file.write_text("")

        removed = localfleet.remove_abandoned_folders(tmp_path)

        assert removed == [gone]
        assert not gone.exists()
        assert running.is_dir()
        assert other.is_dir()
        assert a_file.is_file()

    def test_a_new_folder_is_named_for_this_process_and_private(self) -> None:
        """The folder's name carries this process' id and only its owner
        may enter it."""
        with localfleet.scratch_folder() as folder:
            assert folder.name.startswith(f"acp-fleet-{os.getpid()}-")
            assert folder.stat().st_mode & 0o777 == 0o700
        assert not folder.exists()
