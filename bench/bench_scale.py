"""10,240 connections open at once through one host service: rate, memory per connection, teardown.

    .venv/bin/python bench/bench_scale.py [--quick] [--connections N] [--data-path shm|relay|both]
        [--out bench/results]

Starts a real ``hvsock-host`` (Unix socket, its default private descriptor socket, raised
``--max-socket-number``), creates one VM, attaches it and the host partition with stub-only
clients (one attach stream each, many requests in flight), proves shared memory for both over
the descriptor socket (``Welcome.shm_socket``; the host partition's session is held by the
process that maps its ends, see 2.), and:

1. the host partition listens on a service; the VM fires N Connect requests at once; the host
   partition accepts every offer as it arrives. connect+accept per second = N / (time from the
   first Connect to the last ``opened`` on both sides);
2. both ends of every channel map their rings (``ring.shm.Channel.attach_fd`` on the
   descriptor the host handed that session) and exchange one message each way;
3. with all N channels open and idle: host memory per connection = (growth of the host
   process's private RSS, i.e. RssAnon + RssFile from /proc/PID/status) + (shared-memory pages
   actually allocated: ``mincore`` over every segment, so pages nobody touched are not
   counted), divided by N. The host's own view of the segments (Rss of its
   ``/memfd:hvsock-channel`` mappings in /proc/PID/smaps) is reported beside it;
4. both ends Close every channel; teardown time = until the host lists no channel and maps
   no ring segment any more (no ``/memfd:hvsock-channel`` inode in /proc/PID/maps).

Two modes (``--data-path``, default both, each with its own host):

* ``shm``: both partitions prove shared memory, as above;
* ``relay``: as the "relay-vm" deployment: the VM proves nothing, so the host opens every VM end
  on the relay, and the VM's side of all N channels goes over ONE SessionData stream (the first
  credit of each end, then a ping frame; the pong comes back as a data frame); the host
  partition is on shared memory as in ``shm``. In 2. only the acceptor ends are mapped (by the
  acceptor process, which reports the segments' allocated pages for 3.), and 3. also counts
  the host's threads: an idle relayed end must cost no thread. 4. closes as in ``shm`` (the
  host then finishes every relayed end on the stream).

Writes bench/results/scale.json (``result``: the shm mode as always; ``relay``: the relay
mode) and prints a short table per mode. A benchmark, not a test: it reports missed targets
but exits 0 unless the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import itertools
import json
import mmap
import multiprocessing as mp
import os
import pathlib
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvsock_common import grpc_io  # noqa: E402

# The clients here speak the protocol with bare stubs: on the gRPC I/O stack hvsock's own
# processes run on (hvsock_common.grpc_io), as bench_e2e's do.
with grpc_io.choosing():
    import grpc

from guest_client._partition import AttachOutbox  # noqa: E402
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc  # noqa: E402
from ring import shm  # noqa: E402
from ring.handover import KIND_CHANNEL, connect, receive  # noqa: E402

SERVICE = "00002a2a-facb-11e6-bd58-64006a7986d3"
WILDCARD = "00000000-0000-0000-0000-000000000000"
PARENT = "a42e7cda-d03f-480c-9cc2-a4de20abb878"
TARGETS = {"connections": 10_240, "bytes_per_idle_connection": 28 * 1024, "connects_per_s": 2000}
PAGE = os.sysconf("SC_PAGE_SIZE")
#: How ring segments (memfds) show in /proc/PID/maps and smaps.
SEGMENT_LABEL = "/memfd:hvsock-channel"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(mm: mmap.mmap) -> int:
    """Pages of a shared mapping that exist in the page cache (allocated shared memory)."""
    pages = (len(mm) + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        if _libc.mincore(ctypes.addressof(anchor), len(mm), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    finally:
        del anchor
    return sum(b & 1 for b in vec.raw)


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def smaps_shm_rss(pid: int) -> int:
    """Rss of process ``pid``'s ring segment mappings."""
    total, inside = 0, False
    for line in pathlib.Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5].startswith(SEGMENT_LABEL)
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def mapped_segments(pid: int) -> set[str]:
    """Distinct ring segments (memfd inodes) mapped by process ``pid``."""
    inodes = set()
    for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(SEGMENT_LABEL):
            inodes.add(fields[4])
    return inodes


