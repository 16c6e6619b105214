"""What a relay built on grpcio streams can reach at best, next to bench_e2e's raw gRPC baseline.

    .venv/bin/python bench/bench_relay_ceiling.py [--quick] [--out bench/results]

The relay path moves a socket's bytes as ``SessionData`` frames (at most ``MAX_FRAME_DATA``,
256 KiB) over a bidirectional stream from a sync grpcio client to the host service's grpc.aio
server, and the host answers with send credit (a grant per quarter of the default 1 MiB relay
window). This measures that transport alone, with no sockets, rings, threads or protobuf of
ours:

- ``grpc-raw``: bench_e2e's baseline: one client-streaming call to a sync grpcio server, one
  message per send (generic handlers, bytes, no protobuf);
- ``bidi``: a bidirectional call to a grpc.aio server, each send split into frames of at most
  ``MAX_FRAME_DATA``, one message each, nothing answered until the end;
- ``bidi+credit``: the same, and the server answers 8 bytes per quarter window received,
  like the relay's send credit.
- ``bidi+credit+thread``: the same stream and answers, the sends made as a socket library
  on grpcio must make them: a program thread copies each send (a program may reuse its
  buffer once ``sendall`` returns) and hands it over, at most the relay window (1 MiB) beyond
  the server's last credit, and grpcio's request thread takes it; the answers are read on a
  thread of their own. grpcio's Python API lets no program thread write to a stream itself
  (the sync API pulls requests on its own thread, grpc.aio only from its event loop), so
  this hand-off is in every client of the relay: this is the most the guest library can
  reach.
- ``forward``: both ends relayed: the same messages as ``grpc-raw``, through a grpc.aio server
  that writes each to the stream of a second client, in a process of its own (the receiver),
  and answers the sender 8 bytes per quarter window passed on, like the relay's credit. One
  server process reads and writes every byte, as the host does between two relayed ends
  (with no frames, protobuf, windows or sockets of ours): the most ``relay`` can reach
  against bench_e2e's raw gRPC baseline.

And the 64-byte round trip (p50), a message each way on one bidi stream from a sync client:

- ``grpc-raw``: to a sync grpcio echo (bench_e2e's baseline);
- ``aio``: to a grpc.aio echo (the host service's server);
- ``aio+ring``: to a grpc.aio server that passes each message through a channel's rings (2/3
  pages, the default) to an echo in another process and answers with the reply: the shape of
  a relay-vm round trip with nothing of the emulator in it (the loop writes into the ring, a
  thread waits on the other ring and hands the reply to the loop, as the host's ring relay
  does; no protobuf, credit, sessions or client-side stream thread).

And serial connect cycles (connect, accept, the peer's close seen, close), carried as the
relay carries them, one tiny message each: ``connect`` on an attach stream answered ``opened``,
then ``fin`` on the session's data stream, ``close`` on it answered ``close_done``, all read by
the client in order on one thread. That is five of the six messages a relayed connect exchanges
(the end's first credit is left out), so these are upper bounds:

- ``connect``: the server answers at once (no peer at all);
- ``connect+accept``: the server first offers the connect to a peer process on an attach stream
  of its own and waits for its ``accept``, as every accepting partition must.

Both have nothing of the emulator in them; their rates are the most a relayed connect can reach
against bench_e2e's ``connect/s relay-vm`` and ``connect/s relay`` targets.

And ``connect+accept x N``: bench_scale's first phase. The client fires N (10,240; 1,024 with
--quick) connects at once on one attach stream; the server offers each to the accepting peer
on the peer's stream and, on its accept, answers ``opened`` to both: five tiny messages per
connect, many in flight. Its rate is the most bench_scale's ``connect+accept per second`` can
reach, and its server CPU per connect is the part of the host's that is gRPC's alone.

And the testbed's echo (``hvsock_tools.demo.echo_client``: ``CHUNK`` sends, full duplex) from a
sync grpcio client to the grpc.aio echo, one message per send, every byte echoed by the server
itself: the shape of the testbed summary's ``vm-windows`` line (a relayed VM, one sync grpcio
process) with no host hop, no rings and none of hv_sock's 16 KiB deliveries:

- ``echo``: one echo alone;
- ``echo x2``: two at once on one channel, as the VM runs them (its echo of the host program's
  data, and its own echo against the host program's service); each one's rate.

Their rates are the most the testbed's ``vm-windows`` line can reach.

All over Unix sockets, client and servers in separate processes, in the same run, each with
the allocator settings hvsock's processes give themselves (``bench_e2e.tune_allocators``). Writes
bench/results/relay_ceiling.json and prints each transport's throughput and round trip and
their ratios to ``grpc-raw``: the ratio ``bidi+credit+thread`` reaches is the most the relay
could reach against the ``relay/grpc-raw`` targets of bench_e2e, the one ``aio+ring`` reaches
the least a relayed VM's round trip can cost against its ``rtt_p50 relay-vm/grpc-raw`` target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any

# bench_e2e imports the guest library before grpc: this bench's processes run on the gRPC I/O
# stack hvsock's do (hvsock_common.grpc_io), as bench_e2e's do.
from bench_e2e import RTT_MSG, cpu_seconds, tune_allocators  # isort: skip
import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host_service.core.relay import DEFAULT_RELAY_WINDOW, MAX_FRAME_DATA
from hvsock_common import grpc_io
from hvsock_tools.demo import CHUNK as ECHO_CHUNK
from ring import shm

SIZES = [16384, 65536, 262144]
THROUGHPUT_KINDS = ["grpc-raw", "bidi", "bidi+credit", "bidi+credit+thread", "forward"]
FRAME = MAX_FRAME_DATA  # the relay's largest frame
CREDIT_EVERY = DEFAULT_RELAY_WINDOW // 4  # bytes per credit answer (the relay's grant step)
OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


def _sync_server(address: str, ready: Any) -> None:
    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = sum(len(m) for m in requests)
        return total.to_bytes(8, "little")

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "ceiling.Raw",
                {
                    "Push": grpc.stream_unary_rpc_method_handler(push),
                    "Echo": grpc.stream_stream_rpc_method_handler(echo),
                },
            ),
        )
    )
    server.add_insecure_port(address)
    server.start()
    ready.set()
    server.wait_for_termination()


def _ring_echo(pid: int, fd: int) -> None:
    """The far end of ``aio+ring``: echo what comes through the rings until EOF."""
    path = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    try:
        end = shm.Channel.attach_fd(path)
    finally:
        os.close(path)
    buffer = bytearray(65536)
    with end:
        while n := end.recv_into(buffer):
            end.sendall(memoryview(buffer)[:n])


def _aio_server(address: str, ready: Any, ring_fd: Any) -> None:
    # The rings of ``aio+ring`` (default geometry); run() starts their far end (_ring_echo)
    # in a process of its own, from this descriptor.
    rings = shm.Channel.create(2, 3, end=0)
    ring_fd.value = rings.fileno()

    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    # ``forward``: the sender's messages on their way to the receiver's stream (bounded, as
    # gRPC's flow control bounds the host's reads); b"" ends one receiver's stream.
    forwarded: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    async def forward(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        total = granted = 0
        async for message in requests:
            await forwarded.put(message)
            total += len(message)
            if total - granted >= CREDIT_EVERY:
                granted = total
                yield total.to_bytes(8, "little")
        await forwarded.put(b"")
        yield total.to_bytes(8, "little")

    async def forward_out(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        while message := await forwarded.get():
            yield message

    def relay(credit: bool) -> grpc.RpcMethodHandler:
        async def frames(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            total = granted = 0
            async for frame in requests:
                total += len(frame)
                if credit and total - granted >= CREDIT_EVERY:
                    granted = total
                    yield total.to_bytes(8, "little")
            yield total.to_bytes(8, "little")

        return grpc.stream_stream_rpc_method_handler(frames)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        def read_replies() -> None:
            # As the ring relay's reader: wait on the ring off the loop, hand the bytes over.
            buffer = bytearray(65536)
            while n := rings.recv_into(buffer):
                loop.call_soon_threadsafe(replies.put_nowait, bytes(buffer[:n]))

        threading.Thread(target=read_replies, daemon=True).start()

        async def via_ring(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            async for message in requests:
                rings.tx.write(message, 0)  # from the loop, as the ring relay's inline write
                yield await replies.get()

        # Connect cycles: the client's data stream and the peer's offers (one client, one
        # peer at a time: the bench runs them serially).
        to_data: asyncio.Queue[bytes] = asyncio.Queue()
        offers: asyncio.Queue[bytes] = asyncio.Queue()
        accepts: asyncio.Queue[bytes] = asyncio.Queue()
        # Connects in flight: what goes to the connecting client and to the accepting peer.
        to_connector: asyncio.Queue[bytes] = asyncio.Queue()
        to_acceptor: asyncio.Queue[bytes] = asyncio.Queue()

        def accepted(_accept: bytes) -> None:
            to_acceptor.put_nowait(b"opened")
            to_connector.put_nowait(b"opened")

        def connect_attach(peer: bool) -> grpc.RpcMethodHandler:
            async def attach(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                async for _connect in requests:
                    if peer:
                        offers.put_nowait(b"offer")
                        await accepts.get()
                    yield b"opened"
                    to_data.put_nowait(b"fin")  # the peer closed at once

            return grpc.stream_stream_rpc_method_handler(attach)

        def fed_from(
            out: asyncio.Queue[bytes], on_request: Callable[[bytes], None]
        ) -> grpc.RpcMethodHandler:
            """A stream answering from ``out`` while ``on_request`` takes each request; it
            ends when the client's requests do."""

            async def stream(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                async def take() -> None:
                    async for request in requests:
                        on_request(request)
                    out.put_nowait(b"")

                taking = asyncio.ensure_future(take())
                while message := await out.get():
                    yield message
                await taking

            return grpc.stream_stream_rpc_method_handler(stream)

        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "ceiling.Relay",
                    {
                        "bidi": relay(False),
                        "bidi+credit": relay(True),
                        "Echo": grpc.stream_stream_rpc_method_handler(echo),
                        "forward": grpc.stream_stream_rpc_method_handler(forward),
                        "ForwardOut": grpc.unary_stream_rpc_method_handler(forward_out),
                        "EchoViaRing": grpc.stream_stream_rpc_method_handler(via_ring),
                        "connect": connect_attach(False),
                        "connect+accept": connect_attach(True),
                        # The client's data stream: each close answered close_done.
                        "ConnectData": fed_from(
                            to_data, lambda _close: to_data.put_nowait(b"close_done")
                        ),
                        # The peer's attach stream: offers out, accepts in.
                        "Peer": fed_from(offers, accepts.put_nowait),
                        # Connects in flight: the connector's and the acceptor's streams.
                        "Connects": fed_from(
                            to_connector, lambda _connect: to_acceptor.put_nowait(b"offer")
                        ),
                        "Accepts": fed_from(to_acceptor, accepted),
                    },
                ),
            )
        )
        server.add_insecure_port(address)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _queued(outgoing: queue.SimpleQueue[bytes | None]) -> Iterator[bytes]:
    """A request iterator fed from a queue (grpcio's sync calls read it on a thread of theirs)."""
    while (message := outgoing.get()) is not None:
        yield message


