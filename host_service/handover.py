"""Ring memory handed to the programs that hold a channel's ends: descriptors over a Unix socket.

Ring segments are anonymous sealed files (``ring.shm``): nothing in any file system names them,
so a process gets one only by being handed its descriptor. The host listens on one Unix stream
socket (a path, e.g. in a volume the host shares with VM containers, or an abstract name
``@...`` by default) and speaks this protocol on it — documented for clients in other languages
in ``protos/hvsock/v1/hvsock.proto`` (Welcome.shm_socket):

1. The client connects and sends its session secret (``Welcome.session``) and ``\\n``.
2. The host answers with one message carrying one descriptor: a sealed probe file holding a
   nonce. A client that maps the probe and reads the nonce sends it in ``ProveSharedMemory``
   on its attach stream; from then on the host opens that session's channel ends on shared
   memory. An unknown secret, or a session that already has a connection, is answered by
   closing the connection.
3. For every channel end the session opens on shared memory, the host sends one message with
   the segment's descriptor *before* the ``opened`` answer leaves on the attach stream.

Every host message is 16 bytes (``ring.handover.MESSAGE``: magic ``HVFD``, kind 1 probe or 2
channel, channel id), with exactly one descriptor in its ``SCM_RIGHTS`` ancillary data. Messages are
sent whole or not at all (16 bytes on a Unix stream socket go in one buffer), and a receiver
that reads 16 bytes at a time gets one message and its descriptor per read.

Hostile clients. A connection that has not sent its secret within :data:`HELLO_TIMEOUT`, or that
sends more than :data:`MAX_HELLO` bytes, is closed; at most :data:`MAX_UNAUTHENTICATED`
connections wait for their secret at once (more are closed at accept). Anything a client sends
after its secret is a protocol error and closes the connection: its session's later channels
use the relay. A client that does not read its descriptors fills its socket buffer; the host
then opens that end on the relay instead of blocking (:meth:`DescriptorServer.send_channel`
returns False). The host never reads anything from a segment it hands over to decide what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable

from ring.handover import KIND_CHANNEL, KIND_PROBE, MESSAGE, pack, unix_address
from ring.shm import sealed_memfd

log = logging.getLogger("hvsock.host.handover")

#: Seconds a new connection has to send its session secret.
HELLO_TIMEOUT = 5.0
#: Longest hello (a session secret is 32 characters).
MAX_HELLO = 256
#: Connections waiting for their secret at once.
MAX_UNAUTHENTICATED = 64
#: Bytes of the probe's nonce.
NONCE_SIZE = 32

#: Takes a session secret and the connection it came on; returns the nonce to put in the probe
#: (the session now owns the connection), or None to refuse.
Claim = Callable[[str, socket.socket], "bytes | None"]
#: Told when an owned connection ends (the peer closed it or broke the protocol).
Lost = Callable[[socket.socket], None]


def default_address() -> str:
    """An abstract name private to this host process: nothing to remove on exit, and reachable
    only from this machine's network namespace (containers elsewhere fall back to the relay)."""
    return f"@hvsock-{os.getpid()}-{secrets.token_hex(8)}"


class DescriptorServer:
    """The host's end of the descriptor socket (runs on the event loop, never blocks)."""

    def __init__(self, address: str, claim: Claim, lost: Lost) -> None:
        self.address = address
        self._claim = claim
        self._lost = lost
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Connections waiting for their secret: what they sent so far, and their deadline.
        self._hellos: dict[socket.socket, tuple[bytearray, asyncio.TimerHandle]] = {}
        self._owned: set[socket.socket] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if not self.address.startswith("@"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)  # left by a host that was killed
            # 0600 from the start: no window in which another user could connect.
            old_umask = os.umask(0o177)
            try:
                listener.bind(unix_address(self.address))
            finally:
                os.umask(old_umask)
            listener.listen(256)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._loop.add_reader(listener, self._accept)
        log.info("ring descriptors handed over on %s", self.address)

    def close(self) -> None:
        for conn in [*self._hellos, *self._owned]:
            self._drop(conn)
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener)
            self._listener.close()
            self._listener = None
            if not self.address.startswith("@"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)

    # -- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: refuse this one, keep serving
                log.warning("descriptor socket: accept failed: %s", exc)
                return
            if len(self._hellos) >= MAX_UNAUTHENTICATED:
                conn.close()
                continue
            conn.setblocking(False)
            timer = self._loop.call_later(HELLO_TIMEOUT, self._drop, conn)
            self._hellos[conn] = (bytearray(), timer)
            self._loop.add_reader(conn, self._read_hello, conn)

    def _read_hello(self, conn: socket.socket) -> None:
        buffer, timer = self._hellos[conn]
        try:
            chunk = conn.recv(MAX_HELLO + 1 - len(buffer))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buffer += chunk
        if not chunk or len(buffer) > MAX_HELLO:
            self._drop(conn)
            return
        if not buffer.endswith(b"\n"):
            return  # more to come (within MAX_HELLO and HELLO_TIMEOUT)
        timer.cancel()
        del self._hellos[conn]
        assert self._loop is not None
        self._loop.remove_reader(conn)
        nonce = self._claim(buffer[:-1].decode("utf-8", "replace"), conn)
        if nonce is None:
            conn.close()
            return
        self._owned.add(conn)
        self._loop.add_reader(conn, self._read_owned, conn)
        try:
            probe = sealed_memfd("hvsock-probe", len(nonce), nonce)
        except OSError as exc:  # out of descriptors or memory: this session uses the relay
            log.warning("descriptor socket: no probe for a session: %s", exc)
            self._drop(conn)
            return
        try:
            if not self._send(conn, KIND_PROBE, 0, probe):
                self._drop(conn)
        finally:
            os.close(probe)

    def _read_owned(self, conn: socket.socket) -> None:
        """Nothing may come after the secret: data or EOF ends the connection."""
        try:
            conn.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: socket.socket, *, tell: bool = True) -> None:
        """Close ``conn`` (idempotent); a session owning it is told unless ``tell`` is False."""
        hello = self._hellos.pop(conn, None)
        if hello is not None:
            hello[1].cancel()
        owned = conn in self._owned
        self._owned.discard(conn)
        if conn.fileno() >= 0 and self._loop is not None:
            self._loop.remove_reader(conn)
        conn.close()
        if owned and tell:
            self._lost(conn)

    def release(self, conn: socket.socket) -> None:
        """The session that owned ``conn`` ended: close it (without telling it back)."""
        if conn in self._owned:
            self._drop(conn, tell=False)

    # -- messages ------------------------------------------------------------------------

    def send_channel(self, conn: socket.socket, channel_id: int, fd: int) -> bool:
        """Hand a channel segment to its end; False if it cannot go now (the client does not
        read its descriptors, or the connection broke): that end then uses the relay."""
        return conn in self._owned and self._send(conn, KIND_CHANNEL, channel_id, fd)

    def _send(self, conn: socket.socket, kind: int, channel_id: int, fd: int) -> bool:
        try:
            sent = socket.send_fds(conn, [pack(kind, channel_id)], [fd])
        except (BlockingIOError, InterruptedError):
            log.info("descriptor socket full: channel %d end goes on the relay", channel_id)
            return False
        except OSError as exc:
            log.info("descriptor socket broke (%s): dropping it", exc)
            self._drop(conn)
            return False
        if sent != MESSAGE.size:  # cannot happen for 16 bytes; never leave half a message
            self._drop(conn)
            return False
        return True
