"""The byte pipe under every socket: a receive ring and a send ring, whatever the data path.

Sockets only ever read ``rx`` and write ``tx`` (``ring.Ring`` objects), so back-pressure, FIN
ordering, partial reads and rescind behave identically on every path:

* :class:`ShmPipe` — the channel's own shared-memory rings, mapped from the host's segment;
  bytes go from this program's ring straight to the peer's.
* :class:`RelayPipe` — two private rings of the channel's geometry plus two pump threads that
  move them to and from the host's ``ChannelData`` stream (the gRPC relay path). The outbound
  pump reads whatever the socket has written, up to 64 KiB per frame, so a loop of small sends
  is coalesced into large frames, and never sends beyond the host's credit (``send_limit``).
* :func:`memory_pair` — two pipes crossed over private rings: an in-process transport for fast
  unit tests that exercises the same code as the other paths.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from ring import PAGE_SIZE, Channel, Ring
from ring.shm import stall_bit

log = logging.getLogger("hvsock.client")

#: Largest relay frame (the API's limit); also the coalescing size of small sends.
MAX_FRAME = 65536


class Pipe(Protocol):
    rx: Ring
    tx: Ring
    path: str

    def rescind(self) -> None: ...

    def close(self) -> None: ...

    def hold(self, receiving: bool, timeout: float | None) -> float | None:
        """Wait while the host stalls this end's sends (or receives); return what is left of
        ``timeout``. TimeoutError when it runs out, BlockingIOError when it is 0."""
        ...

    def wait_unstalled(self, receiving: bool, timeout: float | None) -> bool:
        """Wait until this end's sends (or receives) are not stalled; False on timeout."""
        ...


class _NeverStalled:
    """Pipes the host stalls by itself (the relay) or never (in-process pairs)."""

    def hold(self, receiving: bool, timeout: float | None) -> float | None:
        return timeout

    def wait_unstalled(self, receiving: bool, timeout: float | None) -> bool:
        return True


def _private_ring(pages: int, max_payload: int) -> tuple[mmap.mmap, Ring]:
    # Anonymous mmap: page-aligned (the ring needs 8-byte alignment) and never in /dev/shm.
    memory = mmap.mmap(-1, pages * PAGE_SIZE)
    return memory, Ring(memory, initialize=True, max_payload=max_payload)


class ShmPipe:
    """Both ends map the rings, so the host cannot stall them by not moving bytes: it sets the
    segment header's stalled word (pause, StallRing) and this end checks it before each send
    and receive — one atomic load while nothing is stalled. A call already blocked inside the
    ring when a stall starts completes normally; the stall applies from the next call."""

    path = "shm"

    def __init__(self, segment: hvsock_pb2.SharedMemorySegment, directory: str | None) -> None:
        self.channel = Channel.attach(segment.name, end=segment.end, directory=directory)
        self.rx, self.tx = self.channel.rx, self.channel.tx
        self._bits = (stall_bit(segment.end, False), stall_bit(segment.end, True))

    def hold(self, receiving: bool, timeout: float | None) -> float | None:
        bits = self._bits[receiving]
        if not self.channel.stalled & bits:
            return timeout
        if timeout == 0:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        start = time.monotonic()
        if not self.channel.wait_unstalled(bits, timeout):
            raise TimeoutError("timed out")
        if timeout is None:
            return None
        return max(timeout - (time.monotonic() - start), 1e-6)

    def wait_unstalled(self, receiving: bool, timeout: float | None) -> bool:
        return self.channel.wait_unstalled(self._bits[receiving], timeout)

    def rescind(self) -> None:
        self.channel.rescind()

    def close(self) -> None:
        self.channel.close()


