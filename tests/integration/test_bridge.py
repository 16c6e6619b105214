"""``hvsock bridge``: unmodified programs across the boundary, half-close, resets, many
connections, on both data paths (shared memory and the gRPC relay)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

import guest_client as hv
from guest_client import aio
from hvsock.v1 import hvsock_pb2
from hvsock_tools.bridge import (
    Bridge,
    HvEndpoint,
    PlainEndpoint,
    parse_endpoint,
    run_in_thread,
)
from hvsock_tools.proxies import _vm_resolver

from .hostproc import BIN, HostProcess, run_host

pytestmark = pytest.mark.integration

PORTS = iter(range(7000, 8000))


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    with run_host(tmp_path_factory.mktemp("host")) as process:
        yield process


class Parts:
    def __init__(self, host: HostProcess, data_path: str) -> None:
        self.host, self.data_path = host, data_path
        self.opened: list[hv.Partition] = []

    def create_vm(self, personality: str = "linux", name: str | None = None) -> tuple[str, str]:
        # No name: a fresh one (names are unique on a host, and the host serves the module).
        created = self.host.create_vm(name, personality)
        return created.partition.vm_id, created.token

    def vm(self, personality: str = "linux") -> hv.Partition:
        vm_id, token = self.create_vm(personality)
        return self._open(hvsock_pb2.Hello(vm_id=vm_id, token=token))

    def root(self) -> hv.Partition:
        return self._open(hvsock_pb2.Hello(host=True, token=self.host.token))

    def _open(self, hello: hvsock_pb2.Hello) -> hv.Partition:
        p = hv.Partition(self.host.target, hello, data_path=self.data_path)
        self.opened.append(p)
        return p

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HVSOCK_DATA_PATH": self.data_path,
        }


@pytest.fixture(params=["shm", "relay"])
def parts(request: pytest.FixtureRequest, host: HostProcess) -> Iterator[Parts]:
    p = Parts(host, request.param)
    yield p
    for partition in p.opened:
        partition.close()


def service() -> tuple[int, str]:
    port = next(PORTS)
    return port, hv.service_id_for_port(port)


def vm_id_of(partition: hv.Partition) -> str:
    return str(partition.vm_id)


def tcp_loopback() -> PlainEndpoint:
    return PlainEndpoint(host="127.0.0.1", port=0)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def until_error(send: object, deadline: float = 10.0) -> type[BaseException]:
    """Keep sending until the send fails (the close or reset has taken effect)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            send(b"x" * 1024)  # type: ignore[operator]
        except (BrokenPipeError, ConnectionResetError) as exc:
            return type(exc)
    raise AssertionError("sends kept succeeding")


# -------------------------------------------------------------------------------------------


