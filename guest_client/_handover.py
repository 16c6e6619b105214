"""This session's connection to the host's descriptor socket (``ring.handover``).

The host sends a channel's descriptor before the ``opened`` answer that names it, so by the time
a thread opens a channel end its descriptor is already in the socket buffer (or, once a reader
runs, in the stash).

Two ways to read, chosen once per session:

* descriptors only (the host offers no control frames, or before :meth:`Handover.start_control`):
  several threads may open ends at once (a connect on one, an accept on the attach reader), so
  one reads at a time, under the lock, and keeps descriptors meant for another channel in a
  small stash for their owner;
* with control frames (``Welcome.control_socket``): the session's requests go out here
  (:meth:`Handover.send`, any thread, one frame at a time under the send lock) and one reader
  thread (``hvsock-control``) reads everything: answers go to the session's router, descriptors
  to the stash, where :meth:`Handover.take` waits for them. Answers and descriptors come in the
  host's order, so an ``opened`` answer is routed only after its descriptor is stashed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from hvsock.v1 import hvsock_pb2
from ring.handover import (
    KIND_CHANNEL,
    KIND_REQUEST,
    KIND_RESPONSE,
    connect,
    frame,
    receive,
    receive_any,
)

log = logging.getLogger("hvsock.client")

#: Seconds to wait for the probe, or for a channel's descriptor (already sent when we look).
TIMEOUT = 5.0
#: Descriptors kept for channels nobody has asked for yet (the oldest is closed beyond).
MAX_STASHED = 256


def _expect_channel(kind: int, fd: int) -> None:
    """After the probe, every descriptor is a channel's: anything else closes it and is a
    protocol error."""
    if kind != KIND_CHANNEL:
        os.close(fd)
        raise OSError(errno.EPROTO, "a second probe on the descriptor socket")


class Handover:
    """Receives ring descriptors for one attach session (and, with control frames, carries its
    requests and answers)."""

    def __init__(self, address: str, secret: str, timeout: float = TIMEOUT) -> None:
        """Connect, present the session secret and read the probe: :attr:`nonce` is what
        ``ProveSharedMemory`` sends. Raises OSError when this process cannot reach the socket
        or map what comes over it (the session then uses the relay)."""
        self._sock, self.nonce = connect(address, secret, timeout)
        self._lock = threading.Lock()
        self._stashed = threading.Condition(self._lock)  # a descriptor arrived (reader runs)
        self._stash: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._ended: str | None = None  # the reader stopped: why
        self._closing = False

    # -- control frames ------------------------------------------------------------------------

    def start_control(
        self,
        on_answer: Callable[[hvsock_pb2.AttachResponse], None],
        on_lost: Callable[[str], None],
    ) -> None:
        """From now on one reader thread takes everything the host sends: answers go to
        ``on_answer`` (on that thread), and ``on_lost`` is told once if the connection ends
        before :meth:`close`."""
        self._sock.settimeout(None)
        self._reader = threading.Thread(
            target=self._read, args=(on_answer, on_lost), name="hvsock-control", daemon=True
        )
        self._reader.start()

    def send(self, request: hvsock_pb2.AttachRequest) -> None:
        """Send one request frame (blocks while the host's socket buffer is full). A broken
        connection raises OSError; the reader reports the loss."""
        data = frame(KIND_REQUEST, request.SerializeToString())
        with self._send_lock:
            self._sock.sendall(data)

    def shutdown_write(self) -> None:
        """No more requests: the host carries out those sent, then ends the session."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _read(
        self,
        on_answer: Callable[[hvsock_pb2.AttachResponse], None],
        on_lost: Callable[[str], None],
    ) -> None:
        reason = "the host closed the descriptor socket"
        try:
            while True:
                kind, channel_id, item = receive_any(self._sock)
                if kind == KIND_RESPONSE:
                    assert isinstance(item, bytes)
                    answer = hvsock_pb2.AttachResponse.FromString(item)
                    try:
                        on_answer(answer)
                    except Exception:  # one answer's trouble must not cost the session
                        log.exception("routing an answer from the descriptor socket")
                    continue
                assert isinstance(item, int)
                _expect_channel(kind, item)
                with self._stashed:
                    self._keep(channel_id, item)
                    self._stashed.notify_all()
        except (OSError, DecodeError) as exc:
            reason = str(exc)
        with self._stashed:
            self._ended = reason
            self._stashed.notify_all()
        if not self._closing:
            on_lost(reason)

    # -- descriptors ---------------------------------------------------------------------------

    def _keep(self, channel_id: int, fd: int) -> None:
        """Stash a descriptor for its owner (lock held)."""
        self._stash[channel_id] = fd
        if len(self._stash) > MAX_STASHED:
            os.close(self._stash.popitem(last=False)[1])

    def take(self, channel_id: int, timeout: float = TIMEOUT) -> int:
        """The descriptor of ``channel_id``'s segment (the caller closes it)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                fd = self._stash.pop(channel_id, None)
                if fd is not None:
                    return fd
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        errno.ETIMEDOUT, f"no ring descriptor for channel {channel_id}"
                    )
                if self._reader is not None:
                    if self._ended is not None:
                        raise ConnectionResetError(errno.ECONNRESET, self._ended)
                    if self._reader is threading.current_thread():
                        # Routing an answer: its descriptor came before it or not at all.
                        raise OSError(errno.EPROTO, f"no descriptor for channel {channel_id}")
                    self._stashed.wait(remaining)
                    continue
                self._sock.settimeout(remaining)
                try:
                    kind, got, fd = receive(self._sock)
                except TimeoutError:
                    continue  # the deadline check above reports it
                _expect_channel(kind, fd)
                if got == channel_id:
                    return fd
                self._keep(got, fd)

    def close(self) -> None:
        # Wake a thread blocked in take() or the reader (they then get ConnectionResetError)
        # before waiting for the lock it holds; the reader, told we are closing, stays quiet.
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for fd in self._stash.values():
                os.close(fd)
            self._stash.clear()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join()
        self._sock.close()
