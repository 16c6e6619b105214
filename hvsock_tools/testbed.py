"""The programs of the docker-compose testbed (``docker-compose.yml``).

    python -m hvsock_tools.testbed host     # the host program
    python -m hvsock_tools.testbed vm       # a VM's workload
    python -m hvsock_tools.testbed echo --to host|VM_ID|vms [--bytes N]
    python -m hvsock_tools.testbed stream --to host|VM_ID [--seconds S]

Every program attaches from its environment (``guest_client.attach_from_env``); the host
program sets ``HVSOCK_HOST_TOKEN``, a VM ``HVSOCK_HOST`` and ``HVSOCK_PERSONALITY``.

Who a VM is. ``vm`` creates its VM on first attach and keeps its id and token in an identity
file, so that the next start attaches as the same VM. With ``--identity-dir`` (or
``HVSOCK_VM_IDENTITY_DIR``, a volume the replicas of one compose service share) the VM is
named ``PREFIX-N``: N is ``HVSOCK_VM_SLOT`` when that is a number (Swarm's ``{{.Task.Slot}}``),
otherwise the lowest number no running replica holds (a ``flock`` on ``PREFIX-N.lock`` in that
directory, held for the program's life), and the identity is ``PREFIX-N.json`` there. A
recreated container, or a replica started again elsewhere, so comes back as the same VM: by
the identity file, or (the file lost, another Swarm node) by its name, which the host lets an
anonymous attach take over while no one is attached as that VM. A name that an *attached* VM
has is refused: ``vm`` says so and exits 2. ``--name`` (``HVSOCK_VM_NAME``) fixes the name;
without an identity directory the name is ``PREFIX-HOSTNAME`` and the identity file
``HVSOCK_VM_IDENTITY``. The identity is also written to ``HVSOCK_VM_IDENTITY`` when that names
another file, for the other programs of the container (``docker compose exec``).

What they do:

- ``host`` listens on the host's echo service (vsock port 7001), and echoes ``--bytes`` with
  every VM that is attached and listening on the VM echo service: those listening when it
  attaches, then each VM whose workload starts listening (the host's lifecycle events: a VM
  started, restarted or recreated, or back after the host service restarted); a VM listening
  on other services only is skipped. It logs one line per echo, and one summary table (a row
  per VM: both directions, bytes, MB/s, the data path of each end) when the echoes it waits
  for are done, and again whenever that table changes.
- ``vm`` listens on the VM's echo service (port 7002) and echoes ``--bytes`` with the host
  once per attachment (again after the host service restarts).
- ``echo`` and ``stream`` are one-shot checks for people and the container tests: ``echo``
  exits 0 when every echo matched (``--to vms`` skips, and names, VMs without an echo
  service); ``stream`` sends until the connection fails or ``--seconds`` pass, then reports
  when and how it failed.

Each echo is checked with SHA-256. Output is for people; with ``--json`` (or
``HVSOCK_TESTBED_JSON=1``) every line is instead one JSON object with a ``kind``: ``echo``
(one echo's result), ``summary`` (the table's rows), ``note`` (anything else), ``stream``.
Exit status 2 is an expected failure (the host refused the attach, a name clash): one line
says why, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import pathlib
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

from .demo import CHUNK, HOST_ECHO_PORT, VM_ECHO_PORT, echo_client, serve_echo

HOST_ECHO = hv.service_id_for_port(HOST_ECHO_PORT)
VM_ECHO = hv.service_id_for_port(VM_ECHO_PORT)
PATH_NAMES = {"shm": "shared memory", "relay": "gRPC relay", None: "?"}
#: Errors worth retrying while the other side's echo service is not up yet.
NOT_YET = (ConnectionRefusedError, TimeoutError, ConnectionResetError)
#: What a connect to a VM's echo service ends in when the VM has none (windows personality:
#: refused at once; linux: no answer, so the connect times out).
NO_SERVICE = ("ECONNREFUSED", "ETIMEDOUT")
POLL = 1.0  # seconds between the host program's looks at the VM list
#: `stream`'s echo bytes in flight: half a 64-page ring, so its sends never wait on its reads.
STREAM_WINDOW = 128 * 1024
#: The host program prints its table once every VM it echoed with has answered both ways, or,
#: when one never does (a VM that died mid-echo, one that echoes later), once nothing changed
#: for this long.
SETTLE = 10.0
#: ... and, complete, once nothing changed for this long (VMs starting together finish close
#: together: one table for them, not one per VM).
QUIET = 2.0
#: Exit status of an expected failure (a refused attach, a taken name): a message, no traceback.
EXIT_REFUSED = 2
#: Slots a VM service's replicas may claim (PREFIX-1 .. PREFIX-MAX_SLOTS).
MAX_SLOTS = 4096


_OUTPUT = threading.Lock()


class _Output:
    """Lines for people, or (``--json``) one JSON object per line for scripts; never both."""

    json = False

    def line(self, text: str, record: dict[str, Any] | None = None) -> None:
        """A line for people; in JSON mode ``record`` (kind "note" with the text if None)."""
        if self.json:
            text = json.dumps(record or {"kind": "note", "text": text}, sort_keys=True)
        _say(text)


OUT = _Output()


def _say(text: str) -> None:
    """Print whole lines: echoes run in threads, and print() writes the text and its newline
    separately, so lines could interleave and break the JSON lines scripts parse."""
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
        # Whole lines only: a JSON line half written by a workload thread would break the
        # scripts that parse the log. Bounded, so that a stuck writer cannot hold the exit.
        name = signal.Signals(signum).name
        text = f"stopped ({name})"
        if OUT.json:
            text = json.dumps({"kind": "note", "text": text, "stopped": name}, sort_keys=True)
        held = _OUTPUT.acquire(timeout=1.0)
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        finally:
            if held:
                _OUTPUT.release()
        # Not sys.exit: the workload's threads may be blocked anywhere (an accept, a grpc
        # call); nothing of theirs is left to clean up on the host's side.
        os._exit(0)


_STOPPER = _Stopper()


class ExpectedFailure(Exception):
    """A failure the program explains in one line and exits ``EXIT_REFUSED`` for."""


def _emit(text: str, record: dict[str, Any]) -> None:
    record["kind"] = "echo"
    record["at"] = time.time()  # wall clock: scripts compare it across containers
    OUT.line(text, record)


def _mb_per_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _describe(record: dict[str, Any]) -> str:
    if not record.get("connected"):
        return f"not connected: {record.get('error')}"
    paths = f"VM end {PATH_NAMES[record.get('data_path')]}"
    if "host_data_path" in record:
        paths += f", host end {PATH_NAMES[record['host_data_path']]}"
    if not record.get("ok"):
        return f"FAILED: {record.get('error')} ({paths})"
    return f"{_mib(record['bytes'])}, {record['mb_per_s']} MB/s, {paths}, sha256 ok"


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

    def watch_listeners(self, service_id: str) -> Any:
        """The ids of VMs as they start listening on ``service_id`` (a cancellable iterator:
        ``.cancel()`` ends it)."""
        stream = self._stub.WatchEvents(hvsock_pb2.WatchEventsRequest(), metadata=self._metadata)

        class Listening:
            def __iter__(self) -> Any:
                for event in stream:
                    if event.kind == "listening" and f", {service_id})" in event.detail:
                        yield event.vm_id

            def cancel(self) -> None:
                stream.cancel()

        return Listening()

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


def _listen_when_attached(partition: hv.Partition, service: str) -> hv.HvSocket:
    """A listener on ``service`` once the partition is attached, attaching again (and waiting)
    as often as the host goes away before the listen is done."""
    while True:
        partition.wait_attached()
        listener: hv.HvSocket = partition.socket()
        try:
            listener.bind((hv.HV_GUID_WILDCARD, service))
            listener.listen(64)
            return listener
        except OSError as exc:
            listener.close()
            _STOPPER.park_if_stopping()
            if not isinstance(exc, ConnectionResetError):
                raise


class HostProgram:
    def __init__(self, partition: hv.Partition, admin: Admin, nbytes: int) -> None:
        self.partition = partition
        self.admin = admin
        self.nbytes = nbytes
        self.lock = threading.Lock()
        #: vm_id -> {"name", "personality", "host->vm": record, "vm->host": record}
        self.table: dict[str, dict[str, Any]] = {}
        self.in_flight = 0
        self.changed_at = 0.0  # monotonic time of the table's last change
        self.printed: list[dict[str, Any]] | None = None  # the rows printed last

    def run(self) -> None:
        while True:
            listener = _listen_when_attached(self.partition, HOST_ECHO)
            OUT.line(f"host program: echo service {HOST_ECHO} listening")
            accepting = serve_echo(
                listener, self._echoed_back, on_start=self._echo_started, on_end=self._echo_ended
            )
            self._watch_vms(accepting)
            listener.close()
            _STOPPER.park_if_stopping()
            OUT.line("host program: lost the host service; attaching again")

    def _watch_vms(self, accepting: threading.Thread) -> None:
        """Echo with each VM once per attachment of its workload while the host service stays
        up: with every VM already listening on the echo service, then with each that starts
        listening on it (a workload attached: a VM started, recreated, or back after the host
        restarted). The host's lifecycle events say when, however fast a VM container comes
        back; one-shot checks (``echo``) in a VM container do not listen, so they are not
        taken for a new attachment. Prints the summary when it settles."""
        events = self.admin.watch_listeners(VM_ECHO)
        threading.Thread(
            target=self._echo_on_events, args=(events,), name="events", daemon=True
        ).start()
        try:
            partitions = self.admin.partitions()
        except grpc.RpcError:
            events.cancel()
            return
        for p in partitions:
            running = p.state == hvsock_pb2.PARTITION_STATE_RUNNING
            if not p.host and running and p.attached and p.listener_count > 0:
                self._start_echo(p.vm_id)
        idle = threading.Event()
        while accepting.is_alive():
            self._print_table_when_settled()
            idle.wait(POLL)
        events.cancel()

    def _echo_on_events(self, events: Any) -> None:
        try:
            for vm_id in events:
                self._start_echo(vm_id)
        except grpc.RpcError:
            return  # cancelled, or the host went away (the program attaches again)

    def _start_echo(self, vm_id: str) -> None:
        with self.lock:
            self.in_flight += 1
        threading.Thread(target=self._echo_with, args=(vm_id,), daemon=True).start()

    def _echo_with(self, vm_id: str) -> None:
        try:
            vm = next(p for p in self.admin.partitions() if p.vm_id == vm_id)
        except (grpc.RpcError, StopIteration):  # the host or the VM went away meanwhile
            vm = None
        if vm is None or vm.host:
            with self.lock:
                self.in_flight -= 1
            return
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
        try:
            if result["connected"]:
                record = self._record(vm, "host->vm", result, **paths)
                _emit(f"host -> {record['vm_name']} ({vm.vm_id}): {_describe(record)}", record)
            elif result.get("errno") in NO_SERVICE:
                # It listens, but not on the echo service: not a testbed VM (vm-web, yours).
                OUT.line(f"host program: {vm.name} ({vm.vm_id}) runs no echo service; skipped")
            else:
                record = self._record(vm, "host->vm", result)
                _emit(f"host -> {vm.name} ({vm.vm_id}): {_describe(record)}", record)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _echo_started(self, conn: Any, peer: tuple[str, str]) -> None:
        with self.lock:
            self.in_flight += 1

    def _echo_ended(self, conn: Any, peer: tuple[str, str]) -> None:
        with self.lock:
            self.in_flight -= 1

    def _echoed_back(self, conn: Any, peer: tuple[str, str], nbytes: int, seconds: float) -> None:
        vm_id = peer[0]
        try:
            vms = {p.vm_id: p for p in self.admin.partitions()}
        except grpc.RpcError:
            return  # the host went away just now; the VM echoes again once it is back
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
            self.changed_at = time.monotonic()
        return record

    def _print_table_when_settled(self) -> None:
        with self.lock:
            if self.in_flight:
                return
            rows = summary_rows(self.table.items())
            if not rows or rows == self.printed:
                return
            complete = all(r["host->vm"] is not None and r["vm->host"] is not None for r in rows)
            quiet_for = time.monotonic() - self.changed_at
            if quiet_for < (QUIET if complete else SETTLE):
                return
            self.printed = rows
        if OUT.json:
            OUT.line("", {"kind": "summary", "at": time.time(), "rows": rows})
        else:
            _say(summary_table(rows))


def summary_rows(entries: Iterable[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per VM, by name: what the summary table shows (and ``--json`` prints)."""

    def cell(record: dict[str, Any] | None) -> dict[str, Any] | None:
        if record is None:
            return None
        out = {"ok": bool(record.get("ok")), "bytes": record.get("bytes", 0)}
        out["mb_per_s"] = record.get("mb_per_s", 0.0)
        if not record.get("ok"):
            out["error"] = record.get("error")
        return out

    rows = []
    for vm_id, entry in entries:
        out, back = entry.get("host->vm"), entry.get("vm->host")
        rows.append(
            {
                "vm_id": vm_id,
                "vm_name": entry["name"],
                "personality": entry["personality"],
                "vm_data_path": (out or {}).get("data_path"),
                "host_data_path": (out or back or {}).get("host_data_path"),
                "host->vm": cell(out),
                "vm->host": cell(back),
            }
        )
    return sorted(rows, key=lambda row: (row["vm_name"], row["vm_id"]))


