"""``hvsock run``: an unmodified socat through the vsock shim against the same socat over TCP
loopback, same run.

    .venv/bin/python bench/bench_run.py [--quick] [--mib N] [--repeat N] [--out bench/results]

Starts its own ``hvsock-host``, one VM, and a companion for each side (the VM's, the host
partition's), as ``hvsock run`` does, then times:

- throughput: ``socat -u -b 65536 FILE VSOCK-CONNECT:2:PORT`` in the VM into ``socat -u
  VSOCK-LISTEN:PORT /dev/null`` in the host partition (64-page rings: ``sndbuf``/``rcvbuf``
  262144), from the sender's start to the receiver's exit; the same two socat commands with
  TCP-CONNECT/TCP-LISTEN on 127.0.0.1, runs interleaved, best of ``--repeat``; on each data
  path (``shm``: shared memory; ``relay``: the gRPC relay);
- connect+accept+close per second: a stdlib-Python client (4 threads) in the VM and an
  accept-and-close server in the host partition, both through the shim; the same with
  ``guest_client`` directly (what the emulated host itself allows, measured in this run) and
  over TCP.

Writes bench/results/run.json and run.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from hvsock_tools.demo import local_host
from hvsock_tools.run import preload_library

BLOCK = 65536
RING_BYTES = 262144  # socat's sndbuf/rcvbuf: 64-page rings
CONNECT_THREADS = 4

CONNECT_PROGRAM = """
import socket, sys, threading, time
mode, family = sys.argv[1], sys.argv[2]
fam = socket.AF_VSOCK if family == "vsock" else socket.AF_INET
if mode == "server":
    port, count = int(sys.argv[3]), int(sys.argv[4])
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port) if fam == socket.AF_VSOCK else ("127.0.0.1", port))
    s.listen(256)
    print("LISTENING", flush=True)
    for _ in range(count):
        c, _ = s.accept()
        c.close()
