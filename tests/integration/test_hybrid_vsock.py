"""The hybrid-vsock endpoint driven by socat, an independent client: CONNECT by port and by
GUID, refusals, malformed requests, and guest-initiated connections on ``<path>_<port>``."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from hvsock_tools.bridge import run_in_thread
from hvsock_tools.hybrid import MAX_REQUEST, HybridVsock, parse_request

from .hostproc import BIN, HostProcess, run_host

pytestmark = pytest.mark.integration

SOCAT = shutil.which("socat")
if SOCAT is None and os.environ.get("HVSOCK_REQUIRE_SOCAT") != "1":
    pytest.skip(
        "socat is not installed (apt-get install -y socat); HVSOCK_REQUIRE_SOCAT=1 makes this "
        "a failure",
        allow_module_level=True,
    )

GUEST_PORT = 5001  # the guest listens here
GUEST_GUID = "c0ffee00-1234-4abc-9def-00112233aabb"  # and on this service id
HOST_PORT = 6001  # the guest connects to the host here (socat listens on PATH_6001)
HOST_PORT_NOBODY = 6002  # ...and here, where nothing listens on the Unix side
HOST_GUID = "b0b0b0b0-5678-4abc-9def-00112233aabb"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    with run_host(tmp_path_factory.mktemp("host")) as process:
        yield process


class Setup:
    def __init__(self, vm: hv.Partition, root: hv.Partition, path: str) -> None:
        self.vm, self.root, self.path = vm, root, path


def _serving(
    partition: hv.Partition, service: str, handle: Callable[[hv.HvSocket], None]
) -> hv.HvSocket:
    """A guest listener on ``service`` that runs ``handle`` on each connection, in a thread."""
    listener = partition.socket()
    listener.bind((hv.HV_GUID_WILDCARD, service))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _echo_listener(partition: hv.Partition, service: str) -> hv.HvSocket:
    return _serving(partition, service, _echo)


def _echo(conn: hv.HvSocket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(hv.SHUT_WR)


@pytest.fixture(params=["shm", "relay"])
def setup(
    request: pytest.FixtureRequest, host: HostProcess, tmp_path: pathlib.Path
) -> Iterator[Setup]:
    created = host.create_vm()  # a fresh name: names are unique, and the host is shared
    kwargs = {"data_path": request.param}
    vm = hv.Partition(
        host.target, hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token), **kwargs
    )
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token), **kwargs)
    listeners = [
        _echo_listener(vm, hv.service_id_for_port(GUEST_PORT)),
        _echo_listener(vm, GUEST_GUID),
    ]
    path = str(tmp_path / "v.sock")
    endpoint = HybridVsock(
        root,
        vm.vm_id,
        path,
        guest_ports=[HOST_PORT, HOST_PORT_NOBODY],
        guest_services=[HOST_GUID],
        connect_timeout_ms=300,  # the refused case waits for this (the host never hears no)
    )
    with run_in_thread(endpoint):
        yield Setup(vm, root, path)
    for listener in listeners:
        listener.close()
    vm.close()
    root.close()


def socat_connect(path: str, data: bytes) -> bytes:
    """socat as the host program: write ``data`` (then EOF), return all it read."""
    assert SOCAT is not None
    done = subprocess.run(
        [SOCAT, "-t", "10", "-", f"UNIX-CONNECT:{path}"],
        input=data,
        capture_output=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_connect_by_port(setup: Setup) -> None:
    assert socat_connect(setup.path, b"CONNECT 5001\nhello guest\n") == b"OK 5001\nhello guest\n"


def test_connect_keyword_is_case_insensitive(setup: Setup) -> None:
    assert socat_connect(setup.path, b"connect 5001\nabc") == b"OK 5001\nabc"


def test_connect_by_guid(setup: Setup) -> None:
    request = f"CONNECT {GUEST_GUID.upper()}\n".encode()
    assert socat_connect(setup.path, request + b"by guid") == f"OK {GUEST_GUID}\nby guid".encode()


def test_connect_by_template_guid_reaches_the_port(setup: Setup) -> None:
    guid = hv.service_id_for_port(GUEST_PORT)
    assert socat_connect(setup.path, f"CONNECT {guid}\nx".encode()) == f"OK {guid}\nx".encode()


def test_large_stream_through_the_endpoint(setup: Setup) -> None:
    blob = os.urandom(4 << 20)
    assert socat_connect(setup.path, b"CONNECT 5001\n" + blob) == b"OK 5001\n" + blob


def test_refused_service_closes_the_socket(setup: Setup) -> None:
    assert socat_connect(setup.path, b"CONNECT 5999\nanyone?") == b""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT abc\n",
        b"CONNECT 5001 \n",  # trailing space
        b"CONNECT  5001\n",  # two spaces
        b"CONNECT -1\n",
        b"CONNECT 4294967296\n",  # > u32
        b"CONNECT 12345678-1234-1234-1234-1234567890\n",  # short GUID
        b"HELLO 5001\n",
        b"CONNECT 5001",  # no newline before EOF
        b"CONNECT " + b"0" * (MAX_REQUEST - 8) + b"5001\n",  # longer than the maximum
    ],
)
def test_malformed_request_closes_the_socket(setup: Setup, request_bytes: bytes) -> None:
    assert socat_connect(setup.path, request_bytes + b"payload") == b""


def test_maximum_request_length() -> None:
    assert MAX_REQUEST == 45
    assert parse_request(b"CONNECT 00000000-facb-11e6-bd58-64006a7986d3") is not None
    assert parse_request(b"CONNECT 0005001") == (hv.service_id_for_port(5001), "5001")


def _socat_listen(path: str) -> subprocess.Popen[str]:
    """socat listening on ``path`` as a host program, echoing with cat."""
    assert SOCAT is not None
    proc = subprocess.Popen(
        [SOCAT, "-d", "-d", f"UNIX-LISTEN:{path}", "EXEC:cat"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "listening on" in line:
            return proc
    raise AssertionError(f"socat did not listen: {proc.wait()}")


def _guest_roundtrip(setup: Setup, service: str, data: bytes) -> bytes:
    sock = setup.vm.socket()
    with sock:
        sock.connect((hv.HV_GUID_PARENT, service))
        sock.sendall(data)
        sock.shutdown(hv.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


@pytest.mark.parametrize("suffix", ["port", "guid", "port-as-guid"])
def test_guest_initiated_connection_arrives_on_path_suffix(setup: Setup, suffix: str) -> None:
    if suffix == "port":
        unix_path, service = f"{setup.path}_{HOST_PORT}", hv.service_id_for_port(HOST_PORT)
    elif suffix == "guid":
        unix_path, service = f"{setup.path}_{HOST_GUID}", HOST_GUID
    else:  # OpenVMM's fallback: PATH_<template guid> for a port
        service = hv.service_id_for_port(HOST_PORT)
        unix_path = f"{setup.path}_{service}"
    proc = _socat_listen(unix_path)
    try:
        assert _guest_roundtrip(setup, service, b"guest to host") == b"guest to host"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_guest_connection_closed_when_nothing_listens(setup: Setup) -> None:
    sock = setup.vm.socket()
    with sock:
        sock.connect((hv.HV_GUID_PARENT, hv.service_id_for_port(HOST_PORT_NOBODY)))
        assert sock.recv(10) == b""  # closed at once (hv_sock has no RST)


def test_command_line_endpoint(host: HostProcess, tmp_path: pathlib.Path) -> None:
    """`hvsock hybrid-vsock` as a process, socat as the client, a VM echo listener."""
    channel, admin = host.admin()
    with channel:
        created = admin.CreatePartition(
            hvsock_pb2.CreatePartitionRequest(name="hybrid-cli"), metadata=host.metadata, timeout=10
        )
    vm = hv.Partition(
        host.target,
        hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token),
    )
    listener = _echo_listener(vm, hv.service_id_for_port(GUEST_PORT))
    path = str(tmp_path / "cli.sock")
    proc = subprocess.Popen(
        [
            str(BIN / "hvsock"),
            "--host",
            host.target,
            "hybrid-vsock",
            "--path",
            path,
            "--vm-id",
            vm.vm_id,
            "--guest-ports",
            f"{HOST_PORT}",
            f"--host-token={host.token}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("hybrid-vsock listening on unix:")
        assert socat_connect(path, b"CONNECT 5001\ncli") == b"OK 5001\ncli"
        with socket.socket(socket.AF_UNIX) as raw:  # the same by hand
            raw.connect(path)
            raw.sendall(b"CONNECT 5001\n")
            assert raw.recv(100) == b"OK 5001\n"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()
        listener.close()
        vm.close()


def _hello_listener(partition: hv.Partition, service: str) -> hv.HvSocket:
    """A guest listener that answers each connection with its VM id, then closes."""

    def hello(conn: hv.HvSocket) -> None:
        with conn:
            conn.sendall(partition.vm_id.encode())
            conn.shutdown(hv.SHUT_WR)

    return _serving(partition, service, hello)


def _hybrid_connect(path: str, port: int) -> bytes:
    """CONNECT ``port`` by hand; everything the endpoint sent until it closed."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(30)
        raw.connect(path)
        raw.sendall(f"CONNECT {port}\n".encode())
        return b"".join(iter(lambda: raw.recv(4096), b""))