def test_http_server_through_bridges(parts: Parts, tmp_path: pathlib.Path) -> None:
    """python -m http.server inside the VM, published as an hv service by a VM-side bridge,
    fetched with urllib through a host-side `hvsock bridge` process."""
    payload = os.urandom(3 << 20)
    (tmp_path / "blob.bin").write_bytes(payload)
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    vm_id, token = parts.create_vm()
    _, svc = service()
    bridge_proc = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
        http_port = int(line.split(" port ")[1].split()[0])
        # VM side, in process: hv (wildcard, svc) -> the HTTP server's TCP port.
        vm = parts._open(hvsock_pb2.Hello(vm_id=vm_id, token=token))
        publish = Bridge(
            HvEndpoint(hv.HV_GUID_WILDCARD.lower(), svc),
            PlainEndpoint(host="127.0.0.1", port=http_port),
            vm,
        )
        with run_in_thread(publish):
            # Host side: the command line, as the host partition.
            bridge_proc = subprocess.Popen(
                [
                    str(BIN / "hvsock"),
                    "--host",
                    parts.host.target,
                    "bridge",
                    "--listen",
                    "tcp:127.0.0.1:0",
                    "--connect",
                    f"hv:{vm_id}:{svc}",
                    f"--host-token={parts.host.token}",
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=parts.env(),
            )
            assert bridge_proc.stdout is not None
            banner = bridge_proc.stdout.readline()
            assert banner.startswith("bridge listening on tcp:127.0.0.1:"), banner
            port = int(banner.split()[3].rsplit(":", 1)[1])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/blob.bin", timeout=20) as r:
                assert r.status == 200
                assert r.read() == payload
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as r:
                assert b"blob.bin" in r.read()
    finally:
        if bridge_proc is not None:
            bridge_proc.terminate()
            assert bridge_proc.wait(timeout=10) == 0
            assert bridge_proc.stdout is not None
            bridge_proc.stdout.close()
        server.terminate()
        server.wait(timeout=10)
        assert server.stdout is not None
        server.stdout.close()


def _tcp_server(handler: object) -> tuple[socket.socket, int]:
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    threading.Thread(target=serve, daemon=True).start()
    return ls, ls.getsockname()[1]


def test_large_upload_and_download(parts: Parts) -> None:
    """32 MiB each way, TCP -> host bridge -> hv -> VM bridge -> TCP, checked with SHA-256."""
    size = 32 << 20
    blob = os.urandom(1 << 20) * 32

    def handle(conn: socket.socket) -> None:
        with conn:
            command = conn.recv(1)
            if command == b"U":  # upload: hash until EOF, answer the digest
                digest = hashlib.sha256()
                while chunk := conn.recv(1 << 20):
                    digest.update(chunk)
                conn.sendall(digest.hexdigest().encode())
            else:  # download
                conn.sendall(blob)

    ls, tcp_port = _tcp_server(handle)
    vm, root = parts.vm(), parts.root()
    _, svc = service()
    publish = Bridge(
        HvEndpoint(hv.HV_GUID_WILDCARD.lower(), svc), PlainEndpoint("127.0.0.1", tcp_port), vm
    )
    front = Bridge(tcp_loopback(), HvEndpoint(vm_id_of(vm), svc), root)
    try:
        with run_in_thread(publish, front):
            with socket.create_connection(front.address) as up:
                up.sendall(b"U" + blob)
                up.shutdown(socket.SHUT_WR)  # the half-close crosses both bridges
                assert read_all(up).decode() == hashlib.sha256(blob).hexdigest()
            with socket.create_connection(front.address) as down:
                down.sendall(b"D")
                got = hashlib.sha256()
                n = 0
                while chunk := down.recv(1 << 20):
                    got.update(chunk)
                    n += len(chunk)
                assert n == size
                assert got.hexdigest() == hashlib.sha256(blob).hexdigest()
    finally:
        ls.close()


@pytest.fixture
def front(parts: Parts) -> Iterator[tuple[Bridge, hv.HvSocket]]:
    """A host-side bridge tcp -> (vm, svc) and the VM's hv listener behind it."""
    vm, root = parts.vm(), parts.root()
    _, svc = service()
    listener = vm.socket()
    listener.bind((hv.HV_GUID_WILDCARD, svc))
    listener.listen()
    bridge = Bridge(tcp_loopback(), HvEndpoint(vm_id_of(vm), svc), root)
    with run_in_thread(bridge):
        yield bridge, listener
    listener.close()


def test_half_close_tcp_to_hv(front: tuple[Bridge, hv.HvSocket]) -> None:
    bridge, listener = front
    with socket.create_connection(bridge.address) as client:
        server, _ = listener.accept()
        with server:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := server.recv(100):
                got += chunk
            assert got == b"request"  # then EOF: the FIN crossed
            server.sendall(b"answer after the client's half-close")
            server.shutdown(hv.SHUT_WR)
            assert read_all(client) == b"answer after the client's half-close"


def test_half_close_hv_to_tcp(front: tuple[Bridge, hv.HvSocket]) -> None:
    bridge, listener = front
    with socket.create_connection(bridge.address) as client:
        server, _ = listener.accept()
        with server:
            server.sendall(b"banner")
            server.shutdown(hv.SHUT_WR)
            assert read_all(client) == b"banner"  # EOF on TCP: the hv FIN crossed
            client.sendall(b"still flowing")
            client.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := server.recv(100):
                got += chunk
            assert got == b"still flowing"


def channels(host: HostProcess, vm_id: str) -> list[hvsock_pb2.ChannelStatus]:
    channel, admin = host.admin()
    with channel:
        listed = admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(vm_id=vm_id), metadata=host.metadata, timeout=10
        )
    return list(listed.channels)


def wait_state(host: HostProcess, vm_id: str, state: int | None, deadline: float = 10.0) -> None:
    """Poll the host's channel table until the VM's one channel is in ``state`` (None: gone,
    as closed channels leave the table)."""
    end = time.monotonic() + deadline
    seen: list[int] = []
    while time.monotonic() < end:
        seen = [c.state for c in channels(host, vm_id)]
        if seen == ([] if state is None else [state]):
            return
        time.sleep(0.01)  # polling an observable state, with a deadline
    raise AssertionError(f"channel states {seen}, wanted {state}")


