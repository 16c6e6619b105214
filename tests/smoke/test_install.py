"""The installed project is whole: compiled ring, generated gRPC code, console scripts."""

from __future__ import annotations

import importlib.machinery
import os
import pathlib
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration

BIN = pathlib.Path(sys.executable).parent


def test_ring_extension_is_compiled_not_a_fallback() -> None:
    env = {k: v for k, v in os.environ.items() if k != "HVSOCK_RING_IMPL"}
    code = "import ring, ring._ring as r; print(ring.IMPLEMENTATION); print(r.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0] == "cython"
    assert out[1].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_generated_grpc_modules_import() -> None:
    from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc

    assert "HostService" in hvsock_pb2.DESCRIPTOR.services_by_name
    assert hasattr(hvsock_pb2_grpc, "HostServiceStub")


@pytest.mark.parametrize("script", ["hvsock-host", "hvsock"])
def test_console_scripts_print_help(script: str) -> None:
    result = subprocess.run(
        [BIN / script, "--help"], check=True, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.startswith(f"usage: {script}")


@pytest.mark.parametrize("module", ["host_service", "hvsock_tools.cli"])
def test_modules_run_with_dash_m(module: str) -> None:
    # hvsock_tools.demo.local_host falls back to `python -m host_service` without the script.
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.startswith("usage: ")


def test_host_serves_health_and_stops_cleanly_on_ctrl_c(tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "host.sock"
    proc = subprocess.Popen(
        [
            BIN / "hvsock-host",
            "--listen",
            "127.0.0.1:0",
            "--unix",
            str(sock),
            "--host-token-file",
            str(tmp_path / "host-token"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc, proc.stderr:
        try:
            for line in proc.stderr:  # the server logs once it is serving
                if "serving on" in line:
                    break
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="hvsock.v1.HostService"), timeout=10
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:  # a failed assertion must not leave the server behind
                proc.kill()
    # No token was given: one was generated into a file only this user can read.
    assert (tmp_path / "host-token").stat().st_mode & 0o777 == 0o600
