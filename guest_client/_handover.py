"""This session's connection to the host's descriptor socket (``ring.handover``).

The host sends a channel's descriptor before the ``opened`` answer leaves on the attach stream,
so by the time a thread opens a channel end its descriptor is already in the socket buffer.
Several threads may open ends at once (a connect on one, an accept on the reader thread): one
reads at a time, under the lock, and keeps descriptors meant for another channel in a small
stash for their owner.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import threading
import time

from ring.handover import KIND_CHANNEL, connect, receive

#: Seconds to wait for the probe, or for a channel's descriptor (already sent when we look).
TIMEOUT = 5.0
#: Descriptors kept for channels nobody has asked for yet (the oldest is closed beyond).
MAX_STASHED = 256


class Handover:
    """Receives ring descriptors for one attach session."""

    def __init__(self, address: str, secret: str, timeout: float = TIMEOUT) -> None:
        """Connect, present the session secret and read the probe: :attr:`nonce` is what
        ``ProveSharedMemory`` sends. Raises OSError when this process cannot reach the socket
        or map what comes over it (the session then uses the relay)."""
        self._sock, self.nonce = connect(address, secret, timeout)
        self._lock = threading.Lock()
        self._stash: collections.OrderedDict[int, int] = collections.OrderedDict()

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
                self._sock.settimeout(remaining)
                try:
                    kind, got, fd = receive(self._sock)
                except TimeoutError:
                    continue  # the deadline check above reports it
                if kind != KIND_CHANNEL:
                    os.close(fd)
                    raise OSError(errno.EPROTO, "a second probe on the descriptor socket")
                if got == channel_id:
                    return fd
                self._stash[got] = fd
                if len(self._stash) > MAX_STASHED:
                    os.close(self._stash.popitem(last=False)[1])

    def close(self) -> None:
        # Wake a thread blocked in take() (it then gets ConnectionResetError) before waiting
        # for the lock it holds.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for fd in self._stash.values():
                os.close(fd)
            self._stash.clear()
        self._sock.close()
