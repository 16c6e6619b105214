"""Every test says what it is: exactly one layer marker, and a unit test keeps its promise.

    unit         pure, in process: no network, no sleeps, no other process
    property     Hypothesis against a reference model, in process
    adapter      the gRPC servicers in process (loopback port 0, a clock the test moves)
    integration  real processes, sockets or servers on loopback
    e2e          containers driven through docker compose

``pytest -m unit`` is then the fast layer, and a unit test that starts a process fails at once
instead of slowing the layer down unnoticed.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

LAYERS = ("unit", "property", "adapter", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        layers = sorted({mark.name for mark in item.iter_markers() if mark.name in LAYERS})
        if len(layers) != 1:
            wrong.append(f"{item.nodeid}: {layers or 'none'}")
    if wrong:
        raise pytest.UsageError(
            f"each test needs exactly one of the markers {', '.join(LAYERS)}:\n" + "\n".join(wrong)
        )


def _no_process(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a unit test must not start a process (mark it integration)")


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest) -> Any:
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", _no_process)
        patch.setattr(os, "fork", _no_process)
        patch.setattr(os, "posix_spawn", _no_process)
        yield