def summary_table(rows: list[dict[str, Any]]) -> str:
    def cell(result: dict[str, Any] | None) -> str:
        if result is None:
            return "-"
        if not result["ok"]:
            return "FAILED" + (" (truncated)" if "truncated" in (result["error"] or "") else "")
        return f"{_mib(result['bytes'])} {result['mb_per_s']:.0f} MB/s"

    header = (
        f"{'VM':<22} {'id':<9} {'pers.':<8} {'VM end':<14} {'host end':<14} "
        f"{'host->VM':<22} VM->host"
    )
    lines = ["testbed summary (host program)", header]
    for row in rows:
        lines.append(
            f"{row['vm_name'][:22]:<22} {row['vm_id'][:8]:<9} {row['personality']:<8} "
            f"{PATH_NAMES[row['vm_data_path']]:<14} {PATH_NAMES[row['host_data_path']]:<14} "
            f"{cell(row['host->vm']):<22} {cell(row['vm->host'])}"
        )
    if any(row["host->vm"] is None or row["vm->host"] is None for row in rows):
        lines.append("(-: no echo that way yet)")
    for row in rows:
        for direction in ("host->vm", "vm->host"):
            result = row[direction]
            if result is not None and result.get("error"):
                lines.append(f"{row['vm_name']} {direction}: {result['error']}")
    return "\n".join(lines)


