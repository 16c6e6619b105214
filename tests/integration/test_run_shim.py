"""``hvsock run``: unmodified AF_VSOCK programs (socat, ncat, a stdlib-Python program, a C
program compiled here) as guests and host programs of a real ``hvsock-host``.

Each program runs through ``hvsock run`` as its own process tree, exactly as a user runs it;
the other end is either another program through ``hvsock run`` or this test process's own
``guest_client`` partition. Data is checked with SHA-256.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from hvsock_common.addresses import PARENT, cid_for_vm_id
from hvsock_tools.run import companion_environment

from .hostproc import BIN, HostProcess, run_host

pytestmark = pytest.mark.integration

HERE = pathlib.Path(__file__).resolve().parent
SOCAT = shutil.which("socat")
NCAT = shutil.which("ncat")
GCC = shutil.which("gcc")
#: An unmodified interpreter: the system's, not this project's environment.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MIB32 = 32 << 20

need_socat = pytest.mark.skipif(
    SOCAT is None and os.environ.get("HVSOCK_REQUIRE_SOCAT") != "1",
    reason="socat is not installed (apt-get install -y socat)",
)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    with run_host(tmp_path_factory.mktemp("host")) as process:
        yield process


class Vm:
    def __init__(self, host: HostProcess, personality: str = "linux") -> None:
        created = host.create_vm(personality=personality)
        self.vm_id: str = created.partition.vm_id
        self.token: str = created.token
        self.cid = cid_for_vm_id(self.vm_id)


@pytest.fixture(scope="module")
def vm(host: HostProcess) -> Vm:
    return Vm(host)


def run_args(host: HostProcess, who: Vm | None) -> list[str]:
    base = [str(BIN / "hvsock"), "--host", host.target, "run"]
    if who is None:
        return [*base, "--host-partition", f"--host-token={host.token}"]
    return [*base, "--vm", who.vm_id, f"--token={who.token}"]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HVSOCK_")}
    env.update(extra)
    return env


#: Programs started by the running test (``start``); ``_reap`` ends what a failure left.
_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def start(
    host: HostProcess, who: Vm | None, program: list[str], **kwargs: Any
) -> subprocess.Popen[bytes]:
    env = environment(**kwargs.pop("env", {}))
    proc = subprocess.Popen([*run_args(host, who), "--", *program], env=env, **kwargs)
    _started.append(proc)
    return proc


def run(
    host: HostProcess, who: Vm | None, program: list[str], timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    env = environment(**kwargs.pop("env", {}))
    return subprocess.run(
        [*run_args(host, who), "--", *program],
        env=env,
        timeout=timeout,
        capture_output=True,
        check=False,
        **kwargs,
    )


def wait_listening(host: HostProcess, vm_id: str, count: int = 1) -> None:
    """Until partition ``vm_id`` has ``count`` listeners (a program's listen reached the host)."""
    channel, admin = host.admin()
    deadline = time.monotonic() + 30
    with channel:
        while time.monotonic() < deadline:
            got = admin.GetPartition(
                hvsock_pb2.GetPartitionRequest(vm_id=vm_id), metadata=host.metadata, timeout=5
            )
            if got.partition.listener_count >= count:
                return
            time.sleep(0.02)  # the admin API has no "listener appeared" wait
    raise AssertionError(f"partition {vm_id} never listened")


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out or b"", err or b""


# ---- socat and ncat ------------------------------------------------------------------------


def _exchange_script(tmp_path: pathlib.Path, reply: pathlib.Path) -> str:
    """What the listening socat runs for each connection: the SHA-256 of everything the peer
    sends until its half-close, then ``reply`` back, then end of stream."""
    digest = tmp_path / "received.sha256"
    return f"SYSTEM:sha256sum > {digest}; cat {reply}"


def _check_exchange(
    tmp_path: pathlib.Path, sent: bytes, reply: pathlib.Path, received: pathlib.Path
) -> None:
    got = (tmp_path / "received.sha256").read_text().split()[0]
    assert got == hashlib.sha256(sent).hexdigest()
    assert (
        hashlib.sha256(received.read_bytes()).digest()
        == hashlib.sha256(reply.read_bytes()).digest()
    )


@need_socat
def test_socat_vm_connects_to_host_32mib_each_way(
    host: HostProcess, vm: Vm, tmp_path: pathlib.Path
) -> None:
    """VSOCK-CONNECT:2:PORT in a VM to VSOCK-LISTEN in the host partition: 32 MiB up to the
    VM's half-close, then 32 MiB back to the host's close, each checked with SHA-256."""
    sent = os.urandom(MIB32)
    (tmp_path / "in.bin").write_bytes(sent)
    reply = tmp_path / "reply.bin"
    reply.write_bytes(os.urandom(MIB32))
    server = start(host, None, ["socat", "VSOCK-LISTEN:6100", _exchange_script(tmp_path, reply)])
    wait_listening(host, PARENT)
    with (tmp_path / "in.bin").open("rb") as stdin, (tmp_path / "out.bin").open("wb") as out:
        client = start(
            host,
            vm,
            ["socat", "-t", "30", "-b", "65536", "-", "VSOCK-CONNECT:2:6100"],
            stdin=stdin,
            stdout=out,
            stderr=subprocess.PIPE,
        )
        status, _, err = finish(client)
    assert status == 0, err.decode()
    assert finish(server)[0] == 0
    _check_exchange(tmp_path, sent, reply, tmp_path / "out.bin")


@need_socat
def test_socat_host_connects_to_vm_listener_32mib_each_way(
    host: HostProcess, vm: Vm, tmp_path: pathlib.Path
) -> None:
    """VSOCK-LISTEN:PORT in a VM, reached by a host program dialling the VM's CID."""
    sent = os.urandom(MIB32)
    (tmp_path / "in.bin").write_bytes(sent)
    reply = tmp_path / "reply.bin"
    reply.write_bytes(os.urandom(MIB32))
    server = start(host, vm, ["socat", "VSOCK-LISTEN:6101", _exchange_script(tmp_path, reply)])
    wait_listening(host, vm.vm_id)
    with (tmp_path / "in.bin").open("rb") as stdin, (tmp_path / "out.bin").open("wb") as out:
        client = start(
            host,
            None,
            ["socat", "-t", "30", "-b", "65536", "-", f"VSOCK-CONNECT:{vm.cid}:6101"],
            stdin=stdin,
            stdout=out,
            stderr=subprocess.PIPE,
        )
        status, _, err = finish(client)
    assert status == 0, err.decode()
    assert finish(server)[0] == 0
    _check_exchange(tmp_path, sent, reply, tmp_path / "out.bin")


@need_socat
def test_connect_errors_in_socats_own_words(host: HostProcess, vm: Vm) -> None:
    """The personality's connect error reaches the program as its errno: socat says so."""
    windows = Vm(host, personality="windows")
    nobody = ["socat", "-", "VSOCK-CONNECT:2:6199"]
    started = time.monotonic()
    timed_out = run(host, vm, nobody, stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    assert timed_out.returncode == 1
    assert b"Connection timed out" in timed_out.stderr, timed_out.stderr
    assert took >= 2.0  # the default vsock connect timeout, 2 s
    refused = run(host, windows, nobody, stdin=subprocess.DEVNULL)
    assert b"Connection refused" in refused.stderr, refused.stderr
    unreachable = run(host, vm, ["socat", "-", "VSOCK-CONNECT:3:6199"], stdin=subprocess.DEVNULL)
    assert b"Network is unreachable" in unreachable.stderr, unreachable.stderr
    no_such_vm = run(host, None, ["socat", "-", "VSOCK-CONNECT:77:6199"], stdin=subprocess.DEVNULL)
    assert b"Network is unreachable" in no_such_vm.stderr, no_such_vm.stderr


@pytest.mark.skipif(NCAT is None, reason="ncat is not installed (apt-get install -y ncat)")
def test_ncat_vsock(host: HostProcess, vm: Vm, tmp_path: pathlib.Path) -> None:
    """Debian's ncat --vsock (its nsock engine: non-blocking connect, epoll): 4 MiB from a VM
    to a host listener, 4 MiB from a VM listener to a host client dialling the VM's CID."""
    up, down = os.urandom(4 << 20), os.urandom(4 << 20)
    with (tmp_path / "up.bin").open("wb") as out:
        server = start(host, None, ["ncat", "--vsock", "-l", "6102", "--recv-only"], stdout=out)
        wait_listening(host, PARENT)
        client = run(host, vm, ["ncat", "--vsock", "--send-only", "2", "6102"], input=up)
        assert client.returncode == 0, client.stderr.decode()
        assert finish(server)[0] == 0
    assert (
        hashlib.sha256((tmp_path / "up.bin").read_bytes()).digest() == hashlib.sha256(up).digest()
    )
    (tmp_path / "down.bin").write_bytes(down)
    with (tmp_path / "down.bin").open("rb") as source:
        server = start(host, vm, ["ncat", "--vsock", "-l", "6103", "--send-only"], stdin=source)
        wait_listening(host, vm.vm_id)
        client = run(host, None, ["ncat", "--vsock", "--recv-only", str(vm.cid), "6103"])
        assert client.returncode == 0, client.stderr.decode()
        assert finish(server)[0] == 0
    assert hashlib.sha256(client.stdout).digest() == hashlib.sha256(down).digest()
    timed_out = run(host, vm, ["ncat", "--vsock", "2", "6198"], stdin=subprocess.DEVNULL)
    assert b"Connection timed out" in timed_out.stderr, timed_out.stderr


# ---- a stdlib Python program ---------------------------------------------------------------


def stdlib(*args: object) -> list[str]:
    return [PYTHON, str(HERE / "vsock_stdlib.py"), *map(str, args)]


@pytest.mark.parametrize("data_path", ["shm", "relay"])
def test_stdlib_python_vm_client_host_asyncio_server(
    host: HostProcess, vm: Vm, data_path: str
) -> None:
    """Blocking connect + selectors, and asyncio's non-blocking connect, against an asyncio
    server; a TCP echo runs next to them in the same program."""
    port = 6110 if data_path == "shm" else 6111
    env = {"HVSOCK_DATA_PATH": data_path}
    server = start(
        host, None, stdlib("asyncio-echo-server", port, 2), stdout=subprocess.PIPE, env=env
    )
    wait_listening(host, PARENT)
    blocking = run(host, vm, stdlib("client", 2, port, 3 << 20), env=env)
    text = blocking.stdout.decode()
    assert blocking.returncode == 0, text + blocking.stderr.decode()
    assert f"peer (2, {port}) local {0xFFFFFFFF}" in text
    assert "tcp untouched" in text and "sha256 ok" in text
    largest = int(text.split("largest read ")[1].split()[0])
    assert 0 < largest <= 16384  # one delivery is at most one packet's payload
    aio = run(host, vm, stdlib("asyncio-client", 2, port, 1 << 20), env=env)
    assert aio.returncode == 0 and b"sha256 ok" in aio.stdout, aio.stdout + aio.stderr
    status, out, _ = finish(server)
    assert status == 0
    assert out.count(b"accepted (") == 2  # the peer as (CID, port): the VM's CID
    assert f"accepted ({vm.cid}, ".encode() in out


def test_stdlib_python_vm_server_host_client(host: HostProcess, vm: Vm) -> None:
    server = start(host, vm, stdlib("echo-server", 6112, 1), stdout=subprocess.PIPE)
    wait_listening(host, vm.vm_id)
    client = run(host, None, stdlib("client", vm.cid, 6112, 1 << 20))
    text = client.stdout.decode()
    assert client.returncode == 0, text + client.stderr.decode()
    assert f"peer ({vm.cid}, 6112) local 2" in text
    status, out, _ = finish(server)
    assert status == 0 and b"accepted (2, " in out


def test_stdlib_python_descriptor_survives_exec(host: HostProcess, vm: Vm) -> None:
    """A connected vsock descriptor inherited across exec is still recognised (by its name)."""
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    listener = _echo_service(root, 6113)
    try:
        done = run(host, vm, stdlib("exec", 2, 6113))
        assert done.returncode == 0, done.stdout + done.stderr
        assert b"inherited True (2, 6113)" in done.stdout and b"echo after exec" in done.stdout
    finally:
        listener.close()
        root.close()


# ---- a C program -----------------------------------------------------------------------------


def _echo_service(partition: hv.Partition, port: int) -> hv.HvSocket:
    listener = partition.socket()
    listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(port)))
    listener.listen()

    def echo(conn: hv.HvSocket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(hv.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.skipif(GCC is None, reason="needs gcc")
def test_c_program(host: HostProcess, vm: Vm, tmp_path: pathlib.Path) -> None:
    """Non-blocking connect + poll, SO_ERROR, getsockname/getpeername, epoll edge-triggered
    reads, dup/F_DUPFD, fork after connect, half-close, SO_VM_SOCKETS_CONNECT_TIMEOUT,
    ENETUNREACH, a TCP socket beside, listen + accept4(SOCK_NONBLOCK|SOCK_CLOEXEC)."""
    binary = tmp_path / "vsock_prog"
    subprocess.run(
        [str(GCC), "-Wall", "-Werror", "-O2", "-o", str(binary), str(HERE / "vsock_prog.c")],
        check=True,
    )
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    listener = _echo_service(root, 6120)
    try:
        proc = start(host, vm, [str(binary), "6120", "6121", "6199"], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        lines = []
        for raw in proc.stdout:
            line = raw.decode().strip()
            lines.append(line)
            if line.startswith("LISTENING"):
                conn = root.socket()
                conn.connect((vm.vm_id, hv.service_id_for_port(6121)))
                conn.sendall(b"hello")
                assert conn.recv(5) == b"olleh"
                assert conn.recv(5) == b""
                conn.close()
        proc.stdout.close()
        assert proc.wait(30) == 0, lines
        assert lines[-1] == "DONE", lines
        for check in (
            "nonblocking-connect",
            "epoll-edge-triggered",
            "dup",
            "fork",
            "connect-timeout",
            "enetunreach",
            "tcp-untouched",
            "accept4",
        ):
            assert f"ok {check}" in lines, lines
    finally:
        listener.close()
        root.close()


# ---- hv_sock semantics ---------------------------------------------------------------------


def test_rescind_reads_what_is_left_then_eof_then_epipe(host: HostProcess, vm: Vm) -> None:
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    try:
        listener = root.socket()
        listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(6130)))
        listener.listen()
        proc = start(host, vm, stdlib("rescind", 2, 6130), stdout=subprocess.PIPE)
        conn, _ = listener.accept()
        conn.sendall(b"r" * 100_000)
        channel, admin = host.admin()
        with channel:
            admin.RescindChannel(
                hvsock_pb2.RescindChannelRequest(channel_id=conn.channel_id, reason="test"),
                metadata=host.metadata,
                timeout=10,
            )
        status, out, _ = finish(proc)
        assert status == 0, out
        assert b"read 100000 then EOF" in out and b"send EPIPE" in out
        conn.close()
        listener.close()
    finally:
        root.close()


def test_backpressure_when_the_peer_does_not_read(host: HostProcess, vm: Vm) -> None:
    """A writer whose peer does not read gets EAGAIN after about a ring's worth (default
    rings: a few KiB, plus the Unix connection's buffer), and nothing is lost."""
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    try:
        listener = root.socket()
        listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(6131)))
        listener.listen()
        proc = start(
            host,
            vm,
            stdlib("backpressure", 2, 6131),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        conn, _ = listener.accept()
        line = proc.stdout.readline().decode()
        assert line.startswith("blocked after"), line
        in_flight = int(line.split()[-1])
        assert 0 < in_flight < 128 * 1024, in_flight
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        total = 0
        while data := conn.recv(65536):
            total += len(data)
        conn.close()
        status, out, _ = finish(proc)
        assert status == 0, out
        assert total == in_flight + 1
        listener.close()
    finally:
        root.close()


def test_exit_status_passes_through_and_the_companion_goes(host: HostProcess, vm: Vm) -> None:
    assert run(host, vm, ["sh", "-c", "exit 7"]).returncode == 7
    missing = run(host, vm, ["/nonexistent/program"])
    assert missing.returncode == 127 and b"/nonexistent/program" in missing.stderr
    killed = run(host, vm, ["sh", "-c", "kill -TERM $$"])
    assert killed.returncode == 128 + 15
    # Started for these programs and used by nothing else: the companion has stopped.
    args = argparse.Namespace(
        host=host.target, vm=vm.vm_id, token=vm.token, host_partition=False, host_token=None
    )
    _, key, _ = companion_environment(args)
    name = f"@hvsock-run/{key}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/net/unix") as table:
            if not any(line.split()[-1] == name for line in table if len(line.split()) >= 8):
                return
        time.sleep(0.05)  # it stops on its own, a moment after its last user
    raise AssertionError(f"the companion {name} is still running")


