"""Running the ``acp-fleet`` command as operators and editors do."""

from __future__ import annotations

import subprocess
import sys
from typing import IO

from shared.localfleet import REPO


def cli(
    *args: str, env: dict[str, str], stdin: int | IO[bytes] = subprocess.DEVNULL
) -> subprocess.CompletedProcess[bytes]:
    """Run ``acp-fleet`` with ``args`` in ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        stdin=stdin,
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
