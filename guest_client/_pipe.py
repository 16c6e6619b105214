"""The byte pipe under every socket: a receive ring and a send ring, whatever the data path.

Sockets only ever read ``rx`` and write ``tx`` (``ring.Ring`` objects, or on the relay path
objects with the same calls and rules), so back-pressure, FIN ordering, partial reads and
rescind behave identically on every path:

* :class:`ShmPipe` — the channel's own shared-memory rings, mapped from the host's segment;
  bytes go from this program's ring straight to the peer's.
* :class:`RelayPipe` — the gRPC relay path: in place of rings, a send buffer bounded by the
  host's credit (its send limit) whose bytes the session's one SessionData stream
  (:mod:`._relay`) takes in frames of up to 256 KiB, so a loop of small sends is coalesced
  into large frames, and a receive buffer that stream fills within the credit this end grants
  as the program reads. Both behave as the rings do (:class:`RelaySend`, :class:`RelayReceive`).
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hvsock.v1 import hvsock_pb2
from hvsock_common.relaywire import Frame, FrameWriter, kept
from ring import (
    CONTROL_PAGE_SIZE,
    FIN_PACKET_LEN,
    PAGE_SIZE,
    Channel,
    Ring,
    effective_max_payload,
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

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("hvsock.client")

#: Largest relay frame's data (the API's limit); also the coalescing size of small sends.
MAX_FRAME_DATA = 262144
#: A ``bytes`` sent over the relay with at least this many bytes is referenced until its frame
#: goes out, not copied (see :class:`RelaySend`); smaller ones are coalesced.
REFERENCED_SEND = 16384


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

    A write appends to a queue bounded by the host's credit — what was accepted never exceeds
    the send limit, which the host grants from its peer ring's free space plus the relay
    window — so back-pressure is that ring's (and the window's). The session stream takes
    frames from the queue (:meth:`take`), so a loop of small sends still travels in large
    frames.

    The queue (``_chunks``) holds the bytes accepted and not yet taken, in order, as:

    * ``bytes`` objects of the program's own, or views of them, referenced and not copied: a
      ``bytes`` cannot change, so a send of :data:`REFERENCED_SEND` bytes or more costs no
      copy before the frame's (the stream's message is the only one);
    * bytearrays holding copies of everything else (small sends, and buffers the program may
      change once the call returns). Only the last chunk is ever appended to, and only while it
      is in the queue: a bytearray taken whole leaves it first, so nothing resizes a buffer a
      frame still refers to.
    """

    def __init__(
        self, lock: threading.Lock, kick: Callable[[], None], limit: int, max_payload: int
    ) -> None:
        self._lock = lock  # taken directly on the write path: cheaper than the condition's
        self._room = threading.Condition(lock)  # credit arrived, or the end is over
        self._kick = kick  # (lock held) tell the session stream this end has work
        self._max_payload = max_payload
        self._chunks: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self.queued = 0  # bytes accepted, not yet taken into a frame (in ``_chunks``)
        self.accepted = 0  # bytes accepted in all
        self.sent = 0  # bytes taken into frames in all
        self.limit = limit  # the host's send limit (bytes in all): frames stay within it
        self._fin = False
        self._rescinded = False

    def write(self, data: Buffer, timeout: float | None = None) -> int:
        """Write some of ``data`` (like ``socket.send``); return the count written."""
        return self._write(data, timeout, False)

    def write_all(self, data: Buffer, timeout: float | None = None) -> None:
        """Write all of ``data`` (like ``socket.sendall``)."""
        self._write(data, timeout, True)

    def _write(self, data: Buffer, timeout: float | None, whole: bool) -> int:
        if timeout is not None:
            _check_timeout(timeout)
        if type(data) is bytes or type(data) is bytearray:  # the usual data: no view to cast
            return self._write_contiguous(data, timeout, whole)
        with memoryview(data) as view:
            if not view.c_contiguous:
                with memoryview(view.tobytes()) as copy, copy.cast("B") as src:
                    return self._write_contiguous(src, timeout, whole)
            with view.cast("B") as src:
                return self._write_contiguous(src, timeout, whole)

    def _write_contiguous(
        self, src: bytes | bytearray | memoryview, timeout: float | None, whole: bool
    ) -> int:
        n = len(src)
        done = 0
        deadline = 0.0
        with self._lock:
            if self._fin:
                raise status_error(ST_FIN_SENT, op="write")
            while done < n:
                if self._rescinded:
                    if done and not whole:
                        return done
                    raise status_error(ST_RESCINDED, op="write")
                room = self.limit - self.accepted
                if room > 0:
                    take = min(room, n - done)
                    chunks = self._chunks
                    if take >= REFERENCED_SEND and type(src) is bytes:
                        chunks.append(src if take == n else memoryview(src)[done : done + take])
                    else:
                        piece = src if take == n else memoryview(src)[done : done + take]
                        if chunks and type(chunks[-1]) is bytearray:
                            chunks[-1] += piece
                        else:
                            chunks.append(bytearray(piece))
                    self.queued += take
                    self.accepted += take
                    done += take
                    self._kick()
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
            self._kick()

    def writable(self) -> int:
        """Bytes a write could take now without blocking."""
        with self._room:
            if self._fin or self._rescinded:
                return 0
            return max(self.limit - self.accepted, 0)

    def wait_writable(self, nbytes: int = 1, timeout: float | None = None) -> bool:
        """Wait until a write of ``min(nbytes, max_payload)`` bytes would not block."""
        _check_timeout(timeout)
        need = min(max(nbytes, 1), self._max_payload)
        with self._room:
            return self._room.wait_for(
                lambda: self._fin or self._rescinded or self.limit - self.accepted >= need,
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
            self._room.notify_all()
            if self.queued:
                self._kick()

    def take(self, n: int) -> list[bytes | bytearray | memoryview]:
        """The next ``n`` (at most :attr:`queued`) bytes, taken for a frame (lock held): the
        queue's own objects where they are taken whole or cannot change, else copies. They are
        read after the lock is let go (the frame's message is joined then)."""
        chunks, parts, left = self._chunks, [], n
        while left:
            chunk = chunks[0]
            size = len(chunk)
            if size <= left:
                parts.append(chunks.popleft())
                left -= size
            elif type(chunk) is bytearray:  # still appended to: its head is copied out
                with memoryview(chunk) as view:
                    parts.append(bytes(view[:left]))
                del chunk[:left]
                left = 0
            else:  # a bytes object, or a view of one: a view of its head
                view = memoryview(chunk)
                parts.append(view[:left])
                chunks[0] = view[left:]
                left = 0
        self.queued -= n
        self.sent += n
        return parts

    def drop(self) -> None:
        """Forget what is queued (lock held): the end was rescinded."""
        self._chunks.clear()
        self.queued = 0

    def rescind(self) -> None:
        """Sends fail (EPIPE) from now on; what is buffered is dropped."""
        with self._room:
            self._rescind()

    def _rescind(self) -> None:
        self._rescinded = True
        self._room.notify_all()
        self._kick()

    @property
    def fin_sent(self) -> bool:
        return self._fin

    @property
    def is_rescinded(self) -> bool:
        return self._rescinded


class RelayReceive:
    """The receive half of a relayed end, in place of a receive ring: the same calls, errors
    and EOF rules as a ``ring.Ring`` reader.

    The session stream's thread appends frames as they come (never blocking); the host sends
    no more than the receive credit: what a ring of this end's geometry holds plus the relay
    window (``capacity``). Reads grant more as they free a quarter of that: a program that does
    not read grants nothing, so the host stops, and the peer's ring fills — the ring's
    back-pressure.
    """

    def __init__(self, lock: threading.Lock, kick: Callable[[], None], capacity: int) -> None:
        self._lock = lock  # taken directly on the read path: cheaper than the condition's
        self._data = threading.Condition(lock)  # data, EOF, or close
        self._kick = kick
        self._capacity = capacity
        self._step = max(capacity // 4, 64)
        self._frames: collections.deque[bytes | memoryview] = collections.deque()
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
        if timeout is not None:
            _check_timeout(timeout)
        if nbytes < 0:
            raise ValueError("negative buffersize in read_into")
        if type(buffer) is bytearray:  # the usual buffer: no view to check or cast
            return self._read(buffer, nbytes, timeout)
        with memoryview(buffer) as view:
            if view.readonly:
                raise TypeError("read_into needs a writable buffer")
            with view.cast("B") as dst:
                return self._read(dst, nbytes, timeout)

    def _read(self, dst: bytearray | memoryview, nbytes: int, timeout: float | None) -> int:
        n = len(dst)
        if nbytes:
            if nbytes > n:
                raise ValueError("buffer too small for requested bytes")
            n = nbytes
        if n == 0:
            return 0
        deadline = 0.0
        with self._lock:
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
                dst[done : done + take] = memoryview(frame)[start : start + take]
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
                self._kick()
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

    def deliver(self, data: bytes | memoryview) -> None:
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

    def rescind(self) -> None:
        """Closed: blocked reads return (what is buffered, then 0); no more credit."""
        with self._data:
            self._rescinded = True
            self._data.notify_all()

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
    """A channel end relayed over its session's SessionData stream (:class:`._relay.Link`).

    Credit flows both ways, so no thread ever waits on something queued behind what it waits
    for: the host grants the send limit from its peer ring's room plus the relay window
    (:class:`RelaySend` accepts no more), this end grants receive credit as the program reads
    (:class:`RelayReceive`). Every call below that says "lock held" runs under the session
    link's one lock, which ``tx`` and ``rx`` share; the link's stream thread takes this end's
    frames (:meth:`frames`) and hands it the host's (:meth:`on_frame`).
    """

    path = "relay"

    def __init__(
        self,
        lock: threading.Lock,
        kick: Callable[[RelayPipe], None],
        channel: hvsock_pb2.Channel,
        end: int,
    ) -> None:
        self.channel_id = channel.channel_id
        self.end = end  # 0: this end is the connector, 1: the acceptor
        self.key = (self.channel_id, end)
        self._lock = lock
        self._over_cond = threading.Condition(lock)
        # The largest packet payload of the peer's ring this end's sends stand for.
        send_payload = effective_max_payload(
            channel.geometry.send_ring_pages * PAGE_SIZE - CONTROL_PAGE_SIZE,
            channel.geometry.max_payload,
        )
        self.tx = RelaySend(lock, lambda: kick(self), channel.relay_send_limit, send_payload)
        self.rx = RelayReceive(lock, lambda: kick(self), channel.relay_receive_window)
        # Receive credit the host has: what was sent it, or, for an end the host credited as
        # it opened, its receive window (no first credit is sent).
        self._granted = self.rx.granted if channel.relay_receive_credited else 0
        self._fin_sent = False  # the FIN is out
        self._closed = False  # the program closed the socket
        self._close_sent = False  # ... and the close frame is out
        self._over = False  # the host is done with this end (close_done or reset)
        #: The host reset this end (a rescind, usually); the attach stream says why:
        #: ChannelEnd.ended_by_reset waits to hear it.
        self.ended_by_host = False
        #: Called (outside the lock) when the session's stream is lost without word from
        #: the host.
        self.on_lost: Callable[[], None] = lambda: None

    # -- socket -> host (lock held) ------------------------------------------------------------

    def frames(self, writer: FrameWriter, budget: int) -> int:
        """Add this end's pending frame to ``writer`` (one frame says all of it), with at most
        ``budget`` data bytes; returns the data bytes added."""
        if self._over:
            return 0
        tx, rx = self.tx, self.rx
        credit = 0
        if self._owes_credit():
            self._granted = credit = rx.granted
        if self._close_sent:
            if credit:
                writer.add(self.channel_id, self.end, credit=credit)
            return 0
        parts: list[bytes | bytearray | memoryview] = []
        n = 0
        if tx.is_rescinded:
            tx.drop()
        elif tx.queued and budget > 0:
            n = max(min(tx.queued, MAX_FRAME_DATA, tx.limit - tx.sent, budget), 0)
            if n:
                parts = tx.take(n)
        fin = close = False
        # FIN and close go behind the rest of the data.
        if not tx.queued and not tx.is_rescinded:
            if self._closed:
                # close() implies the FIN (one frame says both).
                self._close_sent = self._fin_sent = close = True
            elif tx.fin_sent and not self._fin_sent:
                self._fin_sent = fin = True
        if credit or n or fin or close:
            writer.add(self.channel_id, self.end, data=parts, credit=credit, fin=fin, close=close)
        return n

    def _owes_credit(self) -> bool:
        """Whether the host is to hear of more receive credit (lock held)."""
        rx = self.rx
        return not rx.done and rx.granted > self._granted

    def pending(self) -> bool:
        """Whether :meth:`frames` has something to send (lock held)."""
        if self._over or self._close_sent:
            return False
        tx = self.tx
        if self._owes_credit():
            return True
        if tx.is_rescinded:
            return False
        if tx.queued:
            return tx.limit > tx.sent
        return self._closed or (tx.fin_sent and not self._fin_sent)

    # -- host -> socket (lock held) ------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        tx, rx = self.tx, self.rx
        if frame.credit:
            tx.grant(frame.credit)
        if frame.data:
            rx.deliver(kept(frame.data))
        if frame.fin:
            rx.end()
        if frame.close_done:
            self._finish()
        elif frame.reset is not None:
            self.ended_by_host = True
            reset = hvsock_pb2.Error.FromString(frame.reset)
            if reset.code == _DATA_LOSS:
                rx.fail(
                    RingCorruptError.reported(
                        reset.errno.errno or errno.EPROTO, reset.message or "corrupt ring"
                    )
                )
            self._finish()

    def _finish(self) -> None:
        """The host is done with this end: what is buffered stays readable, then EOF; sends
        fail (lock held)."""
        self.rx.end()
        self.tx._rescind()
        self._over = True
        self._over_cond.notify_all()

    def lost(self) -> None:
        """The session's stream broke without word from the host (lock held)."""
        if not self._over:
            self._finish()

    @property
    def over(self) -> bool:
        return self._over

    # -- lifetime ----------------------------------------------------------------------------

    def wait_over(self, timeout: float) -> bool:
        """Wait until the host is done with this end (after a close: it has written everything
        and closed it); False on timeout."""
        with self._over_cond:
            return self._over_cond.wait_for(lambda: self._over, timeout)

    def rescind(self) -> None:
        """Sends fail from now on. The receive side is left to the stream: data the host
        drained from the rescinded ring may still be on its way, and EOF follows it."""
        self.tx.rescind()

    def close(self) -> None:
        """Stop reading; what was written (and the FIN) still drains to the host, then the
        close frame, which the host answers with close_done."""
        self.rx.rescind()
        with self._lock:
            self._closed = True
            self.tx._kick()


#: google.rpc.Code DATA_LOSS: the host found the ring this end reads corrupt.
_DATA_LOSS = 15
