"""The programs of the docker-compose testbed (``docker-compose.yml``).

    python -m hvsock_tools.testbed host     # the host program
    python -m hvsock_tools.testbed vm       # a VM's workload
    python -m hvsock_tools.testbed echo --to host|VM_ID|vms [--bytes N]
    python -m hvsock_tools.testbed stream --to host|VM_ID [--seconds S]

Every program attaches from its environment (``guest_client.attach_from_env``): a VM container
sets ``HVSOCK_VM_IDENTITY`` (the VM is created on first attach and keeps its id and token in that
file), ``HVSOCK_PERSONALITY`` and ``HVSOCK_HOST``; the host program sets ``HVSOCK_HOST_TOKEN``.

- ``host`` listens on the host's echo service (vsock port 7001), and echoes ``--bytes`` with
  every VM that is attached and listening on the VM echo service (each VM once per attachment;
  again after the VM or the host service restarts; a VM listening on other services only is
  skipped). It logs one line per echo and, once the VMs it knows are done, a
  summary table per VM: both directions, bytes, MB/s, the VM end's data path.
- ``vm`` listens on the VM's echo service (port 7002) and echoes ``--bytes`` with the host
  once per attachment (again after the host service restarts).
- ``echo`` and ``stream`` are one-shot checks for people and the container tests: ``echo``
  exits 0 when every echo matched; ``stream`` sends until the connection fails or ``--seconds``
  pass, then reports when and how it failed.

Each echo is checked with SHA-256 and also printed as ``RESULT {json}`` for scripts.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import grpc

import guest_client as hv
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.conventions import TOKEN_METADATA

from .demo import CHUNK, HOST_ECHO_PORT, VM_ECHO_PORT, WINDOW, echo_client, serve_echo

HOST_ECHO = hv.service_id_for_port(HOST_ECHO_PORT)
VM_ECHO = hv.service_id_for_port(VM_ECHO_PORT)
PATH_NAMES = {"shm": "shared memory", "relay": "gRPC relay", None: "?"}
#: Errors worth retrying while the other side's echo service is not up yet.
NOT_YET = (ConnectionRefusedError, TimeoutError, ConnectionResetError)
POLL = 1.0  # seconds between the host program's looks at the VM list


_OUTPUT = threading.Lock()


def _say(text: str) -> None:
    """Print whole lines: echoes run in threads, and print() writes the text and its newline
    separately, so lines could interleave and break the RESULT lines scripts parse."""
    with _OUTPUT:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Stopper:
    """A clean stop on SIGTERM (``docker stop``, ``docker compose down``) and SIGINT.

    These programs run as PID 1 in their containers, and the kernel gives PID 1 no default
    action for SIGTERM: without a handler ``docker stop`` waits its 10 s and kills the
    program, and the host rescinds its channels as for a crash. Here the first signal
    closes every socket of the program's partitions (the peers read EOF, as from a socket
    closed by its program), detaches them, and exits 0 at once, wherever the workload's
    threads are: everything they hold on the host's side has been given back by then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: list[hv.Partition] = []
        self._stopping = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def add(self, partition: hv.Partition) -> hv.Partition:
        with self._lock:
            stopping = self._stopping
            self._partitions.append(partition)
        if stopping:  # attached while the stop was under way: give it back too
            partition.shutdown()
        return partition

    def park_if_stopping(self) -> None:
        """Called by a workload loop whose sockets just failed: if that is the stop closing
        them, wait here for the exit rather than take it for a lost host (and attach again, or
        fail on the closed partition and exit non-zero first)."""
        with self._lock:
            stopping = self._stopping
        if stopping:
            threading.Event().wait()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The handler runs in the main thread between two bytecodes, possibly inside a lock
        # the closing needs (a socket's, the output's): the stop runs in a thread of its own.
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        threading.Thread(target=self._stop, args=(signum,), name="stop", daemon=True).start()

    def _stop(self, signum: int) -> None:
        with self._lock:
            partitions = list(self._partitions)
        for partition in partitions:
            partition.shutdown()
        # Whole lines only: a RESULT line half written by a workload thread would break the
        # scripts that parse the log. Bounded, so that a stuck writer cannot hold the exit.
        held = _OUTPUT.acquire(timeout=1.0)
        try:
            sys.stdout.write(f"stopped ({signal.Signals(signum).name})\n")
            sys.stdout.flush()
        finally:
            if held:
                _OUTPUT.release()
        # Not sys.exit: the workload's threads may be blocked anywhere (an accept, a grpc
        # call); nothing of theirs is left to clean up on the host's side.
        os._exit(0)


_STOPPER = _Stopper()


def _emit(line: str, record: dict[str, Any]) -> None:
    record["at"] = time.time()  # wall clock: scripts compare it across containers
    _say(line + "\nRESULT " + json.dumps(record, sort_keys=True))


