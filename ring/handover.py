"""The wire format of the descriptor socket, spoken by the host service and the programs.

Ring memory is an anonymous sealed file (:mod:`ring.shm`), so it travels as a descriptor in
``SCM_RIGHTS`` over a Unix stream socket. The client sends its session secret and ``\\n``; the
host sends messages of :data:`MESSAGE` (16 bytes), each with exactly one descriptor: first a
probe (:data:`KIND_PROBE`, a sealed file holding a nonce), then one per channel end the
session opens on shared memory (:data:`KIND_CHANNEL`). The host's side and the rules it
enforces are in ``host_service/handover.py``; the proto documents the protocol for clients in
other languages (``Welcome.shm_socket``).
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct

from .shm import check_sealed

MAGIC = b"HVFD"
KIND_PROBE = 1
KIND_CHANNEL = 2
#: magic, kind, channel id (0 for the probe).
MESSAGE = struct.Struct("<4sIQ")


def unix_address(address: str) -> str:
    """``@name`` is an abstract socket name (no file); anything else is a path."""
    return "\0" + address[1:] if address.startswith("@") else address


def pack(kind: int, channel_id: int) -> bytes:
    return MESSAGE.pack(MAGIC, kind, channel_id)


def receive(sock: socket.socket) -> tuple[int, int, int]:
    """Read one host message: (kind, channel id, descriptor); the descriptor is the caller's.
    ``ConnectionResetError`` when the host closed the socket, ``OSError(EPROTO)`` for anything
    that is not a whole message with one descriptor."""
    data, fds, flags, _ = socket.recv_fds(sock, MESSAGE.size, 1, socket.MSG_CMSG_CLOEXEC)
    if not data and not fds:
        raise ConnectionResetError(errno.ECONNRESET, "the host closed the descriptor socket")
    if len(data) != MESSAGE.size or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, "malformed message on the descriptor socket")
    magic, kind, channel_id = MESSAGE.unpack(data)
    if magic != MAGIC or kind not in (KIND_PROBE, KIND_CHANNEL):
        os.close(fds[0])
        raise OSError(errno.EPROTO, "malformed message on the descriptor socket")
    return kind, channel_id, fds[0]


def read_probe(fd: int) -> bytes:
    """Map the probe (proving this process can map what the host hands it) and return it."""
    size = check_sealed(fd)
    if not 0 < size <= mmap.PAGESIZE:
        raise OSError(errno.EPROTO, f"probe of {size} bytes")
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        return bytes(mm)


def connect(address: str, secret: str, timeout: float) -> tuple[socket.socket, bytes]:
    """Connect to the host's descriptor socket as the session ``secret``, receive the probe and
    map it: returns the connected socket (blocking, ``timeout`` set) and the probe's nonce,
    which ``ProveSharedMemory`` sends. Raises OSError if this process cannot reach the socket
    or map what comes over it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(unix_address(address))
        sock.sendall(secret.encode() + b"\n")
        kind, _, fd = receive(sock)
        try:
            if kind != KIND_PROBE:
                raise OSError(errno.EPROTO, "the descriptor socket sent no probe first")
            return sock, read_probe(fd)
        finally:
            os.close(fd)
    except BaseException:
        sock.close()
        raise
