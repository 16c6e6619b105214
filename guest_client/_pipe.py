"""The byte pipe under every socket: a receive ring and a send ring, whatever the data path.

Sockets only ever read ``rx`` and write ``tx`` (``ring.Ring`` objects, or on the relay path
objects with the same calls and rules), so back-pressure, FIN ordering, partial reads and
rescind behave identically on every path:

* :class:`ShmPipe` — the channel's own shared-memory rings, mapped from the host's segment;
  bytes go from this program's ring straight to the peer's.
* :class:`RelayPipe` — the gRPC relay path: in place of rings, a send buffer bounded by the
  host's credit (``send_limit``) whose bytes gRPC's request consumer takes up to 64 KiB per
  frame, so a loop of small sends is coalesced into large frames, and a receive buffer the
  response stream fills within the credit this end grants as the program reads. Both behave
  as the rings do (:class:`RelaySend`, :class:`RelayReceive`).
* :func:`memory_pair` — two pipes crossed over private rings: an in-process transport for fast
  unit tests that exercises the same code as the other paths.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.workers import WorkerPool
from ring import (
    CONTROL_PAGE_SIZE,
    FIN_PACKET_LEN,
    PAGE_SIZE,
    WRITE_RESERVE,
    Channel,
    Ring,
    effective_max_payload,
    packet_len,
)
from ring._errors import (
    ST_AGAIN,
    ST_FIN_SENT,
    ST_RESCINDED,
    ST_TIMEOUT,
    RingCorruptError,
    status_error,
)
from ring.shm import stall_bit

from . import errors

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("hvsock.client")

#: Largest relay frame (the API's limit); also the coalescing size of small sends.
MAX_FRAME = 65536

#: Runs each relayed end's inbound loop.
_WORKERS = WorkerPool()


class Pipe(Protocol):
    path: str
    #: The host ended this end's transport itself (only the relay has one that it can end):
    #: ChannelEnd.ended_by_reset then waits to hear why on the attach stream.
    ended_by_host: bool

    @property
    def rx(self) -> RxEnd: ...

    @property
    def tx(self) -> TxEnd: ...

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

    ended_by_host = False

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
    ended_by_host = False  # the host ends nothing of it: it rescinds the rings

    def __init__(self, segment: hvsock_pb2.SharedMemorySegment, fd: int) -> None:
        """Map the segment behind ``fd`` (handed over by the host; the caller closes it)."""
        self.channel = Channel.attach_fd(fd, end=segment.end)
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


class TxEnd(Protocol):
    """What sockets use of a send ring: ``ring.Ring``, or :class:`RelaySend`."""

    def write(self, data: Buffer, timeout: float | None = None) -> int: ...
    def write_all(self, data: Buffer, timeout: float | None = None) -> None: ...
    def fin(self, timeout: float | None = None) -> None: ...
    def writable(self) -> int: ...
    def wait_writable(self, nbytes: int = 1, timeout: float | None = None) -> bool: ...
    def watch_writable(self, timeout: float | None = None) -> bool: ...
    def rescind(self) -> None: ...
    @property
    def fin_sent(self) -> bool: ...
    @property
    def is_rescinded(self) -> bool: ...


class RxEnd(Protocol):
    """What sockets use of a receive ring: ``ring.Ring``, or :class:`RelayReceive`."""

    def read_into(self, buffer: Buffer, nbytes: int = 0, timeout: float | None = None) -> int: ...
    def readable(self) -> int: ...
    def wait_readable(self, timeout: float | None = None) -> bool: ...
    def watch_readable(self, timeout: float | None = None) -> bool: ...
    def rescind(self) -> None: ...
    @property
    def at_eof(self) -> bool: ...
    @property
    def is_rescinded(self) -> bool: ...


def _ring_capacity(pages: int, max_payload: int) -> tuple[int, int]:
    """(payload bytes an empty ring of ``pages`` takes without blocking, its largest packet
    payload): what ``writable()`` and ``max_payload`` of a fresh ``Ring`` of that size say."""
    size = pages * PAGE_SIZE - CONTROL_PAGE_SIZE
    largest = effective_max_payload(size, max_payload)
    free, total = size, 0
    while free > WRITE_RESERVE:
        payload = min(free - WRITE_RESERVE, largest)
        total += payload
        free -= packet_len(payload)
    return total, largest


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be non-negative or None")


def _wait(condition: threading.Condition, timeout: float | None, deadline: float, op: str) -> float:
    """Wait once on ``condition`` (held) within ``timeout``, raising what a ring raises
    (BlockingIOError for 0, TimeoutError once the deadline passed); returns the deadline."""
    if timeout is None:
        condition.wait()
        return deadline
    if timeout == 0:
        raise status_error(ST_AGAIN, op=op)
    now = time.monotonic()
    if deadline == 0.0:
        deadline = now + timeout
    elif now >= deadline:
        raise status_error(ST_TIMEOUT, op=op)
    condition.wait(deadline - now)
    return deadline


class RelaySend:
    """The send half of a relayed end, in place of a send ring: the same calls, errors,
    partial writes and FIN rules as a ``ring.Ring`` writer.

    A write appends to a buffer bounded by the host's credit — what was accepted never exceeds
    ``send_limit``, which the host grants from its ring's free space — so back-pressure is that
    ring's. gRPC's request consumer takes up to 64 KiB per frame from the buffer
    (:meth:`RelayPipe._requests`), so a loop of small sends still travels in large frames.
    """

    def __init__(
        self, lock: threading.Lock, work: threading.Condition, capacity: int, max_payload: int
    ) -> None:
        self._room = threading.Condition(lock)  # credit arrived, or the end is over
        self._work = work
        self._max_payload = max_payload
        self.buffer = bytearray()  # accepted, not yet taken into a frame
        self.accepted = 0  # bytes accepted in all
        self.sent = 0  # bytes taken into frames in all
        self.limit = 0  # the host's send credit (bytes in all): frames stay within it
        # What writes may fill: the credit, or before it arrives what the (empty) send ring
        # holds, which is what the host's first credit is.
        self._bound = capacity
        self._fin = False
        self._rescinded = False

    def write(self, data: Buffer, timeout: float | None = None) -> int:
        """Write some of ``data`` (like ``socket.send``); return the count written."""
        return self._write(data, timeout, False)

    def write_all(self, data: Buffer, timeout: float | None = None) -> None:
        """Write all of ``data`` (like ``socket.sendall``)."""
        self._write(data, timeout, True)

    def _write(self, data: Buffer, timeout: float | None, whole: bool) -> int:
        _check_timeout(timeout)
        with memoryview(data) as view:
            if not view.c_contiguous:
                with memoryview(view.tobytes()) as copy, copy.cast("B") as src:
                    return self._write_view(src, timeout, whole)
            with view.cast("B") as src:
                return self._write_view(src, timeout, whole)

    def _write_view(self, src: memoryview, timeout: float | None, whole: bool) -> int:
        n = len(src)
        done = 0
        deadline = 0.0
        with self._room:
            if self._fin:
                raise status_error(ST_FIN_SENT, op="write")
            while done < n:
                if self._rescinded:
                    if done and not whole:
                        return done
                    raise status_error(ST_RESCINDED, op="write")
                room = self._bound - self.accepted
                if room > 0:
                    take = min(room, n - done)
                    self.buffer += src[done : done + take]
                    self.accepted += take
                    done += take
                    self._work.notify()
                    if not whole:
                        break
                    continue
                deadline = _wait(self._room, timeout, deadline, "write")
            return done

    def fin(self, timeout: float | None = None) -> None:
        """FIN after everything written (it needs no credit). Idempotent."""
        _check_timeout(timeout)
        with self._room:
            if self._fin:
                return
            if self._rescinded:
                raise status_error(ST_RESCINDED, op="fin")
            self._fin = True
            self._work.notify()

    def writable(self) -> int:
        """Bytes a write could take now without blocking."""
        with self._room:
            if self._fin or self._rescinded:
                return 0
            return max(self._bound - self.accepted, 0)

    def wait_writable(self, nbytes: int = 1, timeout: float | None = None) -> bool:
        """Wait until a write of ``min(nbytes, max_payload)`` bytes would not block."""
        _check_timeout(timeout)
        need = min(max(nbytes, 1), self._max_payload)
        with self._room:
            return self._room.wait_for(
                lambda: self._fin or self._rescinded or self._bound - self.accepted >= need,
                timeout,
            )

    def watch_writable(self, timeout: float | None = None) -> bool:
        """For another thread than the writer's (a readiness watcher): the same as
        ``wait_writable(1, timeout)``, which only waits on this end's condition."""
        return self.wait_writable(1, timeout)

    def grant(self, limit: int) -> None:
        """The host's credit (lock held)."""
        if limit > self.limit:
            self.limit = limit
            self._work.notify()
            if limit > self._bound:
                self._bound = limit
                self._room.notify_all()

    def rescind(self) -> None:
        """Sends fail (EPIPE) from now on; what is buffered is dropped."""
        with self._room:
            self._rescind()

    def _rescind(self) -> None:
        self._rescinded = True
        self._room.notify_all()
        self._work.notify()

    @property
    def fin_sent(self) -> bool:
        return self._fin

    @property
    def is_rescinded(self) -> bool:
        return self._rescinded