class Descriptors:
    """A session's descriptor socket (``ring.handover``), read by a thread of its own.

    Not ``guest_client._handover.Handover``: that one reads only when asked for a channel and
    keeps at most 256 descriptors for channels nobody asked for yet, while here thousands of
    opens are in flight at once. The host never blocks on this socket: when its buffer is full
    it opens the end on the relay instead, so the descriptors must be read as they come.
    """

    def __init__(self, address: str, secret: str) -> None:
        self._fds: dict[int, int] = {}
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        #: ``nonce`` is what ProveSharedMemory sends.
        self._sock, self.nonce = connect(address, secret, 10)
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                kind, channel_id, fd = receive(self._sock)
                if kind != KIND_CHANNEL:
                    os.close(fd)
                    raise OSError(errno.EPROTO, "a second probe on the descriptor socket")
                with self._cond:
                    self._fds[channel_id] = fd
                    self._cond.notify_all()
        except ConnectionResetError:
            pass  # closed (by us or the host)
        except BaseException as exc:
            self._error = exc
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def take(self, channel_id: int, timeout: float = 60) -> int:
        """The descriptor of ``channel_id``'s segment (the caller closes it)."""
        with self._cond:
            if (
                not self._cond.wait_for(lambda: channel_id in self._fds or self._done, timeout)
                or channel_id not in self._fds
            ):
                raise RuntimeError(
                    f"no descriptor for channel {channel_id} ({self._error or 'timeout/closed'})"
                )
            return self._fds.pop(channel_id)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(30)
        self._sock.close()
        with self._cond:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class Partition:
    """One attach stream with many requests in flight (stubs, and the guest library's batching
    of queued requests: as guest_client does, requests and responses travel in batches)."""

    def __init__(self, target: str, hello: hvsock_pb2.Hello) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = hvsock_pb2_grpc.HostServiceStub(self.channel)
        self._requests = AttachOutbox()
        self._ids = itertools.count(1)
        first = hvsock_pb2.AttachRequest(hello=hello)
        first.hello.response_batches = True
        self._requests.put(first)
        self.call = self.stub.Attach(iter(self._requests))
        self.welcome = next(self.call).welcome
        self._requests.batches = self.welcome.request_batches
        self.inbox: queue.SimpleQueue[hvsock_pb2.AttachResponse | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for message in self.call:
                for response in message.batch or (message,):
                    self.inbox.put(response)
        self.inbox.put(None)

    def send(self, **kind: Any) -> int:
        request_id = next(self._ids)
        self._requests.put(hvsock_pb2.AttachRequest(request_id=request_id, **kind))
        return request_id

    def get(self, timeout: float = 60) -> hvsock_pb2.AttachResponse:
        response = self.inbox.get(timeout=timeout)
        if response is None:
            raise RuntimeError("attach stream ended")
        return response

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()


class RelayStream:
    """One SessionData stream carrying every relayed end of a session (stubs only)."""

    def __init__(self, stub: hvsock_pb2_grpc.HostServiceStub, session: str) -> None:
        self._requests: queue.SimpleQueue[hvsock_pb2.SessionDataRequest | None] = (
            queue.SimpleQueue()
        )
        self._requests.put(hvsock_pb2.SessionDataRequest(session=session))
        self.call = stub.SessionData(iter(self._requests.get, None))
        #: channel id -> bytes received; resets and close_done seen.
        self.received: dict[int, bytes] = {}
        self.ended: dict[int, str] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for response in self.call:
                with self._cond:
                    for frame in response.frames:
                        if frame.data:
                            self.received[frame.channel_id] = (
                                self.received.get(frame.channel_id, b"") + frame.data
                            )
                        if frame.close_done or frame.HasField("reset"):
                            self.ended[frame.channel_id] = (
                                "closed" if frame.close_done else frame.reset.message
                            )
                    self._cond.notify_all()

    def send(self, frames: list[hvsock_pb2.RelayFrame]) -> None:
        for start in range(0, len(frames), 1000):  # well under the 1 MiB message limit
            self._requests.put(hvsock_pb2.SessionDataRequest(frames=frames[start : start + 1000]))

    def wait_for(self, condition: Any, timeout: float = 120) -> bool:
        with self._cond:
            return self._cond.wait_for(condition, timeout)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self._reader.join(30)


def start_host(sock: pathlib.Path, token: str, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            str(pathlib.Path(sys.executable).parent / "hvsock-host"),
            "--listen",
            "127.0.0.1:0",
            "--unix",
            str(sock),
            f"--host-token={token}",  # the = form: a token may start with "-"
            "--max-socket-number",
            str(n + 16),
            # An end has the connect timeout to map the rings it was handed; here all N are
            # opened first (1.) and mapped afterwards (2.).
            "--connect-timeout-ms",
            "300000",
            "--log-level",
            "INFO",
        ],
        stderr=subprocess.PIPE,
        text=True,
        # No --shm-socket: the host's private abstract socket, reported in Welcome.shm_socket.
        env={k: v for k, v in os.environ.items() if k != "HVSOCK_SHM_SOCKET"},
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "serving on" in line:
            break
    else:
        raise RuntimeError(f"hvsock-host exited with {proc.wait()}: {''.join(lines)}")
    threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
    return proc


CTX = mp.get_context("spawn")


def map_end(descriptors: Descriptors, channel_id: int, end: int) -> shm.Channel:
    fd = descriptors.take(channel_id)
    try:
        return shm.Channel.attach_fd(fd, end=end)
    finally:
        os.close(fd)  # the mapping keeps the memory


def acceptor_ends(pipe: Connection, address: str, secret: str) -> None:
    """The acceptor's side of every channel, in a process of its own: it holds the host
    partition's descriptor socket (sends the parent the probe's nonce to prove), then maps
    each channel it is told of, answers the ping, and holds the rings until told."""
    descriptors = Descriptors(address, secret)
    pipe.send(descriptors.nonce)
    ends = [map_end(descriptors, channel_id, end) for channel_id, end in pipe.recv()]
    for end in ends:
        if end.recv(16, timeout=30) != b"ping":
            raise RuntimeError("bad ping")
        end.sendall(b"pong")
    while pipe.recv() == "resident":  # allocated pages of every segment
        pipe.send(sum(resident_pages(end._mm) for end in ends))
    for end in ends:
        end.close()
    descriptors.close()


def prove(partition: Partition, nonce: bytes) -> None:
    partition.send(prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=nonce))
    response = partition.get()
    if not response.HasField("ack"):
        raise RuntimeError(f"shared memory not proven: {response}")


