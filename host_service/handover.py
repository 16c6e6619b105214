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

4. Control frames (``ring.handover``): after the probe the client may carry its session's attach
   requests here instead of on the gRPC stream, a fraction of a gRPC message's cost. Its first
   frame must prove the probe (``ProveSharedMemory``); the host then sends every later answer
   of the session as a frame on this connection (the gRPC stream stays open, silent, as the
   session's lifeline). The client's EOF on this connection ends the session as the end of its
   request stream would, after every frame before it is carried out.

What goes out on a connection (descriptor messages and answer frames) leaves in order through
one queue per connection: a message is never split by another, and a descriptor waiting in the
queue is a duplicate the queue owns.

Hostile clients. A connection that has not sent its secret within :data:`HELLO_TIMEOUT`, or that
sends more than :data:`MAX_HELLO` bytes, is closed; at most :data:`MAX_UNAUTHENTICATED`
connections wait for their secret at once (more are closed at accept). Anything a client sends
after its secret other than well-formed request frames (bad magic or kind, a frame longer than
``MAX_CONTROL_FRAME``, a first frame that is not a proof) is a protocol error and closes the
connection: a session that had not moved its requests here uses the relay for its later
channels; one that had is ended with INVALID_ARGUMENT. A client that reads neither its
descriptors nor its answers fills its socket buffer, then the queue: past a bound (the
session's ``max_queued`` answers, :data:`MAX_QUEUED_DESCRIPTORS` for a descriptor) the host
stops queueing for it (:meth:`DescriptorServer.send_response` and
:meth:`DescriptorServer.send_channel` return False: the session is ended as one that stopped
reading, the end goes on the relay). The host never reads anything from a segment it hands over
to decide what to do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ring.handover import (
    KIND_CHANNEL,
    KIND_PROBE,
    KIND_REQUEST,
    KIND_RESPONSE,
    MAGIC,
    MESSAGE,
    frame,
    pack,
    parse_header,
    unix_address,
)
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

#: Bytes read from an owned connection at a time.
READ_SIZE = 64 * 1024
#: Request frames served in one turn of the event loop.
FRAMES_PER_TURN = 64
#: Messages queued on a connection beyond which a descriptor is not queued (its end is relayed).
MAX_QUEUED_DESCRIPTORS = 4096

#: Takes a session secret and the connection it came on; returns the nonce to put in the probe
#: (the session now owns the connection), or None to refuse.
Claim = Callable[[str, socket.socket], "bytes | None"]
#: Told when an owned connection ends: None when the peer closed it, else the protocol error.
Lost = Callable[[socket.socket, "str | None"], None]
#: Takes one request frame's payload from an owned connection (on the event loop).
Request = Callable[[socket.socket, bytes], None]


@dataclass(eq=False, slots=True)
class _Out:
    """One message waiting to go out."""

    data: bytes
    fd: int = -1  # a descriptor the queue owns (sent with the first bytes), or -1
    done: int = 0  # bytes of ``data`` sent already


@dataclass(eq=False)
class _Owned:
    """An owned connection's buffers: request bytes not yet a whole frame, and what waits to
    go out, in order."""

    inbound: bytearray = field(default_factory=bytearray)
    outbound: collections.deque[_Out] = field(default_factory=collections.deque)
    writing: bool = False  # waiting for the socket to take more (add_writer)
    paused: bool = False  # not read while the frames already read wait for their turn


def default_address() -> str:
    """An abstract name private to this host process: nothing to remove on exit, and reachable
    only from this machine's network namespace (containers elsewhere fall back to the relay)."""
    return f"@hvsock-{os.getpid()}-{secrets.token_hex(8)}"


class DescriptorServer:
    """The host's end of the descriptor socket (runs on the event loop, never blocks)."""

    def __init__(self, address: str, claim: Claim, lost: Lost, request: Request) -> None:
        self.address = address
        self._claim = claim
        self._lost = lost
        self._request = request
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Connections waiting for their secret: what they sent so far, and their deadline.
        self._hellos: dict[socket.socket, tuple[bytearray, asyncio.TimerHandle]] = {}
        self._owned: dict[socket.socket, _Owned] = {}

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
        self._owned[conn] = _Owned()
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
        """Request frames, each handed on whole as it completes; EOF or a protocol error ends
        the connection (EOF only once every frame before it is served)."""
        owned = self._owned.get(conn)
        if owned is None:
            return
        try:
            chunk = conn.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        owned.inbound += chunk
        self._serve(conn, owned)

    def _serve(self, conn: socket.socket, owned: _Owned) -> None:
        """Hand on the whole frames in ``owned.inbound``, at most :data:`FRAMES_PER_TURN` before
        the loop runs others' work; meanwhile the connection is not read, so a client sending
        faster than its requests are served fills its own socket, not the host's memory."""
        if self._owned.get(conn) is not owned:
            return  # dropped meanwhile
        buffer = owned.inbound
        for _ in range(FRAMES_PER_TURN):
            if not MAGIC.startswith(bytes(buffer[: len(MAGIC)])):  # judged from the first byte
                self._drop(conn, error="bytes after the secret that are not a request frame")
                return
            if len(buffer) < MESSAGE.size:
                break
            try:
                _, length = parse_header(buffer[: MESSAGE.size], (KIND_REQUEST,))
            except OSError as exc:
                self._drop(conn, error=exc.strerror)
                return
            end = MESSAGE.size + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[MESSAGE.size : end])
            del buffer[:end]
            self._request(conn, payload)
            if conn not in self._owned:
                return  # the request ended the session
        else:
            if len(buffer) >= MESSAGE.size:
                assert self._loop is not None
                if not owned.paused:
                    owned.paused = True
                    self._loop.remove_reader(conn)
                self._loop.call_soon(self._serve, conn, owned)
                return
        if owned.paused and self._loop is not None:
            owned.paused = False
            self._loop.add_reader(conn, self._read_owned, conn)

    def _drop(self, conn: socket.socket, *, tell: bool = True, error: str | None = None) -> None:
        """Close ``conn`` (idempotent); a session owning it is told (with the protocol error,
        if that is why) unless ``tell`` is False."""
        hello = self._hellos.pop(conn, None)
        if hello is not None:
            hello[1].cancel()
        owned = self._owned.pop(conn, None)
        if error is not None:
            log.info("descriptor socket: %s: closing the connection", error)
        if owned is not None:
            for item in owned.outbound:
                if item.fd != -1:
                    os.close(item.fd)
            owned.outbound.clear()
        if conn.fileno() >= 0 and self._loop is not None:
            self._loop.remove_reader(conn)  # (a no-op while paused)
            if owned is not None and owned.writing:
                self._loop.remove_writer(conn)
        conn.close()
        if owned is not None and tell:
            self._lost(conn, error)

    def drop(self, conn: socket.socket, error: str) -> None:
        """``conn`` broke the protocol (found by its session): close it, telling why."""
        if conn in self._owned:
            self._drop(conn, error=error)

    def release(self, conn: socket.socket) -> None:
        """The session that owned ``conn`` ended: close it (without telling it back)."""
        if conn in self._owned:
            self._drop(conn, tell=False)

    # -- messages ------------------------------------------------------------------------

    def send_channel(self, conn: socket.socket, channel_id: int, fd: int) -> bool:
        """Hand a channel segment to its end; False if it cannot go (the connection broke, or
        the client reads nothing and the queue is full): that end then uses the relay."""
        return self._send(conn, KIND_CHANNEL, channel_id, fd)

    def send_response(self, conn: socket.socket, payload: bytes, max_queued: int) -> bool:
        """Queue one answer frame; False if the connection is gone or already holds
        ``max_queued`` messages the client has not taken."""
        owned = self._owned.get(conn)
        if owned is None or len(owned.outbound) >= max_queued:
            return False
        owned.outbound.append(_Out(frame(KIND_RESPONSE, payload)))
        return self._flush(conn, owned)

    def _send(self, conn: socket.socket, kind: int, channel_id: int, fd: int) -> bool:
        owned = self._owned.get(conn)
        if owned is None or len(owned.outbound) >= MAX_QUEUED_DESCRIPTORS:
            if owned is not None:
                log.info("descriptor socket full: channel %d end goes on the relay", channel_id)
            return False
        try:
            copy = os.dup(fd)  # the queue's own: the caller keeps (and closes) ``fd``
        except OSError as exc:
            log.warning("descriptor socket: cannot queue a descriptor: %s", exc)
            return False
        owned.outbound.append(_Out(pack(kind, channel_id), copy))
        return self._flush(conn, owned)

    def _flush(self, conn: socket.socket, owned: _Owned) -> bool:
        """Send what the socket takes now, in order; wait for it to take the rest. False (and
        the connection dropped) if it broke."""
        outbound = owned.outbound
        while outbound:
            item = outbound[0]
            try:
                if item.fd != -1:
                    # The descriptor rides on the message's first bytes (16 go whole).
                    sent = socket.send_fds(conn, [item.data], [item.fd])
                else:
                    sent = conn.send(memoryview(item.data)[item.done :])
            except (BlockingIOError, InterruptedError):
                if not owned.writing and self._loop is not None:
                    owned.writing = True
                    self._loop.add_writer(conn, self._writable, conn)
                return True
            except OSError as exc:
                log.info("descriptor socket broke (%s): dropping it", exc)
                self._drop(conn)
                return False
            if item.fd != -1:
                if sent != len(item.data):  # cannot happen for 16 bytes: never half a message
                    self._drop(conn)
                    return False
                os.close(item.fd)
                item.fd = -1
                outbound.popleft()
            else:
                item.done += sent
                if item.done == len(item.data):
                    outbound.popleft()
        if owned.writing and self._loop is not None:
            owned.writing = False
            self._loop.remove_writer(conn)
        return True

    def _writable(self, conn: socket.socket) -> None:
        owned = self._owned.get(conn)
        if owned is not None:
            self._flush(conn, owned)
