"""The wire format of the descriptor socket, spoken by the host service and the programs.

Ring memory is an anonymous sealed file (:mod:`ring.shm`), so it travels as a descriptor in
``SCM_RIGHTS`` over a Unix stream socket. The client sends its session secret and ``\\n``; the
host sends messages of :data:`MESSAGE` (16 bytes), each with exactly one descriptor: first a
probe (:data:`KIND_PROBE`, a sealed file holding a nonce), then one per channel end the
session opens on shared memory (:data:`KIND_CHANNEL`). The host's side and the rules it
enforces are in ``host_service/handover.py``; the proto documents the protocol for clients in
other languages (``Welcome.shm_socket``).

Control frames. A host that says so (``Welcome.control_socket``) also carries the session's
attach requests and answers on this socket, which costs a fraction of a gRPC message: a frame is
the same 16-byte header with kind :data:`KIND_REQUEST` (client -> host) or
:data:`KIND_RESPONSE` (host -> client), the payload's length in the channel-id field, and then
that many bytes of a serialized ``AttachRequest`` / ``AttachResponse``, never a descriptor. The
client's first frame proves the probe (``ProveSharedMemory``); from the host's answer on, every
answer of the session comes on this socket.
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
KIND_REQUEST = 3
KIND_RESPONSE = 4
#: magic, kind, channel id (0 for the probe; the payload's length for a control frame).
MESSAGE = struct.Struct("<4sIQ")
#: Largest control frame payload (attach requests and answers are a few hundred bytes).
MAX_CONTROL_FRAME = 64 * 1024


def unix_address(address: str) -> str:
    """``@name`` is an abstract socket name (no file); anything else is a path."""
    return "\0" + address[1:] if address.startswith("@") else address


def pack(kind: int, channel_id: int) -> bytes:
    return MESSAGE.pack(MAGIC, kind, channel_id)


def frame(kind: int, payload: bytes) -> bytes:
    """A control frame: header and payload."""
    return MESSAGE.pack(MAGIC, kind, len(payload)) + payload


def parse_header(header: bytes | bytearray | memoryview, kinds: tuple[int, ...]) -> tuple[int, int]:
    """(kind, channel id or payload length) of a 16-byte header; ``OSError(EPROTO)`` for a bad
    magic, a kind not in ``kinds`` or a control frame longer than :data:`MAX_CONTROL_FRAME`."""
    magic, kind, value = MESSAGE.unpack(header)
    if magic != MAGIC or kind not in kinds:
        raise OSError(errno.EPROTO, "malformed message on the descriptor socket")
    if kind in (KIND_REQUEST, KIND_RESPONSE) and value > MAX_CONTROL_FRAME:
        raise OSError(errno.EPROTO, f"control frame of {value} bytes on the descriptor socket")
    return kind, value


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, "the host closed the descriptor socket")
        view = view[n:]


def receive_any(sock: socket.socket) -> tuple[int, int, int | bytes]:
    """Read one host message of any kind: (kind, channel id, descriptor) for a probe or a
    channel, (KIND_RESPONSE, length, payload) for a control frame. A descriptor is the
    caller's. Errors as :func:`receive`."""
    data, fds, flags, _ = socket.recv_fds(sock, MESSAGE.size, 1, socket.MSG_CMSG_CLOEXEC)
    try:
        if not data and not fds:
            raise ConnectionResetError(errno.ECONNRESET, "the host closed the descriptor socket")
        if flags & socket.MSG_CTRUNC:
            raise OSError(errno.EPROTO, "malformed message on the descriptor socket")
        header = bytearray(data)
        if len(header) < MESSAGE.size:
            # Only a control frame's header can arrive in pieces (a descriptor message is
            # 16 bytes sent whole); the rest carries no descriptor.
            if fds:
                raise OSError(errno.EPROTO, "malformed message on the descriptor socket")
            rest = bytearray(MESSAGE.size - len(header))
            _recv_exactly(sock, memoryview(rest))
            header += rest
        kind, value = parse_header(header, (KIND_PROBE, KIND_CHANNEL, KIND_RESPONSE))
        if kind == KIND_RESPONSE:
            if fds:
                raise OSError(errno.EPROTO, "a descriptor with a control frame")
            payload = bytearray(value)
            _recv_exactly(sock, memoryview(payload))
            return kind, value, bytes(payload)
        if len(fds) != 1:
            raise OSError(errno.EPROTO, "malformed message on the descriptor socket")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return kind, value, fds[0]


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
