"""A program that imports the guest library first runs gRPC on the I/O stack it chooses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hvsock_common import grpc_io

pytestmark = pytest.mark.integration


def test_grpc_knows_the_experiments_and_the_library_chooses_them_first() -> None:
    # A fresh interpreter, as a program: importing the guest library loads grpc with the
    # choice, and gRPC would log "Unknown experiment" for a name it does not know (a grpcio
    # upgrade that drops one); the environment is left as it was.
    env = {k: v for k, v in os.environ.items() if k not in (grpc_io.ENV, grpc_io.GRPC_ENV)}
    probe = (
        "import os, sys; import guest_client; "
        "assert 'grpc' in sys.modules; "
        f"assert {grpc_io.GRPC_ENV!r} not in os.environ; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "Unknown experiment" not in done.stderr, done.stderr
