"""The benchmarks refuse values a run cannot use before they start a fleet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.localfleet import REPO


class TestArguments:
    @pytest.mark.parametrize(
        ("script", "args", "named"),
        [
            ("relay.py", ["--round-trips", "1"], "--round-trips"),
            ("relay.py", ["--mib", "-1"], "--mib"),
            ("relay.py", ["--mib", "99999999999999999999"], "--mib"),
            ("admission.py", ["--seconds", "0"], "--seconds"),
            ("admission.py", ["--seconds", "nan"], "--seconds"),
            ("startup.py", ["--sessions", "0"], "--sessions"),
            ("startup.py", ["--burst", "-3"], "--burst"),
        ],
    )
    def test_a_value_out_of_range_is_refused_by_name(
        self, script: str, args: list[str], named: str
    ) -> None:
        """Exit 2 with one line naming the option and its range, and nothing
        started: no line on stdout."""
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / script), *args],
            capture_output=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )

        assert done.returncode == 2
        assert done.stdout == b""
        last = done.stderr.decode().splitlines()[-1]
        assert f"error: argument {named}: expected " in last
        assert repr(args[-1]) in last
