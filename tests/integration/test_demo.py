"""``make demo`` end to end: a private host, two VM processes, echoes on both data paths."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _demo_dirs() -> set[str]:
    return {p.name for p in pathlib.Path("/dev/shm").glob("hvsock-demo-*")}


def test_demo_echoes_on_both_data_paths_and_cleans_up() -> None:
    before = _demo_dirs()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HVSOCK_")}
    done = subprocess.run(
        [sys.executable, "-m", "hvsock_tools.demo", "--bytes", "300000"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    rows = re.findall(
        r"^(vm-shm|vm-relay)\s+(host -> vm|vm -> host)\s+(\S+)\s+(\S+ \S+)\s+([\d.]+)\s+(.+)$",
        out,
        re.MULTILINE,
    )
    assert len(rows) == 4, out
    for vm, _direction, connected, nbytes, rate, path in rows:
        assert connected == "yes", out
        assert nbytes == "293.0 KiB", out
        assert float(rate) > 0, out
        assert path == ("shared memory" if vm == "vm-shm" else "gRPC relay"), out
    assert "all echoes verified (SHA-256)" in out
    # Every process is gone (run() waited for the demo, which waits for its children) and
    # the private shared-memory directory is removed.
    pids = [int(pid) for pid in re.findall(r"\(.*?pid (\d+)", out)]
    assert len(pids) == 3, out  # the host service and the two VMs
    assert not [pid for pid in pids if pathlib.Path(f"/proc/{pid}").exists()]
    assert _demo_dirs() <= before


def test_local_host_starts_whatever_its_log_level() -> None:
    """It waits for the host's socket, not for a log line a quieter level would not print."""
    from hvsock_tools.demo import local_host

    with local_host(prefix="hvsock-quiet", log_level="WARNING") as host:
        vm_id, _token = host.create_vm("quiet")
        assert vm_id
        assert b"serving on" not in host.log_path.read_bytes()
