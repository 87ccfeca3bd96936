"""Workspaces: one small filesystem per sandbox, in a sparse file on the node.

A tmpfs workspace goes with its container, before anyone could fetch its
files, and counts against the sandbox's memory; a plain directory on the
node's disk has no size of its own, so a runaway agent fills the node. An
ext4 filesystem in a sparse file, loop-mounted and bound into the sandbox,
has both properties that matter: the agent's writes fail with ENOSPC at the
limit while the node's disk gives at most that much, and the files outlive
the container until the worker has archived them.

Formatting and mounting cost a few milliseconds; warm pool members get
theirs before they are claimed.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
import tarfile
from pathlib import Path

import structlog

from shared.errors import SandboxError
from shared.tracing import traced

log = structlog.get_logger("worker.workspace")

# Only this directory holds anything; its name says which sandbox it serves.
_IMAGE = "fs.img"
_MOUNT = "mnt"
_UMOUNT_TRIES = 20


class ArchiveTooLarge(SandboxError):
    """The workspace holds more than the archive may."""


class Workspace:
    """The workspace of one sandbox: ``<root>/<name>/{fs.img,mnt}``."""

    def __init__(self, root: str | Path, name: str) -> None:
        self.dir = Path(root) / name
        self.image = self.dir / _IMAGE
        self.mount = self.dir / _MOUNT

    async def create(self, size_bytes: int, *, uid: int, gid: int) -> None:
        """Format and mount an empty filesystem of ``size_bytes``, owned by uid."""
        self.make_dirs()
        await self.format(size_bytes, uid=uid, gid=gid)

    def make_dirs(self) -> None:
        """Make the workspace's directory and its (still empty) mount point."""
        # 0700 on the directory: no other user of the node reads a session's
        # files, whatever modes the agent gives them.
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=False)
        self.mount.mkdir(mode=0o700)

    @traced("workspace.format")
    async def format(self, size_bytes: int, *, uid: int, gid: int) -> None:
        """Format the filesystem and mount it on the directories made first."""
        try:
            with self.image.open("wb") as handle:
                handle.truncate(size_bytes)
            # No journal and no reserved blocks: the agent gets every byte of
            # its limit, and a workspace never outlives a crash worth replaying.
            await _run(
                "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                "-E", f"root_owner={uid}:{gid},nodiscard", str(self.image),
            )  # fmt: skip
            await _run(
                "mount", "-o", "loop,nosuid,nodev,noatime",
                str(self.image), str(self.mount),
            )  # fmt: skip
            # The agent sees an empty directory, not the filesystem's own.
            (self.mount / "lost+found").rmdir()
        except BaseException:
            await asyncio.shield(self.remove())
            raise

    async def put(self, archive: bytes, *, uid: int, gid: int) -> int:
        """Unpack a tar archive into the workspace; return the files written.

        Raises:
            SandboxError: the archive is malformed, unsafe or does not fit.
        """
        return await asyncio.to_thread(self._extract, archive, uid, gid)

    def _extract(self, archive: bytes, uid: int, gid: int) -> int:
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
                members = tar.getmembers()
                # The data filter refuses absolute names, '..', links that
                # leave the workspace and device files; the worker is root.
                tar.extractall(self.mount, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise SandboxError(
                f"workspace archive could not be unpacked: {exc}"
            ) from exc
        for directory, dirs, files in os.walk(self.mount):
            for name in (
                directory,
                *(os.path.join(directory, n) for n in dirs + files),
            ):
                os.lchown(name, uid, gid)
        return len(members)

    async def archive(self, max_bytes: int) -> bytes:
        """Return the workspace as a tar archive of at most ``max_bytes``.

        Raises:
            ArchiveTooLarge: the files would not fit in ``max_bytes``.
        """
        return await asyncio.to_thread(self._archive, max_bytes)

    def _archive(self, max_bytes: int) -> bytes:
        buffer = _BoundedBuffer(max_bytes)
        try:
            with tarfile.open(
                fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT
            ) as tar:
                for entry in sorted(self.mount.iterdir()):
                    tar.add(entry, arcname=entry.name)
        except _Overflow:
            raise ArchiveTooLarge(
                f"the workspace holds more than {max_bytes} bytes of archive"
            ) from None
        return buffer.getvalue()

    def full(self) -> bool:
        """True when the filesystem has (almost) no block left to give."""
        try:
            stats = os.statvfs(self.mount)
        except OSError:
            return False
        # A write that did not fit leaves up to its own size free, and
        # ext4 keeps a little back for its metadata: "full" allows for both.
        free = stats.f_bavail * stats.f_frsize
        return free < max(2 * 1024**2, stats.f_blocks * stats.f_frsize // 100)

    def used_bytes(self) -> int:
        """Bytes the workspace's files take on its filesystem."""
        stats = os.statvfs(self.mount)
        return (stats.f_blocks - stats.f_bfree) * stats.f_frsize

    def capacity_bytes(self) -> int:
        """The size of the workspace's filesystem."""
        stats = os.statvfs(self.mount)
        return stats.f_blocks * stats.f_frsize

    async def remove(self) -> None:
        """Unmount and delete; call only once the sandbox is gone.

        A mount still busy (a handle left open on the node) is retried for a
        while, then left for the next reconciliation rather than torn away.
        """
        if self.mount.is_mount():
            for attempt in range(_UMOUNT_TRIES):
                try:
                    await _run("umount", str(self.mount))
                    break
                except SandboxError:
                    if attempt == _UMOUNT_TRIES - 1:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
        await asyncio.to_thread(shutil.rmtree, self.dir, ignore_errors=True)


class Spares:
    """Formatted, mounted workspaces kept ready for cold starts.

    A cold start then spends no time on ``mkfs`` and ``mount``; each take
    starts one replacement in the background, and at most ``count`` are
    kept or being made for each size and owner.
    """

    def __init__(self, root: str | Path, *, prefix: str, count: int) -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.count = count
        self._ready: dict[tuple[int, int, int], list[Workspace]] = {}
        self._making: dict[tuple[int, int, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.names: set[str] = set()

    def take(self, size_bytes: int, *, uid: int, gid: int) -> Workspace | None:
        """A ready workspace of this size and owner, or None; refill either way."""
        key = (size_bytes, uid, gid)
        ready = self._ready.setdefault(key, [])
        spare = ready.pop() if ready else None
        if spare is not None:
            self.names.discard(spare.dir.name)
        if self.count and len(ready) + self._making.get(key, 0) < self.count:
            task = asyncio.create_task(self._make(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return spare

    async def _make(self, key: tuple[int, int, int]) -> None:
        size_bytes, uid, gid = key
        workspace = Workspace(self.root, f"{self.prefix}-{secrets.token_hex(6)}")
        self.names.add(workspace.dir.name)
        self._making[key] = self._making.get(key, 0) + 1
        made = False
        try:
            await workspace.create(size_bytes, uid=uid, gid=gid)
            made = True
        except SandboxError:
            log.warning("workspace.spare_failed", exc_info=True)
        finally:
            self._making[key] -= 1
            # A failed or cancelled spare removed itself; its name goes too.
            if not made:
                self.names.discard(workspace.dir.name)
        if made:
            self._ready.setdefault(key, []).append(workspace)

    async def made(self) -> None:
        """Wait for the spares being made now."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop making spares and remove those kept."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ready in self._ready.values():
            while ready:
                spare = ready.pop()
                await spare.remove()
                self.names.discard(spare.dir.name)


def leftovers(root: str | Path, live: set[str]) -> list[Workspace]:
    """Workspaces under ``root`` whose names are not in ``live``."""
    base = Path(root)
    if not base.is_dir():
        return []
    return [
        Workspace(base, entry.name)
        for entry in base.iterdir()
        if entry.name not in live
    ]


class _Overflow(Exception):
    pass


class _BoundedBuffer(io.BytesIO):
    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.max_bytes:
            raise _Overflow
        return super().write(data)


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        why = stderr.decode(errors="replace").strip()
        raise SandboxError(f"{argv[0]} exited {process.returncode}: {why}")