class RelayReceive:
    """The receive half of a relayed end, in place of a receive ring: the same calls, errors
    and EOF rules as a ``ring.Ring`` reader.

    The inbound thread appends frames as they come (never blocking); the host sends no more
    than the receive credit, which is what a ring of this end's geometry holds. Reads grant
    more as they free a quarter of that (at most one packet's worth): a program that does not
    read grants nothing, so the host stops, and the peer's ring fills — the ring's back-pressure.
    """

    def __init__(
        self, lock: threading.Lock, work: threading.Condition, capacity: int, max_payload: int
    ) -> None:
        self._data = threading.Condition(lock)  # data, EOF, or close
        self._work = work
        self._capacity = capacity
        self._step = max(min(capacity // 4, max_payload), 64)
        self._frames: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into the first frame
        self._size = 0  # bytes buffered
        self._consumed = 0  # bytes read in all
        self.granted = capacity  # receive credit (bytes in all) to give the host
        self.eof = False  # FIN (or the end of the stream) came, behind the buffered data
        self._at_eof = False
        self._rescinded = False
        #: Raised by reads once the buffered data is read: the host found the ring corrupt.
        self._error: OSError | None = None

    def read_into(self, buffer: Buffer, nbytes: int = 0, timeout: float | None = None) -> int:
        """Read up to ``nbytes`` (default ``len(buffer)``) into ``buffer``; 0 = EOF."""
        _check_timeout(timeout)
        if nbytes < 0:
            raise ValueError("negative buffersize in read_into")
        with memoryview(buffer) as view:
            if view.readonly:
                raise TypeError("read_into needs a writable buffer")
            with view.cast("B") as dst:
                n = len(dst)
                if nbytes:
                    if nbytes > n:
                        raise ValueError("buffer too small for requested bytes")
                    n = nbytes
                if n == 0:
                    return 0
                return self._read(dst, n, timeout)

    def _read(self, dst: memoryview, n: int, timeout: float | None) -> int:
        deadline = 0.0
        with self._data:
            while not self._size:
                if self._error is not None:
                    raise self._error
                if self._at_eof or self._rescinded:
                    return 0
                if self.eof:
                    self._at_eof = True
                    return 0
                deadline = _wait(self._data, timeout, deadline, "read")
            frames = self._frames
            done = 0
            while done < n and frames:
                frame = frames[0]
                start = self._offset
                take = min(len(frame) - start, n - done)
                with memoryview(frame) as src:
                    dst[done : done + take] = src[start : start + take]
                done += take
                if start + take == len(frame):
                    frames.popleft()
                    self._offset = 0
                else:
                    self._offset = start + take
            self._size -= done
            self._consumed += done
            if not self._rescinded and self._consumed + self._capacity - self.granted >= self._step:
                self.granted = self._consumed + self._capacity
                self._work.notify()
            return done

    def readable(self) -> int:
        """Bytes waiting to be read (a pending EOF counts, like a ring's FIN packet)."""
        with self._data:
            return self._size + (FIN_PACKET_LEN if self.eof and not self._at_eof else 0)

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Wait until a read would not block; False on timeout."""
        _check_timeout(timeout)
        with self._data:
            return self._data.wait_for(
                lambda: bool(self._size) or self.eof or self._at_eof or self._rescinded, timeout
            )

    def watch_readable(self, timeout: float | None = None) -> bool:
        """For another thread than the reader's (a readiness watcher): the same as
        ``wait_readable``, which only waits on this end's condition."""
        return self.wait_readable(timeout)

    def deliver(self, data: bytes) -> None:
        """A frame from the host (lock held)."""
        if self._rescinded:
            return  # closed: nobody reads it any more
        self._frames.append(data)
        self._size += len(data)
        self._data.notify_all()

    def fail(self, error: OSError) -> None:
        """``error`` behind the buffered data, for every later read (lock held)."""
        self._error = error
        self.end()

    def end(self) -> None:
        """EOF behind the buffered data (lock held)."""
        self.eof = True
        self._data.notify_all()
        self._work.notify()

    def rescind(self) -> None:
        """Closed: blocked reads return (what is buffered, then 0); no more credit."""
        with self._data:
            self._rescinded = True
            self._data.notify_all()
            self._work.notify()

    @property
    def done(self) -> bool:
        """No more receive credit is needed (lock held)."""
        return self.eof or self._rescinded

    @property
    def at_eof(self) -> bool:
        return self._at_eof

    @property
    def is_rescinded(self) -> bool:
        return self._rescinded


class RelayPipe(_NeverStalled):
    """A channel end relayed over ``ChannelData``.

    Credit flows both ways, so no thread ever waits on something queued behind what it waits
    for: the host grants ``send_limit`` from its ring's free space (:class:`RelaySend` accepts
    no more), this end grants ``receive_limit`` as the program reads (:class:`RelayReceive`).
    Beside the program's own threads there are two (daemons):

    * gRPC's request consumer pulls :meth:`_requests`: receive credit, data (up to 64 KiB per
      frame, whatever the socket wrote meanwhile), then FIN; the request stream ends when the
      socket is closed (after the FIN) and no more credit is needed;
    * ``inbound`` reads the response stream and never blocks: credit updates take effect at
      once, data is appended to the receive buffer (bounded by the receive credit).
    """

    path = "relay"

    def __init__(
        self,
        stub: hvsock_pb2_grpc.HostServiceStub,
        session: str,
        channel: hvsock_pb2.Channel,
    ) -> None:
        geometry = channel.geometry
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # something for the request stream
        send_capacity, send_payload = _ring_capacity(geometry.send_ring_pages, geometry.max_payload)
        recv_capacity, recv_payload = _ring_capacity(geometry.recv_ring_pages, geometry.max_payload)
        self.tx = RelaySend(lock, self._work, send_capacity, send_payload)
        self.rx = RelayReceive(lock, self._work, recv_capacity, recv_payload)
        self._granted = 0  # receive credit sent to the host
        self._fin_sent = False  # the FIN frame is out
        self._closed = False
        self._over = False  # the response stream ended
        #: The host ended the stream with a status (the channel rescinded, or the host going
        #: away); the attach stream says which: ChannelEnd.ended_by_reset waits to hear it.
        self.ended_by_host = False
        #: Called (on the inbound thread) when the stream fails without word from the host.
        self.on_lost: Callable[[], None] = lambda: None
        opening = hvsock_pb2.ChannelDataRequest(
            open=hvsock_pb2.ChannelDataOpen(session=session, channel_id=channel.channel_id)
        )
        # The stream is opened on the worker: opening one (its request-consumer thread
        # included) costs about 0.3 ms that neither connect() nor the attach stream's
        # reader thread, which builds this pipe, should wait for. Sends meanwhile wait in
        # the send buffer, within the credit an empty ring holds.
        _WORKERS.run(lambda: self._inbound(stub, opening), "hvsock-relay-in")

    # -- socket -> host ----------------------------------------------------------------------

    def _requests(
        self, opening: hvsock_pb2.ChannelDataRequest
    ) -> Iterator[hvsock_pb2.ChannelDataRequest]:
        """The request stream, pulled by gRPC's consumer thread one message at a time."""
        yield opening
        tx, rx, work = self.tx, self.rx, self._work
        while True:
            with work:
                while True:
                    if self._over:
                        return
                    if not rx.done and rx.granted > self._granted:
                        self._granted = rx.granted
                        request = hvsock_pb2.ChannelDataRequest(receive_limit=rx.granted)
                        break
                    if tx.is_rescinded:
                        tx.buffer.clear()
                    elif tx.buffer:
                        if tx.limit > tx.sent:
                            buffer = tx.buffer
                            n = min(len(buffer), MAX_FRAME, tx.limit - tx.sent)
                            with memoryview(buffer) as view:
                                frame = bytes(view[:n])
                            del buffer[:n]
                            tx.sent += n
                            request = hvsock_pb2.ChannelDataRequest(data=frame)
                            break
                    elif tx.fin_sent and not self._fin_sent:
                        self._fin_sent = True
                        request = hvsock_pb2.ChannelDataRequest(fin=True)
                        break
                    # Ending the request stream means close() to the host: a half-closed
                    # socket keeps it open until the program closes the socket. Nor does it
                    # end while the host may still need receive credit to send what it holds.
                    sending_done = tx.is_rescinded or (self._fin_sent and self._closed)
                    if sending_done and rx.done:
                        return
                    work.wait()
            yield request

    # -- host -> socket ----------------------------------------------------------------------

    def _inbound(
        self, stub: hvsock_pb2_grpc.HostServiceStub, opening: hvsock_pb2.ChannelDataRequest
    ) -> None:
        tx, rx, work = self.tx, self.rx, self._work
        try:
            for frame in stub.ChannelData(self._requests(opening)):
                with work:
                    if frame.send_limit:
                        tx.grant(frame.send_limit)
                    if frame.data:
                        rx.deliver(frame.data)
                    if frame.fin:
                        rx.end()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.debug("relay stream ended: %s", exc)
            # The host ends streams it tears down with a status carrying an errno detail; one
            # without is the transport failing (the host went away): a reset, not an EOF.
            # Say so before the EOF becomes visible, so no reader takes it for a clean end.
            if rpc_status.from_call(exc) is None:
                self.on_lost()
            else:
                self.ended_by_host = True
                if exc.code() == grpc.StatusCode.DATA_LOSS:
                    reported = errors.from_rpc_error(exc)
                    with work:
                        rx.fail(
                            RingCorruptError.reported(
                                reported.errno or errno.EPROTO, reported.strerror or "corrupt ring"
                            )
                        )
        except ValueError:  # the partition closed its gRPC channel before the stream opened
            self.on_lost()
        # The stream is over (channel closed, rescinded, or the host went away): what is
        # buffered stays readable, then EOF; sends fail.
        with work:
            rx.end()
            tx._rescind()
            self._over = True
            work.notify()

    # -- lifetime ----------------------------------------------------------------------------

    def wait_over(self, timeout: float) -> bool:
        """Wait until the host ended the data stream (after a close: it has written everything
        and closed this end); False on timeout."""
        with self._work:
            return self._work.wait_for(lambda: self._over, timeout)

    def rescind(self) -> None:
        """Sends fail from now on. The receive side is left to the stream: data the host
        drained from the rescinded ring may still be on its way, and EOF follows it."""
        self.tx.rescind()

    def close(self) -> None:
        """Stop reading; what was written (and the FIN) still drains to the host.

        The request stream ends after the FIN, and the host closes this end once all of it is
        in the ring, then ends the response stream, which ends the inbound thread.
        """
        with self._work:
            self._closed = True
        self.rx.rescind()