def _mb_per_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0


def _describe(record: dict[str, Any]) -> str:
    if not record.get("connected"):
        return f"not connected: {record.get('error')}"
    verdict = "sha256 ok" if record.get("ok") else f"FAILED {record.get('error', 'mismatch')}"
    paths = f"VM end {PATH_NAMES[record.get('data_path')]}"
    if "host_data_path" in record:
        paths += f", host end {PATH_NAMES[record['host_data_path']]}"
    return f"connected, {record['bytes']} bytes, {record['mb_per_s']} MB/s, {paths}, {verdict}"


class Admin:
    """The admin API, for the host program's view of VMs and channels."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = hvsock_pb2_grpc.AdminServiceStub(self._channel)
        self._metadata = ((TOKEN_METADATA, hv.find_token(None) or ""),)

    def partitions(self) -> list[hvsock_pb2.Partition]:
        answer = self._stub.ListPartitions(
            hvsock_pb2.ListPartitionsRequest(), metadata=self._metadata, timeout=5
        )
        return list(answer.partitions)

    def end_paths(self, vm_id: str, channel_id: int | None) -> tuple[str | None, str | None]:
        """(VM end, host end) data paths of one channel between the host and ``vm_id``."""
        answer = self._stub.ListChannels(
            hvsock_pb2.ListChannelsRequest(vm_id=vm_id), metadata=self._metadata, timeout=5
        )
        for channel in answer.channels:
            if channel.channel_id == channel_id:
                connector = hv.DATA_PATH_NAMES.get(channel.connector_data_path)
                listener = hv.DATA_PATH_NAMES.get(channel.listener_data_path)
                if channel.connector.vm_id == vm_id:
                    return connector, listener
                return listener, connector
        return None, None

    def close(self) -> None:
        self._channel.close()


def _echo_until_up(
    partition: hv.Partition, address: tuple[str, str], nbytes: int, wait: float, **kw: Any
) -> dict[str, Any]:
    """``echo_client``, retried while the other side is not listening yet (up to ``wait`` s)."""
    deadline = time.monotonic() + wait
    pause = threading.Event()
    while True:
        result = echo_client(partition, address, nbytes, **kw)
        retry = not result["connected"] and result.get("errno") in (
            "ECONNREFUSED",
            "ETIMEDOUT",
            "ECONNRESET",
        )
        if not retry or time.monotonic() >= deadline:
            return result
        pause.wait(0.5)


# ---- the host program --------------------------------------------------------------------------


class HostProgram:
    def __init__(self, partition: hv.Partition, admin: Admin, nbytes: int) -> None:
        self.partition = partition
        self.admin = admin
        self.nbytes = nbytes
        self.lock = threading.Lock()
        #: vm_id -> {"name", "personality", "host->vm": record, "vm->host": record}
        self.table: dict[str, dict[str, Any]] = {}
        self.in_flight = 0
        self.dirty = False

    def run(self) -> None:
        while True:
            self.partition.wait_attached()
            listener = self.partition.socket()
            try:
                listener.bind((hv.HV_GUID_WILDCARD, HOST_ECHO))
                listener.listen(64)
            except OSError as exc:
                _STOPPER.park_if_stopping()
                if not isinstance(exc, ConnectionResetError):
                    raise
                continue  # lost the host again before listening: wait for the next attach
            _say(f"host program: echo service {HOST_ECHO} listening")
            accepting = serve_echo(listener, self._echoed_back)
            self._watch_vms(accepting)
            listener.close()
            _STOPPER.park_if_stopping()
            _say("host program: lost the host service; attaching again")

    def _watch_vms(self, accepting: threading.Thread) -> None:
        """Echo with each VM once per attachment while the host service stays up."""
        done: set[str] = set()
        idle = threading.Event()
        while accepting.is_alive():
            try:
                partitions = self.admin.partitions()
            except grpc.RpcError:
                return
            attached = {p.vm_id for p in partitions if p.attached}
            done &= attached  # a VM that detached is echoed with again when it is back
            for p in partitions:
                running = p.state == hvsock_pb2.PARTITION_STATE_RUNNING
                ready = running and p.attached and p.listener_count > 0
                if p.host or not ready or p.vm_id in done:
                    continue
                done.add(p.vm_id)
                with self.lock:
                    self.in_flight += 1
                threading.Thread(target=self._echo_with, args=(p,), daemon=True).start()
            self._print_table_when_quiet()
            idle.wait(POLL)

    def _echo_with(self, vm: hvsock_pb2.Partition) -> None:
        paths: dict[str, str | None] = {}

        def note_paths(sock: Any) -> None:
            paths["data_path"], paths["host_data_path"] = self.admin.end_paths(
                vm.vm_id, sock.channel_id
            )

        try:
            result = echo_client(
                self.partition, (vm.vm_id, VM_ECHO), self.nbytes, on_connected=note_paths
            )
        except grpc.RpcError as exc:  # the admin API went away mid-echo
            result = {"connected": True, "ok": False, "bytes": 0, "seconds": 0.0}
            result["error"] = f"admin API: {exc.code().name}"
        if result["connected"]:
            record = self._record(vm, "host->vm", result, **paths)
            _emit(f"host -> {record['vm_name']} ({vm.vm_id}): {_describe(record)}", record)
        else:  # it listens, but not on the echo service: not a testbed VM (vm-web, yours)
            _say(f"host program: {vm.name} ({vm.vm_id}) runs no echo service")
        with self.lock:
            self.in_flight -= 1

    def _echoed_back(self, conn: Any, peer: tuple[str, str], nbytes: int, seconds: float) -> None:
        vm_id = peer[0]
        vms = {p.vm_id: p for p in self.admin.partitions()}
        if vm_id not in vms:
            return
        result = {"connected": True, "ok": True, "bytes": nbytes, "seconds": seconds}
        self._record(vms[vm_id], "vm->host", result, host_data_path=conn.data_path)

    def _record(
        self, vm: hvsock_pb2.Partition, direction: str, result: dict[str, Any], **paths: Any
    ) -> dict[str, Any]:
        record = {
            "role": "host",
            "direction": direction,
            "vm_id": vm.vm_id,
            "vm_name": vm.name,
            "personality": hvsock_pb2.Personality.Name(vm.personality)
            .removeprefix("PERSONALITY_")
            .lower(),
            "mb_per_s": _mb_per_s(result.get("bytes", 0), result.get("seconds", 0.0)),
            **result,
            **paths,
        }
        with self.lock:
            entry = self.table.setdefault(vm.vm_id, {})
            entry.update(name=record["vm_name"], personality=record["personality"])
            entry[direction] = record
            if direction == "vm->host" and "host->vm" in entry:
                record.setdefault("data_path", entry["host->vm"].get("data_path"))
            self.dirty = True
        return record

    def _print_table_when_quiet(self) -> None:
        with self.lock:
            if not self.dirty or self.in_flight:
                return
            self.dirty = False
            rows = sorted(self.table.items(), key=lambda item: item[1]["name"])
        _say(summary_table(rows))


def summary_table(rows: Iterable[tuple[str, dict[str, Any]]]) -> str:
    def cell(record: dict[str, Any] | None) -> str:
        if record is None:
            return "-"
        if not record.get("ok"):
            return "FAILED"
        return f"{record['bytes'] / 2**20:.1f} MiB {record['mb_per_s']:.0f} MB/s"

    header = f"{'VM':<26} {'id':<9} {'pers.':<8} {'VM end path':<14} {'host->VM':<22} VM->host"
    lines = ["testbed summary (host program)", header]
    for vm_id, entry in rows:
        out = entry.get("host->vm")
        path = PATH_NAMES[out.get("data_path")] if out else "?"
        lines.append(
            f"{entry['name'][:26]:<26} {vm_id[:8]:<9} {entry['personality']:<8} {path:<14} "
            f"{cell(out):<22} {cell(entry.get('vm->host'))}"
        )
    return "\n".join(lines)


def host_main(args: argparse.Namespace) -> int:
    partition = _STOPPER.add(hv.attach_host())
    _say(f"host program attached to {partition.target}")
    HostProgram(partition, Admin(partition.target), args.bytes).run()
    return 0


# ---- the VM program ----------------------------------------------------------------------------


def vm_main(args: argparse.Namespace) -> int:
    # A VM created on this attach is named PREFIX-HOSTNAME (a container's hostname is its id),
    # so that scaled replicas tell apart; HVSOCK_VM_NAME overrides it.  Cut to the host's 64
    # characters: a machine's hostname may be that long by itself (a container's is 12).
    name = os.environ.get("HVSOCK_VM_NAME") or f"{args.name_prefix}-{socket.gethostname()}"[:64]
    vm = _STOPPER.add(hv.attach(name=name))
    _say(f"VM {vm.name} ({vm.vm_id}, {vm.personality}) attached to {vm.target}")
    while True:
        vm.wait_attached()
        listener = vm.socket()
        try:
            listener.bind((hv.HV_GUID_WILDCARD, VM_ECHO))
            listener.listen(64)
        except OSError as exc:
            _STOPPER.park_if_stopping()
            if not isinstance(exc, ConnectionResetError):
                raise
            continue
        accepting = serve_echo(listener)
        _vm_echo_with_host(vm, args.bytes, args.wait)
        accepting.join()  # the accept loop ends when the host service goes away
        listener.close()
        _STOPPER.park_if_stopping()
        _say(f"VM {vm.name}: lost the host service; attaching again")


def _vm_echo_with_host(vm: hv.Partition, nbytes: int, wait: float) -> bool:
    paths: dict[str, str | None] = {}
    result = _echo_until_up(
        vm,
        (hv.HV_GUID_PARENT, HOST_ECHO),
        nbytes,
        wait,
        on_connected=lambda sock: paths.update(data_path=sock.data_path),
    )
    record = {
        "role": "vm",
        "direction": "vm->host",
        "vm_id": vm.vm_id,
        "vm_name": vm.name,
        "personality": vm.personality,
        "mb_per_s": _mb_per_s(result.get("bytes", 0), result.get("seconds", 0.0)),
        **result,
        **paths,
    }
    _emit(f"VM {vm.name} ({vm.vm_id}) -> host: {_describe(record)}", record)
    return bool(result["ok"])


# ---- one-shot checks ---------------------------------------------------------------------------


def _targets(partition: hv.Partition, to: str) -> list[tuple[str, str]]:
    """(vm_id, name) pairs that ``--to`` names."""
    if to == "host":
        return [(hv.HV_GUID_PARENT.lower(), "host")]
    if to != "vms":
        return [(to, to)]
    admin = Admin(partition.target)
    try:
        return [
            (p.vm_id, p.name)
            for p in admin.partitions()
            if not p.host and p.attached and p.listener_count > 0
        ]
    finally:
        admin.close()


def echo_main(args: argparse.Namespace) -> int:
    partition = _STOPPER.add(hv.attach_from_env())
    ok = True
    for vm_id, name in _targets(partition, args.to):
        service = HOST_ECHO if name == "host" else VM_ECHO
        paths: dict[str, str | None] = {}

        def note_path(sock: Any, paths: dict[str, str | None] = paths) -> None:
            paths["local_data_path"] = sock.data_path

        result = echo_client(partition, (vm_id, service), args.bytes, on_connected=note_path)
        record = {
            "role": "check",
            "from": partition.vm_id,
            "to": vm_id,
            "mb_per_s": _mb_per_s(result.get("bytes", 0), result.get("seconds", 0.0)),
            **result,
            **paths,
        }
        verdict = "sha256 ok" if result["ok"] else f"FAILED {result.get('error', 'mismatch')}"
        _emit(f"echo {partition.vm_id} -> {name}: {verdict}", record)
        ok = ok and bool(result["ok"])
    return 0 if ok else 1


def stream_main(args: argparse.Namespace) -> int:
    """Send and read back echoes until the connection fails; report how and when (wall clock,
    so that a test can compare it with the moment it killed the other side)."""
    partition = _STOPPER.add(hv.attach_from_env())
    service = HOST_ECHO if args.to == "host" else VM_ECHO
    target = hv.HV_GUID_PARENT if args.to == "host" else args.to
    record: dict[str, Any] = {"role": "stream", "to": target, "bytes": 0}
    chunk = os.urandom(CHUNK)
    buf = bytearray(CHUNK)
    sent = received = 0
    sock = partition.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * WINDOW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * WINDOW)
    try:
        sock.connect((target, service))
        _say(f"STREAMING to {target} over {PATH_NAMES[sock.data_path]}")
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            if sent - received + CHUNK <= WINDOW:
                sock.sendall(chunk)
                sent += CHUNK
                continue
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionResetError(errno.ECONNRESET, "EOF from the peer mid-stream")
            received += n
        record["error"] = None
    except OSError as exc:
        record.update(
            failed_at=time.time(),
            error=f"{type(exc).__name__}: {exc}",
            errno=errno.errorcode.get(exc.errno or 0, ""),
        )
    finally:
        sock.close()
        partition.close()
    record["bytes"] = received
    _say("RESULT " + json.dumps(record, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvsock_tools.testbed", description=__doc__)
    parser.add_argument("--bytes", type=int, default=32 * 2**20, help="bytes per echo")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("host", help="the host program")
    vm = commands.add_parser("vm", help="a VM's workload")
    vm.add_argument("--wait", type=float, default=120, help="seconds to wait for the host echo")
    vm.add_argument("--name-prefix", default="vm", help="name of a VM created on attach")
    echo = commands.add_parser("echo", help="echo once with the host, a VM, or every VM")
    echo.add_argument("--to", required=True, help="host, a VM id, or vms (every VM)")
    stream = commands.add_parser("stream", help="stream echoes until the connection fails")
    stream.add_argument("--to", required=True, help="host or a VM id")
    stream.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args(argv)
    run = {"host": host_main, "vm": vm_main, "echo": echo_main, "stream": stream_main}
    _STOPPER.install()
    return run[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
