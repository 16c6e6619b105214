"""Ring vs TCP loopback vs Unix sockets: throughput by message size and 64-byte round trips.

    .venv/bin/python bench/bench_ring.py [--quick] [--out bench/results]

Writer and reader always run in separate processes (fork: the child inherits the ring
segment's descriptor and maps it with ``Channel.attach_fd``). For each transport and message
size the writer sends fixed-size messages for a fixed time, then ends the stream (FIN /
shutdown); the reader reads into one 256 KiB buffer until EOF and times first byte to EOF.
The ring is measured with the seed's default sizes (send ring 2 pages, receive ring 3
pages), with 6 pages and with 64 pages; the sockets are plain Python sockets with default
options (TCP_NODELAY only for the round-trip test, where Nagle would add 40 ms).

Writes bench/results/ring.json (every figure and every ratio, plus the targets and whether
they were met) and bench/results/ring.png (throughput against message size), and prints a
short table. This is a benchmark, not a test: it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ring

SIZES = [64, 1024, 4096, 16384, 65536, 262144]
RINGS = {"ring-2/3": (2, 3), "ring-6": (6, 6), "ring-64": (64, 64)}
READ_BUF = 256 * 1024
CTX = mp.get_context("fork")


# ---- endpoints: a tiny common interface over channels and sockets -------------------------


class End:
    send_all: Callable[[Any], None]
    recv_into: Callable[[bytearray], int]
    finish: Callable[[], None]
    close: Callable[[], None]


def ring_end(chan: ring.Channel) -> End:
    e = End()
    e.send_all = chan.sendall
    e.recv_into = chan.recv_into
    e.finish = chan.fin
    e.close = chan.close
    return e


def attach_inherited(fd: int) -> End:
    """In the forked child: map the segment through the descriptor inherited from the parent
    (the creator's), then close that copy (the mapping keeps the memory)."""
    chan = ring.Channel.attach_fd(fd)
    os.close(fd)
    return ring_end(chan)


def sock_end(sock: socket.socket) -> End:
    e = End()
    e.send_all = sock.sendall
    e.recv_into = sock.recv_into
    e.finish = lambda: sock.shutdown(socket.SHUT_WR)
    e.close = sock.close
    return e


def make_pair(kind: str, nodelay: bool = False) -> tuple[Callable[[], End], Callable[[], End]]:
    """Return (parent_factory, child_factory); call parent's in the parent before fork."""
    if kind.startswith("ring"):
        send_pages, recv_pages = RINGS[kind]
        # The parent is end 1 (reads ring 0, the child's send ring of `send_pages` pages).
        chan = ring.Channel.create(send_pages, recv_pages, end=1)
        fd = chan.fileno()
        return (lambda: ring_end(chan)), (lambda: attach_inherited(fd))
    if kind == "tcp":
        lsock = socket.create_server(("127.0.0.1", 0))
        addr = lsock.getsockname()
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="hvbench-"), "s")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        addr = path

    def parent() -> End:
        conn, _ = lsock.accept()
        lsock.close()
        if kind == "tcp" and nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock_end(conn)

    def child() -> End:
        fam = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.connect(addr)
        if kind == "tcp" and nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock_end(s)

    return parent, child


# ---- throughput ---------------------------------------------------------------------------


def _writer(child: Callable[[], End], size: int, seconds: float, ctl: Connection) -> None:
    end = child()
    msg = os.urandom(size)
    ctl.send("ready")
    ctl.recv()  # go
    count = 0
    stop = time.monotonic() + seconds
    send = end.send_all
    mono = time.monotonic
    while True:
        for _ in range(64):  # check the clock every 64 messages
            send(msg)
        count += 64
        if mono() >= stop:
            break
    end.finish()
    ctl.send(count)
    ctl.recv()  # keep the mapping/socket until the reader is done
    end.close()
    os._exit(0)


def throughput(kind: str, size: int, seconds: float) -> dict[str, float]:
    parent_f, child_f = make_pair(kind)
    ctl, child_ctl = CTX.Pipe()
    proc = CTX.Process(target=_writer, args=(child_f, size, seconds, child_ctl))
    proc.start()
    end = parent_f()
    assert ctl.recv() == "ready"
    buf = bytearray(READ_BUF)
    recv = end.recv_into
    ctl.send("go")
    total = recv(buf)
    t0 = time.perf_counter()
    first = total
    while True:
        n = recv(buf)
        if n == 0:
            break
        total += n
    elapsed = time.perf_counter() - t0
    count = ctl.recv()
    ctl.send("bye")
    proc.join(30)
    end.close()
    assert total == count * size, (kind, size, total, count * size)
    moved = total - first  # bytes after the clock started
    return {
        "bytes": total,
        "seconds": elapsed,
        "MBps": moved / elapsed / 1e6,
        "msgs_per_s": moved / size / elapsed,
    }


# ---- ping-pong ----------------------------------------------------------------------------


def _echo(child: Callable[[], End], iters: int, ctl: Connection) -> None:
    end = child()
    buf = bytearray(64)
    view = memoryview(buf)
    ctl.send("ready")
    for _ in range(iters):
        got = 0
        while got < 64:
            got += end.recv_into(view[got:])  # type: ignore[arg-type]
        end.send_all(buf)
    ctl.recv()
    end.close()
    os._exit(0)


