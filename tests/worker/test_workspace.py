"""Workspaces: a hard size limit off the node's disk, files in and out."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from scheduler.client import ApiError, End, FleetClient
from shared.localfleet import LocalFleet
from shared.wire import STDOUT
from tests.sandboxes import MIB
from worker.workspace import Spares


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def workspace_root(fleet: LocalFleet) -> Path:
    return fleet.workdir / "workspaces"


async def wait_ended(client: FleetClient, session_id: str) -> dict[str, object]:
    async with asyncio.timeout(60):
        while True:
            view = await client.session(session_id)
            if view["state"] == "ended":
                return view
            await asyncio.sleep(0.1)


class TestWorkspaceLimit:
    async def test_filling_the_workspace_fails_inside_and_spares_the_node(
        self, fleet: LocalFleet
    ) -> None:
        root = workspace_root(fleet)
        free_before = shutil.disk_usage(fleet.workdir).free
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("fill-workspace")
            said = b""
            async with client.stdio(created["id"]) as stdio:
                async with asyncio.timeout(60):
                    async for event in stdio.events():
                        assert not isinstance(event, End), said
                        if getattr(event, "channel", None) == STDOUT:
                            said += event.data
                        if b"dd=" in said and said.endswith(b"\n") and b"%" in said:
                            break
                # While the agent holds its full workspace, the node's side:
                # one sparse image, allocated no further than the limit.
                images = list(root.glob("*/fs.img"))
                allocated = [image.stat().st_blocks * 512 for image in images]
                filled = max(images, key=lambda image: image.stat().st_blocks)
                free_during = shutil.disk_usage(fleet.workdir).free
                await stdio.send(b"exit\n")
                async with asyncio.timeout(60):
                    async for event in stdio.events():
                        if isinstance(event, End):
                            break
            view = await client.session(created["id"])

        assert b"No space left on device" in said
        assert b"dd=1" in said
        assert images, "no workspace image was found on the node"
        assert max(allocated) <= 17 * MIB
        # Other writers share the node's disk, so allow them some slack; a
        # workspace that spilled onto the node would take 64 MiB.
        assert free_before - free_during < 40 * MIB
        assert view["cause"] == "disk_full"
        assert view["exit_code"] == 1
        # Gone with its session: nothing of it stays on the node.
        assert not filled.parent.exists()


class TestSpares:
    async def test_a_spare_is_taken_ready_and_replaced(self, tmp_path: Path) -> None:
        """The first take finds none and makes one; the next gets it mounted
        and owned by the agent, and close removes what is kept."""
        spares = Spares(tmp_path, prefix="t-spare", count=1)
        first = spares.take(16 * MIB, uid=1000, gid=1000)
        await spares.made()

        second = spares.take(16 * MIB, uid=1000, gid=1000)
        assert second is not None
        mounted, owner = second.mount.is_mount(), second.mount.stat().st_uid
        await spares.made()
        kept = set(spares.names)
        await spares.close()
        await second.remove()

        assert first is None
        assert (mounted, owner) == (True, 1000)
        assert second.dir.name not in kept
        assert len(kept) == 1
        assert not os.listdir(tmp_path)

    async def test_other_sizes_and_owners_get_spares_of_their_own(
        self, tmp_path: Path
    ) -> None:
        """A spare fits only a take of its size and owner."""
        spares = Spares(tmp_path, prefix="t-spare", count=1)
        spares.take(16 * MIB, uid=1000, gid=1000)
        await spares.made()

        other_size = spares.take(32 * MIB, uid=1000, gid=1000)
        other_owner = spares.take(16 * MIB, uid=1001, gid=1001)
        await spares.made()
        await spares.close()

        assert (other_size, other_owner) == (None, None)


class TestWorkspaceFiles:
    async def test_files_go_in_before_the_agent_and_come_out_after(
        self, fleet: LocalFleet
    ) -> None:
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session(
                "edit-workspace", upload=True, fetch=True
            )
            sid = created["id"]
            await asyncio.sleep(0.5)
            waiting = await client.session(sid)
            assert waiting["state"] == "queued"
            assert waiting["workspace_upload"] == "pending"

            uploaded = await client.put_workspace(sid, tar_of({"in.txt": b"hello\n"}))
            assert uploaded["workspace_upload"] == "received"
            stdout = b""
            async with client.stdio(sid) as stdio:
                await stdio.send_eof()
                async with asyncio.timeout(60):
                    async for event in stdio.events():
                        if isinstance(event, End):
                            break
                        if getattr(event, "channel", None) == STDOUT:
                            stdout += event.data
            view = await wait_ended(client, sid)
            archive = await client.workspace(sid)

        assert stdout.startswith(b"hello\n")
        # The agent's uid owns the files put in for it.
        assert b"/workspace/in.txt 1000" in stdout
        assert view["cause"] == "agent_exit"
        assert view["workspace_archive"] == "stored"
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            names = sorted(tar.getnames())
            out = tar.extractfile("out.txt")
            assert out is not None
            assert out.read() == b"changed\n"
        assert names == ["in.txt", "out.txt", "sub", "sub/file"]

    async def test_bad_archives_are_refused_and_the_session_keeps_waiting(
        self, fleet: LocalFleet
    ) -> None:
        escape = io.BytesIO()
        with tarfile.open(fileobj=escape, mode="w") as tar:
            link = tarfile.TarInfo("etc-link")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc"
            tar.addfile(link)
            tar.addfile(tarfile.TarInfo("etc-link/passwd"), io.BytesIO(b""))
        huge = io.BytesIO()
        with tarfile.open(fileobj=huge, mode="w") as tar:
            info = tarfile.TarInfo("big")
            info.size = 2**40
            tar.addfile(info)  # the header alone: it claims a terabyte
        cases = {
            "not a tar": b"plain text, not an archive",
            "empty": b"",
            "parent path": tar_of({"../outside": b"x"}),
            "absolute link": escape.getvalue(),
            "too big unpacked": huge.getvalue(),
        }
        async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
            created = await client.create_session("edit-workspace", upload=True)
            sid = created["id"]
            for name, archive in cases.items():
                with pytest.raises(ApiError) as refused:
                    await client.put_workspace(sid, archive)
                assert refused.value.status == 422, name
                assert refused.value.code == "invalid_archive", name
            still = await client.session(sid)
            assert still["state"] == "queued"
            assert still["workspace_upload"] == "pending"

            await client.put_workspace(sid, tar_of({"in.txt": b"ok\n"}))
            with pytest.raises(ApiError) as again:
                await client.put_workspace(sid, tar_of({"in.txt": b"again\n"}))
            assert (again.value.status, again.value.code) == (409, "already_uploaded")
            view = await wait_ended(client, sid)
            assert view["cause"] == "agent_exit"

            # Not asked for at creation: no archive in, none kept out.
            plain = await client.create_session("exit3")
            with pytest.raises(ApiError) as unexpected:
                await client.put_workspace(plain["id"], tar_of({"a": b"b"}))
            assert (unexpected.value.status, unexpected.value.code) == (
                409,
                "upload_not_expected",
            )
            await wait_ended(client, plain["id"])
            with pytest.raises(ApiError) as missing:
                await client.workspace(plain["id"])
            assert (missing.value.status, missing.value.code) == (
                404,
                "no_workspace_archive",
            )

    async def test_another_org_can_neither_put_nor_fetch(
        self, fleet: LocalFleet
    ) -> None:
        async with (
            FleetClient(fleet.url, fleet.api_keys["acme"]) as acme,
            FleetClient(fleet.url, fleet.api_keys["beta"]) as beta,
        ):
            created = await acme.create_session("edit-workspace", upload=True)
            with pytest.raises(ApiError) as put:
                await beta.put_workspace(created["id"], tar_of({"in.txt": b"x"}))
            with pytest.raises(ApiError) as fetched:
                await beta.workspace(created["id"])
            assert (put.value.status, fetched.value.status) == (404, 404)
            assert (await acme.session(created["id"]))["workspace_upload"] == "pending"
            await acme.cancel(created["id"])


async def test_no_workspace_is_left_on_the_node(fleet: LocalFleet) -> None:
    """Every workspace is gone once its session is (pool members aside)."""
    async with FleetClient(fleet.url, fleet.api_keys["acme"]) as client:
        sessions = [await client.create_session("exit3") for _ in range(5)]
        for created in sessions:
            await wait_ended(client, created["id"])
    ids = [created["id"] for created in sessions]
    assert traces_on_node(workspace_root(fleet), ids) == []


def traces_on_node(root: Path, session_ids: list[str]) -> list[str]:
    """Directories and mounts on the node that name one of the sessions."""
    assert root.is_dir()
    mounts = Path("/proc/self/mounts").read_text().split()
    names = [entry.name for entry in root.iterdir()] + mounts
    return [name for name in names if any(sid in name for sid in session_ids)]
