"""Peer process for tests/integration/test_ring_xproc.py (run as a script, not collected).

Usage: python ring_peer.py COMMAND FD [ARGS...]; prints one line per event on stdout.
FD is a descriptor the test handed over with ``subprocess.Popen(pass_fds=[FD])``: the ring
segment to attach (``Channel.attach_fd``), except for ``create-and-hold``, where it is a Unix
socket to send the new segment's descriptor on (SCM_RIGHTS), or ``-`` to keep it to itself.
Sequencing with the test goes through stdout lines and stdin, never through sleeps.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sys
import time

import ring


def _pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(1 << 20)


def stream_write(chan: ring.Channel, nbytes: int, seed: int) -> None:
    """Write nbytes in random-sized writes (1 B .. 64 KiB), then FIN; print the digest."""
    rnd = random.Random(seed)
    pool = memoryview(_pool(seed))
    digest = hashlib.sha256()
    sent = 0
    while sent < nbytes:
        n = min(rnd.randint(1, 65536), nbytes - sent)
        off = rnd.randrange(0, len(pool) - n)
        chunk = pool[off : off + n]
        chan.sendall(chunk)
        digest.update(chunk)
        sent += n
    chan.fin()
    print(sent, digest.hexdigest(), flush=True)


def stream_read(chan: ring.Channel, seed: int) -> None:
    """Read with random sizes (partial packets) until EOF; print count and digest."""
    rnd = random.Random(seed)
    buf = bytearray(65536)
    view = memoryview(buf)
    digest = hashlib.sha256()
    total = 0
    while True:
        n = chan.recv_into(buf, rnd.randint(1, 65536))
        if n == 0:
            break
        digest.update(view[:n])
        total += n
    print(total, digest.hexdigest(), flush=True)


def block_read(chan: ring.Channel) -> None:
    print("ready", flush=True)
    data = chan.recv(100)
    print(repr(time.monotonic()), repr(data), flush=True)


def block_write(chan: ring.Channel) -> None:
    tx = chan.tx
    while tx.writable():
        tx.write(b"f" * tx.writable(), timeout=0)
    print("ready", flush=True)
    try:
        chan.sendall(b"x" * 100000)
        print(repr(time.monotonic()), "wrote", flush=True)
    except BrokenPipeError as e:
        print(repr(time.monotonic()), f"EPIPE:{e.errno}", flush=True)


def write_then_report(chan: ring.Channel, nbytes: int) -> None:
    chan.sendall(bytes(range(256)) * (nbytes // 256))
    print("done", flush=True)


def timed_read(chan: ring.Channel, timeout: float) -> None:
    t0 = time.monotonic()
    try:
        chan.recv(10, timeout=timeout)
        print("no-timeout", flush=True)
    except TimeoutError as e:
        print(f"timeout:{e.errno}", repr(time.monotonic() - t0), flush=True)


def hold(chan: ring.Channel, message: str = "") -> None:
    """Optionally write ``message`` first; then hold the segment until told (or killed)."""
    if message:
        chan.sendall(message.encode())
    print("ready", flush=True)
    sys.stdin.readline()  # until the test says so (or kills us)


def main() -> None:
    cmd, fd_arg, *args = sys.argv[1:]
    if cmd == "create-and-hold":
        # ARGS: [MESSAGE]: once the test has attached, write MESSAGE to it.
        chan = ring.Channel.create()
        if fd_arg != "-":
            with socket.socket(fileno=int(fd_arg)) as sock:
                socket.send_fds(sock, [b"fd"], [chan.fileno()])
            chan.close_fd()  # handed over: the test's descriptor and our mapping remain
            chan.wait_peer(timeout=30)
        hold(chan, *args)
        return
    fd = int(fd_arg)
    chan = ring.Channel.attach_fd(fd)
    os.close(fd)  # the mapping keeps the memory
    {
        "stream-write": lambda: stream_write(chan, int(args[0]), int(args[1])),
        "stream-read": lambda: stream_read(chan, int(args[0])),
        "block-read": lambda: block_read(chan),
        "block-write": lambda: block_write(chan),
        "write-then-report": lambda: write_then_report(chan, int(args[0])),
        "timed-read": lambda: timed_read(chan, float(args[0])),
        "hold": lambda: hold(chan, *args),
    }[cmd]()
    chan.close()


if __name__ == "__main__":
    main()