else:
    address = (int(sys.argv[3]), int(sys.argv[4])) if fam == socket.AF_VSOCK else (
        "127.0.0.1", int(sys.argv[4]))
    count, threads = int(sys.argv[5]), int(sys.argv[6])
    def work():
        for _ in range(count // threads):
            c = socket.socket(fam, socket.SOCK_STREAM)
            c.connect(address)
            c.close()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers: w.start()
    for w in workers: w.join()
    print(count / (time.perf_counter() - start), flush=True)
"""


class Companion:
    """A companion process (``python -m hvsock_tools.vsock_companion``), as hvsock run starts."""

    def __init__(self, name: str, env: dict[str, str], host_partition: bool) -> None:
        command = [sys.executable, "-m", "hvsock_tools.vsock_companion", "--name", name]
        if host_partition:
            command.append("--host-partition")
        self.name = name
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.stdout.close()
        if not line.startswith("ready"):
            raise RuntimeError(f"companion did not start: {line!r}")

    def env(self, library: str) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_PRELOAD"] = library
        env["HVSOCK_PRELOAD_SOCKET"] = "@" + self.name
        return env

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def base_env(host: Any, data_path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HVSOCK_")}
    env.update(HVSOCK_HOST=host.target, HVSOCK_DATA_PATH=data_path, **extra)
    return env


def listeners(host: Any, vm_id: str) -> int:
    channel, admin = host.admin()
    with channel:
        got = admin.GetPartition(
            hvsock_pb2.GetPartitionRequest(vm_id=vm_id), metadata=host.metadata, timeout=5
        )
    return int(got.partition.listener_count)


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling: neither socat nor the admin API says "listening"


def tcp_listening(port: int) -> bool:
    with open("/proc/net/tcp") as table:
        return any(
            line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
            for line in list(table)[1:]
        )


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed_pair(receiver: list[str], sender: list[str], renv: Any, senv: Any, ready: Any) -> float:
    """Seconds from the sender's start to the receiver's exit (it exits at end of stream)."""
    recv_proc = subprocess.Popen(receiver, env=renv, stderr=subprocess.PIPE)
    try:
        wait_for(ready, "the receiver to listen")
        start = time.perf_counter()
        send_proc = subprocess.Popen(sender, env=senv, stderr=subprocess.PIPE)
        _, send_err = send_proc.communicate(timeout=300)
        _, recv_err = recv_proc.communicate(timeout=300)
        elapsed = time.perf_counter() - start
    finally:
        if recv_proc.poll() is None:
            recv_proc.kill()
            recv_proc.wait()
    if send_proc.returncode or recv_proc.returncode:
        raise RuntimeError(f"socat failed: {send_err.decode()} {recv_err.decode()}")
    return elapsed


def throughput(
    host: Any,
    vm_side: Companion,
    host_side: Companion,
    library: str,
    path: pathlib.Path,
    repeat: int,
    port: int,
) -> dict[str, Any]:
    size = path.stat().st_size
    opts = f"sndbuf={RING_BYTES},rcvbuf={RING_BYTES}"
    runs: dict[str, list[float]] = {"vsock": [], "tcp": []}
    for i in range(repeat):
        before = listeners(host, hv.HV_GUID_PARENT.lower())
        vsock_port = port + i
        elapsed = timed_pair(
            ["socat", "-u", "-b", str(BLOCK), f"VSOCK-LISTEN:{vsock_port},{opts}", "/dev/null"],
            ["socat", "-u", "-b", str(BLOCK), str(path), f"VSOCK-CONNECT:2:{vsock_port},{opts}"],
            host_side.env(library),
            vm_side.env(library),
            lambda b=before: listeners(host, hv.HV_GUID_PARENT.lower()) > b,
        )
        runs["vsock"].append(size / elapsed)
        tcp_port = free_tcp_port()
        elapsed = timed_pair(
            ["socat", "-u", "-b", str(BLOCK), f"TCP-LISTEN:{tcp_port},reuseaddr", "/dev/null"],
            ["socat", "-u", "-b", str(BLOCK), str(path), f"TCP:127.0.0.1:{tcp_port}"],
            None,
            None,
            lambda p=tcp_port: tcp_listening(p),
        )
        runs["tcp"].append(size / elapsed)
    best = {kind: max(values) for kind, values in runs.items()}
    return {
        "bytes": size,
        "vsock_shim_bytes_per_second": round(best["vsock"]),
        "tcp_loopback_bytes_per_second": round(best["tcp"]),
        "shim_vs_tcp": round(best["vsock"] / best["tcp"], 3),
        "runs": {kind: [round(v) for v in values] for kind, values in runs.items()},
    }


def connect_rate_program(
    program: pathlib.Path,
    family: str,
    count: int,
    port: int,
    server_env: Any,
    client_env: Any,
    ready: Any,
    cid: int = 2,
) -> float:
    server = subprocess.Popen(
        [sys.executable, str(program), "server", family, str(port), str(count)],
        env=server_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "LISTENING":
            raise RuntimeError("connect server did not start")
        wait_for(ready, "the connect server")
        client = subprocess.run(
            [
                sys.executable,
                str(program),
                "client",
                family,
                str(cid),
                str(port),
                str(count),
                str(CONNECT_THREADS),
            ],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
    return float(client.stdout.strip())


def direct_connect_rate(host: Any, vm: tuple[str, str], count: int, data_path: str) -> float:
    root = hv.Partition(
        host.target, hvsock_pb2.Hello(host=True, token=host.token), data_path=data_path
    )
    guest = hv.Partition(
        host.target, hvsock_pb2.Hello(vm_id=vm[0], token=vm[1]), data_path=data_path
    )
    service = hv.service_id_for_port(7999)
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, service))
    listener.listen(256)

    def serve() -> None:
        for _ in range(count):
            conn, _ = listener.accept()
            conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    def work() -> None:
        for _ in range(count // CONNECT_THREADS):
            sock = guest.socket()
            sock.connect((hv.HV_GUID_PARENT, service))
            sock.close()

    workers = [threading.Thread(target=work) for _ in range(CONNECT_THREADS)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rate = count / (time.perf_counter() - start)
    server.join(30)
    listener.close()
    guest.close()
    root.close()
    return rate


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    labels, shim, tcp = [], [], []
    for data_path, figures in results["throughput"].items():
        labels.append(data_path)
        shim.append(figures["vsock_shim_bytes_per_second"] / 1e6)
        tcp.append(figures["tcp_loopback_bytes_per_second"] / 1e6)
    xs = range(len(labels))
    left.bar([x - 0.2 for x in xs], shim, 0.4, label="socat via hvsock run (vsock)")
    left.bar([x + 0.2 for x in xs], tcp, 0.4, label="socat over TCP loopback")
    left.set_xticks(list(xs), labels)
    left.set_ylabel("MB/s (64 KiB blocks, best run)")
    left.set_title("throughput")
    left.legend()
    rates = results["connect"]
    names = list(rates)
    right.bar(names, [rates[n] for n in names])
    right.axhline(500, color="grey", linestyle="--", linewidth=1)
    right.set_ylabel(f"connect+accept+close / s ({CONNECT_THREADS} threads)")
    right.set_title("connects")
    right.tick_params(axis="x", labelrotation=20)
    fig.suptitle("hvsock run: unmodified socat and stdlib programs through the vsock shim")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 runs, 200 connects")
    parser.add_argument("--mib", type=int, default=None, help="MiB per run (default 256)")
    parser.add_argument("--repeat", type=int, default=None, help="runs each (default 3)")
    parser.add_argument("--connects", type=int, default=None, help="default 1000")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if shutil.which("socat") is None:
        print("bench_run needs socat (apt-get install -y socat)", file=sys.stderr)
        return 1
    mib = args.mib or (64 if args.quick else 256)
    repeat = args.repeat or (2 if args.quick else 3)
    connects = args.connects or (200 if args.quick else 1000)
    library = preload_library()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "block": BLOCK,
        "ring_bytes": RING_BYTES,
        "throughput": {},
        "connect": {},
    }
    work = pathlib.Path(tempfile.mkdtemp(prefix="hvsock-bench-run-", dir="/dev/shm"))
    try:
        payload = work / "payload.bin"
        chunk = os.urandom(1 << 20)
        with payload.open("wb") as f:
            for _ in range(mib):
                f.write(chunk)
        program = work / "connects.py"
        program.write_text(CONNECT_PROGRAM)
        with local_host(prefix="hvsock-bench-run") as host:
            vm = host.create_vm("bench-run")
            for index, data_path in enumerate(("shm", "relay")):
                vm_side = Companion(
                    f"hvsock-bench-run/{os.getpid()}/vm-{data_path}",
                    base_env(host, data_path, HVSOCK_VM_ID=vm[0], HVSOCK_TOKEN=vm[1]),
                    False,
                )
                host_side = Companion(
                    f"hvsock-bench-run/{os.getpid()}/host-{data_path}",
                    base_env(host, data_path, HVSOCK_HOST_TOKEN=host.token),
                    True,
                )
                try:
                    runs = repeat if data_path == "shm" else 1
                    figures = throughput(
                        host, vm_side, host_side, library, payload, runs, 7000 + 100 * index
                    )
                    results["throughput"][data_path] = figures
                    shim_mbps = figures["vsock_shim_bytes_per_second"] / 1e6
                    tcp_mbps = figures["tcp_loopback_bytes_per_second"] / 1e6
                    print(
                        f"{data_path:<6} socat vsock {shim_mbps:7.0f} MB/s"
                        f"  tcp {tcp_mbps:7.0f} MB/s  ratio {figures['shim_vs_tcp']:.2f}",
                        flush=True,
                    )
                    if data_path == "shm":
                        before = listeners(host, hv.HV_GUID_PARENT.lower())
                        rate = connect_rate_program(
                            program,
                            "vsock",
                            connects,
                            7500,
                            host_side.env(library),
                            vm_side.env(library),
                            lambda b=before: listeners(host, hv.HV_GUID_PARENT.lower()) > b,
                        )
                        results["connect"]["vsock via hvsock run"] = round(rate)
                finally:
                    vm_side.stop()
                    host_side.stop()
            results["connect"]["guest_client direct"] = round(
                direct_connect_rate(host, vm, connects, "shm")
            )
            tcp_port = free_tcp_port()
            results["connect"]["tcp loopback"] = round(
                connect_rate_program(
                    program,
                    "tcp",
                    connects,
                    tcp_port,
                    None,
                    None,
                    lambda: tcp_listening(tcp_port),
                )
            )
            for name, rate in results["connect"].items():
                print(f"connect+accept+close {name:<22} {rate:7.0f} /s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "run.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "run.png"))
    print(f"wrote {out} and run.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
