"""``make demo``: a host service, two VMs in their own processes, echoes across both data paths.

    .venv/bin/python -m hvsock_tools.demo [--bytes N]

What it does, in order:

1. starts a private ``hvsock-host`` (its own Unix socket, token and shared-memory directory);
2. creates two VMs with the admin API, ``vm-shm`` and ``vm-relay``;
3. the host program (this process) attaches the host partition and listens on an echo
   service; each VM runs in its own process (``python -m hvsock_tools.demo --vm``) and finds
   the host from the environment, exactly as a program inside a VM container would
   (``HVSOCK_HOST``, ``HVSOCK_VM_ID``, ``HVSOCK_TOKEN``; ``vm-relay`` also has
   ``HVSOCK_DATA_PATH=relay``, which forces the gRPC relay instead of shared memory);
4. each VM listens on its own echo service; the host connects to each VM's echo and each VM
   connects to the host's echo, sends ``--bytes`` bytes and checks the echo with SHA-256;
5. prints one line per VM and direction (connected, bytes, throughput, data path), stops
   everything and removes the shared-memory directory. Exit status 0 when every echo matched.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

import guest_client as hv
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common import grpc_io
from hvsock_common.conventions import TOKEN_METADATA, new_token

HOST_ECHO_PORT = 7001  # the host's echo service (a vsock-template service id)
VM_ECHO_PORT = 7002  # each VM's echo service
BUFFER = 256 * 1024  # SO_SNDBUF/SO_RCVBUF asked for: 64-page rings (default rings are small)
CHUNK = 64 * 1024


# ---- a private host service ----------------------------------------------------------------


def _callers_environment() -> dict[str, str]:
    """The caller's environment without its hvsock settings, but with its gRPC I/O choice,
    which is the whole process tree's (``hvsock_common.grpc_io``)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HVSOCK_") or k == grpc_io.ENV}


@dataclass
class LocalHost:
    """An ``hvsock-host`` child process with its own socket and token."""

    proc: subprocess.Popen[bytes]
    target: str
    token: str
    workdir: pathlib.Path
    log_path: pathlib.Path

    def admin(self) -> tuple[grpc.Channel, hvsock_pb2_grpc.AdminServiceStub]:
        channel = grpc.insecure_channel(self.target)
        return channel, hvsock_pb2_grpc.AdminServiceStub(channel)

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return ((TOKEN_METADATA, self.token),)

    def create_vm(self, name: str) -> tuple[str, str]:
        """Create a VM; returns (vm_id, token)."""
        channel, admin = self.admin()
        with channel:
            created = admin.CreatePartition(
                hvsock_pb2.CreatePartitionRequest(name=name),
                metadata=self.metadata,
                timeout=10,
            )
        return created.partition.vm_id, created.token

    def partition(self, *, vm: tuple[str, str] | None = None, data_path: str = "auto") -> Any:
        hello = (
            hvsock_pb2.Hello(vm_id=vm[0], token=vm[1])
            if vm is not None
            else hvsock_pb2.Hello(host=True, token=self.token)
        )
        return hv.Partition(self.target, hello, data_path=data_path)

    def env(self, vm: tuple[str, str], data_path: str = "auto") -> dict[str, str]:
        """The environment a program in that VM would be given."""
        env = _callers_environment()
        env.update(
            HVSOCK_HOST=self.target,
            HVSOCK_VM_ID=vm[0],
            HVSOCK_TOKEN=vm[1],
            HVSOCK_DATA_PATH=data_path,
        )
        return env