# ---- the companion's connect requests, spoken by hand ---------------------------------------


def _ask_on_data(name: str, ident: str, line: bytes) -> bytes:
    """A blocking connect as the shim makes it: the data socket (bound to ``ident``, or
    unnamed when empty) connects to ``@<name>/connect`` and sends ``line``; everything it
    receives until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as data:
        if ident:
            data.bind(f"\0{ident}")
        data.connect(f"\0{name}/connect")
        data.sendall(line)
        data.shutdown(socket.SHUT_WR)  # the program closes: the relay ends after the reply
        got = b""
        while chunk := data.recv(4096):
            got += chunk
        return got


def test_companion_blocking_connect_requests(host: HostProcess, vm: Vm) -> None:
    """The reply line, then the channel's data at once on the same connection; bad requests
    get ``ERR <errno>`` and the connection's end; strangers are refused."""
    name = f"hvsock-test/{os.getpid()}/companion"
    env = environment(HVSOCK_HOST=host.target, HVSOCK_VM_ID=vm.vm_id, HVSOCK_TOKEN=vm.token)
    companion = subprocess.Popen(
        [sys.executable, "-m", "hvsock_tools.vsock_companion", "--name", name],
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    _started.append(companion)
    assert companion.stdout is not None
    assert companion.stdout.readline().startswith(b"ready")
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(6140)))
    listener.listen()

    def greet() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"hello")  # right behind the reply: nothing may be lost or mixed
            conn.shutdown(hv.SHUT_WR)

    greeter = threading.Thread(target=greet)
    greeter.start()
    try:
        got = _ask_on_data(name, f"{name}/s/t.1", b"CONNECT 2 6140 4294967295 2000 0 0\n")
        greeter.join(10)
        line, _, rest = got.partition(b"\n")
        assert line.split()[0] == b"OK" and line.split()[3:] == [b"2", b"6140"], got
        assert rest == b"hello"
        refused = _ask_on_data(name, f"{name}/s/t.2", b"CONNECT 2 6141 4294967295 2000 0 0\n")
        assert refused.startswith(b"ERR %d " % errno.ETIMEDOUT), refused  # linux personality
        unreachable = _ask_on_data(name, f"{name}/s/t.3", b"CONNECT 7 6140 4294967295 2000 0 0\n")
        assert unreachable.startswith(b"ERR %d " % errno.ENETUNREACH), unreachable
        for bad in (b"CONNECT 2 6140\n", b"CONNECT 2 x 1 2 3 4\n", b"HELLO\n", b"x" * 2000):
            answer = _ask_on_data(name, f"{name}/s/t.4", bad)
            assert answer.startswith(b"ERR %d bad request" % errno.EINVAL), (bad, answer)
        for stranger in ("", "elsewhere/s/1"):  # unnamed, or not one of this companion's
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                _ask_on_data(name, stranger, b"CONNECT 2 6140 4294967295 2000 0 0\n")
    finally:
        listener.close()
        root.close()
