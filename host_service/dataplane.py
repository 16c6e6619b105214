"""Channel rings owned by the host service, and the gRPC relay for ends that cannot map them.

Every open channel has one shared-memory segment with two rings (``ring.shm.Channel``):
ring 0 carries connector -> acceptor, ring 1 acceptor -> connector, so the connector is end 0
and the acceptor end 1. The host creates the segment as a broker (``end=None``) and keeps it
mapped for the channel's whole life, so it can rescind (a flag in each ring's control page that
wakes every waiter in every process) and report ring fill. An end on the shared-memory path
attaches by name and moves bytes itself; for an end on the relay path the host attaches that end
and pumps it to and from the client's ChannelData stream.

Relay pumps. Ring waits block on futexes, which asyncio cannot await, so each relayed end has
two pumps, each on a pooled worker thread (``workers.WorkerPool``): a reader (ring -> stream)
and a writer (stream -> ring, and credit grants). They talk to the event loop only through
``call_soon_threadsafe``. Teardown rescinds the rings first, which wakes any blocked ring call,
then waits for both pumps to return, then unmaps.

Credit: the client may have sent at most ``send_limit`` bytes in all. The writer grants
``written + tx.writable()`` whenever it has written everything it was sent, and when the client
is at its limit it sleeps on the ring until the peer frees space — so the window a relayed
writer sees is the ring's own free space, and back-pressure is the ring's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import grpc

from hvsock.v1 import hvsock_pb2
from hvsock_common.workers import WorkerPool
from ring import RingCorruptError, shm
from ring._constants import MAX_PAYLOAD, PAGE_SIZE

from . import metrics
from .core import errors
from .core.types import RingGeometry, Session, Side
from .wire import MalformedRequest

log = logging.getLogger("hvsock.host.dataplane")

#: Largest relay frame either way (the proto's limit).
MAX_FRAME = 65536
#: Relay frames read from the ring but not yet sent to the client, per end: bounds memory and
#: keeps the peer's back-pressure tied to the client's reading.
MAX_FRAMES_IN_FLIGHT = 4

_END_OF_SIDE = {Side.CONNECTOR: 0, Side.ACCEPTOR: 1}
#: The most a byte count reported from a ring can be (what a Prometheus or int64 reader takes).
_MAX_REPORTED_BYTES = 2**63 - 1

#: The relay pumps and reclaim jobs of every channel (started threads would cost the event
#: loop a wait for each to run).
_WORKERS = WorkerPool()


class EndPath(StrEnum):
    SHARED_MEMORY = "shm"
    RELAY = "relay"


class _Fin:
    """Marker in the writer's queue: the client sent FIN."""


class _Stop:
    """Marker in the writer's queue: tear down."""


_FIN = _Fin()
_STOP = _Stop()

#: Markers on the relay's event-loop queue, beside the frames to send.
_READER_DONE = hvsock_pb2.ChannelDataResponse()
_WRITER_DONE = hvsock_pb2.ChannelDataResponse()
_PUMP_DONE = hvsock_pb2.ChannelDataResponse()
_RESCINDED = hvsock_pb2.ChannelDataResponse()

#: Hands a frame or a marker to the event loop.
_Post = Callable[[hvsock_pb2.ChannelDataResponse], None]


