"""Throughput through ``hvsock bridge`` against a direct socket-API connection, same run.

    .venv/bin/python bench/bench_bridge.py [--quick] [--out bench/results]

Starts its own ``hvsock-host`` and one VM. The VM's service (this process) listens on an hv
address and reads into one 256 KiB buffer with ``recv_into``, timing first byte to EOF. The
client, in a spawned process (no GIL shared with the reader), sends ``--mib`` MiB in 64 KiB
``sendall`` calls, then ``shutdown(SHUT_WR)``:

- ``direct``: the host partition's hv socket connects to ``(vm, service)`` (64-page rings);
- ``bridge``: a plain TCP socket connects to an ``hvsock bridge`` process (its own process, as
  a user runs it) that relays to ``(vm, service)`` as the host partition (64-page rings).

Both on each data path: ``shm`` (shared memory) and ``grpc`` (the relay), for the reader, the
direct writer and the bridge alike. Best of ``--repeat`` runs. Writes bench/results/bridge.json
(every figure and the bridge/direct ratio) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import guest_client as hv
from hvsock_tools.demo import local_host

CHUNK = 64 * 1024
RING = 63 * 4096  # 64-page rings, asked for with SO_SNDBUF/SO_RCVBUF
DATA_PATHS = ["shm", "relay"]


def writer(kind: str, target: str, token: str, data_path: str, address: Any, nbytes: int) -> None:
    """The client process: send nbytes then half-close, wait for the reader's close."""
    payload = os.urandom(CHUNK)
    if kind == "direct":
        from hvsock.v1 import hvsock_pb2

        partition = hv.Partition(
            target, hvsock_pb2.Hello(host=True, token=token), data_path=data_path
        )
        sock: Any = partition.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RING)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RING)
        sock.connect(tuple(address))
    else:
        partition = None
        sock = socket.create_connection(tuple(address))
    sent = 0
    view = memoryview(payload)
    while sent < nbytes:
        sock.sendall(view)
        sent += CHUNK
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the reader closes when it has everything
    sock.close()
    if partition is not None:
        partition.close()


def read_one(listener: Any, nbytes: int) -> float:
    conn, _ = listener.accept()
    buffer = bytearray(256 * 1024)
    got = 0
    start = None
    while True:
        n = conn.recv_into(buffer)
        if not n:
            break
        if start is None:
            start = time.perf_counter()
        got += n
    elapsed = time.perf_counter() - (start or time.perf_counter())
    conn.close()
    if got != nbytes:
        raise RuntimeError(f"read {got} bytes, expected {nbytes}")
    return elapsed


def measure(
    kind: str, host: Any, data_path: str, listener: Any, address: Any, nbytes: int, repeat: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    best = None
    runs = []
    for _ in range(repeat):
        proc = ctx.Process(
            target=writer,
            args=(kind, host.target, host.token, data_path, address, nbytes),
        )
        proc.start()
        elapsed = read_one(listener, nbytes)
        proc.join(60)
        if proc.exitcode != 0:
            raise RuntimeError(f"{kind} writer exited with {proc.exitcode}")
        rate = nbytes / elapsed
        runs.append(round(rate))
        best = rate if best is None else max(best, rate)
    assert best is not None
    return {"bytes_per_second": round(best), "runs_bytes_per_second": runs}


def start_bridge(
    host: Any, data_path: str, vm_id: str, service: str
) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HVSOCK_")}
    env.update(HVSOCK_DATA_PATH=data_path)
    proc = subprocess.Popen(
        [
            str(pathlib.Path(sys.executable).parent / "hvsock"),
            "--host",
            host.target,
            "bridge",
            "--listen",
            "tcp:127.0.0.1:0",
            "--connect",
            f"hv:{vm_id}:{service}",
            f"--host-token={host.token}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    if not banner.startswith("bridge listening on tcp:"):
        raise RuntimeError(f"bridge did not start: {banner!r} (exit {proc.poll()})")
    port = int(banner.split()[3].rsplit(":", 1)[1])
    return proc, ("127.0.0.1", port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB, one run each")
    parser.add_argument("--mib", type=int, default=None, help="MiB per run (default 128)")
    parser.add_argument("--repeat", type=int, default=None, help="runs each (default 3)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    mib = args.mib or (16 if args.quick else 128)
    repeat = args.repeat or (1 if args.quick else 3)
    nbytes = mib << 20
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "bytes_per_run": nbytes,
        "send_size": CHUNK,
        "ring_pages": 64,
        "paths": {},
    }
    with local_host(prefix="hvsock-bench-bridge") as host:
        vm_creds = host.create_vm("bench-bridge")
        for data_path in DATA_PATHS:
            vm = host.partition(vm=vm_creds, data_path=data_path)
            service = hv.service_id_for_port(9000 + DATA_PATHS.index(data_path))
            listener = vm.socket()
            listener.bind((hv.HV_GUID_WILDCARD, service))
            listener.listen()
            figures: dict[str, Any] = {}
            figures["direct"] = measure(
                "direct", host, data_path, listener, (vm.vm_id, service), nbytes, repeat
            )
            bridge, address = start_bridge(host, data_path, vm.vm_id, service)
            try:
                figures["bridge"] = measure(
                    "bridge", host, data_path, listener, address, nbytes, repeat
                )
            finally:
                bridge.terminate()
                bridge.wait(10)
                assert bridge.stdout is not None
                bridge.stdout.close()
            figures["bridge_vs_direct"] = round(
                figures["bridge"]["bytes_per_second"] / figures["direct"]["bytes_per_second"], 3
            )
            results["paths"][data_path] = figures
            listener.close()
            vm.close()
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "bridge.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{'path':<6} {'direct MB/s':>12} {'bridge MB/s':>12} {'ratio':>7}")
    for data_path, figures in results["paths"].items():
        print(
            f"{data_path:<6} {figures['direct']['bytes_per_second'] / 1e6:>12.0f}"
            f" {figures['bridge']['bytes_per_second'] / 1e6:>12.0f}"
            f" {figures['bridge_vs_direct']:>7.2f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