def test_tcp_reset_closes_hv_side(parts: Parts, front: tuple[Bridge, hv.HvSocket]) -> None:
    bridge, listener = front
    vm_id = _listener_vm(parts)
    client = socket.create_connection(bridge.address)
    server, _ = listener.accept()
    with server:
        client.sendall(b"x")
        assert server.recv(10) == b"x"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        assert server.recv(10) == b""  # hv_sock has no RST: end of stream...
        # ...and the bridge's end is closed, not half-closed (a FIN would leave it
        # HALF_CLOSED_CONNECTOR and still able to receive).
        wait_state(parts.host, vm_id, hvsock_pb2.CHANNEL_STATE_CLOSING)
    wait_state(parts.host, vm_id, None)  # both ends closed


def _listener_vm(parts: Parts) -> str:
    return vm_id_of(next(p for p in parts.opened if not p._hello.host))


def test_hv_rescind_resets_tcp_sender(parts: Parts, front: tuple[Bridge, hv.HvSocket]) -> None:
    bridge, listener = front
    vm_id = _listener_vm(parts)
    with socket.create_connection(bridge.address) as client:
        server, _ = listener.accept()
        with server:
            (status,) = channels(parts.host, vm_id)
            channel, admin = parts.host.admin()
            with channel:
                admin.RescindChannel(
                    hvsock_pb2.RescindChannelRequest(channel_id=status.channel_id, reason="t"),
                    metadata=parts.host.metadata,
                    timeout=10,
                )
            assert read_all(client) == b""
            # The hv side is gone: what the TCP side still sends is answered with an RST.
            assert until_error(client.sendall) in (ConnectionResetError, BrokenPipeError)


def test_refused_hv_connect_resets_tcp_client(parts: Parts) -> None:
    vm = parts.vm(personality="windows")  # a windows VM's connect to nobody: ECONNREFUSED
    _, svc = service()
    bridge = Bridge(tcp_loopback(), HvEndpoint(hv.HV_GUID_PARENT.lower(), svc), vm)
    with (
        run_in_thread(bridge),
        socket.create_connection(bridge.address) as client,
        pytest.raises(ConnectionResetError),
    ):
        client.recv(10)
    assert bridge.stats.failed_connects == 1


def test_connect_to_a_vm_by_name(parts: Parts) -> None:
    """hv:NAME:SERVICE finds the VM by name for each connection (the admin API, host token)."""
    port, svc = service()
    name = f"named-vm-{parts.data_path}-{port}"
    vm_id, token = parts.create_vm(name=name)
    vm, root = parts._open(hvsock_pb2.Hello(vm_id=vm_id, token=token)), parts.root()
    listener = vm.socket()
    listener.bind((hv.HV_GUID_WILDCARD, svc))
    listener.listen()
    cli_args = argparse.Namespace(
        host=parts.host.target,
        token=None,
        host_token=parts.host.token,
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        tls_server_name=None,
    )
    resolve = _vm_resolver(cli_args)
    bridge = Bridge(tcp_loopback(), parse_endpoint(f"hv:{name}:{port}"), root, resolve_vm=resolve)
    with run_in_thread(bridge), socket.create_connection(bridge.address) as client:
        server, (peer_vm, _) = listener.accept()
        assert peer_vm == "a42e7cda-d03f-480c-9cc2-a4de20abb878"  # the host partition
        with server:
            client.sendall(b"ping")
            assert server.recv(10) == b"ping"
    listener.close()

    unknown = Bridge(tcp_loopback(), parse_endpoint("hv:no-such-vm:5"), root, resolve_vm=resolve)
    with (
        run_in_thread(unknown),
        socket.create_connection(unknown.address) as client,
        pytest.raises(ConnectionResetError),
    ):
        client.recv(10)
    assert unknown.stats.failed_connects == 1

    with pytest.raises(ValueError, match="not a VM id, alias or name"):
        parse_endpoint("hv:bad name!:5")
    with pytest.raises(ValueError, match="VM names are for the connect side"):
        Bridge(parse_endpoint(f"hv:{name}:5"), tcp_loopback(), root, resolve_vm=resolve)
    with pytest.raises(ValueError, match="no way to look up"):
        Bridge(tcp_loopback(), parse_endpoint(f"hv:{name}:5"), root)