def host_main(args: argparse.Namespace) -> int:
    partition = _STOPPER.add(_attach_or_explain(hv.attach_host, "the host partition"))
    OUT.line(f"host program attached to {partition.target}")
    HostProgram(partition, Admin(partition.target), args.bytes).run()
    return 0


def _attach_or_explain(attach: Any, who: str, **kwargs: Any) -> hv.Partition:
    """``attach(**kwargs)``; a refusal from the host becomes an ExpectedFailure."""
    try:
        partition: hv.Partition = attach(**kwargs)
    except FileExistsError as exc:
        raise ExpectedFailure(f"cannot attach as {who}: {exc.strerror}") from None
    except (PermissionError, FileNotFoundError, ValueError) as exc:
        raise ExpectedFailure(f"cannot attach as {who}: {exc}") from None
    return partition


# ---- the VM program ----------------------------------------------------------------------------


#: Slot locks this process holds (kept open: closing one would give its slot away).
_SLOT_LOCKS: list[int] = []


def claim_slot(directory: pathlib.Path, prefix: str) -> int:
    """The lowest N whose ``PREFIX-N.lock`` in ``directory`` no running process holds; held
    (``flock``) until this process exits, so the replicas sharing the directory get one N each
    and a replica started again after one stopped gets the N it left."""
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(1, MAX_SLOTS + 1):
        fd = os.open(directory / f"{prefix}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _SLOT_LOCKS.append(fd)
        return slot
    raise ExpectedFailure(f"all {MAX_SLOTS} slots of {prefix} in {directory} are taken")


def vm_identity(args: argparse.Namespace) -> tuple[str, pathlib.Path | None]:
    """(the VM's name, its identity file) as the module documentation says."""
    directory = args.identity_dir or os.environ.get("HVSOCK_VM_IDENTITY_DIR")
    name = args.name or os.environ.get("HVSOCK_VM_NAME")
    if not name and directory:
        slot_text = os.environ.get("HVSOCK_VM_SLOT", "")
        # Docker Compose passes Swarm's "{{.Task.Slot}}" through unreplaced: not a number.
        slot = int(slot_text) if slot_text.isdigit() else 0
        if not 1 <= slot <= MAX_SLOTS:
            slot = claim_slot(pathlib.Path(directory), args.name_prefix)
        name = f"{args.name_prefix}-{slot}"
    if not name:
        # A container's hostname is its id: replicas tell apart (but a recreated one is new).
        # Cut to the host's 64 characters: a machine's hostname may be that long by itself.
        name = f"{args.name_prefix}-{socket.gethostname()}"[:64]
    if directory:
        return name, pathlib.Path(directory) / f"{name}.json"
    identity = os.environ.get("HVSOCK_VM_IDENTITY")
    return name, pathlib.Path(identity) if identity else None


def attach_vm(name: str, identity: pathlib.Path | None) -> hv.Partition:
    """Attach as the VM in ``identity``, else create (or take over) the VM called ``name``."""
    try:
        return _attach_or_explain(hv.attach, f"VM {name}", name=name, identity=identity)
    except ExpectedFailure as failure:
        if identity is None or not identity.exists():
            raise
        # The host does not know the saved VM (its state was reset) or its token (the VM was
        # taken over by name since): start over by name, which gets the same VM when no one
        # is attached as it.
        stale = identity.with_name(identity.name + ".stale")
        os.replace(identity, stale)
        OUT.line(f"VM {name}: {failure}; identity file moved to {stale}, attaching by name")
        return _attach_or_explain(hv.attach, f"VM {name}", name=name, identity=identity)


def _keep_identity(vm: hv.Partition, identity: pathlib.Path | None) -> None:
    """Write the VM's identity where the container's other programs look (HVSOCK_VM_IDENTITY),
    when that is not the file it was attached from."""
    target = os.environ.get("HVSOCK_VM_IDENTITY")
    if not target or (identity is not None and pathlib.Path(target) == identity):
        return
    path = pathlib.Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"vm_id": vm.vm_id, "token": vm.token}, file)
    os.replace(temporary, path)


