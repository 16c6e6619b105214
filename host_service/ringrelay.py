"""The host's side of one relayed channel end whose peer's bytes go through the rings.

A :class:`RingRelay` moves one relayed end's bytes between its session's SessionData stream
(``sessiondata.SessionData``, on the event loop) and the channel's rings, which the peer maps
(the usual "relay-vm" deployment: the VM relayed, the host partition on shared memory). Two
pumps do it: the *writer* (client data -> the ring toward the peer) and the *reader* (the ring
from the peer -> the client, within the client's credit).

Idle cost. Pumps hold no thread while there is nothing to do, so ten thousand idle relayed
connections cost no thread each (issue 12, item 5). A pump is a job on a pooled worker thread
(``workers.WorkerPool``) that runs while it can make progress and then returns, leaving one of
three things to start it again:

* the loop, when the reason it stopped goes away: data or FIN/close from the client
  (:meth:`push`), credit or room on the stream (:meth:`credit`, :meth:`written_out`), a stall
  lifted (:meth:`RingRelay.set_running` opening a stall gate);
* the ring watcher (``ring.watcher.RingWatcher``: a few threads asleep on up to 127 rings each
  with ``futex_waitv``), when the ring it needs is readable or has room: the reader waits as an
  observer, the writer hands its wait over as the ring writer's delegate;
* nothing, when the direction is over (EOF read, close written, the ring rescinded or corrupt).

Before parking in the watcher, a pump that has just moved bytes waits in the ring for
:data:`GRACE` seconds (spinning, then a futex sleep), so a busy stream keeps its thread and
pays no hand-off, while an idle one lets it go. The reader's job begins on the loop (started
there, or resumed there by the watcher), which never waits: an end that has just opened parks
from there, and a little data or an EOF (a round trip's answer after an idle spell, a connect
cycle's end) is read there, saving the hand-offs to a worker and back; once data moved, or
when the ring holds more, the job goes on on a worker.

The reader reads small amounts into buffers of their size and large ones into a buffer of its
worker thread (allocated on the first large read of that thread): window buffers exist while
data is in flight, never per channel.

State. Per direction, ``_rx_active`` / ``_tx_active`` say a job runs, is queued, or is parked in
the watcher; at most one job per direction exists, and only the code that clears the flag (a
pump deciding to stop, under ``_lock``, after re-checking every reason to go on) may end it, so
a start request (under the same lock) is never lost: either the flag is set and the running
pump sees the new state when it re-checks, or it is clear and the request starts a job.
``_alive`` counts the active directions.

Teardown. :meth:`stop` (from ``SessionData._finish``) marks the end stopping and cancels any
watch (the watcher then runs the pump, which sees ``_stopping`` and ends). The mapping of the
rings is released by whichever of the pumps and :meth:`stop` comes last (``_alive`` 0 while
stopping), so no thread is ever inside a ring, nor a watch armed on it, when it is unmapped.

Windows (see ``core.relay``): the writer reports each item written (``_WRITTEN``, with the
ring's room, read by the writer itself: ``writable()`` is the ring writer's call) and, when the
client is at its limit with everything in the ring, the moment the ring has a quarter of itself
free (``_ROOM``), once per limit told. The reader never reads beyond the client's credit, and at
most ``MAX_UNSENT`` bytes of an end wait for the stream at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hvsock_common.relaywire import kept
from hvsock_common.workers import WorkerPool
from ring import FIN_PACKET_LEN, RingCorruptError, shm
from ring.watcher import RingWatcher, Watch, room_for

from . import metrics
from .core.relay import MAX_FRAME_DATA
from .core.types import Side

if TYPE_CHECKING:
    from .sessiondata import SessionData

log = logging.getLogger("hvsock.host.relay")

#: Bytes of one end read from the ring and not yet written to the stream, at most.
MAX_UNSENT = 1 << 20
#: Seconds a pump that has just moved bytes waits in the ring before it parks in the watcher.
GRACE = 0.005

#: The relay pumps (started threads would cost the event loop a wait for each to run). A pump
#: holds its worker only while its end moves bytes, so a few idle workers serve many ends; more
#: would only keep their stacks (about 48 KiB each) after a burst.
_WORKERS = WorkerPool(max_idle=16)
#: Sleeps on the rings of parked pumps.
_WATCHER = RingWatcher()
#: Reads of up to this many bytes go into a buffer of their own size (an idle end's one
#: message costs no window); larger ones into the worker thread's buffer.
_SMALL_READ = 4096
#: The reader's buffer for large reads, one per worker thread (allocated on first use).
_SCRATCH = threading.local()


class _Fin:
    """Marker in the writer's queue: the client sent FIN."""