def _forward_receiver(address: str, commands: Any) -> None:
    """``forward``'s receiver, in a process of its own: for each command, read one ForwardOut
    stream to its end and answer the bytes it carried."""
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        forward_out = channel.unary_stream("/ceiling.Relay/ForwardOut")
        while commands.recv():
            commands.send(sum(len(message) for message in forward_out(b"")))


def _accepting_peer(address: str, method: str) -> None:
    """The connect ceilings' peer: accept every offer, as a listening partition does."""
    outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    with grpc.insecure_channel(address) as channel:
        for message in channel.stream_stream(f"/ceiling.Relay/{method}")(_queued(outgoing)):
            if message == b"offer":
                outgoing.put(b"accept")


def _connects_in_flight(channel: grpc.Channel, count: int, server_pid: int) -> dict[str, Any]:
    """``count`` connects fired at once, until every one is opened: their rate and the
    server's CPU per connect."""
    outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    began, server_cpu = time.perf_counter(), cpu_seconds(server_pid)
    answers = channel.stream_stream("/ceiling.Relay/Connects")(_queued(outgoing))
    for _ in range(count):
        outgoing.put(b"connect")
    for _ in range(count):
        if next(answers) != b"opened":
            raise RuntimeError("connect+accept x N: a connect was answered otherwise")
    elapsed = time.perf_counter() - began
    result = {
        "per_s": count / elapsed,
        "server_cpu_us_per_connect": (cpu_seconds(server_pid) - server_cpu) / count * 1e6,
    }
    outgoing.put(None)
    for _ in answers:
        pass
    return result


