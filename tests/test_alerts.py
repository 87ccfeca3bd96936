"""The shipped alert rules, evaluated by Prometheus' own ``promtool``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from shared.localfleet import REPO

RULES = REPO / "docs" / "alerts.yml"


def silent(node: str) -> dict[str, Any]:
    """The alert ``node`` raises, as promtool reports it."""
    return {
        "exp_labels": {"node": node, "severity": "page"},
        "exp_annotations": {
            "summary": f"Node {node} sends no heartbeat; its worker is down or cut off."
        },
    }


def promtool_test(tmp_path: Path, series: dict[str, str], at: dict[str, list]) -> str:
    """Run ``promtool test rules`` on one-minute ``series`` of the heartbeat
    gauge, expecting the alerts ``at`` each time; return its output."""
    case = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": "fleet_node_heartbeat_age_seconds"
                        f'{{node="{node}", instance="scheduler-1"}}',
                        "values": values,
                    }
                    for node, values in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": time,
                        "alertname": "FleetNodeHeartbeatMissing",
                        "exp_alerts": alerts,
                    }
                    for time, alerts in at.items()
                ],
            }
        ],
    }
    path = tmp_path / "heartbeat-test.yml"
    path.write_text(yaml.safe_dump(case))
    return promtool("test", "rules", str(path))


def promtool(*args: str) -> str:
    """Run promtool, expect success, return what it printed."""
    done = subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class TestRules:
    def test_the_rules_file_is_valid(self) -> None:
        """promtool reads every rule of the shipped file."""
        out = promtool("check", "rules", str(RULES))

        assert "SUCCESS" in out


class TestNodeHeartbeatAlert:
    def test_a_dead_node_pages_on_after_it_leaves_the_listing(
        self, tmp_path: Path
    ) -> None:
        """A node silent past a lease pages after a minute and goes on
        paging once its gauge is gone (the scheduler drops it from the
        listing); one that stopped cleanly never pages, even after an
        earlier silence, and one that beats again stops paging. An hour
        after a dead node's last age the page ends."""
        out = promtool_test(
            tmp_path,
            {
                # Beats until 4 min, silent 5 and 6 min, then dropped.
                "dead": "1x4 60 120 _x90",
                # Stops cleanly at 6 min: its gauge goes while fresh.
                "stopped": "1x6 _x90",
                # Silent 5 and 6 min, then beats again.
                "back": "1x4 60 120 1x90",
                # Silent 1 and 2 min, beats again, stops cleanly at 13 min.
                "flapped": "0 15 30 1x10 _x80",
            },
            {
                "2m": [silent("flapped")],
                "4m": [],
                "6m": [silent("back"), silent("dead")],
                "8m": [silent("dead")],
                "30m": [silent("dead")],
                "70m": [],
            },
        )

        assert "SUCCESS" in out