def run(n: int, data_path: str = "shm") -> dict[str, Any]:
    relay = data_path == "relay"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the host inherits it too
    work = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"hvsock-bench-{secrets.token_hex(4)}"
    work.mkdir()
    token = secrets.token_urlsafe(16)
    proc = start_host(work / "host.sock", token, n)
    target = f"unix:{work / 'host.sock'}"
    meta = (("x-hvsock-token", token),)
    admin_channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 256 << 20)]
    )
    admin = hvsock_pb2_grpc.AdminServiceStub(admin_channel)
    ends: list[shm.Channel] = []
    descriptors: Descriptors | None = None
    peer: mp.process.BaseProcess | None = None
    stream: RelayStream | None = None
    try:
        vm = admin.CreatePartition(
            hvsock_pb2.CreatePartitionRequest(name="bench-vm"), metadata=meta, timeout=10
        )
        guest = Partition(target, hvsock_pb2.Hello(vm_id=vm.partition.vm_id, token=vm.token))
        root = Partition(target, hvsock_pb2.Hello(host=True, token=token))
        if not guest.welcome.shm_socket:
            raise RuntimeError("the host offers no descriptor socket (shared memory is off)")
        if relay:
            # No proof: the host opens the VM's ends on the relay, all on one stream.
            stream = RelayStream(guest.stub, guest.welcome.session)
        else:
            descriptors = Descriptors(guest.welcome.shm_socket, guest.welcome.session)
            prove(guest, descriptors.nonce)
        # The acceptor ends live in another process (Python's mmap keeps a dup of the fd per
        # mapping, and 2 x N mappings in one process would pass the open-file limit); that
        # process holds the host partition's descriptor socket, so the host hands the
        # acceptor ends' descriptors straight to it.
        parent_pipe, child_pipe = CTX.Pipe()
        peer = CTX.Process(
            target=acceptor_ends,
            args=(child_pipe, root.welcome.shm_socket, root.welcome.session),
        )
        peer.start()
        if not parent_pipe.poll(60):
            raise RuntimeError("the acceptor process never reached the descriptor socket")
        prove(root, parent_pipe.recv())
        root.send(
            listen=hvsock_pb2.Listen(
                address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=SERVICE), backlog=n
            )
        )
        assert root.get().HasField("listening")
        before = proc_status(proc.pid)

        # 1. N connects in flight at once; the host partition accepts each offer as it comes.
        guest_opened: dict[int, hvsock_pb2.Channel] = {}
        root_opened: dict[int, hvsock_pb2.Channel] = {}
        failures: list[str] = []

        def accept_all() -> None:
            while len(root_opened) < n and not failures:
                response = root.get()
                kind = response.WhichOneof("kind")
                if kind == "offer":
                    root.send(
                        accept=hvsock_pb2.Accept(channel_id=response.offer.channel.channel_id)
                    )
                elif kind == "opened":
                    root_opened[response.opened.channel_id] = response.opened
                else:
                    failures.append(str(response))

        acceptor = threading.Thread(target=accept_all)
        started = time.perf_counter()
        acceptor.start()
        remote = hvsock_pb2.Address(vm_id=PARENT, service_id=SERVICE)
        for _ in range(n):
            guest.send(connect=hvsock_pb2.Connect(remote=remote, connect_timeout_ms=300_000))
        while len(guest_opened) < n and not failures:
            response = guest.get()
            if response.WhichOneof("kind") == "opened":
                guest_opened[response.opened.channel_id] = response.opened
            else:
                failures.append(str(response))
        acceptor.join()
        opened_s = time.perf_counter() - started
        if failures:
            raise RuntimeError(f"{len(failures)} connects failed, first: {failures[0]}")
        listed = admin.ListChannels(hvsock_pb2.ListChannelsRequest(), metadata=meta, timeout=60)
        open_at_once = sum(c.state == hvsock_pb2.CHANNEL_STATE_OPEN for c in listed.channels)
        guest_path = (
            hvsock_pb2.DATA_PATH_GRPC_RELAY if relay else hvsock_pb2.DATA_PATH_SHARED_MEMORY
        )
        wrong = sum(o.data_path != guest_path for o in guest_opened.values()) + sum(
            o.data_path != hvsock_pb2.DATA_PATH_SHARED_MEMORY for o in root_opened.values()
        )
        if wrong:
            raise RuntimeError(f"{wrong} channel ends were opened on another data path")

        # 2. Map both ends of every channel and exchange one message each way.
        started = time.perf_counter()
        order = list(guest_opened)
        parent_pipe.send([(c, root_opened[c].shared_memory.end) for c in order])
        if stream is not None:
            # Each relayed end: its first credit (the host sends nothing before it), then
            # the ping; the pong comes back on the same stream.
            stream.send(
                [
                    hvsock_pb2.RelayFrame(
                        channel_id=c,
                        end=0,
                        credit=guest_opened[c].relay_receive_window,
                        data=b"ping",
                    )
                    for c in order
                ]
            )
            if not stream.wait_for(lambda: len(stream.received) == n or stream.ended):
                raise RuntimeError(f"{n - len(stream.received)} pongs never came")
            if stream.ended or any(v != b"pong" for v in stream.received.values()):
                raise RuntimeError(f"bad echo on the relay: {list(stream.ended.items())[:3]}")
        else:
            for channel_id in order:
                ends.append(
                    map_end(descriptors, channel_id, guest_opened[channel_id].shared_memory.end)
                )
            for end in ends:
                end.sendall(b"ping")
            for end in ends:
                if end.recv(16, timeout=30) != b"pong":
                    raise RuntimeError("bad echo")
        exchange_s = time.perf_counter() - started
        host_segments_open = len(mapped_segments(proc.pid))

        # 3. Memory with every connection open and idle.
        time.sleep(0.5)  # let the host settle (allocator, lazily freed event objects)
        after = proc_status(proc.pid)
        private = lambda s: s.get("RssAnon", 0) + s.get("RssFile", 0)  # noqa: E731
        rss_growth = after["VmRSS"] - before["VmRSS"]
        private_growth = private(after) - private(before)
        if relay:
            parent_pipe.send("resident")  # the acceptor's mappings cover every segment
            shm_bytes = parent_pipe.recv() * PAGE
        else:
            shm_bytes = sum(resident_pages(c._mm) for c in ends) * PAGE  # one per segment
        host_shm_rss = smaps_shm_rss(proc.pid)
        host_threads = threads_of(proc.pid)
        per_connection = (private_growth + shm_bytes) / n

        # 4. Tear everything down: both ends close; wait until nothing is left.
        started = time.perf_counter()
        for channel_id in guest_opened:
            guest.send(close=hvsock_pb2.Close(channel_id=channel_id))
            root.send(close=hvsock_pb2.Close(channel_id=channel_id))
        acks = 0
        for partition in (guest, root):
            seen = 0
            while seen < n:
                response = partition.get()
                if response.request_id:
                    seen += 1
                    acks += response.HasField("ack")
        for end in ends:
            end.close()
        ends.clear()
        parent_pipe.send("close")
        peer.join(60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = admin.ListChannels(hvsock_pb2.ListChannelsRequest(), metadata=meta, timeout=60)
            if not left.channels and not mapped_segments(proc.pid):
                break
            time.sleep(0.01)
        teardown_s = time.perf_counter() - started
        channels_left = len(left.channels)
        segments_left = len(mapped_segments(proc.pid))
        if stream is not None:
            stream.close()
            stream = None
        guest.close()
        root.close()
    finally:
        if stream is not None:
            stream.close()
        for end in ends:
            with contextlib.suppress(Exception):
                end.close()
        if descriptors is not None:
            descriptors.close()
        if peer is not None and peer.is_alive():
            peer.kill()
            peer.join(30)
        admin_channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    rate = n / opened_s
    return {
        "data_path": data_path,
        "connections": n,
        "open_at_once": open_at_once,
        "connect_accept_s": round(opened_s, 3),
        "connect_accept_per_s": round(rate, 1),
        "map_and_exchange_s": round(exchange_s, 3),
        "host_segments_mapped_while_open": host_segments_open,
        "host_rss_growth_bytes": rss_growth,
        "host_private_rss_growth_bytes": private_growth,
        "shm_allocated_bytes": shm_bytes,
        "host_shm_mapping_rss_bytes": host_shm_rss,
        "host_threads_while_idle": host_threads,
        "bytes_per_idle_connection": round(per_connection),
        "close_acks": acks,
        "teardown_s": round(teardown_s, 3),
        "channels_left": channels_left,
        "segments_left": segments_left,
    }


def judge(result: dict[str, Any], n: int) -> dict[str, bool]:
    return {
        "all_open_at_once": result["open_at_once"] == n,
        "bytes_per_idle_connection": result["bytes_per_idle_connection"]
        <= TARGETS["bytes_per_idle_connection"],
        "connects_per_s": result["connect_accept_per_s"] >= TARGETS["connects_per_s"],
        "nothing_left": result["channels_left"] == 0 and result["segments_left"] == 0,
    }


def table(result: dict[str, Any], met: dict[str, bool], n: int) -> None:
    print(f"-- {result['data_path']} --")
    rows = [
        (
            "connections open at once",
            f"{result['open_at_once']:,} / {n:,}",
            met["all_open_at_once"],
        ),
        (
            "connect+accept per second",
            f"{result['connect_accept_per_s']:,.0f}",
            met["connects_per_s"],
        ),
        (
            "host bytes per idle connection",
            f"{result['bytes_per_idle_connection']:,} (RSS "
            f"{result['host_private_rss_growth_bytes'] // n:,} + shm "
            f"{result['shm_allocated_bytes'] // n:,})",
            met["bytes_per_idle_connection"],
        ),
        ("teardown of all (s)", f"{result['teardown_s']:.2f}", met["nothing_left"]),
    ]
    for name, value, ok in rows:
        print(f"{name:<32} {value:<40} {'ok' if ok else 'MISSED'}")
    print(f"{'host threads while idle':<32} {result['host_threads_while_idle']:<40,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1,024 connections")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument(
        "--data-path",
        choices=["shm", "relay", "both"],
        default="both",
        help="the VM's ends on shared memory, relayed over one SessionData stream, or both runs",
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    n = args.connections or (1024 if args.quick else TARGETS["connections"])
    modes = ["shm", "relay"] if args.data_path == "both" else [args.data_path]
    report: dict[str, Any] = {
        "benchmark": "scale",
        "quick": n != TARGETS["connections"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "page": PAGE},
        "grpc_io": grpc_io.stack(),
        "targets": TARGETS,
    }
    for mode in modes:
        result = run(n, mode)
        met = judge(result, n)
        if mode == "shm":  # where the shm mode always was
            report["result"], report["met"] = result, met
        else:
            report["relay"] = {"result": result, "met": met}
        table(result, met, n)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'scale.json'}")


if __name__ == "__main__":
    main()
