"""The testbed programs (``python -m hvsock_tools.testbed``) stop cleanly on SIGTERM.

In their containers they are PID 1, which gets no default action for SIGTERM: ``docker stop``
would wait its 10 s and kill them. Here the program is an ordinary child process, but the
handler is the same: it must exit 0 at once and close its channels, so that the peer reads
EOF and the host records a close, not a rescind.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from hvsock_tools.demo import HOST_ECHO_PORT, VM_ECHO_PORT, serve_echo

from .hostproc import HostProcess, run_host
from .test_host_badinput import wait_for_no_channels
from .test_multi_session import recv_exactly

pytestmark = pytest.mark.integration

STOP_WITHIN = 2.0  # seconds, as the testbed containers must


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    with run_host(tmp_path_factory.mktemp("testbed-stop")) as process:
        yield process


def _channel_endings(host: HostProcess, channel_id: int) -> list[tuple[str, str]]:
    """(kind, detail) of the lifecycle events of one channel, from the host's replay."""
    channel, admin = host.admin()
    with channel:
        stream = admin.WatchEvents(
            hvsock_pb2.WatchEventsRequest(replay=1000), metadata=host.metadata, timeout=2
        )
        out = []
        try:
            for event in stream:
                if event.channel_id == channel_id:
                    out.append((event.kind, event.detail))
        except Exception:  # the deadline ends the replayed stream: that is its end here
            pass
        return out


@pytest.mark.parametrize("data_path", ["shm", "relay"])
def test_the_vm_program_stops_on_sigterm_closing_its_channels(
    host: HostProcess, data_path: str, tmp_path: pathlib.Path
) -> None:
    created = host.create_vm(personality="windows")
    vm_id = created.partition.vm_id
    root = hv.attach_host(host.target, token=host.token)
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(HOST_ECHO_PORT)))
    listener.listen(8)
    serve_echo(listener)  # the VM program echoes with the host first
    env = {
        **os.environ,
        "HVSOCK_HOST": host.target,
        "HVSOCK_VM_ID": vm_id,
        "HVSOCK_TOKEN": created.token,
        "HVSOCK_DATA_PATH": data_path,
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "hvsock_tools.testbed", "--bytes=65536", "vm"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    sock = None
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        while line and " -> host: " not in line:  # its echo with the host is done
            line = child.stdout.readline()
        assert line.rstrip().endswith("sha256 ok"), line
        # A connection to the program's echo service, open and idle when the stop comes.
        sock = root.socket()
        sock.settimeout(10)
        sock.connect((vm_id, hv.service_id_for_port(VM_ECHO_PORT)))
        sock.sendall(b"before the stop" * 100)
        assert recv_exactly(sock, 1500) == b"before the stop" * 100

        start = time.monotonic()
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=10)
        elapsed = time.monotonic() - start
        assert code == 0, child.stdout.read()
        assert elapsed < STOP_WITHIN, elapsed
        assert "stopped (SIGTERM)" in child.stdout.read()

        assert sock.recv(100) == b""  # EOF: the program closed its end
        channel_id = sock.channel_id
        sock.close()
        wait_for_no_channels(host, vm_id)
        endings = _channel_endings(host, channel_id)
        kinds = [kind for kind, _ in endings]
        # The program closed its end (the host passed its FIN on: on the relay path it rides
        # the data stream, so the host records it as a shutdown) before its session ended; the
        # host rescinds the half still open only then, as after any close.
        assert any(kind.endswith("_by_acceptor") for kind in kinds), endings
        assert ("fin", "to the connector") in endings, endings
        if "rescind" in kinds:
            assert kinds.index("fin") < kinds.index("rescind"), endings
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        if sock is not None:
            sock.close()
        listener.close()
        root.close()