def vm_main(args: argparse.Namespace) -> int:
    name, identity = vm_identity(args)
    vm = _STOPPER.add(attach_vm(name, identity))
    _keep_identity(vm, identity)
    OUT.line(
        f"VM {vm.name} ({vm.vm_id}, {vm.personality}) attached to {vm.target}",
        {"kind": "note", "attached": True, "vm_id": vm.vm_id, "vm_name": vm.name},
    )
    while True:
        listener = _listen_when_attached(vm, VM_ECHO)
        accepting = serve_echo(listener)
        _vm_echo_with_host(vm, args.bytes, args.wait)
        accepting.join()  # the accept loop ends when the host service goes away
        listener.close()
        _STOPPER.park_if_stopping()
        OUT.line(f"VM {vm.name}: lost the host service; attaching again")


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
        listed = admin.partitions()
    except grpc.RpcError as exc:
        raise ExpectedFailure(f"listing the VMs: {exc.code().name}: {exc.details()}") from None
    finally:
        admin.close()
    return [(p.vm_id, p.name) for p in listed if not p.host and p.attached and p.listener_count > 0]


def echo_main(args: argparse.Namespace) -> int:
    partition = _STOPPER.add(_attach_or_explain(hv.attach_from_env, "this partition"))
    counts = {"ok": 0, "skipped": 0, "failed": 0}
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
            "to_name": name,
            "mb_per_s": _mb_per_s(result.get("bytes", 0), result.get("seconds", 0.0)),
            **result,
            **paths,
        }
        if result["ok"]:
            counts["ok"] += 1
            verdict = f"sha256 ok, {_mib(result['bytes'])}, {record['mb_per_s']} MB/s"
            verdict += f", {PATH_NAMES[paths.get('local_data_path')]}"
        elif args.to == "vms" and not result["connected"] and result.get("errno") in NO_SERVICE:
            # Every attached VM with a listener was asked; this one listens on other services.
            counts["skipped"] += 1
            record["skipped"] = True
            verdict = f"skipped: no echo service ({result['errno']})"
        else:
            counts["failed"] += 1
            verdict = f"FAILED: {result.get('error')}"
        _emit(f"echo {partition.name or partition.vm_id} -> {name}: {verdict}", record)
    if args.to == "vms":
        total = ", ".join(f"{n} {what}" for what, n in counts.items())
        OUT.line(f"echo with every VM: {total}", {"kind": "note", **counts})
    return 0 if counts["failed"] == 0 else 1