def pingpong(kind: str, iters: int, warmup: int) -> dict[str, float]:
    if kind.startswith("ring"):
        chan = ring.Channel.create(*RINGS[kind], end=0)
        fd = chan.fileno()
        parent_f: Callable[[], End] = lambda: ring_end(chan)  # noqa: E731
        child_f: Callable[[], End] = lambda: attach_inherited(fd)  # noqa: E731
    else:
        parent_f, child_f = make_pair(kind, nodelay=True)
    ctl, child_ctl = CTX.Pipe()
    proc = CTX.Process(target=_echo, args=(child_f, iters + warmup, child_ctl))
    proc.start()
    end = parent_f()
    assert ctl.recv() == "ready"
    msg = bytearray(os.urandom(64))
    buf = bytearray(64)
    view = memoryview(buf)
    rtts: list[float] = []
    clock = time.perf_counter_ns
    for i in range(iters + warmup):
        t0 = clock()
        end.send_all(msg)
        got = 0
        while got < 64:
            got += end.recv_into(view[got:])  # type: ignore[arg-type]
        t1 = clock()
        if i >= warmup:
            rtts.append((t1 - t0) / 1000)
    assert buf == msg
    ctl.send("bye")
    proc.join(30)
    end.close()
    rtts.sort()
    return {
        "iterations": iters,
        "p50_us": rtts[len(rtts) // 2],
        "p99_us": rtts[int(len(rtts) * 0.99)],
        "mean_us": statistics.fmean(rtts),
    }


# ---- report -------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, by_size in results["throughput"].items():
        xs = [int(s) for s in by_size]
        ax.plot(xs, [by_size[s]["MBps"] for s in by_size], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES, ["64B", "1K", "4K", "16K", "64K", "256K"])
    ax.set_xlabel("message size")
    ax.set_ylabel("throughput (MB/s)")
    ax.set_title("hvsock-emulator ring vs loopback sockets (one direction, Python endpoints)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    seconds = 0.25 if args.quick else 1.0
    iters, warmup = (2000, 200) if args.quick else (20000, 1000)
    kinds = [*RINGS, "tcp", "unix"]

    results: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "seconds_per_point": seconds,
            "ring_implementation": ring.IMPLEMENTATION,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "read_buffer": READ_BUF,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "throughput": {},
        "pingpong_64B": {},
    }
    for kind in kinds:
        results["throughput"][kind] = {}
        for size in SIZES:
            results["throughput"][kind][str(size)] = throughput(kind, size, seconds)
    for kind in ("ring-64", "tcp", "unix"):
        results["pingpong_64B"][kind] = pingpong(kind, iters, warmup)

    tp = results["throughput"]
    ratios: dict[str, Any] = {}
    for kind in RINGS:
        for base in ("tcp", "unix"):
            ratios[f"{kind}/{base}"] = {
                s: tp[kind][s]["MBps"] / tp[base][s]["MBps"] for s in map(str, SIZES)
            }
    pp = results["pingpong_64B"]
    ratios["rtt_p50 ring-64/unix"] = pp["ring-64"]["p50_us"] / pp["unix"]["p50_us"]
    ratios["rtt_p50 ring-64/tcp"] = pp["ring-64"]["p50_us"] / pp["tcp"]["p50_us"]
    ratios["rtt_p99 ring-64/unix"] = pp["ring-64"]["p99_us"] / pp["unix"]["p99_us"]
    results["ratios"] = ratios
    r64 = ratios["ring-64/tcp"]
    results["targets"] = {
        "throughput_16KiB >= 1.5x tcp": {"value": r64["16384"], "met": r64["16384"] >= 1.5},
        "throughput_64KiB >= 1.5x tcp": {"value": r64["65536"], "met": r64["65536"] >= 1.5},
        "msg_rate_64B >= 2x tcp": {"value": r64["64"], "met": r64["64"] >= 2.0},
        "rtt_p50 <= 0.5x unix": {
            "value": ratios["rtt_p50 ring-64/unix"],
            "met": ratios["rtt_p50 ring-64/unix"] <= 0.5,
        },
    }

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "ring.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    png_path = os.path.join(args.out, "ring.png")
    plot(results, png_path)

    print(f"throughput, MB/s ({seconds}s per point; 64B also in Mmsg/s)")
    print(f"{'size':>8} " + " ".join(f"{k:>10}" for k in kinds) + "  ring-64/tcp")
    for s in map(str, SIZES):
        row = " ".join(f"{tp[k][s]['MBps']:10.0f}" for k in kinds)
        print(f"{s:>8} {row}  {r64[s]:10.2f}x")
    print("64B msg/s: " + ", ".join(f"{k} {tp[k]['64']['msgs_per_s'] / 1e6:.2f}M" for k in kinds))
    print(
        "64B round trip (us): "
        + ", ".join(f"{k} p50 {v['p50_us']:.1f} p99 {v['p99_us']:.1f}" for k, v in pp.items())
    )
    for name, t in results["targets"].items():
        print(f"target {name}: {t['value']:.2f} {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
