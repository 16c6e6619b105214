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

import logging
import mmap
import threading
from collections.abc import Iterator
from typing import Protocol

import grpc

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from ring import PAGE_SIZE, Channel, Ring

log = logging.getLogger("hvsock.client")

#: Largest relay frame (the API's limit); also the coalescing size of small sends.
MAX_FRAME = 65536


class Pipe(Protocol):
    rx: Ring
    tx: Ring
    path: str

    def rescind(self) -> None: ...

    def close(self) -> None: ...


def _private_ring(pages: int, max_payload: int) -> tuple[mmap.mmap, Ring]:
    # Anonymous mmap: page-aligned (the ring needs 8-byte alignment) and never in /dev/shm.
    memory = mmap.mmap(-1, pages * PAGE_SIZE)
    return memory, Ring(memory, initialize=True, max_payload=max_payload)


class ShmPipe:
    path = "shm"

    def __init__(self, segment: hvsock_pb2.SharedMemorySegment, directory: str | None) -> None:
        self.channel = Channel.attach(segment.name, end=segment.end, directory=directory)
        self.rx, self.tx = self.channel.rx, self.channel.tx

    def rescind(self) -> None:
        self.channel.rescind()

    def close(self) -> None:
        self.channel.close()


class MemoryPipe:
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


class RelayPipe:
    """A channel end relayed over ``ChannelData``.

    Threads: gRPC's request-consumer thread runs :meth:`_outbound` (it blocks on the private
    tx ring and on credit), and one reader thread runs :meth:`_inbound` (it blocks writing into
    the private rx ring when the program does not read, which stops it reading the stream, so
    gRPC flow control carries the back-pressure to the host and from there to the peer's ring).
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
        self._opening = hvsock_pb2.ChannelDataRequest(
            open=hvsock_pb2.ChannelDataOpen(session=session, channel_id=channel.channel_id)
        )
        self._credit = threading.Condition()
        self._limit = 0
        self._sent = 0
        self._stopped = False
        self._closed = False
        self._call = stub.ChannelData(self._outbound())
        self._reader = threading.Thread(target=self._inbound, name="hvsock-relay", daemon=True)
        self._reader.start()

    def _outbound(self) -> Iterator[hvsock_pb2.ChannelDataRequest]:
        yield self._opening
        buffer = bytearray(MAX_FRAME)
        try:
            while True:
                with self._credit:
                    self._credit.wait_for(lambda: self._stopped or self._limit > self._sent)
                    if self._stopped:
                        return
                    room = min(self._limit - self._sent, MAX_FRAME)
                n = self.tx.read_into(buffer, room, None)
                if n == 0:  # the socket wrote FIN (or the channel was rescinded)
                    if not self.tx.is_rescinded:
                        yield hvsock_pb2.ChannelDataRequest(fin=True)
                    # Ending the request stream means close() to the host: a half-closed
                    # socket keeps it open until the program closes the socket.
                    with self._credit:
                        self._credit.wait_for(lambda: self._stopped or self._closed)
                    return
                self._sent += n
                yield hvsock_pb2.ChannelDataRequest(data=bytes(buffer[:n]))
        except OSError as exc:  # closed under us at teardown
            log.debug("relay outbound ended: %s", exc)

    def _inbound(self) -> None:
        try:
            for frame in self._call:
                if frame.send_limit:
                    with self._credit:
                        self._limit = max(self._limit, frame.send_limit)
                        self._credit.notify_all()
                if frame.data:
                    self.rx.write_all(frame.data, None)
                if frame.fin:
                    self.rx.fin(None)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.debug("relay stream ended: %s", exc)
        except OSError as exc:  # rescinded or closed locally
            log.debug("relay inbound ended: %s", exc)
            self._call.cancel()
        # The stream is over (channel closed, rescinded, or the host went away): what is
        # buffered stays readable, then EOF; sends fail.
        self.rescind()

    def rescind(self) -> None:
        self.rx.rescind()
        self.tx.rescind()
        with self._credit:
            self._stopped = True
            self._credit.notify_all()

    def close(self) -> None:
        """Stop reading; what was written (and the FIN) still drains to the host.

        The outbound pump ends after the FIN, which ends the request stream; the host then
        closes this end and ends the response stream, which ends the reader thread. The
        private rings are freed when both threads are done with them (garbage collection).
        """
        self.rx.rescind()
        with self._credit:
            self._closed = True
            self._credit.notify_all()
