"""What a relay built on grpcio streams can reach at best, next to bench_e2e's raw gRPC baseline.

    .venv/bin/python bench/bench_relay_ceiling.py [--quick] [--out bench/results]

The relay path moves a socket's bytes as ``SessionData`` frames (measured here: 64 KiB frames)
over a bidirectional stream from a sync grpcio client to the host service's grpc.aio
server, and the host answers with send credit (about one message per two frames on a 256 KiB
ring). This measures that transport alone, with no sockets, rings, threads or protobuf of ours:

- ``grpc-raw``: bench_e2e's baseline: one client-streaming call to a sync grpcio server, one
  message per send (generic handlers, bytes, no protobuf);
- ``bidi``: a bidirectional call to a grpc.aio server, each send split into 64 KiB frames,
  nothing answered until the end;
- ``bidi+credit``: the same, and the server answers 8 bytes every two frames, like the relay's
  send credit.

All over Unix sockets, client and servers in separate processes, in the same run. Writes
bench/results/relay_ceiling.json and prints each transport's throughput and its ratio to
``grpc-raw``: the ratio ``bidi+credit`` reaches is the most the relay could reach against the
``relay/grpc-raw >= 0.5`` target of bench_e2e.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
from bench_e2e import cpu_seconds

SIZES = [16384, 65536, 262144]
FRAME = 65536  # the relay's largest frame
CREDIT_EVERY = 2  # frames per credit answer (a 256 KiB ring granted in half-ring steps)
OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


def _sync_server(address: str, ready: Any) -> None:
    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = sum(len(m) for m in requests)
        return total.to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "ceiling.Raw", {"Push": grpc.stream_unary_rpc_method_handler(push)}
            ),
        )
    )
    server.add_insecure_port(address)
    server.start()
    ready.set()
    server.wait_for_termination()


def _aio_server(address: str, ready: Any) -> None:
    def relay(credit: bool) -> grpc.RpcMethodHandler:
        async def frames(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            total = count = 0
            async for frame in requests:
                total += len(frame)
                count += 1
                if credit and count % CREDIT_EVERY == 0:
                    yield total.to_bytes(8, "little")
            yield total.to_bytes(8, "little")

        return grpc.stream_stream_rpc_method_handler(frames)

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "ceiling.Relay", {"bidi": relay(False), "bidi+credit": relay(True)}
                ),
            )
        )
        server.add_insecure_port(address)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _measure(
    channel: grpc.Channel, kind: str, size: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    message = b"\xa5" * size
    frames = [message[i : i + FRAME] for i in range(0, size, FRAME)]
    sent = 0

    def sends() -> Iterator[bytes]:
        nonlocal sent
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if kind == "grpc-raw":
                yield message
            else:
                yield from frames
            sent += size

    began, cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    if kind == "grpc-raw":
        answer = channel.stream_unary("/ceiling.Raw/Push")(sends())
        received = int.from_bytes(answer, "little")
    else:
        received = 0
        for answer in channel.stream_stream(f"/ceiling.Relay/{kind}")(sends()):
            received = int.from_bytes(answer, "little")
    elapsed = time.perf_counter() - began
    if received != sent:
        raise RuntimeError(f"{kind}: server counted {received} bytes, client sent {sent}")
    gigabytes = sent / 1e9
    return {
        "bytes": sent,
        "seconds": elapsed,
        "MBps": sent / elapsed / 1e6,
        "cpu_s_per_GB": {
            "client": (time.process_time() - cpu) / gigabytes,
            "server": (cpu_seconds(server_pid) - server_cpu) / gigabytes,
        },
    }


def run(seconds: float, rounds: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hvsock-ceiling-") as workdir:
        addresses = {
            "sync": f"unix:{workdir}/sync.sock",
            "aio": f"unix:{workdir}/aio.sock",
        }
        servers = {}
        for name, target in (("sync", _sync_server), ("aio", _aio_server)):
            ready = ctx.Event()
            proc = ctx.Process(target=target, args=(addresses[name], ready), daemon=True)
            proc.start()
            if not ready.wait(60):
                raise RuntimeError(f"the {name} server did not start")
            servers[name] = proc
        results: dict[str, Any] = {"throughput": {}, "ratios": {}}
        try:
            channels = {n: grpc.insecure_channel(a, options=OPTIONS) for n, a in addresses.items()}
            for kind in ("grpc-raw", "bidi", "bidi+credit"):
                server = "sync" if kind == "grpc-raw" else "aio"
                pid = servers[server].pid
                assert pid is not None
                row = results["throughput"][kind] = {}
                for size in SIZES:
                    # Best of a few rounds: the machine may be shared; every round is kept.
                    runs = [
                        _measure(channels[server], kind, size, seconds, pid) for _ in range(rounds)
                    ]
                    best = max(runs, key=lambda r: r["MBps"])
                    row[str(size)] = {**best, "rounds_MBps": [r["MBps"] for r in runs]}
                    mbps = best["MBps"]
                    print(f"  {kind:<12} {size // 1024:>4} KiB {mbps:8.0f} MB/s", flush=True)
            for channel in channels.values():
                channel.close()
        finally:
            for proc in servers.values():
                proc.kill()
                proc.join()
    raw = results["throughput"]["grpc-raw"]
    for kind in ("bidi", "bidi+credit"):
        for size in SIZES:
            results["ratios"][f"{kind}/grpc-raw@{size}"] = (
                results["throughput"][kind][str(size)]["MBps"] / raw[str(size)]["MBps"]
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short points (seconds)")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = run(0.3 if args.quick else 1.5, 2 if args.quick else 3)
    results["meta"] = {
        "quick": args.quick,
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "frame": FRAME,
        "credit_every_frames": CREDIT_EVERY,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": os.getloadavg(),
    }
    path = os.path.join(args.out, "relay_ceiling.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    for name, ratio in results["ratios"].items():
        print(f"  {name:<26} {ratio:5.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