def _accepts_connections(path: pathlib.Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:  # not there yet, or not listening yet
            return False
    return True


@contextlib.contextmanager
def local_host(
    *extra: str, prefix: str = "hvsock-demo", log_level: str = "INFO"
) -> Iterator[LocalHost]:
    """Start ``hvsock-host`` on a private Unix socket (and 127.0.0.1:0); stop it and remove its
    temporary files on exit, whatever happened."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    sock = workdir / "host.sock"
    token = new_token(16)
    log_path = workdir / "host.log"
    binary = pathlib.Path(sys.executable).parent / "hvsock-host"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "host_service"]
    env = _callers_environment()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    *command,
                    "--listen",
                    "127.0.0.1:0",
                    "--unix",
                    str(sock),
                    f"--host-token={token}",
                    "--state",
                    str(workdir / "state.sqlite"),
                    "--log-level",
                    log_level,
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + 30
        # Ready once its Unix socket takes a connection (whatever the log level lets it say).
        while not _accepts_connections(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hvsock-host did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        yield LocalHost(proc, f"unix:{sock}", token, workdir, log_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# ---- echo: a server and a checked client -----------------------------------------------------


def _ask_for_big_rings(sock: Any) -> None:
    """Larger rings are asked for as on Linux: SO_SNDBUF/SO_RCVBUF before connect."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)


def _echo_connection(conn: Any) -> int:
    """Echo until EOF, then half-close; the number of bytes echoed."""
    echoed = 0
    with conn:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := conn.recv_into(buf):
            conn.sendall(view[:n])
            echoed += n
        conn.shutdown(hv.SHUT_WR)
    return echoed


EchoDone = Callable[[Any, tuple[str, str], int, float], None]


def serve_echo(
    listener: Any,
    on_done: EchoDone | None = None,
    *,
    on_start: Callable[[Any, tuple[str, str]], None] | None = None,
    on_end: Callable[[Any, tuple[str, str]], None] | None = None,
) -> threading.Thread:
    """Accept until the listener closes; echo each connection in its own thread, then call
    ``on_done(conn, peer, bytes echoed, seconds)`` (not for connections that failed).
    ``on_start(conn, peer)`` and ``on_end(conn, peer)`` bracket every echo, failed or not
    (a caller counting echoes in flight)."""

    def echo(conn: Any, peer: tuple[str, str]) -> None:
        start = time.perf_counter()
        if on_start is not None:
            on_start(conn, peer)
        try:
            try:
                echoed = _echo_connection(conn)
            except OSError:
                return
            if on_done is not None:
                on_done(conn, peer, echoed, time.perf_counter() - start)
        finally:
            if on_end is not None:
                on_end(conn, peer)

    def loop() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn, peer), daemon=True).start()

    thread = threading.Thread(target=loop, name="echo-accept", daemon=True)
    thread.start()
    return thread