def stream_main(args: argparse.Namespace) -> int:
    """Send and read back echoes until the connection fails; report how and when (wall clock,
    so that a test can compare it with the moment it killed the other side)."""
    partition = _STOPPER.add(_attach_or_explain(hv.attach_from_env, "this partition"))
    service = HOST_ECHO if args.to == "host" else VM_ECHO
    target = hv.HV_GUID_PARENT if args.to == "host" else args.to
    record: dict[str, Any] = {"kind": "stream", "role": "stream", "to": target, "bytes": 0}
    chunk = os.urandom(CHUNK)
    buf = bytearray(CHUNK)
    sent = received = 0
    sock = partition.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * STREAM_WINDOW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * STREAM_WINDOW)
    try:
        sock.connect((target, service))
        OUT.line(
            f"streaming to {target} over {PATH_NAMES[sock.data_path]}",
            {"kind": "streaming", "to": target, "data_path": sock.data_path},
        )
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            if sent - received + CHUNK <= STREAM_WINDOW:
                sock.sendall(chunk)
                sent += CHUNK
                continue
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionResetError(errno.ECONNRESET, "end of stream from the peer")
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
    if record["error"]:
        text = f"stream to {target} failed after {_mib(received)} echoed: {record['error']}"
    else:
        text = f"stream to {target}: {_mib(received)} echoed in {args.seconds:g} s, no failure"
    OUT.line(text, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hvsock_tools.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # --json goes before or after the command: the command's copy only counts when given.
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--bytes", type=int, default=32 * 2**20, help="bytes per echo")
    json_flag: dict[str, Any] = {"action": "store_true", "default": argparse.SUPPRESS}
    commands = parser.add_subparsers(dest="command", required=True)
    host = commands.add_parser("host", help="the host program")
    vm = commands.add_parser("vm", help="a VM's workload")
    vm.add_argument("--wait", type=float, default=120, help="seconds to wait for the host echo")
    vm.add_argument("--name-prefix", default="vm", help="name of a VM created on attach")
    vm.add_argument("--name", default=None, help="the VM's name (HVSOCK_VM_NAME)")
    vm.add_argument(
        "--identity-dir",
        default=None,
        help="where the VM's identity and slot lock are kept (HVSOCK_VM_IDENTITY_DIR)",
    )
    echo = commands.add_parser("echo", help="echo once with the host, a VM, or every VM")
    echo.add_argument("--to", required=True, help="host, a VM id, or vms (every VM)")
    stream = commands.add_parser("stream", help="stream echoes until the connection fails")
    stream.add_argument("--to", required=True, help="host or a VM id")
    stream.add_argument("--seconds", type=float, default=60)
    for command in (host, vm, echo, stream):
        command.add_argument("--json", help="one JSON object per line", **json_flag)
    args = parser.parse_args(argv)
    if args.bytes < 0:
        parser.error("--bytes must be 0 or more")
    OUT.json = args.json or os.environ.get("HVSOCK_TESTBED_JSON", "") in ("1", "true", "yes")
    run = {"host": host_main, "vm": vm_main, "echo": echo_main, "stream": stream_main}
    _STOPPER.install()
    try:
        return run[args.command](args)
    except ExpectedFailure as failure:
        OUT.line(f"testbed {args.command}: {failure}", {"kind": "error", "error": str(failure)})
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
