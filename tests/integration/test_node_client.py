"""A VM written in Node.js (tests/node/echo_vm.js, @grpc/grpc-js + @grpc/proto-loader reading
protos/ at run time) echoes what a Python host partition sends: the proto is the whole contract.

Skipped when node or npm is missing, unless HVSOCK_REQUIRE_NODE=1 (CI), which makes that a
failure."""

from __future__ import annotations

import hashlib
import os
import pathlib
import queue
import secrets
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

from host_service.core.relay import DEFAULT_RELAY_WINDOW
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host
from .rawclient import RawPartition, RelayStream

pytestmark = pytest.mark.integration

NODE_DIR = pathlib.Path(__file__).resolve().parents[1] / "node"
ECHO_VM = NODE_DIR / "echo_vm.js"


def _unavailable(reason: str) -> None:
    if os.environ.get("HVSOCK_REQUIRE_NODE") == "1":
        pytest.fail(f"{reason} (HVSOCK_REQUIRE_NODE=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with tests/node/node_modules installed from package-lock.json."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm_bin is None:
        _unavailable("the Node.js client test needs node and npm on PATH")
    assert node_bin is not None and npm_bin is not None
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run(
            [npm_bin, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            _unavailable(f"npm ci failed in {NODE_DIR}: {result.stderr.strip()[-2000:]}")
    return node_bin


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


class NodeVm:
    """echo_vm.js as a child process; its stdout lines arrive on a queue."""

    def __init__(self, node: str, host: HostProcess, vm_id: str, token: str, service: str):
        env = {
            **os.environ,
            "HVSOCK_HOST": host.target,
            "HVSOCK_VM_ID": vm_id,
            "HVSOCK_VM_TOKEN": token,  # the token from the environment, the rest from argv
        }
        self.proc = subprocess.Popen(
            [node, str(ECHO_VM), "--vm-id", vm_id, "--service", service],
            cwd=NODE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: object, sink: object) -> None:
        assert stream is not None and callable(sink)
        for line in stream:  # type: ignore[attr-defined]
            sink(line.rstrip("\n"))
        if sink.__name__ == "put":  # type: ignore[attr-defined]
            sink(None)

    def expect(self, prefix: str, timeout: float = 30) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"echo_vm.js printed nothing; stderr: {self.stderr}") from None
        assert line is not None, f"echo_vm.js ended early; stderr: {self.stderr}"
        assert line.startswith(prefix), (line, self.stderr)
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for thread in self._threads:
            thread.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.slow  # 1 MiB both ways through 2- and 3-page rings on the relay
def test_node_vm_echoes_over_the_relay(node: str, host: HostProcess) -> None:
    service = str(uuid.uuid4())
    channel, admin = host.admin()
    with channel:
        created = admin.CreatePartition(
            hvsock_pb2.CreatePartitionRequest(name="node-vm"), metadata=host.metadata, timeout=10
        )
    vm_id = created.partition.vm_id
    vm = NodeVm(node, host, vm_id, created.token, service)
    root = RawPartition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    try:
        vm.expect("LISTENING ")
        # The host partition connects to (VM id, service) and uses the relay.
        connected = root.request(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=vm_id, service_id=service), force_relay=True
            )
        )
        assert connected.WhichOneof("kind") == "opened", connected
        channel_id = connected.opened.channel_id
        assert connected.opened.data_path == hvsock_pb2.DATA_PATH_GRPC_RELAY
        assert vm.expect("OPENED ") == f"OPENED {channel_id}"

        payload = secrets.token_bytes(4 * DEFAULT_RELAY_WINDOW)  # beyond the 2-page ring and window
        relay = RelayStream(root, channel_id)
        failure: list[BaseException] = []

        def write() -> None:
            try:
                relay.send_all(payload, timeout=60)
                relay.send_fin()
            except BaseException as exc:
                failure.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        echoed = relay.read_all(timeout=60)  # until the VM's FIN
        writer.join(timeout=60)
        assert not failure, failure
        assert len(echoed) == len(payload)
        assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert relay.limits[0] < len(payload)  # the credit really bounded the sender
        assert vm.expect("ECHOED ") == f"ECHOED {channel_id} {len(payload)}"

        # Close our end: the VM closes its own, detaches and exits cleanly.
        assert root.request(close=hvsock_pb2.Close(channel_id=channel_id)).HasField("ack")
        vm.expect("DONE")
        assert vm.proc.wait(timeout=30) == 0, vm.stderr
        relay.close()

        channel, admin = host.admin()
        with channel:
            remaining = admin.ListChannels(
                hvsock_pb2.ListChannelsRequest(vm_id=vm_id), metadata=host.metadata, timeout=10
            )
            partition = admin.GetPartition(
                hvsock_pb2.GetPartitionRequest(vm_id=vm_id), metadata=host.metadata, timeout=10
            ).partition
        assert [c for c in remaining.channels if c.state != hvsock_pb2.CHANNEL_STATE_CLOSED] == []
        assert not partition.attached
    finally:
        root.close()
        vm.stop()


def test_node_vm_reports_a_bad_token(node: str, host: HostProcess) -> None:
    channel, admin = host.admin()
    with channel:
        created = admin.CreatePartition(
            hvsock_pb2.CreatePartitionRequest(name="node-bad"), metadata=host.metadata, timeout=10
        )
    vm = NodeVm(node, host, created.partition.vm_id, "not-the-token", str(uuid.uuid4()))
    try:
        assert vm.proc.wait(timeout=30) == 1
    finally:
        vm.stop()
    assert any(
        f"attach: {grpc.StatusCode.UNAUTHENTICATED.value[0]} " in line for line in vm.stderr
    ), vm.stderr