def echo_client(
    partition: Any,
    address: tuple[str, str],
    nbytes: int,
    on_connected: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Connect, send ``nbytes`` of random data, read the echo back; a result dict
    (``on_connected(sock)`` runs once the connection is up, before any data).

    Full duplex, as a program measuring a stream would be: a thread sends while this one
    reads, so the echo server's sends always drain and what is in flight is bounded only by
    the connection's own flow control (the rings, and a relayed end's window).
    """
    result: dict[str, Any] = {"connected": False, "bytes": 0, "seconds": 0.0, "ok": False}
    pattern = os.urandom(CHUNK + 251)
    sent_hash = hashlib.sha256()
    got_hash = hashlib.sha256()
    received = 0
    start = time.perf_counter()

    def send_all(sock: Any) -> None:
        sent = 0
        try:
            while sent < nbytes:
                offset = sent % 251  # vary the content from chunk to chunk
                piece = memoryview(pattern)[offset : offset + min(CHUNK, nbytes - sent)]
                sock.sendall(piece)
                sent_hash.update(piece)
                sent += len(piece)
            sock.shutdown(hv.SHUT_WR)
        except OSError:
            pass  # the reader sees the connection end and says how

    try:
        sock = partition.socket()
        _ask_for_big_rings(sock)
        sock.settimeout(30)
        with sock:
            sock.connect(address)
            result["connected"] = True
            if on_connected is not None:
                on_connected(sock)
            buf = bytearray(CHUNK)
            start = time.perf_counter()
            sender = threading.Thread(target=send_all, args=(sock,), name="echo-send")
            sender.start()
            try:
                while n := sock.recv_into(buf):
                    got_hash.update(memoryview(buf)[:n])
                    received += n
            finally:
                # A reset or rescind fails the sender's sendall too; a peer that closed early
                # (EPIPE there) is told by the short count below, as a truncated echo.
                sender.join()
    except OSError as exc:
        # After the connect, say how far the echo got: "reset after 3 MiB" is a different
        # story from "refused".
        after = f" after {received} of {nbytes} bytes" if result["connected"] else ""
        result["error"] = f"{type(exc).__name__}: {exc}{after}"
        result["errno"] = errno.errorcode.get(exc.errno or 0, "")
        result.update(bytes=received, seconds=time.perf_counter() - start)
        return result
    result.update(bytes=received, seconds=time.perf_counter() - start)
    if received < nbytes:
        # The peer ended the stream early (it died, or its channel was rescinded): that is a
        # truncated echo, not a corrupted one.
        result["truncated"] = True
        result["error"] = f"truncated: {received} of {nbytes} bytes came back"
    elif got_hash.digest() != sent_hash.digest():
        result["error"] = "sha256 mismatch: the echo differs from what was sent"
    else:
        result["ok"] = True
    return result


def _path_name(partition: Any) -> str:
    return "shared memory" if getattr(partition, "shm", False) else "gRPC relay"


# ---- the VM program ----------------------------------------------------------------------------


def vm_main(nbytes: int) -> int:
    """Runs inside a 'VM': attach from the environment, serve echo, echo against the host."""
    with hv.attach() as vm:
        listener = vm.socket()
        listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(VM_ECHO_PORT)))
        listener.listen()
        serve_echo(listener)
        print(json.dumps({"ready": True, "vm_id": vm.vm_id}), flush=True)
        # Wait for the host program's go (one line on stdin), then echo against the host.
        if not sys.stdin.readline():
            return 1
        result = echo_client(
            vm, (hv.HV_GUID_PARENT, hv.service_id_for_port(HOST_ECHO_PORT)), nbytes
        )
        result["data_path"] = _path_name(vm)
        print(json.dumps({"result": result}), flush=True)
        sys.stdin.readline()  # until the host program is done with our echo service
        listener.close()
    return 0


# ---- the host program --------------------------------------------------------------------------


@dataclass
class VmProcess:
    name: str
    forced: str
    vm_id: str = ""
    proc: subprocess.Popen[str] | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_json(proc: subprocess.Popen[str], key: str, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        raise RuntimeError(f"VM process gave no {key!r} line (exit {proc.poll()})")
    message: dict[str, Any] = json.loads(box[0])
    if key not in message:
        raise RuntimeError(f"VM process said {box[0]!r}")
    return message


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def host_main(nbytes: int) -> int:
    vms = [VmProcess("vm-shm", "auto"), VmProcess("vm-relay", "relay")]
    started = time.perf_counter()
    with local_host() as host:
        print(f"hvsock demo: host service at {host.target} (pid {host.proc.pid})", flush=True)
        try:
            with host.partition() as root:
                listener = root.socket()
                listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(HOST_ECHO_PORT)))
                listener.listen()
                serve_echo(listener)
                for vm in vms:
                    creds = host.create_vm(vm.name)
                    vm.vm_id = creds[0]
                    vm.proc = subprocess.Popen(
                        [sys.executable, "-m", "hvsock_tools.demo", "--vm", "--bytes", str(nbytes)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        env=host.env(creds, vm.forced),
                    )
                for vm in vms:
                    assert vm.proc is not None
                    _read_json(vm.proc, "ready", 30)
                    print(
                        f"  {vm.name} attached (vm id {vm.vm_id}, pid {vm.proc.pid},"
                        f" HVSOCK_DATA_PATH={vm.forced})",
                        flush=True,
                    )
                # Both directions for both VMs at once: host -> VM echo here, VM -> host there.
                threads = []
                for vm in vms:
                    assert vm.proc is not None and vm.proc.stdin is not None
                    vm.proc.stdin.write("go\n")
                    vm.proc.stdin.flush()

                    def to_vm(vm: VmProcess = vm) -> None:
                        address = (vm.vm_id, hv.service_id_for_port(VM_ECHO_PORT))
                        vm.results["host -> vm"] = echo_client(root, address, nbytes)

                    thread = threading.Thread(target=to_vm, daemon=True)
                    thread.start()
                    threads.append(thread)
                for thread in threads:
                    thread.join(120)
                for vm in vms:
                    assert vm.proc is not None
                    vm.results["vm -> host"] = _read_json(vm.proc, "result", 120)["result"]
                    # The host end of a channel to the relay VM is on shared memory; the VM
                    # end is what the VM chose, and that decides how the bytes cross.
                    vm.results["host -> vm"]["data_path"] = vm.results["vm -> host"]["data_path"]
                listener.close()
        finally:
            for vm in vms:
                if vm.proc is None:
                    continue
                with contextlib.suppress(OSError):
                    assert vm.proc.stdin is not None
                    vm.proc.stdin.close()
                try:
                    vm.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    vm.proc.kill()
                    vm.proc.wait()
                if vm.proc.stdout is not None:
                    vm.proc.stdout.close()
    ok = _summary(vms, nbytes, time.perf_counter() - started)
    return 0 if ok else 1


def _summary(vms: list[VmProcess], nbytes: int, elapsed: float) -> bool:
    print()
    print(f"{'VM':<10} {'direction':<11} {'connected':<10} {'bytes':>10} {'MB/s':>8}  data path")
    ok = True
    for vm in vms:
        for direction in ("host -> vm", "vm -> host"):
            r = vm.results.get(direction, {})
            good = bool(r.get("ok"))
            ok = ok and good
            rate = r["bytes"] / r["seconds"] / 1e6 if r.get("seconds") else 0.0
            line = (
                f"{vm.name:<10} {direction:<11} {'yes' if r.get('connected') else 'NO':<10}"
                f" {_fmt_bytes(r.get('bytes', 0)):>10} {rate:>8.1f}  {r.get('data_path', '?')}"
            )
            if not good:
                line += f"  FAILED {r.get('error', 'echo mismatch')}"
            print(line)
    verdict = "all echoes verified (SHA-256)" if ok else "SOME ECHOES FAILED"
    print(f"\n{verdict}; {_fmt_bytes(nbytes)} each way per connection; {elapsed:.1f} s; cleaned up")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=32 << 20, help="bytes per echo (32 MiB)")
    parser.add_argument("--vm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bytes <= 0:
        parser.error("--bytes must be positive")
    if args.vm:
        return vm_main(args.bytes)
    return host_main(args.bytes)


if __name__ == "__main__":
    sys.exit(main())
