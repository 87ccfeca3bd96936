"""Reading a sandbox's refused forks from the node's cgroup files."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import cgroups
from worker.cgroups import forks_refused, known_pids_events, pids_events_path


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A /proc with one process, 42, whose cgroup file the test writes."""
    (tmp_path / "42").mkdir()
    return tmp_path


class TestPidsEventsPath:
    def test_finds_the_pids_hierarchy_of_cgroup_v1(self, proc: Path) -> None:
        """On v1 the file lives under the pids controller's own mount."""
        (proc / "42" / "cgroup").write_text(
            "12:memory:/docker/abc\n5:pids:/docker/abc\n0::/docker/abc\n"
        )

        path = pids_events_path(42, proc=proc)

        assert path == Path("/sys/fs/cgroup/pids/docker/abc/pids.events")

    def test_finds_the_unified_hierarchy_of_cgroup_v2(
        self, proc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On v2 the one hierarchy holds it, when pids is enabled there."""
        root = tmp_path / "cgroup"
        (root / "system.slice" / "docker-abc.scope").mkdir(parents=True)
        events = root / "system.slice" / "docker-abc.scope" / "pids.events"
        events.write_text("max 0\n")
        monkeypatch.setattr(cgroups, "_CGROUP_ROOT", root)
        (proc / "42" / "cgroup").write_text("0::/system.slice/docker-abc.scope\n")

        assert pids_events_path(42, proc=proc) == events

    def test_is_none_for_a_process_that_is_gone(self, proc: Path) -> None:
        """A pid with no /proc entry has no cgroup to read."""
        assert pids_events_path(7, proc=proc) is None


class TestForksRefused:
    def test_reads_the_max_count(self, tmp_path: Path) -> None:
        """The 'max' line counts forks refused at the limit."""
        events = tmp_path / "pids.events"
        events.write_text("max 17\n")

        assert forks_refused(events) == 17

    def test_is_none_once_the_cgroup_is_removed(self, tmp_path: Path) -> None:
        """A removed cgroup reads as None, so the watcher stops."""
        assert forks_refused(tmp_path / "gone" / "pids.events") is None


class TestKnownPidsEvents:
    @pytest.mark.parametrize(
        "layout",
        [
            "pids/docker/{id}",
            "pids/system.slice/docker-{id}.scope",
            "docker/{id}",
            "system.slice/docker-{id}.scope",
        ],
    )
    def test_finds_each_driver_layout(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
    ) -> None:
        """Docker's cgroupfs and systemd layouts, v1 and v2, need no lookup."""
        directory = tmp_path / layout.format(id="abc")
        directory.mkdir(parents=True)
        (directory / "pids.events").write_text("max 0\n")
        monkeypatch.setattr(cgroups, "_CGROUP_ROOT", tmp_path)

        assert known_pids_events("abc") == directory / "pids.events"

    def test_is_none_for_another_layout(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A custom cgroup parent falls back to asking the process."""
        monkeypatch.setattr(cgroups, "_CGROUP_ROOT", tmp_path)

        assert known_pids_events("abc") is None
