"""Specification of compose.yaml: who holds the Docker socket, and how the
worker reaches the Engine. The file is parsed, not run: building the fleet
image needs a registry, which this machine cannot reach."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from shared.cli import main

REPO = Path(__file__).resolve().parent.parent
ENGINE_SOCKET = "/var/run/docker.sock"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    found: dict[str, Any] = compose["services"]
    return found


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """Each volume of a service as (source, target), short or long form."""
    pairs = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        pairs.append((source, target))
    return pairs


class TestCompose:
    def test_has_the_fleets_services(self, services: dict[str, Any]) -> None:
        """Redis, the scheduler, the worker and the socket proxy are there."""
        assert set(services) == {"redis", "scheduler", "worker", "docker-proxy"}
        assert services["docker-proxy"]["command"] == ["docker-proxy"]

    def test_only_the_proxy_mounts_the_docker_socket(
        self, services: dict[str, Any]
    ) -> None:
        """The Engine's socket is mounted into the proxy and nowhere else."""
        holders = {
            name
            for name, service in services.items()
            for source, _ in mounts(service)
            if source.endswith("docker.sock")
        }

        assert holders == {"docker-proxy"}
        assert (ENGINE_SOCKET, ENGINE_SOCKET) in mounts(services["docker-proxy"])

    def test_the_workers_docker_url_is_the_proxys_socket(
        self, services: dict[str, Any]
    ) -> None:
        """The worker's docker_url names the proxy's listen path, in a
        volume the two share, and the proxy forwards to the Engine."""
        worker, proxy = services["worker"], services["docker-proxy"]
        listen = proxy["environment"]["ACP_FLEET_DOCKER_PROXY__LISTEN_PATH"]
        directory = str(PurePosixPath(listen).parent)

        assert worker["environment"]["ACP_FLEET_WORKER__DOCKER_URL"] == (
            f"unix://{listen}"
        )
        assert ("docker-proxy", directory) in mounts(worker)
        assert ("docker-proxy", directory) in mounts(proxy)
        assert proxy["environment"]["ACP_FLEET_DOCKER_PROXY__UPSTREAM_URL"] == (
            f"unix://{ENGINE_SOCKET}"
        )
        assert "docker" not in worker["environment"].get("DOCKER_HOST", "")

    def test_no_service_is_privileged_and_the_proxy_has_no_network(
        self, services: dict[str, Any]
    ) -> None:
        """No service runs privileged; the proxy drops every capability and
        has no network."""
        assert not any(service.get("privileged") for service in services.values())
        assert services["docker-proxy"]["cap_drop"] == ["ALL"]
        assert "cap_add" not in services["docker-proxy"]
        assert services["docker-proxy"]["network_mode"] == "none"

    def test_pulled_images_and_the_base_are_pinned_by_digest(
        self, services: dict[str, Any]
    ) -> None:
        """Images pulled from a registry, and the fleet image's base, name a
        digest; only the fleet's own built image goes by tag."""
        dockerfile = (REPO / "images/fleet/Dockerfile").read_text()
        bases = [line for line in dockerfile.splitlines() if line.startswith("FROM")]
        pulled = [s["image"] for s in services.values() if "build" not in s]

        assert pulled
        assert all("@sha256:" in image for image in pulled)
        assert bases
        assert all("@sha256:" in line for line in bases)

    def test_the_cli_has_the_command_compose_runs(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`acp-fleet docker-proxy --help` describes the proxy."""
        with pytest.raises(SystemExit) as exited:
            main(["docker-proxy", "--help"])

        assert exited.value.code == 0
        assert "worker.docker_url" in capsys.readouterr().out
