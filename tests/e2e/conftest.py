"""Container tests: the docker-compose testbed, built and driven through compose.

They run when HVSOCK_E2E=1 (``make e2e``, and CI); then a missing Docker engine is a failure.
Otherwise they are skipped with the reason. HVSOCK_BUILD_IMAGE / HVSOCK_RUNTIME_IMAGE choose the
Dockerfile's base images (CI builds local ones with docker/base-images.sh).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .compose import ComposeProject, docker_available

REQUIRED = os.environ.get("HVSOCK_E2E") == "1"
ECHO_BYTES = 8 * 2**20


@pytest.fixture(scope="session")
def testbed() -> Iterator[ComposeProject]:
    if not REQUIRED:
        pytest.skip("container tests: set HVSOCK_E2E=1 (make e2e) to run them; they need Docker")
    reason = docker_available()
    if reason is not None:
        pytest.fail(f"HVSOCK_E2E=1 but the container tests cannot run: {reason}")
    bed = ComposeProject(
        f"hvsock-e2e-{os.getpid()}",
        {
            # Random published ports, so that a user's testbed or host service is never in the way.
            "HVSOCK_GRPC_PUBLISH": "127.0.0.1:",
            "HVSOCK_METRICS_PUBLISH": "127.0.0.1:",
            "HVSOCK_WEB_PUBLISH": "127.0.0.1:",
            "HVSOCK_ECHO_BYTES": str(ECHO_BYTES),
            # The workload's results as JSON lines, for the tests to read from the logs.
            "HVSOCK_TESTBED_JSON": "1",
            "HVSOCK_IMAGE": os.environ.get("HVSOCK_IMAGE", "hvsock-emulator:e2e"),
        },
    )
    bed.run("build", timeout=1800)
    try:
        bed.run("up", "--detach", timeout=300)
        yield bed
    finally:
        if os.environ.get("HVSOCK_E2E_KEEP") != "1":
            bed.run("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)