class Relay:
    """The host's side of one relayed channel end."""

    def __init__(self, end: shm.Channel, side: Side, vm_id: str, session_id: int) -> None:
        self.end = end
        self.side = side
        self.vm_id = vm_id
        #: The session holding this end: only its ChannelData stream may claim it.
        self.session_id = session_id
        self.claimed = False
        #: Why the client's frames broke the protocol (the stream then fails INVALID_ARGUMENT).
        self.error: str | None = None
        #: Set when the host rescinds the channel (the stream then fails UNAVAILABLE).
        self.reset: str | None = None
        #: Set when the ring this end reads is corrupt (the channel is rescinded and the stream
        #: fails DATA_LOSS; a corrupt ring it writes is _WriterState.corrupt, a plain rescind).
        self.corrupt: RingCorruptError | None = None
        self.sent = 0  # client -> ring bytes written
        self.received = 0  # ring -> client bytes
        # Cleared while the host stalls this end: the client's frames stop going into the ring
        # (its sends), and the ring's data stops going to the client (its receives).
        self.send_running = threading.Event()
        self.send_running.set()
        self.recv_running = threading.Event()
        self.recv_running.set()
        # The client's receive credit: total bytes it is ready to take (None until it says;
        # meanwhile MAX_FRAMES_IN_FLIGHT bounds what is sent). Guarded by _receive_credit.
        self._receive_limit: int | None = None
        self._receive_credit = threading.Condition()
        self._stopping = False
        # Frames read from the ring and not yet sent to the client (released as they go, and
        # by stop(): a reader waiting here must not outlive a stream nobody drains).
        self._in_flight = threading.Semaphore(MAX_FRAMES_IN_FLIGHT)
        self._inbound: queue.SimpleQueue[bytes | _Fin | _Stop] = queue.SimpleQueue()
        self._pumps: list[threading.Event] = []  # set when each pump has returned
        #: The running stream's queue on the event loop (None before and after it runs).
        self._out: asyncio.Queue[hvsock_pb2.ChannelDataResponse] | None = None
        # Set by the service: tell the core this end sent FIN / closed. Called on the event
        # loop, only once the FIN is in the ring — never ahead of data still being written.
        self.on_fin: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None
        #: Set by the service: the stream ended some other way (cancelled, deadline, broken
        #: connection, an exception) with the channel still up, or the ring this end writes is
        #: corrupt. Nobody will read or write this end again, so the channel is torn down
        #: (rescinded), as for an end that crashed.
        self.on_abort: Callable[[str], None] = lambda reason: None

    async def run(
        self,
        request_iterator: AsyncIterator[hvsock_pb2.ChannelDataRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[hvsock_pb2.ChannelDataResponse, None]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[hvsock_pb2.ChannelDataResponse] = asyncio.Queue()
        self._out = out
        in_flight = self._in_flight
        # The first credit is granted before any frame is read, so the pump's checks never
        # see a limit the client has not been told.
        state = _WriterState(limit=self.end.tx.writable())

        def post(message: hvsock_pb2.ChannelDataResponse) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                loop.call_soon_threadsafe(out.put_nowait, message)

        pump: asyncio.Task[None] | None = None
        reader_done = writer_done = pump_done = closed = ended = False
        # Everything from the first yield on is inside the try: the stream may end at any
        # await or yield, and this relay is its to reclaim from the moment it was claimed.
        try:
            yield hvsock_pb2.ChannelDataResponse(send_limit=state.limit)
            self._pumps = [
                _WORKERS.run(lambda: self._read_ring(post, in_flight), "hvsock-relay-rx"),
                _WORKERS.run(lambda: self._write_ring(post, state), "hvsock-relay-tx"),
            ]
            pump = asyncio.create_task(self._pump_requests(request_iterator, state))
            pump.add_done_callback(lambda _: out.put_nowait(_PUMP_DONE))
            # A rescinded channel ends the stream without waiting for the client's half-close;
            # a client that broke the protocol gets no more data once its frames are done with.
            while not (
                (reader_done and writer_done and (pump_done or self.reset is not None))
                or (state.error is not None and pump_done and writer_done)
            ):
                message = await out.get()
                if message is _READER_DONE:
                    reader_done = True
                    if self.corrupt is not None:
                        # Rescinds the channel (both ends told) and ends this stream.
                        self.reset = self.reset or str(self.corrupt)
                        self.on_abort(str(self.corrupt))
                elif message is _WRITER_DONE:
                    writer_done = True
                    if state.corrupt is not None:
                        self.on_abort(state.corrupt)  # rescinds the channel (both ends told)
                    if state.fin_written:
                        self.on_fin()
                elif message is _PUMP_DONE:
                    pump_done = True
                elif message is _RESCINDED:
                    pass  # only to look at the loop's condition again
                elif message is not None:
                    if message.data:
                        in_flight.release()
                    yield message
                if writer_done and pump_done and not closed and state.error is None:
                    # The client's stream ended and all it sent is in the ring: this end is
                    # closed (a half-closed client keeps its stream open until close()).
                    closed = True
                    self.on_close()
            # The servicer turns a protocol error or a rescind into the stream's status.
            self.error = state.error
            ended = True
        finally:
            self._out = None
            try:
                if not ended and self.reset is None and state.error is None:
                    self.on_abort("the relayed end's data stream ended without closing it")
                if pump is not None:
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump
            finally:
                self._inbound.put(_STOP)
                # This stream owns the relay's pumps and mapping from the moment it was
                # claimed, however it ends.
                _WORKERS.run(self.stop, "hvsock-reclaim")

    async def _pump_requests(
        self, request_iterator: AsyncIterator[hvsock_pb2.ChannelDataRequest], state: _WriterState
    ) -> None:
        """Validate the client's frames and hand them to the writer thread."""
        total = 0
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "data":
                    data = request.data
                    total += len(data)
                    problem = (
                        "data after fin"
                        if state.fin
                        else f"frame of {len(data)} bytes exceeds {MAX_FRAME}"
                        if len(data) > MAX_FRAME
                        else f"sent {total} bytes beyond send_limit {state.limit}"
                        if total > state.limit
                        else None
                    )
                    if problem is not None:
                        state.error = problem
                        self._inbound.put(_STOP)
                        self.end.rescind()
                        return
                    if data:
                        self._inbound.put(data)
                elif kind == "fin":
                    state.fin = True
                    self._inbound.put(_FIN)
                elif kind == "receive_limit":
                    with self._receive_credit:
                        self._receive_limit = max(self._receive_limit or 0, request.receive_limit)
                        self._receive_credit.notify_all()
                else:
                    state.error = "open may only be the first frame"
                    self._inbound.put(_STOP)
                    self.end.rescind()
                    return
        except MalformedRequest as err:
            # A frame that is not a ChannelDataRequest: a protocol error like those above.
            state.error = err.message
            self._inbound.put(_STOP)
            self.end.rescind()
        finally:
            if not state.fin:
                # The client went away without FIN: its end is as good as closed.
                self._inbound.put(_FIN)

    def _read_ring(self, post: _Post, in_flight: threading.Semaphore) -> None:
        rx = self.end.rx
        buffer = bytearray(MAX_FRAME)
        try:
            while True:
                in_flight.acquire()
                with self._receive_credit:
                    # Never send beyond what the client can take: its data frames must not
                    # queue up in front of the credit (send_limit) frames it is waiting for.
                    self._receive_credit.wait_for(self._may_send)
                    if self._stopping:
                        return
                    limit = self._receive_limit
                    room = MAX_FRAME if limit is None else min(MAX_FRAME, limit - self.received)
                # Wait for data outside the read, so a stall that starts meanwhile holds it.
                self.recv_running.wait()
                rx.wait_readable(None)
                self.recv_running.wait()
                n = rx.read_into(buffer, room, None)
                if n == 0:
                    post(hvsock_pb2.ChannelDataResponse(fin=True))
                    return
                self.received += n
                metrics.BYTES.labels("to_client").inc(n)
                post(hvsock_pb2.ChannelDataResponse(data=bytes(memoryview(buffer)[:n])))
        except RingCorruptError as exc:
            # Ring contents are the peer's to spoil: the host only reports it. As for the
            # writer's ring, the channel is rescinded (the stream tells the core, on the event
            # loop); the client gets the error a shared-memory reader would get, not a clean
            # EOF that hides truncated data. Wake this end's writer now: it may be waiting for
            # the client's frames, not the ring.
            log.warning("relay read on %s: %s", self.vm_id, exc)
            self.corrupt = exc
            self.end.rescind()
            self.halt_writer()
        except OSError as exc:  # closed under us at teardown
            log.warning("relay read on %s ended: %s", self.vm_id, exc)
            post(hvsock_pb2.ChannelDataResponse(fin=True))
        finally:
            post(_READER_DONE)

    def _write_ring(self, post: _Post, state: _WriterState) -> None:
        tx = self.end.tx
        # Wait for this much space before granting more credit to a blocked client: a quarter
        # of the ring, so the next grant is on its way while the peer drains the rest.
        grant_step = max(min(tx.data_size // 4, tx.max_payload), 64)

        def grant() -> None:
            limit = self.sent + tx.writable()
            if limit > state.limit:
                state.limit = limit
                post(hvsock_pb2.ChannelDataResponse(send_limit=limit))

        pulled = 0
        try:
            while True:
                try:
                    item = self._inbound.get(block=pulled < state.limit)
                except queue.Empty:
                    # Everything sent is written and the client is at its limit: sleep on the
                    # ring until the peer frees space (or the channel is rescinded).
                    metrics.RING_FULL_WAITS.inc()
                    tx.wait_writable(grant_step, None)
                    if tx.is_rescinded:
                        return
                    grant()
                    continue
                if isinstance(item, _Stop):
                    return
                if isinstance(item, _Fin):
                    self.send_running.wait()
                    tx.fin(None)
                    state.fin_written = True
                    return
                pulled += len(item)
                self.send_running.wait()
                tx.write_all(item, None)
                self.sent += len(item)
                metrics.BYTES.labels("from_client").inc(len(item))
                if self._inbound.empty():
                    grant()
        except RingCorruptError as exc:
            # The ring's control page is impossible (someone mapping the memory wrote it): the
            # channel is rescinded, nothing more. Wake this end's waiters now; the stream tells
            # the core once the writer is done (on the event loop).
            log.warning("relay write on %s: %s", self.vm_id, exc)
            state.corrupt = str(exc)
            self.end.rescind()
        except OSError as exc:  # rescinded (EPIPE)
            log.debug("relay write on %s ended: %s", self.vm_id, exc)
        finally:
            post(_WRITER_DONE)

    def rescinded(self, reason: str) -> None:
        """The host rescinded the channel (called on the event loop). The stream may be waiting
        for nothing but this (both pumps done, a client that never half-closes): wake it."""
        self.reset = self.reset or reason
        if self._out is not None:
            self._out.put_nowait(_RESCINDED)

    def halt_writer(self) -> None:
        """End the writer thread (the ring is rescinded); the reader still drains."""
        self._inbound.put(_STOP)

    def _may_send(self) -> bool:
        limit = self._receive_limit
        return self._stopping or limit is None or limit > self.received

    def stop(self) -> None:
        """Wake the pumps and wait for them to return, then unmap (the rings must already be
        rescinded, or the stream over). Idempotent: the stream and the channel's removal may
        both call it."""
        with self._receive_credit:
            if self._stopping:
                return
            self._stopping = True
            self._receive_credit.notify_all()
        for _ in range(MAX_FRAMES_IN_FLIGHT):
            self._in_flight.release()  # a reader waiting for the stream to take its frames
        self.send_running.set()
        self.recv_running.set()
        self._inbound.put(_STOP)
        for pump in self._pumps:
            pump.wait()
        self.end.close()


@dataclass
class _WriterState:
    limit: int = 0
    fin: bool = False  # the client sent FIN
    fin_written: bool = False  # ... and it is in the ring
    error: str | None = None
    corrupt: str | None = None  # the ring the writer writes is corrupt: why


@dataclass(eq=False)
class _ChannelRings:
    broker: shm.Channel
    geometry: RingGeometry  # the connector's view
    relays: dict[Side, Relay] = field(default_factory=dict)
    #: Ends on the shared-memory path: side -> VM id, and side -> the session holding it.
    shm_ends: dict[Side, str] = field(default_factory=dict)
    shm_sessions: dict[Side, int] = field(default_factory=dict)
    #: Sides whose end is open (the broker's descriptor is dropped once both are).
    opened: set[Side] = field(default_factory=set)
    stall_timers: list[asyncio.TimerHandle] = field(default_factory=list)
    #: The map check of each end on shared memory (cancelled when the channel goes).
    map_checks: list[asyncio.TimerHandle] = field(default_factory=list)
    #: Paused VMs: their ends of this channel are stalled both ways.
    paused: set[str] = field(default_factory=set)
    #: Stalls in force per ring (StallRing): ring r stalls end r's sends and the peer's receives.
    ring_stalls: list[int] = field(default_factory=lambda: [0, 0])
    stalled_mask: int = 0
    #: Last bytes_written reported per shared-memory end (the report never goes backwards).
    shm_bytes: dict[Side, int] = field(default_factory=dict)


class DataPlane:
    """Creates, hands over, relays, stalls and reclaims the rings of every open channel."""

    max_payload = MAX_PAYLOAD

    def __init__(self, map_timeout: float) -> None:
        #: Seconds an end on shared memory has to map its segment once handed it.
        self.map_timeout = map_timeout
        #: Set by the service: rescind a channel (an end never mapped its rings).
        self.on_unmapped: Callable[[int, str], None] = lambda channel_id, reason: None
        self._channels: dict[int, _ChannelRings] = {}

    def open_end(
        self,
        channel_id: int,
        side: Side,
        path: EndPath,
        connector_view: RingGeometry,
        vm_id: str,
        session_id: int,
        hand_over: Callable[[int], bool] | None = None,
    ) -> tuple[EndPath, hvsock_pb2.SharedMemorySegment | None]:
        """Set up one end of an opening channel (held by ``session_id`` of ``vm_id``); the
        segment is made for the first end. An end on shared memory gets the segment's
        descriptor through ``hand_over``; when that fails it goes on the relay instead.
        Returns the end's path and, on shared memory, where its rings are."""
        rings = self._channels.get(channel_id)
        if rings is None:
            broker = shm.Channel.create(
                connector_view.send_pages, connector_view.recv_pages, end=None
            )
            rings = self._channels[channel_id] = _ChannelRings(broker, connector_view)
        end = _END_OF_SIDE[side]
        if path is EndPath.SHARED_MEMORY and (
            hand_over is None or not hand_over(rings.broker.fileno())
        ):
            path = EndPath.RELAY
        rings.opened.add(side)
        segment = None
        if path is EndPath.RELAY:
            attached = shm.Channel.attach_fd(rings.broker.fileno(), end=end)
            rings.relays[side] = Relay(attached, side, vm_id, session_id)
        else:
            rings.shm_ends[side] = vm_id
            rings.shm_sessions[side] = session_id
            rings.map_checks.append(
                asyncio.get_running_loop().call_later(
                    self.map_timeout, self._check_mapped, channel_id, rings, end
                )
            )
            ring0 = PAGE_SIZE
            ring1 = ring0 + connector_view.send_pages * PAGE_SIZE
            segment = hvsock_pb2.SharedMemorySegment(
                size=ring1 + connector_view.recv_pages * PAGE_SIZE,
                send_ring_offset=ring0 if end == 0 else ring1,
                recv_ring_offset=ring1 if end == 0 else ring0,
                end=end,
            )
        if len(rings.opened) == len(_END_OF_SIDE):
            rings.broker.close_fd()  # every end has its own mapping or descriptor now
        self._apply_stalls(rings)
        return path, segment

    def _check_mapped(self, channel_id: int, rings: _ChannelRings, end: int) -> None:
        """A segment handed over but never mapped would hold its memory (and the peer) for as
        long as the client likes: reset the channel instead."""
        if self._channels.get(channel_id) is not rings or rings.broker.closed:
            return
        if not rings.broker.mapped_mask & (1 << end):
            self.on_unmapped(
                channel_id, f"end {end} did not map its rings within {self.map_timeout:g} s"
            )

    def claim_relay(self, channel_id: int, session: Session) -> Relay:
        """The relayed end of ``channel_id`` that ``session`` holds (not another session's,
        even of the same partition), for its ChannelData stream."""
        rings = self._channels.get(channel_id)
        relay = None
        if rings is not None:
            candidates = [
                r
                for r in rings.relays.values()
                if (r.vm_id, r.session_id) == (session.vm_id, session.session_id)
            ]
            relay = next((r for r in candidates if not r.claimed), None)
            if relay is None and candidates:
                raise errors.InvalidState(f"channel {channel_id} already has a data stream")
        if (
            relay is None
            and rings is not None
            and any(
                (rings.shm_ends[side], rings.shm_sessions.get(side))
                == (session.vm_id, session.session_id)
                for side in rings.shm_ends
            )
        ):
            raise errors.InvalidState(
                f"session {session.session_id}'s end of channel {channel_id} uses shared memory"
            )
        if relay is None:
            raise errors.NotFound(
                f"session {session.session_id} of partition {session.vm_id} has no relayed end "
                f"of channel {channel_id}"
            )
        relay.claimed = True
        return relay

    def rescind(self, channel_id: int, reason: str = "rescinded") -> None:
        rings = self._channels.get(channel_id)
        if rings is not None:
            for relay in rings.relays.values():
                relay.rescinded(reason)
            rings.broker.rescind()

    def remove(self, channel_id: int) -> None:
        """The channel is gone: wake everything, then reclaim threads and mappings."""
        rings = self._channels.pop(channel_id, None)
        if rings is None:
            return
        rings.broker.rescind()
        for timer in (*rings.stall_timers, *rings.map_checks):
            timer.cancel()

        def finish() -> None:
            # A claimed relay is reclaimed by its stream once that has drained what is left
            # in the ring to the client (a rescinded ring drains, then EOF).
            for relay in rings.relays.values():
                if relay.claimed:
                    relay.halt_writer()  # nothing more can go into a rescinded ring
                else:
                    relay.stop()
            rings.broker.close()

        if not rings.relays:
            rings.broker.close()  # shared memory only: unmapping is quick, no thread to join
            return
        # Waiting for relay pumps to return may take a moment; never on the event loop.
        _WORKERS.run(finish, "hvsock-reclaim")

    def ring_used(self, channel_id: int) -> tuple[int, int] | None:
        rings = self._channels.get(channel_id)
        if rings is None or rings.broker.closed:
            return None
        ring0, ring1 = rings.broker.rings
        return (ring0.write_index - ring0.read_index) % ring0.data_size, (
            ring1.write_index - ring1.read_index
        ) % ring1.data_size

    def bytes_sent(self, channel_id: int, side: Side) -> int:
        """Bytes ``side`` has written into its send ring: counted by the relay for a relayed
        end; for an end on shared memory, which writes the ring itself, the ring's own
        bytes_written counter (ring/_layout.pxd)."""
        rings = self._channels.get(channel_id)
        if rings is None:
            return 0
        relay = rings.relays.get(side)
        if relay is not None:
            return relay.sent
        if side not in rings.shm_ends or rings.broker.closed:
            return 0
        counted = rings.broker.rings[_END_OF_SIDE[side]].bytes_written_total
        # The counter lives in memory the end writes: only reported, and kept sane for the
        # report (never above int64, never going backwards).
        last = rings.shm_bytes.get(side, 0)
        if last <= counted <= _MAX_REPORTED_BYTES:
            rings.shm_bytes[side] = counted
            return counted
        return last

    # -- stalls --------------------------------------------------------------------------
    #
    # A stall holds one end's sends and/or receives. Relayed ends stop being pumped; ends on
    # the shared-memory path move bytes themselves, so the host sets the segment header's
    # stalled word (``ring.shm.OFF_STALLED``) and the client waits on it before each call (a
    # call already blocked inside the ring completes; the stall applies from the next one).
    # Pauses (per VM) and StallRing holds (counted per ring) add up; an operation moves again
    # once nothing holds it.

    def pause(self, channel_id: int, vm_id: str) -> None:
        """The VM is paused: its ends of the channel stall both ways until :meth:`resume`."""
        rings = self._channels.get(channel_id)
        if rings is not None:
            rings.paused.add(vm_id)
            self._apply_stalls(rings)

    def resume(self, channel_id: int, vm_id: str) -> None:
        rings = self._channels.get(channel_id)
        if rings is not None:
            rings.paused.discard(vm_id)
            self._apply_stalls(rings)

    def stall(self, channel_id: int, writer: Side | None, duration: float | None = None) -> None:
        """Stall the ring ``writer`` writes (both rings for None): its writer's sends and its
        reader's receives; for ``duration`` seconds, or until :meth:`unstall`."""
        rings = self._channels.get(channel_id)
        if rings is None:
            return
        ring_ids = (0, 1) if writer is None else (_END_OF_SIDE[writer],)
        for ring_id in ring_ids:
            rings.ring_stalls[ring_id] += 1
        self._apply_stalls(rings)
        if duration is not None:
            loop = asyncio.get_running_loop()
            rings.stall_timers.append(
                loop.call_later(duration, self._release, channel_id, rings, ring_ids)
            )

    def unstall(self, channel_id: int) -> None:
        """End every StallRing hold on the channel (pauses stay)."""
        rings = self._channels.get(channel_id)
        if rings is not None:
            for timer in rings.stall_timers:
                timer.cancel()
            rings.stall_timers.clear()
            rings.ring_stalls[:] = [0, 0]
            self._apply_stalls(rings)

    def _release(self, channel_id: int, rings: _ChannelRings, ring_ids: tuple[int, ...]) -> None:
        if self._channels.get(channel_id) is not rings:
            return  # removed meanwhile
        for ring_id in ring_ids:
            rings.ring_stalls[ring_id] = max(rings.ring_stalls[ring_id] - 1, 0)
        self._apply_stalls(rings)

    def _apply_stalls(self, rings: _ChannelRings) -> None:
        mask = 0
        for side, end in _END_OF_SIDE.items():
            relay = rings.relays.get(side)
            vm_id = relay.vm_id if relay is not None else rings.shm_ends.get(side)
            if vm_id is not None and vm_id in rings.paused:
                mask |= shm.stall_bit(end, False) | shm.stall_bit(end, True)
        for ring_id in (0, 1):
            if rings.ring_stalls[ring_id]:
                mask |= shm.stall_bit(ring_id, False) | shm.stall_bit(1 - ring_id, True)
        for side, relay in rings.relays.items():
            end = _END_OF_SIDE[side]
            for bit, event in (
                (shm.stall_bit(end, False), relay.send_running),
                (shm.stall_bit(end, True), relay.recv_running),
            ):
                if mask & bit:
                    event.clear()
                else:
                    event.set()
        if mask != rings.stalled_mask and not rings.broker.closed:
            rings.stalled_mask = mask
            rings.broker.set_stalled(mask)

    def close_all(self) -> None:
        for channel_id in list(self._channels):
            self.remove(channel_id)