class MemoryPipe(_NeverStalled):
    """One end of an in-process pair: its own ``Ring`` objects over memory shared with the
    other end's (each ring has one reader object and one writer object, as across processes).
    """

    path = "memory"

    def __init__(self, rx: Ring, tx: Ring) -> None:
        self.rx, self.tx = rx, tx

    def rescind(self) -> None:
        self.rx.rescind()
        self.tx.rescind()

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def memory_pair(
    send_pages: int = 2, recv_pages: int = 3, max_payload: int = 16384
) -> tuple[MemoryPipe, MemoryPipe]:
    """Two crossed pipes; the first end writes ``send_pages`` rings and reads ``recv_pages``."""
    mem_ab, a_to_b = _private_ring(send_pages, max_payload)
    mem_ba, b_to_a = _private_ring(recv_pages, max_payload)
    a = MemoryPipe(Ring(mem_ba, max_payload=max_payload), a_to_b)
    b = MemoryPipe(Ring(mem_ab, max_payload=max_payload), b_to_a)
    return a, b


class RelayPipe(_NeverStalled):
    """A channel end relayed over ``ChannelData``.

    Credit flows both ways, so no thread ever waits on something queued behind what it waits
    for: the host grants ``send_limit`` from its ring's free space, this end grants
    ``receive_limit`` from its private receive ring's free space. Threads (all daemons):

    * ``tx``: reads what the socket wrote (up to 64 KiB, within the send credit) and queues it
      as frames, then FIN; the request stream ends only when the socket is closed;
    * gRPC's request consumer: writes the queued frames;
    * ``inbound``: reads the response stream; never blocks (credit updates take effect at
      once, data goes to a queue bounded by the receive credit);
    * ``rx``: moves received data into the private receive ring (blocking while the program
      does not read) and grants more receive credit as the program frees space.
    """

    path = "relay"

    def __init__(
        self,
        stub: hvsock_pb2_grpc.HostServiceStub,
        session: str,
        channel: hvsock_pb2.Channel,
    ) -> None:
        geometry = channel.geometry
        self._rx_memory, self.rx = _private_ring(geometry.recv_ring_pages, geometry.max_payload)
        self._tx_memory, self.tx = _private_ring(geometry.send_ring_pages, geometry.max_payload)
        self._requests: queue.SimpleQueue[hvsock_pb2.ChannelDataRequest | None] = (
            queue.SimpleQueue()
        )
        self._requests.put(
            hvsock_pb2.ChannelDataRequest(
                open=hvsock_pb2.ChannelDataOpen(session=session, channel_id=channel.channel_id)
            )
        )
        self._lock = threading.Condition()  # guards everything below
        self._send_limit = 0
        self._sent = 0
        self._incoming: collections.deque[bytes | None] = collections.deque()  # None = FIN
        self._moved = 0  # bytes moved into the receive ring
        self._received = 0  # bytes taken off the stream
        self._granted = 0  # receive credit given to the host
        self._stopped = False
        self._closed = False
        self._done = 0  # of the tx and rx threads
        #: Called (on the inbound thread) when the stream fails without word from the host.
        self.on_lost: Callable[[], None] = lambda: None
        self._call = stub.ChannelData(_drain_requests(self._requests))
        self._threads = [
            threading.Thread(target=target, name=f"hvsock-relay-{name}", daemon=True)
            for name, target in (("tx", self._tx), ("in", self._inbound), ("rx", self._rx))
        ]
        for thread in self._threads:
            thread.start()

    # -- socket -> host ----------------------------------------------------------------------

    def _tx(self) -> None:
        buffer = bytearray(MAX_FRAME)
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: self._stopped or self._send_limit > self._sent)
                    if self._stopped:
                        return
                    room = min(self._send_limit - self._sent, MAX_FRAME)
                n = self.tx.read_into(buffer, room, None)
                if n == 0:  # the socket wrote FIN (or the channel was rescinded)
                    if not self.tx.is_rescinded:
                        self._requests.put(hvsock_pb2.ChannelDataRequest(fin=True))
                    # Ending the request stream means close() to the host: a half-closed
                    # socket keeps it open until the program closes the socket.
                    with self._lock:
                        self._lock.wait_for(lambda: self._stopped or self._closed)
                    return
                with self._lock:
                    self._sent += n
                self._requests.put(
                    hvsock_pb2.ChannelDataRequest(data=bytes(memoryview(buffer)[:n]))
                )
        except OSError as exc:  # closed under us at teardown
            log.debug("relay tx ended: %s", exc)
        finally:
            self._side_done()

    # -- host -> socket ----------------------------------------------------------------------

    def _inbound(self) -> None:
        try:
            for frame in self._call:
                with self._lock:
                    if frame.send_limit:
                        self._send_limit = max(self._send_limit, frame.send_limit)
                    if frame.data:
                        self._incoming.append(frame.data)
                        self._received += len(frame.data)
                    if frame.fin:
                        self._incoming.append(None)
                    self._lock.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.debug("relay stream ended: %s", exc)
            # The host ends streams it tears down with a status carrying an errno detail; one
            # without is the transport failing (the host went away): a reset, not an EOF.
            # Say so before the EOF becomes visible, so no reader takes it for a clean end.
            if rpc_status.from_call(exc) is None:
                self.on_lost()
        # The stream is over (channel closed, rescinded, or the host went away): what is
        # buffered stays readable, then EOF; sends fail.
        with self._lock:
            self._incoming.append(None)
            self._lock.notify_all()
        self.tx.rescind()
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def _rx(self) -> None:
        rx = self.rx
        # Wait for this much free space before granting more: a quarter of the ring.
        step = max(min(rx.data_size // 4, rx.max_payload), 64)

        def grant() -> None:
            limit = self._moved + rx.writable()
            if limit > self._granted:
                self._granted = limit
                self._requests.put(hvsock_pb2.ChannelDataRequest(receive_limit=limit))

        try:
            grant()
            while True:
                with self._lock:
                    # Wait for data while the host may still send some.
                    self._lock.wait_for(self._rx_has_work)
                    if self._closed:
                        return
                    item = self._incoming.popleft() if self._incoming else b""
                if item is None:
                    rx.fin(None)
                    return
                if not item:
                    # All granted credit is used and moved: wait for the program to read.
                    rx.wait_writable(step, None)
                    if rx.is_rescinded:
                        return
                    grant()
                    continue
                rx.write_all(item, None)
                self._moved += len(item)
                with self._lock:
                    caught_up = not self._incoming
                if caught_up:
                    grant()
        except OSError as exc:  # rescinded or closed locally
            log.debug("relay rx ended: %s", exc)
        finally:
            self._side_done()

    def _rx_has_work(self) -> bool:
        return bool(self._incoming) or self._received >= self._granted or self._closed

    def _side_done(self) -> None:
        """The tx thread and the rx thread each call this once when done. The request stream
        (which carries receive credit as well as data) ends only when both are: ending it
        earlier would strand the host with data it may not send for want of credit."""
        with self._lock:
            self._done += 1
            last = self._done == 2
        if last:
            self._requests.put(None)

    # -- lifetime ----------------------------------------------------------------------------

    def rescind(self) -> None:
        """Sends fail from now on. The receive side is left to the stream: data the host
        drained from the rescinded ring may still be on its way, and EOF follows it."""
        self.tx.rescind()
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def close(self) -> None:
        """Stop reading; what was written (and the FIN) still drains to the host.

        The tx thread ends the request stream after the FIN, and the host closes this end
        once all of it is in the ring, then ends the response stream, which ends the other
        threads. The private rings are freed with the last reference (garbage collection).
        """
        self.rx.rescind()
        with self._lock:
            self._closed = True
            self._lock.notify_all()


def _drain_requests(
    requests: queue.SimpleQueue[hvsock_pb2.ChannelDataRequest | None],
) -> Iterator[hvsock_pb2.ChannelDataRequest]:
    while (request := requests.get()) is not None:
        yield request
