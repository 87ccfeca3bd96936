"""What operators read: Prometheus endpoints and logs of a running fleet."""

from __future__ import annotations

import json
import re
import secrets

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.localfleet import REPO, LocalFleet
from shared.telemetry import exported_names
from tests.sandboxes import run_session

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample at ``url``, keyed by name and labels."""
    text = httpx.get(url, timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(
                (k, v)
                for k, v in sample.labels.items()
                if not k.startswith("otel_")
                and k not in ("job", "instance", "service_name")
            )
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class TestMetrics:
    async def test_session_ends_starts_and_admissions_are_counted(
        self, fleet: LocalFleet
    ) -> None:
        """One OOM session and one exit are counted once each, by cause."""
        worker_before = scrape(fleet.worker_metrics_url)
        scheduler_before = scrape(f"{fleet.url}/metrics")

        await run_session(fleet, "oom")
        await run_session(fleet, "exit3")
        worker_after = scrape(fleet.worker_metrics_url)
        scheduler_after = scrape(f"{fleet.url}/metrics")

        def delta(name: str, **labels: str) -> float:
            return value(worker_after, name, **labels) - value(
                worker_before, name, **labels
            )

        assert delta("fleet_session_ends_total", cause="oom_killed") == 1
        assert delta("fleet_session_ends_total", cause="agent_exit") == 1
        assert delta("fleet_session_starts_total", start="cold") == 2
        assert delta("fleet_session_startup_duration_seconds_count", phase="queue") == 2
        assert (
            delta("fleet_session_startup_duration_seconds_count", phase="sandbox") == 2
        )
        admitted = value(scheduler_after, "fleet_admissions_total", outcome="admitted")
        assert (
            admitted
            - value(scheduler_before, "fleet_admissions_total", outcome="admitted")
            == 2
        )


class TestLogs:
    async def test_secrets_and_payloads_reach_no_log_line(
        self, fleet: LocalFleet
    ) -> None:
        """A session's secret variable and its stdio appear in no log."""
        secret = "sk-" + secrets.token_hex(16)
        payload = "payload-" + secrets.token_hex(16)

        ran = await run_session(
            fleet, "secret", env={"TOKEN": secret}, stdin=f"{payload}\n".encode()
        )

        assert ran.stdout == f"{payload}\n".encode()
        logs = fleet.log("worker") + fleet.log("scheduler")
        assert ran.session_id in logs
        assert secret not in logs
        assert payload not in logs

    async def test_each_session_ends_with_one_summary_line(
        self, fleet: LocalFleet
    ) -> None:
        """The worker logs one session.ended line with cause and phase times."""
        ran = await run_session(fleet, "exit3")

        lines = [
            json.loads(line)
            for line in fleet.log("worker").splitlines()
            if ran.session_id in line and '"session.ended"' in line
        ]

        assert len(lines) == 1
        summary = lines[0]
        assert (summary["cause"], summary["exit_code"]) == ("agent_exit", 3)
        assert summary["start"] == "cold"
        assert summary["queue_ms"] >= 0
        assert summary["sandbox_ms"] > 0
        assert summary["life_ms"] >= summary["sandbox_ms"]


class TestShippedMonitoring:
    def test_alerts_and_dashboard_name_only_exported_metrics(self) -> None:
        """Every metric the alert rules and the dashboard query exists."""
        docs = REPO / "docs"
        rules = yaml.safe_load((docs / "alerts.yml").read_text())
        exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
        dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
        exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]

        named = {name for expr in exprs for name in re.findall(r"fleet_[a-z_]+", expr)}

        assert len(exprs) >= 14
        assert named <= exported_names(), named - exported_names()
