"""hv sockets end to end, through the socket API, next to TCP, Unix sockets and raw gRPC.

    .venv/bin/python bench/bench_e2e.py [--quick] [--rounds N] [--out bench/results]

Starts its own ``hvsock-host`` (a child process, private Unix socket and shared-memory
directory), creates one VM, and runs two worker processes (spawned, so no GIL is shared): the
*guest* worker attaches the VM partition and is the writer / client, the *host* worker attaches
the host partition and is the reader / server. Both attach once per data path and keep their
partitions for the whole run.

- Throughput, hvbench style: one connection, the writer sends fixed-size messages (1 KiB ..
  256 KiB) for a fixed time with ``sendall``, then ``shutdown(SHUT_WR)``; the reader reads
  into one 256 KiB buffer with ``recv_into`` and times first byte to EOF. Transports:
  ``shm`` (shared-memory path, 64-page rings asked for with SO_SNDBUF/SO_RCVBUF),
  ``shm-default`` (the host's default rings, 2/3 pages), ``relay`` (gRPC relay, 64-page
  rings), TCP loopback, Unix sockets, and ``grpc-raw``: one grpcio client-streaming call to a
  tiny bytes-in service defined here (generic handler, no protobuf), one message per send,
  over a Unix socket like the partitions' channel to the host.
- 64-byte round trip (p50/p99) on shm, relay and relay-vm (default rings), TCP (TCP_NODELAY),
  Unix, and ``grpc-raw``: one grpcio bidi stream to an echo method, a message each way.
- connect + accept + close cycles per second (the client waits for the server's close), on
  shm, relay (both ends relayed) and relay-vm (only the VM's end relayed), default rings.

Every point is measured in each of ``--rounds`` rounds (3; 1 with ``--quick``). Within a
round, each send size is measured on every transport one right after the other, then the round
trips, then the connects, in an order rotated from round to round. A ratio is taken within
each round, so a transport is compared with the baseline measured beside it (this machine's
speed drifts by a third over minutes: a baseline measured minutes apart skews a ratio either
way); the figure reported for each point, ratio and target is the median over the rounds (the
lower middle for an even count), and every round's value is kept. Every process of the run,
the baselines' included, has the allocator settings hvsock's processes give themselves
(:func:`tune_allocators`), so no baseline runs on a slower allocator than the relay.

The targets are the relay's (issue 12) and the shared-memory path's, as ratios to the
baselines measured in the same run.

Writes bench/results/e2e.json (every round's figures, the medians, every ratio, the targets
and whether each was met) and bench/results/e2e.png (medians, bars spanning the rounds), and
prints a short table. It never fails on a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The guest library first: it chooses gRPC's I/O stack as grpc loads (hvsock_common.grpc_io),
# so every process here, the raw grpcio baseline's included, runs on the stack hvsock's do.
import guest_client as hv  # isort: skip
import grpc

from hvsock.v1 import hvsock_pb2
from hvsock_common import allocator, grpc_io
from hvsock_tools.demo import local_host

SIZES = [1024, 4096, 16384, 65536, 262144]
THROUGHPUT_KINDS = [
    "shm",
    "shm-default",
    "relay",
    "relay-default",
    "relay-vm",
    "relay-vm-default",
    "tcp",
    "unix",
    "grpc-raw",
]
RTT_KINDS = ["shm", "relay", "relay-vm", "tcp", "unix", "grpc-raw"]
CONNECT_KINDS = ["shm", "relay", "relay-vm", "tcp", "unix"]
# kind -> (guest's data path, host partition's data path, ring bytes asked for with
# SO_SNDBUF/SO_RCVBUF before connect, 0 for the host's default rings). "relay" relays both
# ends (two gRPC hops: VM -> host service -> host partition); "relay-vm" relays only the VM's
# end and the host partition maps the ring (one hop: the usual deployment, and the like of a
# single raw gRPC stream).
HV_KINDS = {
    "shm": ("shm", "shm", 63 * 4096),  # pages = bytes // 4096 + 1 = 64
    "shm-default": ("shm", "shm", 0),
    "relay": ("relay", "relay", 63 * 4096),
    "relay-default": ("relay", "relay", 0),
    "relay-vm": ("relay", "shm", 63 * 4096),
    "relay-vm-default": ("relay", "shm", 0),
}
# Round trips and connects: default rings.
RTT_HV_KIND = {"shm": "shm-default", "relay": "relay-default", "relay-vm": "relay-vm-default"}
CONNECT_THREADS = 4
READ_BUF = 256 * 1024
RTT_MSG = 64
IO_TIMEOUT = 30.0
GRPC_METHOD = "/hvbench.Sink/Push"
GRPC_ECHO_METHOD = "/hvbench.Sink/Echo"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


# ---- the worker processes -------------------------------------------------------------------


class Worker:
    """State of one worker process: its partitions, listeners and the raw gRPC sink."""

    def __init__(self, role: str, cfg: dict[str, Any]) -> None:
        self.role = role  # "guest" (VM, writer/client) or "host" (reader/server)
        self.cfg = cfg
        self.partitions: dict[str, Any] = {}
        self.listeners: dict[int, Any] = {}
        self.ids = 0
        self.port = 20000 if role == "host" else 30000
        self.grpc_server: grpc.Server | None = None
        self.grpc_results: queue.SimpleQueue[tuple[int, float, float]] = queue.SimpleQueue()
        self.grpc_channel: grpc.Channel | None = None
        self.cycle_thread: threading.Thread | None = None
        self.cycles = 0

    def data_path(self, kind: str) -> str:
        return HV_KINDS[kind][0 if self.role == "guest" else 1]

    # -- transports -----------------------------------------------------------------------

    def partition(self, data_path: str) -> Any:
        """The partition on ``data_path``; a partition is attached once at a time, so the
        one on the other path (if any) is closed first."""
        if data_path not in self.partitions:
            for other in self.partitions.values():
                other.close()
            self.partitions.clear()
            if self.role == "host":
                hello = hvsock_pb2.Hello(host=True, token=self.cfg["host_token"])
            else:
                hello = hvsock_pb2.Hello(vm_id=self.cfg["vm_id"], token=self.cfg["vm_token"])
            self.partitions[data_path] = hv.Partition(
                self.cfg["target"], hello, data_path=data_path
            )
        return self.partitions[data_path]

    def listen(self, kind: str) -> tuple[int, Any]:
        """A listener for ``kind``; returns (listener id, address for the client)."""
        self.ids += 1
        if kind in HV_KINDS:
            self.port += 1
            service = hv.service_id_for_port(self.port)
            sock = self.partition(self.data_path(kind)).socket()
            sock.bind((hv.HV_GUID_WILDCARD, service))
            address: Any = (hv.HV_GUID_PARENT, service)
        elif kind == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            address = sock.getsockname()
        elif kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = os.path.join(self.cfg["workdir"], f"bench-{self.ids}.sock")
            sock.bind(address)
        else:
            raise ValueError(kind)
        sock.listen(128)
        sock.settimeout(IO_TIMEOUT)
        self.listeners[self.ids] = sock
        return self.ids, address

    def close_listener(self, lid: int) -> None:
        sock = self.listeners.pop(lid)
        sock.close()
        if isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(sock.getsockname())

    def connect(self, kind: str, address: Any) -> Any:
        if kind in HV_KINDS:
            ring = HV_KINDS[kind][2]
            sock = self.partition(self.data_path(kind)).socket()
            if ring:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ring)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ring)
            sock.settimeout(IO_TIMEOUT)
            sock.connect(tuple(address))
            return sock
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(tuple(address) if kind == "tcp" else address)
        return sock

    # -- raw gRPC: a client-streaming bytes sink --------------------------------------------

    def grpc_start(self) -> str:
        if self.grpc_server is None:

            def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
                total, first = 0, 0.0
                for message in requests:
                    if not total:
                        first = time.perf_counter()
                    total += len(message)
                self.grpc_results.put((total, first, time.perf_counter()))
                return b""

            def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
                yield from requests

            handler = grpc.method_handlers_generic_handler(
                "hvbench.Sink",
                {
                    "Push": grpc.stream_unary_rpc_method_handler(push),
                    "Echo": grpc.stream_stream_rpc_method_handler(echo),
                },
            )
            self.grpc_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS
            )
            self.grpc_server.add_generic_rpc_handlers((handler,))
            self.grpc_address = f"unix:{os.path.join(self.cfg['workdir'], 'grpc-raw.sock')}"
            self.grpc_server.add_insecure_port(self.grpc_address)
            self.grpc_server.start()
        return self.grpc_address

    # -- commands ------------------------------------------------------------------------------

    def cmd_attach(self, kind: str) -> None:
        if kind in HV_KINDS:
            self.partition(self.data_path(kind))

    def cmd_listen(self, kind: str) -> tuple[int, Any]:
        if kind == "grpc-raw":
            return 0, self.grpc_start()
        return self.listen(kind)

    def cmd_sink(self, kind: str, lid: int) -> dict[str, Any]:
        """Accept one connection, read to EOF; bytes and first-byte-to-EOF seconds."""
        if kind == "grpc-raw":
            total, first, end = self.grpc_results.get(timeout=IO_TIMEOUT + 60)
            return {"bytes": total, "seconds": end - first}
        listener = self.listeners[lid]
        conn, _ = listener.accept()
        conn.settimeout(IO_TIMEOUT)
        buf = bytearray(READ_BUF)
        total = 0
        n = conn.recv_into(buf)
        first = time.perf_counter()
        while n:
            total += n
            n = conn.recv_into(buf)
        end = time.perf_counter()
        conn.close()
        self.close_listener(lid)
        return {"bytes": total, "seconds": end - first}

    def cmd_source(self, kind: str, address: Any, size: int, seconds: float) -> dict[str, Any]:
        """Send ``size``-byte messages for ``seconds``, then end the stream."""
        message = b"\xa5" * size
        sends = 0
        if kind == "grpc-raw":
            if self.grpc_channel is None:
                self.grpc_channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
            call = self.grpc_channel.stream_unary(GRPC_METHOD)

            def messages() -> Iterator[bytes]:
                nonlocal sends
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    sends += 1
                    yield message

            call(messages(), timeout=seconds + IO_TIMEOUT)
            return {"sends": sends}
        sock = self.connect(kind, address)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sock.sendall(message)
            sends += 1
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the reader's close
        sock.close()
        return {"sends": sends}

    def cmd_echo(self, lid: int) -> None:
        """Accept one connection and echo ``RTT_MSG``-byte messages until EOF (raw gRPC: the
        server's Echo method answers by itself)."""
        if lid == 0:
            return
        listener = self.listeners[lid]
        conn, _ = listener.accept()
        conn.settimeout(IO_TIMEOUT)
        if isinstance(conn, socket.socket) and conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(RTT_MSG)
        view = memoryview(buf)
        while True:
            got = 0
            while got < RTT_MSG:
                n = conn.recv_into(view[got:])
                if not n:
                    conn.close()
                    self.close_listener(lid)
                    return
                got += n
            conn.sendall(buf)

    def cmd_ping(self, kind: str, address: Any, count: int, warmup: int) -> dict[str, Any]:
        message = b"\x5a" * RTT_MSG
        if kind == "grpc-raw":
            samples = self._grpc_pings(address, message, warmup, count)
        else:
            samples = self._socket_pings(kind, address, message, warmup, count)
        samples.sort()
        return {
            "count": count,
            "p50_us": samples[len(samples) // 2] * 1e6,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
            "mean_us": statistics.fmean(samples) * 1e6,
            "min_us": samples[0] * 1e6,
        }

    def _socket_pings(
        self, kind: str, address: Any, message: bytes, warmup: int, count: int
    ) -> list[float]:
        sock = self.connect(kind, address)
        if kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(RTT_MSG)
        view = memoryview(buf)
        samples = []
        for i in range(warmup + count):
            start = time.perf_counter()
            sock.sendall(message)
            got = 0
            while got < RTT_MSG:
                n = sock.recv_into(view[got:])
                if not n:
                    raise ConnectionResetError("echo server closed")
                got += n
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
        sock.close()
        return samples

    def _grpc_pings(self, address: str, message: bytes, warmup: int, count: int) -> list[float]:
        """Round trips on one bidi stream, as a program drives one: each request handed to
        grpcio's request iterator from this thread, each answer read from the response
        iterator."""
        if self.grpc_channel is None:
            self.grpc_channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = self.grpc_channel.stream_stream(GRPC_ECHO_METHOD)(
            iter(outgoing.get, None), timeout=IO_TIMEOUT + count
        )
        samples = []
        for i in range(warmup + count):
            start = time.perf_counter()
            outgoing.put(message)
            if len(next(call)) != RTT_MSG:
                raise ConnectionResetError("echo answered another size")
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        outgoing.put(None)
        for _ in call:  # the server ends the stream after the requests end
            pass
        return samples

    def cmd_cycle_server(self, lid: int) -> None:
        """Accept and close in a thread until the listener is closed (cmd_cycle_stop)."""
        listener = self.listeners[lid]
        self.cycles = 0

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except (OSError, ValueError):
                    return
                conn.close()
                self.cycles += 1

        self.cycle_thread = threading.Thread(target=loop, daemon=True)
        self.cycle_thread.start()

    def cmd_cycle_stop(self, lid: int) -> int:
        listener = self.listeners[lid]
        if isinstance(listener, socket.socket):  # close() alone does not wake accept()
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
        self.close_listener(lid)
        if self.cycle_thread is not None:
            self.cycle_thread.join(IO_TIMEOUT)
        return self.cycles

    def cmd_cycle_client(
        self, kind: str, address: Any, seconds: float, wait_eof: bool = True, threads: int = 1
    ) -> dict[str, Any]:
        """connect, wait for the server's close (EOF) when ``wait_eof``, close; as many times
        as fit in ``seconds``, on ``threads`` connecting threads at once."""
        counts = [0] * threads
        start = time.perf_counter()
        deadline = start + seconds

        def loop(i: int) -> None:
            while time.perf_counter() < deadline:
                sock = self.connect(kind, address)
                if wait_eof:
                    sock.recv(1)
                sock.close()
                counts[i] += 1

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
        cycles = sum(counts)
        return {"cycles": cycles, "seconds": elapsed, "per_s": cycles / elapsed}

    def cmd_close(self) -> None:
        for lid in list(self.listeners):
            self.close_listener(lid)
        for partition in self.partitions.values():
            partition.close()
        if self.grpc_channel is not None:
            self.grpc_channel.close()
        if self.grpc_server is not None:
            self.grpc_server.stop(None)


def worker_main(conn: Connection, role: str, cfg: dict[str, Any]) -> None:
    worker = Worker(role, cfg)
    while True:
        try:
            name, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", getattr(worker, f"cmd_{name}")(**kwargs)))
        except Exception as exc:  # reported to the parent, which records it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        if name == "close":
            return


# ---- the parent: drives the workers ------------------------------------------------------------


class Remote:
    def __init__(self, role: str, cfg: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, role, cfg), daemon=True)
        self.proc.start()
        child.close()
        self.role = role

    def start(self, name: str, **kwargs: Any) -> None:
        self.conn.send((name, kwargs))

    def result(self, timeout: float = 120.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role} worker did not answer in {timeout} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.role}: {value}")
        return value

    def call(self, name: str, timeout: float = 120.0, **kwargs: Any) -> Any:
        self.start(name, **kwargs)
        return self.result(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call("close", timeout=20)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def tune_allocators() -> str:
    """Give this process, and every process it starts from now on, the allocator settings the
    hvsock processes give themselves (``hvsock_common.allocator``); returns what the results'
    meta records of it.

    The baselines need it as much as the relay: left to glibc's dynamic mmap threshold, one raw
    grpcio stream of 256 KiB messages ran at about 800 MB/s and another at 1,200, side by side,
    for as long as each process lived (alternated A/A pushes on this project's 2-core machine),
    and whichever a run got moved every ratio against it. bench_e2e's workers used to be tuned
    only once their first relayed end opened, and the ceiling bench's never."""
    os.environ.update(allocator.ENVIRONMENT)
    tuned = allocator.tune_for_large_messages()
    return "tuned in every process" if tuned else "left alone (not glibc)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mbps(figure: dict[str, Any]) -> float:
    return float(figure["bytes"]) / figure["seconds"] / 1e6 if figure["seconds"] else 0.0


def _median_figure(figures: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The figure of the median round by ``key`` (the lower middle for an even count), with
    every round's ``key`` kept as ``rounds``."""
    ordered = sorted(figures, key=lambda figure: figure[key])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [figure[key] for figure in figures]}


def _rotated(kinds: list[str], turn: int) -> list[str]:
    """``kinds`` starting ``turn`` places on: each round measures the kinds in another order,
    so no kind always comes first (or right after the machine was busy elsewhere)."""
    turn %= len(kinds)
    return kinds[turn:] + kinds[:turn]


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 0.3 if args.quick else 1.5
    rtt_count = 1000 if args.quick else 5000
    cycle_seconds = 0.5 if args.quick else 2.0
    rounds = args.rounds if args.rounds else (1 if args.quick else 3)
    malloc = tune_allocators()
    results: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "rounds": rounds,
            "seconds_per_point": seconds,
            "rtt_count": rtt_count,
            "connect_seconds": cycle_seconds,
            "sizes": SIZES,
            "read_buffer": READ_BUF,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "grpc_io": grpc_io.stack(),
            "allocator": malloc,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # 1/5/15-minute load averages at the start (the machine may be shared: compare)
            "loadavg_start": os.getloadavg(),
            "kinds": {
                k: {"guest_data_path": v[0], "host_data_path": v[1], "ring_bytes_asked": v[2]}
                for k, v in HV_KINDS.items()
            },
        },
        # Each round's figures, as measured: {"throughput": {kind: {size: figure}}, "rtt":
        # {kind: figure}, "connect": {kind: figure}, "connect_concurrent": {kind: figure}}.
        "rounds": [],
        "errors": [],
        "wall": {},  # seconds each point took, set-up and teardown included
        "cpu_seconds": {},  # ... and the CPU each process used meanwhile
    }
    with local_host(prefix="hvsock-e2e", log_level="INFO") as host:
        vm_id, vm_token = host.create_vm("bench-vm")
        cfg = {
            "target": host.target,
            "host_token": host.token,
            "vm_id": vm_id,
            "vm_token": vm_token,
            "workdir": str(host.workdir),
        }
        guest, server = Remote("guest", cfg), Remote("host", cfg)
        try:

            def attach(kind: str) -> None:
                for remote in (server, guest):
                    remote.call("attach", kind=kind)

            def pair(
                kind: str, server_cmd: str, client_cmd: str, **client_kwargs: Any
            ) -> tuple[Any, Any]:
                attach(kind)
                lid, address = server.call("listen", kind=kind)
                extra = {"kind": kind} if server_cmd == "sink" else {}
                server.start(server_cmd, lid=lid, **extra)
                client_error = None
                try:
                    client = guest.call(client_cmd, kind=kind, address=address, **client_kwargs)
                except Exception as exc:
                    client, client_error = None, exc
                served = server.result()
                if client_error is not None:
                    raise client_error
                return served, client

            pids = {"host-service": host.proc.pid, "guest": guest.proc.pid, "host": server.proc.pid}

            def record(where: str, what: Callable[[], Any]) -> Any:
                """Run one point; its wall time and each process's CPU seconds are kept."""
                began, cpu = time.perf_counter(), {k: cpu_seconds(p) for k, p in pids.items()}
                try:
                    return what()
                except (RuntimeError, OSError) as exc:
                    results["errors"].append(f"{where}: {exc}")
                    print(f"  ! {where}: {exc}", flush=True)
                    return None
                finally:
                    results["wall"][where] = time.perf_counter() - began
                    results["cpu_seconds"][where] = {
                        k: cpu_seconds(p) - cpu[k] for k, p in pids.items()
                    }

            def throughput(turn: int, kind: str, size: int) -> dict[str, Any] | None:
                where = f"round {turn} throughput {kind} {size}"
                got = record(
                    where, lambda: pair(kind, "sink", "source", size=size, seconds=seconds)
                )
                if got is None:
                    return None
                served, sent = got
                served["MBps"] = _mbps(served)
                served["sends"] = sent["sends"]
                served["cpu_s_per_GB"] = {
                    k: v / (served["bytes"] / 1e9)
                    for k, v in results["cpu_seconds"][where].items()
                    if served["bytes"]
                }
                return served

            def cycles(hv_kind: str, threads: int) -> dict[str, Any]:
                attach(hv_kind)
                lid, address = server.call("listen", kind=hv_kind)
                server.call("cycle_server", lid=lid)
                try:
                    figure: dict[str, Any] = guest.call(
                        "cycle_client",
                        kind=hv_kind,
                        address=address,
                        seconds=cycle_seconds,
                        threads=threads,
                    )
                finally:
                    accepted = server.call("cycle_stop", lid=lid)
                figure["accepted"] = accepted
                return figure

            # Rounds, so every ratio has a baseline measured beside it (this machine's speed
            # drifts by a third over minutes): in each round, for each size, every transport
            # one after the other; then round trips, then connects, the kinds rotated.
            for turn in range(rounds):
                figures: dict[str, Any] = {
                    "throughput": {kind: {} for kind in THROUGHPUT_KINDS},
                    "rtt": {},
                    "connect": {},
                    "connect_concurrent": {},
                }
                results["rounds"].append(figures)
                for size in SIZES:
                    for kind in _rotated(THROUGHPUT_KINDS, turn):
                        figure = throughput(turn, kind, size)
                        if figure is not None:
                            figures["throughput"][kind][str(size)] = figure
                for kind in THROUGHPUT_KINDS:
                    row = figures["throughput"][kind]
                    print(
                        f"  round {turn} throughput {kind:<16}"
                        + " ".join(f"{row.get(str(s), {}).get('MBps', 0):8.0f}" for s in SIZES),
                        flush=True,
                    )
                for kind in _rotated(RTT_KINDS, turn):
                    hv_kind = RTT_HV_KIND.get(kind, kind)
                    got = record(
                        f"round {turn} rtt {kind}",
                        lambda hv_kind=hv_kind: pair(
                            hv_kind,
                            "echo",
                            "ping",
                            count=rtt_count,
                            warmup=min(200, rtt_count // 5),
                        ),
                    )
                    if got is not None:
                        figures["rtt"][kind] = got[1]
                        print(
                            f"  round {turn} rtt {kind:<8} p50 {got[1]['p50_us']:7.1f} us",
                            flush=True,
                        )
                for kind in _rotated(CONNECT_KINDS, turn):
                    hv_kind = RTT_HV_KIND.get(kind, kind)
                    for threads, table_name in (
                        (1, "connect"),
                        (CONNECT_THREADS, "connect_concurrent"),
                    ):
                        where = f"round {turn} connect {kind} x{threads}"
                        got = record(where, lambda h=hv_kind, t=threads: cycles(h, t))
                        if got is None:
                            continue
                        got["cpu_us_per_cycle"] = {
                            k: v / got["cycles"] * 1e6
                            for k, v in results["cpu_seconds"][where].items()
                            if got["cycles"]
                        }
                        figures[table_name][kind] = got
                        print(f"  {where:<30} {got['per_s']:7.0f} cycles/s", flush=True)
        finally:
            guest.stop()
            server.stop()
    results.update(summarize(results["rounds"]))
    return results


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round of every point, every ratio taken within each round (a transport
    against the baseline measured beside it) and its median over the rounds, and the targets
    judged on those medians."""
    summary: dict[str, Any] = {"throughput": {}, "rtt": {}, "connect": {}, "connect_concurrent": {}}
    for kind in THROUGHPUT_KINDS:
        row = summary["throughput"][kind] = {}
        for size in SIZES:
            figures = [
                r["throughput"][kind][str(size)]
                for r in rounds
                if str(size) in r["throughput"][kind]
            ]
            if figures:
                row[str(size)] = _median_figure(figures, "MBps")
    for table_name, kinds, key in (
        ("rtt", RTT_KINDS, "p50_us"),
        ("connect", CONNECT_KINDS, "per_s"),
        ("connect_concurrent", CONNECT_KINDS, "per_s"),
    ):
        for kind in kinds:
            figures = [r[table_name][kind] for r in rounds if kind in r[table_name]]
            if figures:
                summary[table_name][kind] = _median_figure(figures, key)
    per_round = [ratios(r) for r in rounds]
    summary["ratio_rounds"] = {
        name: [r.get(name) for r in per_round] for name in (per_round[0] if per_round else {})
    }
    summary["ratios"] = {
        name: (
            statistics.median_low(known)
            if (known := [v for v in values if v is not None])
            else None
        )
        for name, values in summary["ratio_rounds"].items()
    }
    summary["targets"] = targets(summary["ratios"], summary["ratio_rounds"], summary["connect"])
    return summary


def ratios(figures: dict[str, Any]) -> dict[str, float | None]:
    """Every ratio of one round's figures."""
    tput, rtt = figures["throughput"], figures["rtt"]

    def mb(kind: str, size: int) -> float | None:
        figure = tput.get(kind, {}).get(str(size))
        return figure["MBps"] if figure else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    r: dict[str, Any] = {}
    for size in SIZES:
        r[f"shm/tcp@{size}"] = div(mb("shm", size), mb("tcp", size))
        r[f"shm/unix@{size}"] = div(mb("shm", size), mb("unix", size))
        r[f"shm-default/tcp@{size}"] = div(mb("shm-default", size), mb("tcp", size))
        r[f"relay/grpc-raw@{size}"] = div(mb("relay", size), mb("grpc-raw", size))
        r[f"relay-vm/grpc-raw@{size}"] = div(mb("relay-vm", size), mb("grpc-raw", size))
    r["relay@1024/relay@65536"] = div(mb("relay", 1024), mb("relay", 65536))
    r["relay-vm@1024/relay-vm@65536"] = div(mb("relay-vm", 1024), mb("relay-vm", 65536))
    r["grpc-raw@1024/grpc-raw@65536"] = div(mb("grpc-raw", 1024), mb("grpc-raw", 65536))
    p50 = {k: v["p50_us"] for k, v in rtt.items()}
    r["rtt_p50 shm/tcp"] = div(p50.get("shm"), p50.get("tcp"))
    r["rtt_p50 relay/tcp"] = div(p50.get("relay"), p50.get("tcp"))
    r["rtt_p50 shm/unix"] = div(p50.get("shm"), p50.get("unix"))
    r["rtt_p50 relay-vm/grpc-raw"] = div(p50.get("relay-vm"), p50.get("grpc-raw"))
    for size in SIZES:
        r[f"relay-default/grpc-raw@{size}"] = div(mb("relay-default", size), mb("grpc-raw", size))
        r[f"relay-vm-default/grpc-raw@{size}"] = div(
            mb("relay-vm-default", size), mb("grpc-raw", size)
        )
    return r


def targets(
    r: dict[str, float | None], r_rounds: dict[str, list[float | None]], conn: dict[str, Any]
) -> dict[str, Any]:
    """Each target judged on its median over the rounds; every round's value is kept."""
    judged: dict[str, Any] = {}

    def target(name: str, value: float | None, op: str, bound: float, rounds: list[Any]) -> None:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        judged[name] = {"value": value, "op": op, "target": bound, "met": met, "rounds": rounds}

    def ratio_target(name: str, op: str, bound: float) -> None:
        target(name, r.get(name), op, bound, r_rounds.get(name, []))

    def rate_target(kind: str, bound: float) -> None:
        figure = conn.get(kind, {})
        target(f"connect/s {kind}", figure.get("per_s"), ">=", bound, figure.get("rounds", []))

    # The shared-memory path.
    ratio_target("shm/tcp@16384", ">=", 1.0)
    ratio_target("shm/tcp@65536", ">=", 1.0)
    ratio_target("rtt_p50 shm/tcp", "<=", 1.0)
    rate_target("shm", 1000.0)
    # The relay (issue 12): "relay-vm" relays only the VM's end, "relay" both; "-default" is
    # the host's default rings (2/3 pages), the others 64-page rings.
    ratio_target("relay-vm-default/grpc-raw@65536", ">=", 0.3)
    ratio_target("relay-default/grpc-raw@65536", ">=", 0.2)
    ratio_target("relay-vm/grpc-raw@16384", ">=", 1.0)
    ratio_target("relay-vm/grpc-raw@65536", ">=", 0.6)
    ratio_target("relay-vm/grpc-raw@262144", ">=", 0.5)
    ratio_target("relay/grpc-raw@65536", ">=", 0.35)
    ratio_target("relay/grpc-raw@262144", ">=", 0.35)
    rate_target("relay-vm", 1000.0)
    rate_target("relay", 800.0)
    ratio_target("rtt_p50 relay-vm/grpc-raw", "<=", 1.2)
    return judged


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, row in results["throughput"].items():
        sizes = [s for s in SIZES if str(s) in row]
        figures = [row[str(s)] for s in sizes]
        medians = [f["MBps"] for f in figures]
        spread = [
            [f["MBps"] - min(f["rounds"]) for f in figures],
            [max(f["rounds"]) - f["MBps"] for f in figures],
        ]
        ax.errorbar(sizes, medians, yerr=spread, marker="o", capsize=3, label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(SIZES, [f"{s // 1024} KiB" for s in SIZES])
    ax.set_xlabel("send size (one connection, sendall)")
    ax.set_ylabel("MB/s (reader, first byte to EOF): median, bars the rounds' range")
    mode = "quick" if results["meta"]["quick"] else "full"
    stack, rounds = results["meta"]["grpc_io"], results["meta"]["rounds"]
    ax.set_title(
        f"hv sockets end to end vs TCP / Unix / raw gRPC\n"
        f"({mode}, {rounds} rounds; gRPC on {stack})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"gRPC I/O stack (every process): {meta['grpc_io']}; {meta['rounds']} rounds, "
        "each figure the median round's"
    ]
    lines.append("throughput MB/s  " + "".join(f"{s // 1024:>7} KiB" for s in SIZES))
    for kind, row in results["throughput"].items():
        cells = "".join(
            f"{row[str(s)]['MBps']:>11.0f}" if str(s) in row else f"{'-':>11}" for s in SIZES
        )
        lines.append(f"  {kind:<15}{cells}")
    lines.append("64 B round trip    p50 us    p99 us")
    for kind, figure in results["rtt"].items():
        lines.append(f"  {kind:<15}{figure['p50_us']:>9.1f}{figure['p99_us']:>10.1f}")
    lines.append(f"connect+accept+close /s   serial  x{CONNECT_THREADS} threads")
    for kind, figure in results["connect"].items():
        concurrent = results["connect_concurrent"].get(kind, {}).get("per_s", 0.0)
        lines.append(f"  {kind:<15}{figure['per_s']:>9.0f}{concurrent:>11.0f}")
    lines.append("targets (median over the rounds; then each round's value)")
    for name, t in results["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        each = " ".join("-" if v is None else f"{v:.2f}" for v in t["rounds"])
        lines.append(f"  {name:<32}{value:>9} {t['op']} {t['target']:<7} {verdict:<7} [{each}]")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short points, one round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="rounds of every point (default 3, 1 with --quick); each ratio is taken within "
        "a round, the targets on the median",
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = parser.parse_args()
    if args.rounds < 0:
        parser.error(f"--rounds must be at least 1 (0: the default), not {args.rounds}")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    results = run(args)
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    results["meta"]["loadavg_end"] = os.getloadavg()
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "e2e.png"))
    print(table(results))
    print(f"wrote {args.out}/e2e.json and e2e.png in {results['meta']['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