def _connect_cycles(
    channel: grpc.Channel, kind: str, count: int, server_pid: int
) -> dict[str, Any]:
    """``count`` serial connect cycles after a warm-up: their rate and CPU per cycle."""
    to_attach: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    to_data: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    data = channel.stream_stream("/ceiling.Relay/ConnectData")(_queued(to_data))
    attach = channel.stream_stream(f"/ceiling.Relay/{kind}")(_queued(to_attach))

    def cycles(n: int) -> None:
        for _ in range(n):
            to_attach.put(b"connect")
            if next(attach) != b"opened" or next(data) != b"fin":
                raise RuntimeError(f"{kind}: the connect was answered out of order")
            to_data.put(b"close")
            if next(data) != b"close_done":
                raise RuntimeError(f"{kind}: the close was answered out of order")

    cycles(count // 5)
    began, cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    cycles(count)
    elapsed = time.perf_counter() - began
    result = {
        "per_s": count / elapsed,
        "cpu_us_per_cycle": {
            "client": (time.process_time() - cpu) / count * 1e6,
            "server": (cpu_seconds(server_pid) - server_cpu) / count * 1e6,
        },
    }
    to_attach.put(None)
    to_data.put(None)
    for _ in data:
        pass
    return result


def _measure(
    channel: grpc.Channel, kind: str, size: int, seconds: float, server_pid: int, receiver: Any
) -> dict[str, Any]:
    """One throughput point (``receiver``: the pipe to ``forward``'s receiving process)."""
    if kind == "bidi+credit+thread":
        return _measure_from_thread(channel, size, seconds, server_pid)
    message = b"\xa5" * size
    frames = [message[i : i + FRAME] for i in range(0, size, FRAME)]
    sent = 0

    def sends() -> Iterator[bytes]:
        nonlocal sent
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if kind in ("grpc-raw", "forward"):
                yield message
            else:
                yield from frames
            sent += size

    began, cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    if kind == "grpc-raw":
        answer = channel.stream_unary("/ceiling.Raw/Push")(sends())
        received = int.from_bytes(answer, "little")
    elif kind == "forward":
        receiver.send(True)  # the receiver reads its stream while this one sends
        for _credit in channel.stream_stream("/ceiling.Relay/forward")(sends()):
            pass
        received = receiver.recv()  # once every byte reached the receiver
    else:
        received = 0
        for answer in channel.stream_stream(f"/ceiling.Relay/{kind}")(sends()):
            received = int.from_bytes(answer, "little")
    return _figure(kind, sent, received, (began, cpu, server_cpu), server_pid)


def _figure(
    kind: str, sent: int, received: int, start: tuple[float, float, float], server_pid: int
) -> dict[str, Any]:
    """One throughput point, from ``start``: (wall clock, this process's CPU, the server's)."""
    elapsed = time.perf_counter() - start[0]
    if received != sent:
        raise RuntimeError(f"{kind}: server counted {received} bytes, client sent {sent}")
    gigabytes = sent / 1e9
    return {
        "bytes": sent,
        "seconds": elapsed,
        "MBps": sent / elapsed / 1e6,
        "cpu_s_per_GB": {
            "client": (time.process_time() - start[1]) / gigabytes,
            "server": (cpu_seconds(server_pid) - start[2]) / gigabytes,
        },
    }


def _measure_from_thread(
    channel: grpc.Channel, size: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    """``bidi+credit+thread``: see the module's docstring."""
    message = b"\xa5" * size
    handed: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    room = threading.Condition()
    accepted = credited = 0  # bytes handed over; bytes the server said it received

    def program() -> None:
        nonlocal accepted
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for offset in range(0, size, FRAME):
                piece = bytes(memoryview(message)[offset : offset + FRAME])  # sendall's copy
                with room:
                    while accepted + len(piece) - credited > DEFAULT_RELAY_WINDOW:
                        room.wait()
                    accepted += len(piece)
                handed.put(piece)
        handed.put(None)

    start = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    sender = threading.Thread(target=program)
    sender.start()
    for answer in channel.stream_stream("/ceiling.Relay/bidi+credit")(iter(handed.get, None)):
        with room:
            credited = int.from_bytes(answer, "little")
            room.notify()
    sender.join()
    return _figure("bidi+credit+thread", accepted, credited, start, server_pid)


def _round_trips(channel: grpc.Channel, method: str, count: int) -> float:
    """p50 in microseconds of ``count`` 64-byte round trips (the first fifth warms up)."""
    outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    call = channel.stream_stream(method)(_queued(outgoing))
    message, samples = b"\xa5" * RTT_MSG, []
    for _ in range(count):
        began = time.perf_counter()
        outgoing.put(message)
        if len(next(call)) != RTT_MSG:
            raise RuntimeError(f"{method}: the echo answered another size")
        samples.append(time.perf_counter() - began)
    outgoing.put(None)
    for _ in call:
        pass
    return statistics.median(samples[count // 5 :]) * 1e6


#: Round-trip transports: (server, method).
RTT_KINDS = {
    "grpc-raw": ("sync", "/ceiling.Raw/Echo"),
    "aio": ("aio", "/ceiling.Relay/Echo"),
    "aio+ring": ("aio", "/ceiling.Relay/EchoViaRing"),
}


def _echo(channel: grpc.Channel, nbytes: int) -> float:
    """One echo of ``nbytes`` or so (whole sends; the testbed's shape: full duplex, in flight
    what gRPC's flow control lets through); its rate in MB/s."""
    sends = nbytes // ECHO_CHUNK
    message = b"\xa5" * ECHO_CHUNK
    began = time.perf_counter()
    received = 0
    for answer in channel.stream_stream("/ceiling.Relay/Echo")(message for _ in range(sends)):
        received += len(answer)
    if received != sends * ECHO_CHUNK:
        raise RuntimeError(f"echo: {received} of {sends * ECHO_CHUNK} bytes came back")
    return received / (time.perf_counter() - began) / 1e6


def _echo_ceilings(channel: grpc.Channel, rounds: int, nbytes: int) -> dict[str, Any]:
    """``echo`` and ``echo x2``, the best of ``rounds`` each (every round kept)."""
    results: dict[str, Any] = {}
    for kind, count in (("echo", 1), ("echo x2", 2)):
        runs = []
        for _ in range(rounds):
            with futures.ThreadPoolExecutor(count) as pool:
                rates = list(pool.map(lambda _: _echo(channel, nbytes), range(count)))
            runs.append(min(rates))  # each way's: the slower echo's
        results[kind] = {"MBps": max(runs), "rounds_MBps": runs}
        print(f"  {kind:<16} {max(runs):6.0f} MB/s each", flush=True)
    return results


def _connect_ceilings(
    ctx: Any,
    channel: grpc.Channel,
    address: str,
    server_pid: int,
    rounds: int,
    count: int,
    in_flight: int,
) -> dict[str, Any]:
    """Every connect kind, the best of ``rounds`` each (every round kept)."""
    results: dict[str, Any] = {}
    # kind -> the peer's stream (None: no peer)
    for kind, peer_method in (
        ("connect", None),
        ("connect+accept", "Peer"),
        ("connect+accept x N", "Accepts"),
    ):
        peer = None
        if peer_method is not None:
            peer = ctx.Process(target=_accepting_peer, args=(address, peer_method), daemon=True)
            peer.start()
        try:
            if peer_method == "Accepts":
                runs = [_connects_in_flight(channel, in_flight, server_pid) for _ in range(rounds)]
            else:
                runs = [_connect_cycles(channel, kind, count, server_pid) for _ in range(rounds)]
        finally:
            if peer is not None:
                peer.kill()
                peer.join()
        best = max(runs, key=lambda r: r["per_s"])
        results[kind] = {**best, "rounds_per_s": [r["per_s"] for r in runs]}
        if peer_method == "Accepts":
            results[kind]["in_flight"] = in_flight
            cost = f"server CPU per connect {best['server_cpu_us_per_connect']:.0f} us"
        else:
            cpu = best["cpu_us_per_cycle"]
            cost = f"CPU per cycle: client {cpu['client']:.0f} us, server {cpu['server']:.0f} us"
        print(f"  {kind:<18} {best['per_s']:6.0f} connects/s ({cost})", flush=True)
    return results


def run(
    seconds: float, rounds: int, rtt_count: int, echo_bytes: int, in_flight: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hvsock-ceiling-") as workdir:
        addresses = {
            "sync": f"unix:{workdir}/sync.sock",
            "aio": f"unix:{workdir}/aio.sock",
        }
        servers = {}
        ring_fd = ctx.Value("i", -1)
        for name, target, extra in (
            ("sync", _sync_server, ()),
            ("aio", _aio_server, (ring_fd,)),
        ):
            ready = ctx.Event()
            proc = ctx.Process(target=target, args=(addresses[name], ready, *extra), daemon=True)
            proc.start()
            if not ready.wait(60):
                raise RuntimeError(f"the {name} server did not start")
            servers[name] = proc
        servers["ring-echo"] = ctx.Process(
            target=_ring_echo, args=(servers["aio"].pid, ring_fd.value), daemon=True
        )
        servers["ring-echo"].start()
        receiver, receiver_end = ctx.Pipe()
        servers["forward-receiver"] = ctx.Process(
            target=_forward_receiver, args=(addresses["aio"], receiver_end), daemon=True
        )
        servers["forward-receiver"].start()
        results: dict[str, Any] = {"throughput": {}, "rtt_p50_us": {}, "ratios": {}}
        try:
            channels = {n: grpc.insecure_channel(a, options=OPTIONS) for n, a in addresses.items()}
            # Kinds alternated within each round, size by size, so each sees the machine as
            # the others do (its speed drifts over minutes); the best round of each is kept.
            measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for _ in range(rounds):
                for size in SIZES:
                    for kind in THROUGHPUT_KINDS:
                        server = "sync" if kind == "grpc-raw" else "aio"
                        pid = servers[server].pid
                        assert pid is not None
                        figure = _measure(channels[server], kind, size, seconds, pid, receiver)
                        measured.setdefault((kind, size), []).append(figure)
            for kind in THROUGHPUT_KINDS:
                row = results["throughput"][kind] = {}
                for size in SIZES:
                    runs = measured[kind, size]
                    best = max(runs, key=lambda r: r["MBps"])
                    row[str(size)] = {**best, "rounds_MBps": [r["MBps"] for r in runs]}
                    mbps = best["MBps"]
                    print(f"  {kind:<18} {size // 1024:>4} KiB {mbps:8.0f} MB/s", flush=True)
            # Round trips: kinds alternated over the rounds, the best p50 of each kept.
            rtts: dict[str, list[float]] = {kind: [] for kind in RTT_KINDS}
            for _ in range(rounds):
                for kind, (server, method) in RTT_KINDS.items():
                    rtts[kind].append(_round_trips(channels[server], method, rtt_count))
            for kind, p50s in rtts.items():
                results["rtt_p50_us"][kind] = {"p50": min(p50s), "rounds": p50s}
                print(f"  rtt {kind:<10} p50 {min(p50s):7.1f} us", flush=True)
            aio_pid = servers["aio"].pid
            assert aio_pid is not None
            results["connect"] = _connect_ceilings(
                ctx, channels["aio"], addresses["aio"], aio_pid, rounds, rtt_count // 2, in_flight
            )
            results["echo"] = _echo_ceilings(channels["aio"], rounds, echo_bytes)
            for channel in channels.values():
                channel.close()
        finally:
            for proc in servers.values():
                proc.kill()
                proc.join()
    raw = results["throughput"]["grpc-raw"]
    for kind in THROUGHPUT_KINDS[1:]:
        for size in SIZES:
            results["ratios"][f"{kind}/grpc-raw@{size}"] = (
                results["throughput"][kind][str(size)]["MBps"] / raw[str(size)]["MBps"]
            )
    rtt = results["rtt_p50_us"]
    for kind in ("aio", "aio+ring"):
        results["ratios"][f"rtt_p50 {kind}/grpc-raw"] = rtt[kind]["p50"] / rtt["grpc-raw"]["p50"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short points (seconds)")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # (seconds per point, rounds, round trips, bytes per echo, connects in flight)
    scale = (0.3, 2, 1000, 32 << 20, 1024) if args.quick else (1.5, 3, 5000, 256 << 20, 10_240)
    malloc = tune_allocators()  # before any process starts
    results = run(*scale)
    results["meta"] = {
        "allocator": malloc,
        "quick": args.quick,
        "grpcio": grpc.__version__,
        "grpc_io": grpc_io.stack(),
        "cpus": os.cpu_count(),
        "frame": FRAME,
        "credit_every_bytes": CREDIT_EVERY,
        "echo_chunk": ECHO_CHUNK,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": os.getloadavg(),
    }
    path = os.path.join(args.out, "relay_ceiling.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    for name, ratio in results["ratios"].items():
        print(f"  {name:<34} {ratio:5.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