class _Close:
    """Marker in the writer's queue: the client closed its end."""


_FIN, _CLOSE = _Fin(), _Close()

# What pumps post to the loop: (kind, relay, value).
_DATA = "data"  # value: bytes read from the ring for the client
_WRITTEN = "written"  # the writer wrote into the ring (value: its total, the ring's room)
_ROOM = "room"  # the client is at its limit and the ring has room again (value: as _WRITTEN)
_FIN_WRITTEN = "fin_written"  # the client's FIN is in the ring
_CLOSED = "closed"  # the client's close: everything it sent (and FIN) is in the ring
_READER_EOF = "reader_eof"  # the ring from the peer reached EOF (FIN, or rescinded and drained)
_CORRUPT = "corrupt"  # a ring of this end is corrupt (value: (the ring it reads?, why))


def _scratch() -> bytearray:
    buffer: bytearray | None = getattr(_SCRATCH, "buffer", None)
    if buffer is None:
        buffer = _SCRATCH.buffer = bytearray(MAX_FRAME_DATA)
    return buffer


class RingRelay:
    """The host's side of one relayed channel end whose peer's bytes go through the rings."""

    # Slots: ten thousand idle ends each carry these and nothing more.
    __slots__ = (
        "_alive",
        "_closed",
        "_credit",
        "_fin",
        "_inbound",
        "_item",
        "_item_size",
        "_lock",
        "_parked",
        "_pulled",
        "_read",
        "_reader",
        "_recv_open",
        "_room_told",
        "_rx_active",
        "_rx_over",
        "_rx_watch",
        "_send_open",
        "_stopping",
        "_told",
        "_tx_active",
        "_tx_over",
        "_tx_watch",
        "_unsent",
        "channel_id",
        "corrupt",
        "end",
        "finished",
        "index",
        "key",
        "owner",
        "reader_eof",
        "reset",
        "sent",
        "session_id",
        "side",
        "vm_id",
    )

    def __init__(
        self,
        end: shm.Channel,
        side: Side,
        vm_id: str,
        session_id: int,
        channel_id: int,
        owner: SessionData,
        told: int,
        credit: int = 0,
    ) -> None:
        """``credit``: the client's first receive credit, when the end opened credited; its
        reader starts when the data plane next opens the stall gates (set_running), so a
        stalled end reads nothing even then."""
        self.end = end
        self.side = side
        #: The end's number in frames: 0 the connector, 1 the acceptor.
        self.index = 0 if side is Side.CONNECTOR else 1
        self.key = (channel_id, self.index)
        self.vm_id = vm_id
        self.session_id = session_id
        self.channel_id = channel_id
        self.owner = owner
        #: Client -> ring bytes written (the writer's count; read for diagnostics).
        self.sent = 0
        # Guards everything the pumps and the loop share below.
        self._lock = threading.Lock()
        self._told = told  # the client's send limit as told
        self._credit = credit  # the client's receive limit
        self._read = 0  # bytes read from the ring for the client
        self._unsent = 0  # of those, not yet written to the stream
        self._reader = credit > 0  # the client granted credit: the reader is live
        self._parked = False  # the reader stopped for credit (all it read is posted)
        self._rx_active = self._tx_active = False  # a job runs, is queued or is watched
        self._rx_over = self._tx_over = False  # the direction has ended for good
        self._rx_watch: Watch | None = None
        self._tx_watch: Watch | None = None
        self._stopping = False
        self._alive = 0  # active directions (the mapping goes when none is, once stopping)
        self._closed = False  # mapping released
        # A list, not a deque: it holds a few frames at most (the window), and an empty deque
        # costs 600 bytes per end, idle or not.
        self._inbound: list[bytes | memoryview | _Fin | _Close] = []
        # The writer's own (only the one writer job touches them).
        self._item: memoryview | _Fin | _Close | None = None  # taken, not yet all written
        self._item_size = 0  # bytes of the data item taken (``_item`` is what is left of it)
        self._pulled = 0  # data bytes taken from _inbound
        self._fin = False  # past the client's FIN only close can come
        self._room_told = -1  # the limit a _ROOM post answered (one per limit)
        # Loop-side state.
        self.reset: str | None = None  # the channel was rescinded: why
        #: A ring of this end is corrupt: (whether it is the ring it reads, why).
        self.corrupt: tuple[bool, str] | None = None
        self.reader_eof = False
        self.finished = False
        # The stall gates (see set_running), open: False while the host stalls this end's sends
        # (the client's data stops going into the ring) or its receives (the ring's data stops
        # going to the client). Plain flags: a gate object per direction (with the bound method
        # that starts its pump) cost an idle end 224 bytes.
        self._send_open = True
        self._recv_open = True

    # -- loop side -------------------------------------------------------------------------

    def push(self, item: bytes | memoryview | _Fin | _Close) -> None:
        """The client's data (a view of its request, ``relaywire.Frame.data``), FIN or close."""
        with self._lock:
            # Nothing queued before it and no job: the loop writes it itself if it fits now,
            # which saves a round trip's hand-off to a worker (and its wake-up) per message.
            inline = (
                not self._inbound
                and self._item is None
                and self._send_open
                and not (self._tx_active or self._tx_over or self._stopping)
            )
            if inline:
                self._tx_active = True  # the loop is this direction's job for the moment
                self._alive += 1
            else:
                self._inbound.append(item if isinstance(item, _Fin | _Close) else kept(item))
        if not inline:
            self._kick_writer()
        elif isinstance(item, _Fin | _Close):
            self._end_inline(item)
        else:
            self._write_inline(item)

    def _end_inline(self, item: _Fin | _Close) -> None:
        """On the loop, as the writer's job: the client's FIN or close, when everything before
        it is in the ring (a connect-and-close pays no worker hand-off for it). A full ring
        or an error is the worker's, which waits or reports as always."""
        tx = self.end.tx
        try:
            if not tx.fin_sent:
                tx.fin(0)
        except OSError:
            with self._lock:
                self._item = item
            _WORKERS.run(self._write_ring, "hvsock-relay-tx")
            return
        if self._end_job(False, self._fin_written(item)):
            _WORKERS.run(self._write_ring, "hvsock-relay-tx")

    def _fin_written(self, item: _Fin | _Close) -> bool:
        """The client's FIN (or close, which implies it) is in the ring: tell the loop; True
        for the close (this direction is over)."""
        if item is _CLOSE:
            self.owner.post(_CLOSED, self, None)
            return True
        self._fin = True
        self.owner.post(_FIN_WRITTEN, self, None)
        return False

    def _write_inline(self, data: bytes | memoryview) -> None:
        """On the loop, as the writer's job: write ``data`` without waiting, then end the job,
        or leave what did not fit (and anything else to do) to a worker, which may wait."""
        tx = self.end.tx
        size = len(data)
        try:
            written = tx.write(data, 0)
        except OSError:  # no room (EAGAIN), or an error the worker's job reports as always
            written = 0
        if written == size:
            with self._lock:
                self._pulled += size
                # At its limit, the client waits for room: the worker's job watches for it.
                at_limit = not self._fin and self._pulled >= self._told
                handover = at_limit and self._room_told != self._told
            self.sent += size
            metrics.child(metrics.BYTES, "from_client").inc(size)
            self.owner.post(_WRITTEN, self, (self.sent, tx.writable()))
            if not handover and not self._end_job(False, False):
                return
        else:
            with self._lock:
                self._item, self._item_size = memoryview(kept(memoryview(data)[written:])), size
        _WORKERS.run(self._write_ring, "hvsock-relay-tx")

    def credit(self, limit: int) -> None:
        with self._lock:
            self._credit = limit
            self._reader = True
        self._kick_reader()

    def set_running(self, sends: bool, receives: bool) -> None:
        """Open (True) or close the stall gates of this end's sends and receives. A pump stops
        at a closed gate without a thread waiting on it; opening a gate starts its pump. The
        flag is read by the pump under ``_lock`` after it is stored here and before the kick
        takes that lock, so a pump never misses the opening."""
        self._send_open = sends
        if sends:
            self._kick_writer()
        self._recv_open = receives
        if receives:
            self._kick_reader()

    def tell(self, limit: int) -> None:
        with self._lock:
            self._told = limit

    def written_out(self, n: int) -> None:
        """``n`` bytes of this end went onto the stream."""
        with self._lock:
            self._unsent -= n
        self._kick_reader()

    def stop(self) -> None:
        """Tell the pumps to end (a parked one is started by its watch's cancel); the mapping
        goes once the last has."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            watches = [w for w in (self._rx_watch, self._tx_watch) if w is not None]
            last = self._alive == 0
        for watch in watches:
            watch.cancel()
        if last:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.end.close()

    # -- starting and ending jobs ------------------------------------------------------------

    def _kick_reader(self) -> None:
        with self._lock:
            if (
                self._rx_active
                or self._rx_over
                or self._stopping
                or not self._reader
                or not self._reader_may_go()
            ):
                return
            self._rx_active, self._parked = True, False
            self._alive += 1
        self._read_on_loop()  # every kick comes from the loop (credit, written_out, stalls)

    def _reader_may_go(self) -> bool:  # under _lock
        return self._credit > self._read and self._unsent < MAX_UNSENT and self._recv_open

    def _kick_writer(self) -> None:
        with self._lock:
            if (
                self._tx_active
                or self._tx_over
                or self._stopping
                or not (self._inbound or self._item is not None)
            ):
                return
            self._tx_active = True
            self._alive += 1
        _WORKERS.run(self._write_ring, "hvsock-relay-tx")

    def _end_job(self, reader: bool, over: bool) -> bool:
        """The direction's job found nothing to do (or, ``over``, ended for good): clear its
        flag, unless a reason to go on arrived between its decision and now (a start request
        meanwhile saw the flag set and left it to this job): then True, and the job goes on."""
        with self._lock:
            if not over and not self._stopping:
                if reader and self._reader_may_go():
                    return True
                if not reader and self._writer_may_go():
                    return True
            if reader:
                self._rx_active = False
                self._rx_over = self._rx_over or over
                # Stopped for credit (not for a stall): everything it read is posted.
                self._parked = not over and not self._stopping and self._recv_open
            else:
                self._tx_active = False
                self._tx_over = self._tx_over or over
            self._alive -= 1
            last = self._stopping and self._alive == 0
        if last:
            self._release()
        return False

    def _writer_may_go(self) -> bool:  # under _lock
        return bool(self._inbound or self._item is not None) and self._send_open

    def _park(self, reader: bool, start: Callable[[], Watch]) -> bool:
        """Hand the direction's wait to the watcher (its callback runs the job again); False
        when stopping (the caller ends the job instead)."""
        with self._lock:
            if self._stopping:
                return False
            watch = start()
            if reader:
                self._rx_watch = watch
            else:
                self._tx_watch = watch
        return True

    # The watches' callbacks (bound methods: the watch of an idle end is all it holds).
    def _resume_writer(self) -> None:
        _WORKERS.run(self._write_ring, "hvsock-relay-tx")

    def _resume_reader(self) -> None:
        # Stopping (the watch was cancelled), the job's end unmaps the rings: a worker's work,
        # as it is when the loop is gone (the server stopping).
        if self._stopping or not self.owner.call_soon(self._read_on_loop):
            _WORKERS.run(self._read_ring, "hvsock-relay-rx")

    # -- the writer: client -> ring ------------------------------------------------------------

    def _write_ring(self) -> None:
        while (over := self._write_until_idle()) is not None and self._end_job(False, over):
            pass

    def _write_until_idle(self) -> bool | None:
        """Write until there is nothing to do: False (idle), True (over for good), or None
        (parked in the watcher, whose callback runs the next job)."""
        tx, post = self.end.tx, self.owner.post
        over = False
        try:
            while True:
                with self._lock:
                    self._tx_watch = None
                    if self._stopping:
                        break
                    if self._item is None and self._inbound:
                        queued = self._inbound.pop(0)
                        if isinstance(queued, _Fin | _Close):
                            self._item = queued
                        else:
                            self._item, self._item_size = memoryview(queued), len(queued)
                    elif self._item is None:
                        at_limit = not self._fin and self._pulled >= self._told
                        if not at_limit or self._room_told == self._told:
                            break  # nothing to do until the client sends (push starts it)
                        told = self._told
                    if self._item is not None and not self._send_open:
                        break  # stalled: set_running() starts it again
                    item = self._item
                if item is None:
                    # Everything sent is in the ring and the client is at its limit: once the
                    # peer has freed a quarter of the ring, ask the loop for a new grant.
                    step = max(min(tx.data_size // 4, tx.max_payload), 64)
                    if not tx.wait_writable(step, 0):
                        metrics.RING_FULL_WAITS.inc()
                        if self._park_writer(room_for(tx, step)):
                            return None
                        break
                    if tx.is_rescinded:
                        over = True
                        break
                    self._room_told = told
                    post(_ROOM, self, (self.sent, tx.writable()))
                    continue
                if isinstance(item, _Fin | _Close):
                    if not tx.fin_sent:
                        try:
                            tx.fin(0)
                        except BlockingIOError:
                            if self._park_writer(FIN_PACKET_LEN + 8):  # as ring_fin
                                return None
                            break
                    self._item = None
                    if self._fin_written(item):
                        over = True
                        break
                    continue
                if not self._write_item(tx, item):
                    return None  # parked in the watcher
                size = self._item_size  # the whole item's: ``item`` may be its tail
                with self._lock:
                    self._item = None
                    self._pulled += size
                self.sent += size
                metrics.child(metrics.BYTES, "from_client").inc(size)
                # The room is read here, by the ring's writer: writable() is the owner's call
                # (it checks the writer's own index), and from the loop thread it could catch
                # a publish half done and mark the ring corrupt (INDEX_MOVED).
                post(_WRITTEN, self, (self.sent, tx.writable()))
        except RingCorruptError as exc:
            # The ring's control page is impossible (someone mapping the memory wrote it): the
            # channel is rescinded, nothing more.
            log.warning("relay write on %s: %s", self.vm_id, exc)
            self.end.rescind()
            post(_CORRUPT, self, (False, str(exc)))
            over = True
        except OSError as exc:  # rescinded (EPIPE)
            log.debug("relay write on %s ended: %s", self.vm_id, exc)
            over = True
        return over

    def _write_item(self, tx: Any, item: memoryview) -> bool:
        """Write what is left of ``item``; False when parked in the watcher (the rest stays in
        ``_item``). Waits up to GRACE for room first: a peer that reads frees it soon."""
        while item:
            try:
                n = tx.write(item, GRACE)
            except (BlockingIOError, TimeoutError):
                with self._lock:
                    self._item = item
                if self._park_writer(room_for(tx, len(item))):
                    return False
                raise OSError("stopping") from None
            item = item[n:]
        return True

    def _park_writer(self, need: int) -> bool:
        tx = self.end.tx
        return self._park(False, lambda: _WATCHER.writable(tx, need, self._resume_writer))

    # -- the reader: ring -> client ------------------------------------------------------------

    def _read_ring(self, moved: bool = False) -> None:
        """The reader's job on a worker (``moved``: the loop has just moved data for it)."""
        while (over := self._read_until_idle(moved)) is not None and self._end_job(True, over):
            moved = False

    def _read_moved(self) -> None:
        self._read_ring(True)

    def _read_on_loop(self) -> None:
        """The reader's job, begun on the loop, where it never waits: an end that has just
        opened parks in the watcher from here; a ring that holds a little (a round trip's
        answer, a connect cycle's EOF) is read here, which saves handing the job to a worker
        and the data back. Once data moved, or when the ring holds more, the job goes on on a
        worker, which waits a while for more (``GRACE``) as always."""
        over = self._read_until_idle(on_loop=True)
        if over is not None and self._end_job(True, over):
            _WORKERS.run(self._read_ring, "hvsock-relay-rx")

    def _read_until_idle(self, moved: bool = False, on_loop: bool = False) -> bool | None:
        """Read while there is credit: False (out of credit, or stalled), True (over for
        good), or None (parked in the watcher, whose callback runs the next job; or, from
        the loop, handed to a worker: see :meth:`_read_on_loop`)."""
        rx, post = self.end.rx, self.owner.post
        over = False
        try:
            while True:
                with self._lock:
                    self._rx_watch = None
                    # Never beyond the client's credit, and never far ahead of the stream.
                    # Stopping for credit, everything this pump read is posted already (the
                    # loop relies on that to finish a rescinded end without more credit).
                    if self._stopping or not self._reader_may_go():
                        break
                    room = min(MAX_FRAME_DATA, self._credit - self._read)
                # Wait for data outside the read, so a stall that starts meanwhile holds it.
                if not rx.wait_readable(GRACE if moved else 0):
                    if self._park(True, lambda: _WATCHER.readable(rx, self._resume_reader)):
                        return None
                    break
                if not self._recv_open:
                    continue  # the check above ends the job; set_running() starts it again
                # A small read into its own buffer; a large one into the thread's.
                small = min(room, rx.readable())
                if on_loop and small > _SMALL_READ:
                    _WORKERS.run(self._read_ring, "hvsock-relay-rx")  # the job goes on there
                    return None
                target = bytearray(small) if small <= _SMALL_READ else _scratch()
                try:
                    n = rx.read_into(target, min(room, len(target)), 0)
                except BlockingIOError:
                    moved = False  # woken by something else than data: wait again
                    continue
                if n == 0:
                    post(_READER_EOF, self, None)
                    over = True
                    break
                with self._lock:
                    self._read += n
                    self._unsent += n
                metrics.child(metrics.BYTES, "to_client").inc(n)
                data = bytes(target) if n == len(target) else bytes(memoryview(target)[:n])
                post(_DATA, self, data)
                if on_loop:
                    _WORKERS.run(self._read_moved, "hvsock-relay-rx")  # the job goes on there
                    return None
                moved = True
        except RingCorruptError as exc:
            # Ring contents are the peer's to spoil: the channel is rescinded and the client
            # gets the error a shared-memory reader would get, not an EOF hiding truncation.
            log.warning("relay read on %s: %s", self.vm_id, exc)
            self.end.rescind()
            post(_CORRUPT, self, (True, exc.strerror or str(exc)))
            over = True
        except OSError as exc:
            log.debug("relay read on %s ended: %s", self.vm_id, exc)
            over = True
        return over