def test_a_vm_name_is_looked_up_for_each_connect(host: HostProcess, tmp_path: pathlib.Path) -> None:
    """``--vm-id NAME``: the endpoint starts before the VM exists, and a VM deleted and created
    again under that name (a new id) is the one reached, never the one it replaced."""
    path = str(tmp_path / "named.sock")
    proc = subprocess.Popen(
        [
            str(BIN / "hvsock"),
            "--host",
            host.target,
            "hybrid-vsock",
            "--path",
            path,
            "--vm-id",
            "Hybrid-By-Name",  # the host's names ignore case; so does the lookup
            "--connect-timeout-ms=300",
            f"--host-token={host.token}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    vms: list[hv.Partition] = []
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "the VM named 'Hybrid-By-Name' (looked up for each CONNECT)" in banner, banner
        assert _hybrid_connect(path, GUEST_PORT) == b""  # no such VM yet: closed, no answer
        ids = []
        for _ in range(2):
            created = host.create_vm("hybrid-by-name")
            vm = hv.attach(host.target, vm_id=created.partition.vm_id, token=created.token)
            vms.append(vm)
            listener = _hello_listener(vm, hv.service_id_for_port(GUEST_PORT))
            answer = _hybrid_connect(path, GUEST_PORT)
            assert answer == f"OK {GUEST_PORT}\n{vm.vm_id}".encode(), answer
            ids.append(vm.vm_id)
            listener.close()
            vm.close()
            channel, admin = host.admin()
            with channel:
                admin.DeletePartition(
                    hvsock_pb2.DeletePartitionRequest(vm_id=vm.vm_id),
                    metadata=host.metadata,
                    timeout=10,
                )
        assert ids[0] != ids[1]
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
        assert proc.stdout is not None and proc.stderr is not None
        errors = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        for vm in vms:
            vm.close()
    assert code == 0, errors
    assert "Traceback" not in errors, errors
