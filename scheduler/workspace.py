"""Workspace archives at the API: checked before a worker ever sees one.

An archive is refused here, with the reason, when it is not a tar archive,
names a path outside the workspace, holds links that leave it or device
files, or unpacks to more than the workspace can hold; the worker unpacks
only what passed, with the same rules.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator

from shared.errors import InvalidRequest, TooLarge

# Files and directories per archive; each costs an inode and a syscall.
MAX_MEMBERS = 100_000
_PROBE_ROOT = "/workspace"


async def read_body(
    chunks: AsyncIterator[bytes], *, max_bytes: int, timeout_s: float
) -> bytes:
    """Read a request body of at most ``max_bytes`` within ``timeout_s``.

    Raises:
        TooLarge: the body grew past ``max_bytes``.
        InvalidRequest: the client took longer than ``timeout_s``.
    """
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                body += chunk
                if len(body) > max_bytes:
                    raise TooLarge(
                        "archive_too_large",
                        f"Workspace archives are limited to {max_bytes} bytes.",
                    )
    except TimeoutError:
        raise InvalidRequest(
            "upload_timeout",
            f"The archive did not arrive within {timeout_s:g} s.",
        ) from None
    return bytes(body)


def check_archive(archive: bytes, *, max_unpacked_bytes: int) -> int:
    """Return the number of members of a safe archive that fits, or refuse.

    Raises:
        InvalidRequest: the archive is malformed, unsafe or too big unpacked.
    """
    total = 0
    members = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for member in tar:
                members += 1
                total += member.size
                if members > MAX_MEMBERS:
                    raise _refused(f"it holds more than {MAX_MEMBERS} entries")
                if total > max_unpacked_bytes:
                    raise _refused(
                        f"it unpacks to more than the workspace's "
                        f"{max_unpacked_bytes} bytes"
                    )
                tarfile.data_filter(member, _PROBE_ROOT)
    except tarfile.FilterError as exc:
        raise _refused(str(exc)) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _refused(f"it is not a readable tar archive ({exc})") from None
    return members


def _refused(why: str) -> InvalidRequest:
    return InvalidRequest(
        "invalid_archive", f"The workspace archive is refused: {why}.", field="body"
    )