def test_refused_tcp_connect_closes_hv_side(parts: Parts) -> None:
    vm, root = parts.vm(), parts.root()
    _, svc = service()
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    publish = Bridge(
        HvEndpoint(hv.HV_GUID_WILDCARD.lower(), svc), PlainEndpoint("127.0.0.1", port), vm
    )
    with run_in_thread(publish):
        client = root.socket()
        with client:
            client.connect((vm_id_of(vm), svc))
            assert client.recv(10) == b""
            wait_state(parts.host, vm_id_of(vm), hvsock_pb2.CHANNEL_STATE_CLOSING)


def test_unix_listener_to_hv_service_on_host(parts: Parts, tmp_path: pathlib.Path) -> None:
    """VM -> host: a Unix-socket listener in the VM reaching a host partition service."""
    vm, root = parts.vm(), parts.root()
    _, svc = service()
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, svc))
    listener.listen()
    path = str(tmp_path / "b.sock")
    bridge = Bridge(PlainEndpoint(path=path), HvEndpoint(hv.HV_GUID_PARENT.lower(), svc), vm)
    with run_in_thread(bridge), socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        server, (peer_vm, _) = listener.accept()
        assert peer_vm == vm_id_of(vm)
        with server:
            client.sendall(b"ping")
            assert server.recv(10) == b"ping"
            server.sendall(b"pong")
            assert client.recv(10) == b"pong"
    listener.close()


def test_hundred_concurrent_connections(parts: Parts) -> None:
    vm, root = parts.vm(), parts.root()
    _, svc = service()
    count, size = 100, 32 * 1024

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
            writer.close()

        server = await aio.start_server(echo, (hv.HV_GUID_WILDCARD, svc), partition=vm)
        bridge = Bridge(tcp_loopback(), HvEndpoint(vm_id_of(vm), svc), root, ring_pages=8)
        await bridge.start()
        host, port = bridge.address

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection(host, port)
            data = i.to_bytes(4, "big") * (size // 4)
            writer.write(data)
            writer.write_eof()
            got = await reader.read(-1)
            writer.close()
            assert got == data, i

        try:
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 30)
            assert bridge.stats.accepted == count
            assert bridge.stats.failed_connects == 0
        finally:
            await bridge.aclose()
            server.close()

    asyncio.run(main())


def test_a_host_restart_is_one_log_line_and_the_bridge_listens_again(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hv listener is reset when the host service goes away: the bridge says so in one
    line (no asyncio traceback) and listens again once its VM is attached again."""
    caplog.set_level("INFO")
    state = tmp_path / "state.db"
    _, svc = service()
    backend = socket.create_server(("127.0.0.1", 0))

    def echo_backend() -> None:
        while True:
            try:
                conn, _ = backend.accept()
            except OSError:
                return
            # The bridge resets the plain end of a connection whose hv side the host took
            # down with it (ECONNRESET): that is this test's restart, not a failure.
            with conn, contextlib.suppress(ConnectionResetError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=echo_backend, daemon=True).start()

    def roundtrip(target: str, token: str) -> bool:
        with hv.attach_host(target, token=token) as root:
            sock = root.socket()
            sock.settimeout(10)
            try:
                with sock:
                    sock.connect((vm.vm_id, svc))
                    sock.sendall(b"through the bridge")
                    return sock.recv(100) == b"through the bridge"
            except OSError:
                return False  # not listening (again) yet

    with run_host(tmp_path, "--state", str(state)) as first:
        created = first.create_vm("bridged")
        vm = hv.attach(first.target, vm_id=created.partition.vm_id, token=created.token)
        bridge = Bridge(
            HvEndpoint(hv.HV_GUID_WILDCARD, svc),
            PlainEndpoint("127.0.0.1", backend.getsockname()[1]),
            vm,
        )
        try:
            with run_in_thread(bridge):
                assert roundtrip(first.target, first.token)
                assert first.stop() == 0
                with run_host(tmp_path, "--state", str(state), like=first) as second:
                    deadline = time.monotonic() + 30
                    while not roundtrip(second.target, second.token):
                        assert time.monotonic() < deadline, "the bridge did not listen again"
                    records = list(caplog.records)  # (the second host's stop is not counted)
        finally:
            vm.close()
            backend.close()
    messages = [r.getMessage() for r in records]
    assert not [r for r in records if r.exc_info or "Exception in callback" in r.getMessage()]
    assert sum("the host service went away" in m for m in messages) == 1, messages
    assert any("listening again" in m for m in messages), messages
