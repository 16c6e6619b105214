"""The grpc.aio adapter: drives the pure core, owns streams, timers, rings and persistence.

Threading: everything here runs on one asyncio event loop. The core is called only from that
loop, so it needs no locks. Every core call goes through :meth:`Host.call`, which passes ``now``
and dispatches the events the call produced (also those attached to an error), then re-arms the
one timer the core asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common import relaywire
from hvsock_common.addresses import Address
from hvsock_common.batching import next_batch
from hvsock_common.conventions import MAX_ATTACH_BATCH, TOKEN_METADATA, new_token

from . import __version__, metrics
from .core import errors
from .core.channel import ChannelState
from .core.events import (
    ChannelRemoved,
    ChannelRescinded,
    ChannelStateChanged,
    ConnectFailed,
    ConnectionEstablished,
    ConnectionOffered,
    ConnectRefused,
    Event,
    ListenerChanged,
    PartitionChanged,
    PartitionEvent,
    PartitionResumed,
    PartitionStalled,
    PeerFinReceived,
    ServiceChanged,
    SessionChanged,
    SessionEnded,
)
from .core.host import HostCore
from .core.partitions import hash_token
from .core.relay import DEFAULT_RELAY_WINDOW, MAX_RELAY_WINDOW, RelayBudget
from .core.sessionbook import OpenPlan, SessionBook
from .core.types import (
    ChannelInfo,
    PartitionInfo,
    PartitionState,
    Personality,
    RingGeometry,
    Session,
    Side,
)
from .dataplane import DataPlane, EndPath
from .forward import RelayOpening
from .handover import NONCE_SIZE, DescriptorServer
from .sessiondata import SessionData
from .status import abort, errno_detail, error_message, in_stream_error, rich_status
from .store import PartitionRecord, ServiceRecord, StateStore
from .wire import MalformedRequest

log = logging.getLogger("hvsock.host")

T = TypeVar("T")

#: Responses queued for one attach stream before the host gives up on a client that does not
#: read them (it is detached, as a VM whose VMBus stopped answering would be).
MAX_QUEUED_RESPONSES = 65536
#: Why a session ends when its client ends its requests (its request stream, or its
#: descriptor connection once requests moved there): the stream then ends OK.
ATTACH_STREAM_ENDED = "attach stream ended"
_BATCH_NOT_ALONE = "a request with a batch carries nothing else: no request_id, no kind"
_BATCH_NESTED = "a request inside a batch holds no batch of its own"
#: Events queued for one WatchEvents stream before the host cuts off a watcher that does not
#: keep up (RESOURCE_EXHAUSTED): a watcher that stopped reading must not grow host memory.
MAX_WATCH_BACKLOG = 10_000

_PERSONALITY_TO_PB = {
    Personality.LINUX: hvsock_pb2.PERSONALITY_LINUX,
    Personality.WINDOWS: hvsock_pb2.PERSONALITY_WINDOWS,
}
_PERSONALITY_FROM_PB = {
    hvsock_pb2.PERSONALITY_UNSPECIFIED: Personality.LINUX,
    hvsock_pb2.PERSONALITY_LINUX: Personality.LINUX,
    hvsock_pb2.PERSONALITY_WINDOWS: Personality.WINDOWS,
}
_STATE_TO_PB = {
    PartitionState.RUNNING: hvsock_pb2.PARTITION_STATE_RUNNING,
    PartitionState.PAUSED: hvsock_pb2.PARTITION_STATE_PAUSED,
    PartitionState.OFF: hvsock_pb2.PARTITION_STATE_OFF,
}
_CHANNEL_STATE_TO_PB = {
    ChannelState.CONNECT_REQUESTED: hvsock_pb2.CHANNEL_STATE_CONNECT_REQUESTED,
    ChannelState.OFFERED: hvsock_pb2.CHANNEL_STATE_OFFERED,
    ChannelState.OPEN: hvsock_pb2.CHANNEL_STATE_OPEN,
    ChannelState.HALF_CLOSED_BY_CONNECTOR: hvsock_pb2.CHANNEL_STATE_HALF_CLOSED_CONNECTOR,
    ChannelState.HALF_CLOSED_BY_ACCEPTOR: hvsock_pb2.CHANNEL_STATE_HALF_CLOSED_LISTENER,
    ChannelState.CLOSING_BY_CONNECTOR: hvsock_pb2.CHANNEL_STATE_CLOSING,
    ChannelState.CLOSING_BY_ACCEPTOR: hvsock_pb2.CHANNEL_STATE_CLOSING,
    ChannelState.CLOSED: hvsock_pb2.CHANNEL_STATE_CLOSED,
    ChannelState.RESCINDED: hvsock_pb2.CHANNEL_STATE_RESCINDED,
}
_DATA_PATH_TO_PB = {
    EndPath.SHARED_MEMORY: hvsock_pb2.DATA_PATH_SHARED_MEMORY,
    EndPath.RELAY: hvsock_pb2.DATA_PATH_GRPC_RELAY,
}


def _address(address: Address) -> hvsock_pb2.Address:
    return hvsock_pb2.Address(vm_id=address.vm_id, service_id=address.service_id)


def _geometry(ring: RingGeometry, max_payload: int) -> hvsock_pb2.RingGeometry:
    return hvsock_pb2.RingGeometry(
        send_ring_pages=ring.send_pages, recv_ring_pages=ring.recv_pages, max_payload=max_payload
    )


def _error(err: errors.HvError) -> hvsock_pb2.AttachResponse:
    return hvsock_pb2.AttachResponse(error=error_message(err))


def _batched(responses: list[hvsock_pb2.AttachResponse]) -> hvsock_pb2.AttachResponse:
    return hvsock_pb2.AttachResponse(batch=responses)


@dataclass(eq=False)
class Attachment:
    """One live attach stream: one session of a partition (a partition may have several at
    once, one per process) and its outgoing queue.  Everything here is about this session's
    own listeners and channel ends; the core addresses events to sessions, never to a bare
    partition."""

    session: Session
    secret: str
    #: The session's relayed channel ends and its SessionData stream.
    data: SessionData
    responses: asyncio.Queue[hvsock_pb2.AttachResponse | None] = field(
        default_factory=asyncio.Queue
    )
    #: Hello.peer_fin_notices: tell this session when a peer shuts down writing.
    peer_fin_notices: bool = False
    #: Hello.response_batches: answers and events queued together leave in one message.
    response_batches: bool = False
    #: The session proved it maps what it receives on this connection (ProveSharedMemory):
    #: its channel ends go on shared memory, their descriptors on this connection.
    shm_capable: bool = False
    #: Its connection to the descriptor socket, from the secret until the session ends.
    shm_conn: socket.socket | None = None
    #: The nonce in the probe sent on shm_conn.
    shm_nonce: bytes = b""
    #: Set once the session moved its requests to shm_conn (Welcome.control_socket): sends
    #: one answer there; False when the client takes nothing more.
    control: Callable[[hvsock_pb2.AttachResponse], bool] | None = None
    #: Why the session was ended for breaking the control protocol (the stream's status).
    error: errors.HvError | None = None
    #: Answers owed (connects, accepts), auto-accept credit, channels closed: pure state.
    book: SessionBook = field(default_factory=SessionBook)
    ended: str | None = None
    #: Most answers queued for a client that does not read them.
    max_queued: int = MAX_QUEUED_RESPONSES
    #: The Attach handler serving this stream (cancelled when the client stops reading).
    task: asyncio.Task[Any] | None = None
    #: Called (soon, from the event loop) when the client stopped reading: detach it.
    on_overflow: Callable[[Attachment], None] | None = None

    def send(self, response: hvsock_pb2.AttachResponse) -> None:
        if self.ended is not None:
            return
        if self.control is not None:
            if self.control(response):
                return
        elif self.responses.qsize() < self.max_queued:
            self.responses.put_nowait(response)
            return
        if self.ended is None:  # (the control connection may have broken meanwhile)
            self.end("the partition stopped reading its attach stream")
            if self.on_overflow is not None:
                # Not now: send() runs inside event dispatch, and detaching is a core call.
                asyncio.get_running_loop().call_soon(self.on_overflow, self)

    def proves(self, nonce: bytes) -> bool:
        """Whether ``nonce`` is the one in the probe sent on this session's descriptor
        connection (which it still has)."""
        return (
            self.shm_conn is not None
            and bool(nonce)
            and secrets.compare_digest(nonce, self.shm_nonce)
        )

    def end(self, reason: str) -> None:
        """Close the stream from the host side (the handler then detaches the partition)."""
        if self.ended is None:
            self.ended = reason
            self.responses.put_nowait(None)
            self.data.end(reason)


@dataclass(eq=False)
class Watcher:
    """One WatchEvents stream: its queue of events not yet sent (None: the stream is over)."""

    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    #: Set when the host cut the watcher off: how many events it had not taken.
    behind: int | None = None


class _RingEnds:
    """What the ring metrics need of an open channel: each open end's data path, the ring
    sizes, and the largest byte count read from each shared-memory end's ring.

    One per open channel: slots, and per-end pairs (indexed by end number, replaced when set)
    rather than two dicts per channel (64 bytes each empty, 224 with one entry)."""

    __slots__ = ("connector_view", "paths", "shm_seen")

    def __init__(self, connector_view: RingGeometry) -> None:
        self.connector_view = connector_view
        self.paths: tuple[EndPath | None, EndPath | None] = (None, None)
        self.shm_seen = (0, 0)

    def set_path(self, side: Side, path: EndPath) -> None:
        self.paths = (path, self.paths[1]) if side is Side.CONNECTOR else (self.paths[0], path)

    def seen(self, side: Side, counted: int) -> int:
        """The largest byte count read from ``side``'s ring, ``counted`` included."""
        end = 0 if side is Side.CONNECTOR else 1
        largest = max(self.shm_seen[end], counted)
        self.shm_seen = (largest, self.shm_seen[1]) if end == 0 else (self.shm_seen[0], largest)
        return largest


class Host:
    """The emulated host: the core plus everything with I/O around it."""

    def __init__(
        self,
        core: HostCore,
        *,
        dataplane: DataPlane,
        store: StateStore | None = None,
        shm_socket: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_queued_responses: int = MAX_QUEUED_RESPONSES,
        relay_window: int = DEFAULT_RELAY_WINDOW,
        relay_budget: RelayBudget | None = None,
    ) -> None:
        self.core = core
        #: The relay window of ends whose Connect/Accept/Listen does not ask for one.
        self.relay_window = relay_window
        #: The window bytes all relayed ends may have promised at once (core.relay).
        self.relay_budget = budget = RelayBudget() if relay_budget is None else relay_budget
        metrics.RELAY_PROMISED.set_function(lambda: budget.promised)
        self.max_queued_responses = max_queued_responses
        self.dataplane = dataplane
        dataplane.on_unmapped = self._reset_unmapped
        self.store = store
        #: Hands ring memory to programs (None: shared memory is off, everything is relayed).
        self.handover = (
            DescriptorServer(
                shm_socket, self._claim_handover, self._handover_lost, self._control_frame
            )
            if shm_socket is not None
            else None
        )
        self._by_conn: dict[socket.socket, Attachment] = {}
        #: Carries out one attach request (the servicer's; control frames go through it too).
        self.serve_request: Callable[[hvsock_pb2.AttachRequest, Attachment], None] | None = None
        self.clock = clock
        # Monotonic -> wall clock, for timestamps shown to people.
        self._wall_offset = time.time() - clock()
        #: Live attach streams by session id (several may belong to one partition).
        self.attachments: dict[int, Attachment] = {}
        self._by_secret: dict[str, Attachment] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None  # the core deadline _timer is armed for
        self._watchers: set[Watcher] = set()
        #: Open channels' ends, for the ring metrics (metrics.RINGS); bytes written by
        #: shared-memory ends of channels already gone.
        self._ring_ends: dict[int, _RingEnds] = {}
        self._shm_bytes_done = 0
        #: Shutting down: attaches are refused (UNAVAILABLE/ECONNRESET) so that programs wait
        #: for the next host rather than attach to this one as it goes.
        self.draining = False

    def start(self) -> None:
        """Start what needs the running event loop."""
        if self.handover is not None:
            self.handover.start()
        metrics.RINGS.watch(asyncio.get_running_loop(), self.ring_snapshot)

    def close(self) -> None:
        metrics.RINGS.unwatch(self.ring_snapshot)
        if self.handover is not None:
            self.handover.close()
        self.dataplane.close_all()

    def ring_snapshot(self) -> metrics.RingSnapshot:
        """Shared-memory bytes and ring fill now (on the event loop: rings are unmapped here)."""
        live = 0
        used = dict.fromkeys(metrics.PATHS, 0)
        size = dict.fromkeys(metrics.PATHS, 0)
        for channel_id, ends in self._ring_ends.items():
            live += self._shm_bytes(channel_id, ends)
            fill = self.dataplane.ring_used(channel_id)
            # Ring 0 is written by the connector (end 0), ring 1 by the acceptor (end 1).
            ring_bytes = (ends.connector_view.send_bytes, ends.connector_view.recv_bytes)
            for ring, (path, nbytes) in enumerate(zip(ends.paths, ring_bytes, strict=True)):
                if path is None:
                    continue  # that end is not open yet
                size[path.value] += nbytes
                if fill is not None:
                    used[path.value] += fill[ring]
        return metrics.RingSnapshot(self._shm_bytes_done + live, used, size)

    def _shm_bytes(self, channel_id: int, ends: _RingEnds) -> int:
        """Bytes the channel's shared-memory ends wrote: never less than reported before (the
        ring's counter is gone once the channel's rings are closed)."""
        total = 0
        for side, path in zip((Side.CONNECTOR, Side.ACCEPTOR), ends.paths, strict=True):
            if path is EndPath.SHARED_MEMORY:
                total += ends.seen(side, self.dataplane.bytes_sent(channel_id, side))
        return total

    # -- driving the core ------------------------------------------------------------------

    def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a core method with ``now``; dispatch the events it produced, even on error."""
        try:
            result = method(*args, now=self.clock(), **kwargs)
        except errors.HvError as err:
            # Only the core attaches events, and only its own (the shared base class, which
            # must not import the core, types them ``object``).
            self.dispatch(cast("tuple[Event, ...]", err.events))
            self._arm_timer()
            raise
        events: list[Event]
        if isinstance(result, list):
            events = result
        elif isinstance(result, tuple) and isinstance(result[-1], list):
            events = result[-1]
        else:
            events = []
        self.dispatch(events)
        self._arm_timer()
        return result

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        if self._timer is not None:
            # Compare core deadlines: the loop time one maps to drifts from call to call.
            if deadline == self._timer_deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._loop_time(deadline), self._on_timer)
            self._timer_deadline = deadline

    def _loop_time(self, deadline: float) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + (deadline - self.clock())

    def _on_timer(self) -> None:
        self._timer = None
        self.run_timers()

    def run_timers(self) -> None:
        """Carry out the core's timers that are due by ``clock()`` (the event loop's timer calls
        this; a test with its own clock calls it after moving the clock on)."""
        self.call(self._fire_timers)

    def _fire_timers(self, *, now: float) -> list[Event]:
        return self.core.on_timer(now)

    def wall(self, monotonic: float) -> timestamp_pb2.Timestamp:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int((monotonic + self._wall_offset) * 1e9))
        return stamp

    # -- events ----------------------------------------------------------------------------

    def dispatch(self, events: list[Event] | tuple[Event, ...]) -> None:
        for event in events:
            self._dispatch_one(event)
            for watcher in tuple(self._watchers):
                if watcher.queue.qsize() >= MAX_WATCH_BACKLOG:
                    self._cut_off(watcher)
                else:
                    watcher.queue.put_nowait(event)

    def _to(self, event: PartitionEvent) -> Attachment | None:
        """The attach stream of the session an event is addressed to, if it is still live."""
        return self._session(event.partition, event.session_id)

    def _session(self, vm_id: str | None, session_id: int | None) -> Attachment | None:
        if vm_id is None or session_id is None:
            return None
        attachment = self.attachments.get(session_id)
        if attachment is None or attachment.session.vm_id != vm_id:
            return None
        return attachment

    def _dispatch_one(self, event: Event) -> None:
        if isinstance(event, ConnectionOffered):
            attachment = self._to(event)
            if (
                attachment is not None
                and attachment.book.take_credit(event.listener_id, event.channel_id) is not None
            ):
                # Accept on the listener's behalf, saving the Offer/Accept round trip. Not
                # within this dispatch: the connector's request is still being handled and
                # must record what it waits for first.
                asyncio.get_running_loop().call_soon(
                    self._auto_accept, attachment, event.channel_id
                )
            elif attachment is not None:
                channel = hvsock_pb2.Channel(
                    channel_id=event.channel_id,
                    local=_address(event.local),
                    remote=_address(event.remote),
                    geometry=_geometry(event.ring, self.dataplane.max_payload),
                )
                attachment.send(
                    hvsock_pb2.AttachResponse(
                        offer=hvsock_pb2.Offer(listener_id=event.listener_id, channel=channel)
                    )
                )
        elif isinstance(event, ConnectionEstablished):
            self._established(event)
        elif isinstance(event, ConnectFailed):
            attachment = self._to(event)
            outcome = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout"}.get(
                event.errno, "reset"
            )
            metrics.child(metrics.CONNECTS, outcome).inc()
            if attachment is None:
                return
            pending = attachment.book.failed(event.channel_id)
            error = in_stream_error(event.status, event.reason, event.errno)
            if pending is not None:
                attachment.send(
                    hvsock_pb2.AttachResponse(request_id=pending.request_id, error=error)
                )
            else:
                attachment.send(
                    hvsock_pb2.AttachResponse(
                        notice=hvsock_pb2.ChannelNotice(
                            channel_id=event.channel_id,
                            kind=hvsock_pb2.ChannelNotice.KIND_CONNECT_FAILED,
                            reason=event.reason,
                            errno=errno_detail(event.errno),
                        )
                    )
                )
        elif isinstance(event, PeerFinReceived):
            attachment = self._to(event)
            if (
                attachment is not None
                and attachment.peer_fin_notices
                and event.channel_id not in attachment.book.closed
            ):
                attachment.send(
                    hvsock_pb2.AttachResponse(
                        notice=hvsock_pb2.ChannelNotice(
                            channel_id=event.channel_id,
                            kind=hvsock_pb2.ChannelNotice.KIND_PEER_FIN,
                        )
                    )
                )
        elif isinstance(event, ChannelRescinded):
            self.dataplane.rescind(event.channel_id, event.reason)
            attachment = self._to(event)
            if attachment is not None and event.channel_id not in attachment.book.closed:
                attachment.book.accepts.pop(event.channel_id, None)
                attachment.send(
                    hvsock_pb2.AttachResponse(
                        notice=hvsock_pb2.ChannelNotice(
                            channel_id=event.channel_id,
                            kind=hvsock_pb2.ChannelNotice.KIND_RESCINDED,
                            reason=event.reason,
                            errno=errno_detail(errno.ECONNRESET),
                        )
                    )
                )
        elif isinstance(event, ChannelRemoved):
            ends = self._ring_ends.pop(event.channel_id, None)
            if ends is not None:  # its last count, read before the rings go
                self._shm_bytes_done += self._shm_bytes(event.channel_id, ends)
            self.dataplane.remove(event.channel_id)
            if event.final_state is ChannelState.RESCINDED:
                metrics.child(metrics.RESCINDS, event.reason).inc()
            for vm_id, session_id in (
                (event.connector, event.connector_session),
                (event.acceptor, event.acceptor_session),
            ):
                attachment = self._session(vm_id, session_id)
                if attachment is not None:
                    attachment.book.forget(event.channel_id)
        elif isinstance(event, ChannelStateChanged):
            if event.old is not None:
                metrics.child(metrics.CHANNELS, event.old.value).dec()
            metrics.child(metrics.CHANNELS, event.new.value).inc()
            if event.new in (ChannelState.CLOSED, ChannelState.RESCINDED):
                metrics.child(metrics.CHANNELS, event.new.value).dec()
        elif isinstance(event, SessionEnded):
            attachment = self._to(event)
            if attachment is not None:
                attachment.end(event.reason)
        elif isinstance(event, PartitionStalled):
            for channel_id in event.channel_ids:
                self.dataplane.pause(channel_id, event.vm_id)
        elif isinstance(event, PartitionResumed):
            for channel_id in event.channel_ids:
                self.dataplane.resume(channel_id, event.vm_id)
        elif isinstance(event, PartitionChanged):
            # "attached"/"detached" mark a partition's first and last session.
            if event.change == "attached":
                metrics.PARTITIONS_ATTACHED.inc()
            elif event.change == "detached":
                metrics.PARTITIONS_ATTACHED.dec()
            self._persist_partition(event)
        elif isinstance(event, SessionChanged):
            pass  # the lifecycle log (watchers) is all a session change needs
        elif isinstance(event, ServiceChanged):
            if self.store is not None:
                if event.change == "unregistered":
                    self.store.delete_service(event.service_id)
                else:
                    self.store.put_service(ServiceRecord(event.service_id, event.element_name))
        elif isinstance(event, ConnectRefused):
            metrics.child(metrics.CONNECTS, "refused").inc()
        elif isinstance(event, ListenerChanged):
            pass  # the lifecycle log (watchers) is all a listener change needs

    def _persist_partition(self, event: PartitionChanged) -> None:
        if self.store is None or event.vm_id == self.core.host_vm_id:
            return
        if event.change == "deleted":
            self.store.delete_partition(event.vm_id)
        elif event.state is not None and event.change not in ("created", "attached", "detached"):
            self.store.set_partition_state(event.vm_id, event.state.value)

    def _established(self, event: ConnectionEstablished) -> None:
        """Answer the Connect or Accept that this opening completes, with the end's rings."""
        attachment = self._to(event)
        if attachment is None:
            return
        plan = attachment.book.opened(event.channel_id, connector=event.side is Side.CONNECTOR)
        if plan is None:
            plan = OpenPlan()
        if event.side is Side.CONNECTOR:
            metrics.child(metrics.CONNECTS, "opened").inc()
        path = (
            EndPath.SHARED_MEMORY
            if attachment.shm_capable and not plan.force_relay
            else EndPath.RELAY
        )
        window = self.relay_window if plan.relay_window is None else plan.relay_window
        # Geometry in the event is this end's view; the data plane keeps the connector's view.
        connector_view = event.ring if event.side is Side.CONNECTOR else event.ring.swapped
        conn, handover = attachment.shm_conn, self.handover
        path, segment, send_limit = self.dataplane.open_end(
            event.channel_id,
            event.side,
            path,
            connector_view,
            event.partition,
            event.session_id,
            hand_over=(
                (lambda fd: handover.send_channel(conn, event.channel_id, fd))
                if conn is not None and handover is not None
                else None
            ),
            relays=attachment.data,
            window=window,
        )
        self.core.set_data_path(event.channel_id, event.side, path.value)
        ends = self._ring_ends.setdefault(event.channel_id, _RingEnds(connector_view))
        ends.set_path(event.side, path)
        channel = hvsock_pb2.Channel(
            channel_id=event.channel_id,
            local=_address(event.local),
            remote=_address(event.remote),
            data_path=_DATA_PATH_TO_PB[path],
            geometry=_geometry(event.ring, self.dataplane.max_payload),
            listener_id=plan.listener_id,
        )
        if isinstance(segment, RelayOpening):
            channel.relay_send_limit = send_limit
            channel.relay_window = window
            # What this end's (empty) receive ring holds, plus the window.
            channel.relay_receive_window = segment.receive_window
            channel.relay_receive_credited = segment.credited
        else:
            channel.shared_memory.CopyFrom(segment)
        attachment.send(hvsock_pb2.AttachResponse(request_id=plan.request_id, opened=channel))

    def _auto_accept(self, attachment: Attachment, channel_id: int) -> None:
        if (
            attachment.ended is not None
            or self.attachments.get(attachment.session.session_id) is not attachment
        ):
            attachment.book.accepts.pop(channel_id, None)
            return
        try:
            self.call(self.core.accept, attachment.session, channel_id)
        except errors.HvError:
            # The connect ended meanwhile (timeout, rescind, listener gone): credit unused.
            attachment.book.return_credit(channel_id)

    # -- watchers --------------------------------------------------------------------------

    def watch(self) -> Watcher:
        watcher = Watcher()
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def _cut_off(self, watcher: Watcher) -> None:
        """The watcher fell MAX_WATCH_BACKLOG events behind: drop what it has not taken (the
        memory goes now) and end its stream once it gets to the end marker."""
        self._watchers.discard(watcher)
        watcher.behind = watcher.queue.qsize()
        while not watcher.queue.empty():
            watcher.queue.get_nowait()
        watcher.queue.put_nowait(None)
        log.warning("cut off an event watcher %d events behind", watcher.behind)

    # -- attachments -----------------------------------------------------------------------

    def register(self, session: Session) -> Attachment:
        # A relayed end's FIN and close, once in the peer's ring. The channel may be gone
        # already (rescinded meanwhile): nothing to record then.
        def fin(channel_id: int, side: Side) -> None:
            with contextlib.suppress(errors.HvError):
                self.call(self.core.shutdown, session, channel_id, side=side)

        def close(channel_id: int, side: Side) -> None:
            with contextlib.suppress(errors.HvError):
                self.closing(attachment, channel_id)
                self.call(self.core.close, session, channel_id, side=side)

        def abandon(channel_id: int, reason: str) -> None:
            with contextlib.suppress(errors.HvError):  # gone already: nothing to tear down
                self.call(self.core.rescind, channel_id, reason=reason)

        attachment = Attachment(
            session=session,
            secret=secrets.token_urlsafe(24),
            data=SessionData(
                session.session_id,
                on_fin=fin,
                on_close=close,
                on_abort=abandon,
                budget=self.relay_budget,
            ),
            max_queued=self.max_queued_responses,
            on_overflow=self._overflowed,
        )
        self.attachments[session.session_id] = attachment
        self._by_secret[attachment.secret] = attachment
        return attachment

    def closing(self, attachment: Attachment, channel_id: int) -> None:
        """The session is closing its end of ``channel_id``: it wants no more notices on the
        channel (its rescind, soon), unless it holds the other end too. NotFound if the
        channel is gone."""
        info = self.core.get_channel(channel_id)
        if info.acceptor is None or (info.acceptor.vm_id, info.acceptor.session_id) != (
            info.connector.vm_id,
            info.connector.session_id,
        ):
            attachment.book.closed.add(channel_id)

    def unregister(self, attachment: Attachment, reason: str) -> None:
        attachment.end(reason)
        self._release_handover(attachment)
        if self.attachments.get(attachment.session.session_id) is attachment:
            del self.attachments[attachment.session.session_id]
            self._by_secret.pop(attachment.secret, None)
            # Only this session: the partition's other sessions keep their sockets.
            with contextlib.suppress(errors.HvError):
                self.call(self.core.detach, attachment.session, reason=reason)

    def _overflowed(self, attachment: Attachment) -> None:
        """The client stopped reading: detach it now and stop its stream's handler, which
        may be blocked handing a response to a transport nobody drains."""
        log.warning(
            "detaching %s session %d: %s",
            attachment.session.vm_id,
            attachment.session.session_id,
            attachment.ended,
        )
        self.unregister(attachment, attachment.ended or "stopped reading")
        if attachment.task is not None and not attachment.task.done():
            attachment.task.cancel()

    # -- ring memory handover (handover.py) ---------------------------------------------------

    def _reset_unmapped(self, channel_id: int, reason: str) -> None:
        with contextlib.suppress(errors.HvError):  # gone meanwhile
            self.call(self.core.rescind, channel_id, reason=reason)

    def _claim_handover(self, secret: str, conn: socket.socket) -> bytes | None:
        """A program presented ``secret`` on the descriptor socket: if a live session has it and
        no connection yet, the connection becomes the session's; returns the probe's nonce."""
        attachment = self._by_secret.get(secret)
        if attachment is None or attachment.ended is not None or attachment.shm_conn is not None:
            return None
        attachment.shm_conn = conn
        attachment.shm_nonce = secrets.token_bytes(NONCE_SIZE)
        self._by_conn[conn] = attachment
        return attachment.shm_nonce

    def _handover_lost(self, conn: socket.socket, error: str | None) -> None:
        """The program closed its descriptor connection (or broke its protocol): the session's
        later channel ends use the relay; a session whose requests came there is over."""
        attachment = self._by_conn.get(conn)
        if attachment is None:
            return
        if attachment.control is None:
            self._release_handover(attachment)
            return
        if error is not None:
            attachment.error = errors.InvalidArgument(f"descriptor socket: {error}")
        attachment.end(ATTACH_STREAM_ENDED if error is None else f"descriptor socket: {error}")

    def _control_frame(self, conn: socket.socket, payload: bytes) -> None:
        """One request frame from a session's descriptor connection (Welcome.control_socket)."""
        attachment = self._by_conn.get(conn)
        if attachment is None or attachment.ended is not None or self.serve_request is None:
            return
        try:
            request = hvsock_pb2.AttachRequest.FromString(payload)
        except DecodeError as exc:
            self._control_broken(conn, f"request frame does not decode: {exc}")
            return
        if attachment.control is None:
            # The first frame moves the session's requests here: only with the probe's proof,
            # and before its answer leaves (it must come here too).
            if request.WhichOneof("kind") != "prove_shared_memory" or not attachment.proves(
                request.prove_shared_memory.nonce
            ):
                self._control_broken(conn, "the first request frame must prove the probe")
                return
            handover, limit = self.handover, attachment.max_queued
            assert handover is not None

            def control(response: hvsock_pb2.AttachResponse) -> bool:
                return handover.send_response(conn, response.SerializeToString(), limit)

            attachment.control = control
        self.serve_request(request, attachment)

    def _control_broken(self, conn: socket.socket, why: str) -> None:
        log.info("descriptor socket: %s", why)
        if self.handover is not None:
            self.handover.drop(conn, error=why)

    def _release_handover(self, attachment: Attachment) -> None:
        conn, attachment.shm_conn = attachment.shm_conn, None
        attachment.shm_capable = False
        if conn is not None:
            self._by_conn.pop(conn, None)
            if self.handover is not None:
                self.handover.release(conn)

    def by_secret(self, secret: str) -> Attachment | None:
        return self._by_secret.get(secret)

    # -- conversions -----------------------------------------------------------------------

    def partition_pb(self, info: PartitionInfo) -> hvsock_pb2.Partition:
        listeners = self.core.list_listeners(info.vm_id)
        channels = self.core.list_channels(info.vm_id)
        return hvsock_pb2.Partition(
            vm_id=info.vm_id,
            name=info.name,
            personality=_PERSONALITY_TO_PB[info.personality],
            state=_STATE_TO_PB[info.state],
            host=info.is_host,
            attached=info.attached,
            channel_count=len(channels),
            listener_count=len(listeners),
            session_count=info.sessions,
        )

    def channel_status_pb(self, info: ChannelInfo) -> hvsock_pb2.ChannelStatus:
        status = hvsock_pb2.ChannelStatus(
            channel_id=info.channel_id,
            state=_CHANNEL_STATE_TO_PB[info.state],
            connector=_address(Address(info.connector.vm_id, info.connector.local.service_id)),
            connector_data_path=_path_pb(info.connector.data_path),
            created=self.wall(info.created_at),
        )
        used = self.dataplane.ring_used(info.channel_id)
        status.to_listener.CopyFrom(
            hvsock_pb2.ChannelDirection(
                bytes=self.dataplane.bytes_sent(info.channel_id, Side.CONNECTOR),
                ring_pages=info.ring.send_pages,
                ring_used=used[0] if used else 0,
            )
        )
        to_connector = hvsock_pb2.ChannelDirection(
            ring_pages=info.ring.recv_pages, ring_used=used[1] if used else 0
        )
        if info.acceptor is not None:
            status.listener.CopyFrom(
                _address(Address(info.acceptor.vm_id, info.acceptor.local.service_id))
            )
            status.listener_data_path = _path_pb(info.acceptor.data_path)
            to_connector.bytes = self.dataplane.bytes_sent(info.channel_id, Side.ACCEPTOR)
        else:
            status.listener.CopyFrom(_address(info.connector.remote))
        status.to_connector.CopyFrom(to_connector)
        return status

    def event_pb(self, event: Event) -> hvsock_pb2.WatchEventsResponse:
        response = hvsock_pb2.WatchEventsResponse(time=self.wall(event.at))
        kind, vm_id, channel_id, detail = _describe(event)
        response.kind, response.vm_id, response.channel_id, response.detail = (
            kind,
            vm_id,
            channel_id,
            detail,
        )
        if isinstance(event, PartitionEvent | SessionChanged):
            response.session_id = event.session_id
        return response


def _path_pb(label: str) -> hvsock_pb2.DataPath:
    try:
        return _DATA_PATH_TO_PB[EndPath(label)]
    except ValueError:
        return hvsock_pb2.DATA_PATH_UNSPECIFIED


def _describe(event: Event) -> tuple[str, str, int, str]:
    """(kind, vm id, channel id, detail) of a lifecycle event, for WatchEvents."""
    if isinstance(event, ChannelStateChanged):
        return (event.new.value, "", event.channel_id, event.reason)
    if isinstance(event, ConnectionOffered):
        return ("offer", event.partition, event.channel_id, f"{event.remote} -> {event.local}")
    if isinstance(event, ConnectionEstablished):
        return ("open", event.partition, event.channel_id, f"{event.side.value} {event.local}")
    if isinstance(event, ConnectFailed):
        return ("connect_failed", event.partition, event.channel_id, event.reason)
    if isinstance(event, PeerFinReceived):
        return ("fin", event.partition, event.channel_id, f"to the {event.side.value}")
    if isinstance(event, ChannelRescinded):
        return ("rescind", event.partition, event.channel_id, event.reason)
    if isinstance(event, SessionEnded):
        return ("session_ended", event.partition, 0, event.reason)
    if isinstance(event, SessionChanged):
        detail = f"session {event.session_id}: {event.reason}; {event.sessions} open"
        return (f"session_{event.change}", event.vm_id, 0, detail)
    if isinstance(event, ChannelRemoved):
        return ("removed", event.connector, event.channel_id, event.reason)
    if isinstance(event, ConnectRefused):
        return ("refused", event.connector, 0, f"{event.target}: {event.reason}")
    if isinstance(event, PartitionChanged):
        return (event.change, event.vm_id, 0, event.state.value if event.state else "")
    if isinstance(event, PartitionStalled):
        return ("stall", event.vm_id, 0, f"channels {list(event.channel_ids)}")
    if isinstance(event, PartitionResumed):
        return ("unstall", event.vm_id, 0, f"channels {list(event.channel_ids)}")
    if isinstance(event, ListenerChanged):
        return (event.change, event.vm_id, 0, f"{event.local} {event.reason}".strip())
    if isinstance(event, ServiceChanged):
        return (event.change, "", 0, f"{event.service_id} {event.element_name}")
    return (type(event).__name__, "", 0, "")


# -------------------------------------------------------------------------------------------
# HostService
# -------------------------------------------------------------------------------------------


class HostServicer(hvsock_pb2_grpc.HostServiceServicer):  # type: ignore[misc]  # untyped gencode
    def __init__(self, host: Host) -> None:
        self.host = host
        host.serve_request = self.serve_request

    async def GetInfo(
        self, request: hvsock_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.GetInfoResponse:
        return hvsock_pb2.GetInfoResponse(version=__version__, limits=limits_pb(self.host.core))

    async def Attach(
        self,
        request_iterator: AsyncIterator[hvsock_pb2.AttachRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[hvsock_pb2.AttachResponse]:
        host = self.host
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await abort(context, errors.InvalidArgument("the first request must be hello"))
        welcome, attachment = await self._hello(first.hello, context)
        attachment.task = asyncio.current_task()
        reader: asyncio.Task[None] | None = None
        reason = ATTACH_STREAM_ENDED
        try:
            # Inside the try: a client that hangs up before reading welcome is detached too.
            yield hvsock_pb2.AttachResponse(request_id=first.request_id, welcome=welcome)
            reader = asyncio.create_task(self._read_requests(request_iterator, attachment))
            queued = attachment.responses
            # What queued up while the last message was being sent leaves in one message (to a
            # client that takes batches): the stream sends one message per round of the loop.
            while (response := await queued.get()) is not None:
                if not attachment.response_batches:
                    yield response
                    continue
                message, ended = next_batch(response, queued.qsize, queued.get_nowait, _batched)
                yield message
                if ended:
                    break
            reason = attachment.ended or reason
        finally:
            try:
                if reader is not None:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        # Re-raises what ended the reader (a malformed frame, a bug) -- after
                        # the session is released below, never instead of it.
                        await reader
            finally:
                host.unregister(attachment, attachment.ended or reason)
        if attachment.error is not None:
            await abort(context, attachment.error)
        if attachment.ended not in (None, ATTACH_STREAM_ENDED):
            await context.abort(grpc.StatusCode.UNAVAILABLE, attachment.ended)

    async def _hello(
        self, hello: hvsock_pb2.Hello, context: grpc.aio.ServicerContext
    ) -> tuple[hvsock_pb2.Welcome, Attachment]:
        host = self.host
        core = host.core
        new_token = ""
        try:
            if host.draining:
                raise errors.ConnectionReset("the host service is shutting down")
            if hello.host:
                if hello.vm_id:
                    raise errors.InvalidArgument("hello: give either host or vm_id, not both")
                session, _ = host.call(core.attach, core.host_vm_id, hello.token)
            elif hello.vm_id:
                session, _ = host.call(core.attach, hello.vm_id, hello.token)
            else:
                session, new_token, events = host.call(
                    core.attach_new,
                    name=hello.name or None,
                    personality=_PERSONALITY_FROM_PB.get(hello.personality, Personality.LINUX),
                )
                if any(
                    isinstance(event, PartitionChanged) and event.change == "taken_over"
                    for event in events
                ):
                    # Worth a line of its own: the VM's previous token stops working here.
                    log.info(
                        "took over idle VM %s (%s) by name for %s: new token issued",
                        session.vm_id,
                        hello.name,
                        context.peer(),
                    )
                self._persist_new(session.vm_id, new_token)
        except errors.HvError as err:
            await abort(context, err)
        attachment = host.register(session)
        attachment.peer_fin_notices = hello.peer_fin_notices
        attachment.response_batches = hello.response_batches
        info = core.get_partition(session.vm_id)
        welcome = hvsock_pb2.Welcome(
            vm_id=session.vm_id,
            name=info.name,
            personality=_PERSONALITY_TO_PB[session.personality],
            session=attachment.secret,
            shm_socket=host.handover.address if host.handover is not None else "",
            control_socket=host.handover is not None,
            request_batches=True,
            limits=limits_pb(core),
            host=session.is_host,
            token=new_token,
        )
        log.info(
            "attached %s (%s) session %d (%d open) from %s",
            session.vm_id,
            info.name,
            session.session_id,
            info.sessions,
            context.peer(),
        )
        return welcome, attachment

    def _persist_new(self, vm_id: str, token: str) -> None:
        if self.host.store is None:
            return
        info = self.host.core.get_partition(vm_id)
        self.host.store.put_partition(
            PartitionRecord(
                vm_id,
                info.name,
                info.personality.value,
                info.state.value,
                hash_token(token),
                auto_created=info.auto_created,
            )
        )

    async def _read_requests(
        self, request_iterator: AsyncIterator[hvsock_pb2.AttachRequest], attachment: Attachment
    ) -> None:
        try:
            # A frame that does not decode raises wire.MalformedRequest here; it ends the
            # stream (INVALID_ARGUMENT) through Attach, which detaches the session first.
            async for request in request_iterator:
                if attachment.ended is not None:
                    return
                self.serve_request(request, attachment)
        except MalformedRequest as err:
            attachment.end(err.message)  # the reason the session is detached with
            raise
        finally:
            attachment.end(ATTACH_STREAM_ENDED)

    def serve_request(self, request: hvsock_pb2.AttachRequest, attachment: Attachment) -> None:
        """Carry out one request message of the session, from its stream or its descriptor
        connection (a request, or a batch of them in order), and send each answer it has now."""
        if not request.batch:
            self._serve_one(request, attachment)
        elif request.request_id or request.WhichOneof("kind"):
            self._answer(request, attachment, _error(errors.InvalidArgument(_BATCH_NOT_ALONE)))
        elif len(request.batch) > MAX_ATTACH_BATCH:
            # Each is told (by its own id), and none is carried out: one message must not hold
            # the loop for more than a batch's worth of requests.
            why = (
                f"a batch holds at most {MAX_ATTACH_BATCH} requests (this one held "
                f"{len(request.batch)}): none of them was carried out"
            )
            for one in request.batch:
                self._answer(one, attachment, _error(errors.InvalidArgument(why)))
        else:
            for one in request.batch:
                if one.batch:
                    self._answer(one, attachment, _error(errors.InvalidArgument(_BATCH_NESTED)))
                else:
                    self._serve_one(one, attachment)

    def _serve_one(self, request: hvsock_pb2.AttachRequest, attachment: Attachment) -> None:
        if attachment.ended is not None:
            return
        try:
            response = self._handle(request, attachment)
        except errors.HvError as err:
            response = _error(err)
        if response is not None:
            self._answer(request, attachment, response)

    def _answer(
        self,
        request: hvsock_pb2.AttachRequest,
        attachment: Attachment,
        response: hvsock_pb2.AttachResponse,
    ) -> None:
        if request.request_id == 0:
            # A notification (close, shutdown, unlisten the client does not wait on): never
            # answered; a failure is only logged.
            if response.HasField("error"):
                log.debug("notification %s failed: %s", request, response.error)
            return
        response.request_id = request.request_id
        attachment.send(response)

    def _handle(
        self, request: hvsock_pb2.AttachRequest, attachment: Attachment
    ) -> hvsock_pb2.AttachResponse | None:
        """Answer one request; None when the answer comes later (connect, accept)."""
        host, core, session = self.host, self.host.core, attachment.session
        kind = request.WhichOneof("kind")
        if kind == "listen":
            listener, _ = host.call(
                core.listen,
                session,
                request.listen.address.vm_id,
                request.listen.address.service_id,
                backlog=request.listen.backlog or None,
            )
            attachment.book.listen(
                listener.listener_id,
                request.listen.auto_accept,
                _relay_window(request.listen),
            )
            return hvsock_pb2.AttachResponse(
                listening=hvsock_pb2.Listening(
                    listener_id=listener.listener_id, address=_address(listener.local)
                )
            )
        if kind == "unlisten":
            host.call(core.unlisten, session, request.unlisten.listener_id)
            attachment.book.unlisten(request.unlisten.listener_id)
            return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
        if kind == "accept_credit":
            credit = request.accept_credit
            attachment.book.add_credit(credit.listener_id, credit.count)
            return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
        if kind == "connect":
            connect = request.connect
            if connect.connect_timeout_ms > core.config.max_connect_timeout_ms:
                raise errors.InvalidArgument(
                    f"connect_timeout_ms is at most {core.config.max_connect_timeout_ms}"
                )
            self._connect(request, attachment)
            return None
        if kind == "accept":
            channel_id = request.accept.channel_id
            plan = OpenPlan(
                request.request_id, request.accept.force_relay, _relay_window(request.accept)
            )
            attachment.book.expect(channel_id, plan, connecting=False)
            try:
                host.call(core.accept, session, channel_id)
            finally:
                attachment.book.accepts.pop(channel_id, None)
            return None
        if kind == "shutdown":
            host.call(core.shutdown, session, request.shutdown.channel_id)
            return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
        if kind == "close":
            # close() never fails on a socket whose channel the host already tore down (or
            # that its relay stream already closed): closing is idempotent.
            channel_id = request.close.channel_id
            if request.close.reset:
                host.call(core.reset, session, channel_id)
                return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
            with contextlib.suppress(errors.NotFound):
                host.closing(attachment, channel_id)
                host.call(core.close, session, channel_id)
            return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
        if kind == "prove_shared_memory":
            if not request.prove_shared_memory.nonce:
                # The client cannot (or will not) map what the socket hands it: relay.
                host._release_handover(attachment)
                return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
            if not attachment.proves(request.prove_shared_memory.nonce):
                raise errors.InvalidArgument("shared-memory proof does not match the probe")
            attachment.shm_capable = True
            return hvsock_pb2.AttachResponse(ack=hvsock_pb2.Ack())
        if kind == "hello":
            raise errors.InvalidState("already attached: hello is only the first request")
        raise errors.InvalidArgument("empty request (no kind set)")

    def _connect(self, request: hvsock_pb2.AttachRequest, attachment: Attachment) -> None:
        """Start a connect; it is answered when ConnectionEstablished or ConnectFailed comes.

        The channel id is known only once the core returns. Opening needs another request
        (the acceptor's Accept), so no ConnectionEstablished can come from this call; a failure
        can (e.g. the listener's partition refused synchronously), so check before recording.
        """
        connect = request.connect
        host, core = self.host, self.host.core
        plan = OpenPlan(request.request_id, connect.force_relay, _relay_window(connect))
        channel_id, events = host.call(
            core.connect,
            attachment.session,
            connect.remote.vm_id,
            connect.remote.service_id,
            timeout_ms=connect.connect_timeout_ms or None,
            local_service_id=connect.local_service_id or None,
            send_pages=connect.send_ring_pages or None,
            recv_pages=connect.recv_ring_pages or None,
        )
        if not any(
            isinstance(e, ConnectFailed | ChannelRemoved) and e.channel_id == channel_id
            for e in events
        ):
            attachment.book.expect(channel_id, plan, connecting=True)

    async def SessionData(
        self,
        request_iterator: AsyncIterator[relaywire.Request],  # decoded by hand (wire.py)
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:  # SessionDataResponse, encoded (wire: sent as they are)
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        attachment = self.host.by_secret(first.session) if first.session else None
        if attachment is None or attachment.ended is not None:
            await abort(context, errors.Unauthenticated("unknown or ended session"))
        data = attachment.data
        try:
            data.open_stream()
        except errors.HvError as err:
            await abort(context, err)
        try:
            # Closed explicitly however this stream ends, so the ends are torn down now.
            async with contextlib.aclosing(data.serve(first, request_iterator)) as responses:
                async for response in responses:
                    yield response
        except errors.HvError as err:  # a malformed request, or a rule of the stream
            await abort(context, err)
        if data.ended is not None:
            await abort(context, errors.ConnectionReset(f"the session ended: {data.ended}"))


def _relay_window(request: Any) -> int | None:
    """A Connect/Accept/Listen's relay window (None: the host's default); EINVAL if too big."""
    if not request.HasField("relay_window"):
        return None
    window = int(request.relay_window)
    if window > MAX_RELAY_WINDOW:
        raise errors.InvalidArgument(f"relay_window is at most {MAX_RELAY_WINDOW}")
    return window


def limits_pb(core: HostCore) -> hvsock_pb2.Limits:
    config = core.config
    return hvsock_pb2.Limits(
        max_socket_number=config.max_socket_number,
        send_ring_page=config.send_ring_page,
        recv_ring_page=config.recv_ring_page,
        max_ring_page=config.max_ring_pages,
        strict_registry=config.strict_registry,
        allow_guest_to_guest=config.allow_guest_to_guest,
        connect_timeout_ms=int(config.connect_timeout * 1000),
        close_timeout_ms=int(config.close_timeout * 1000),
        max_sessions_per_partition=config.max_sessions_per_partition,
        max_partitions=config.max_partitions,
    )


# -------------------------------------------------------------------------------------------
# AdminService
# -------------------------------------------------------------------------------------------


class AdminServicer(hvsock_pb2_grpc.AdminServiceServicer):  # type: ignore[misc]  # untyped gencode
    """Every call checks the host token first; core errors map through ``status.abort``."""

    def __init__(self, host: Host, host_token: str) -> None:
        self.host = host
        self._token_sha256 = hash_token(host_token)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        token = dict(context.invocation_metadata() or ()).get(TOKEN_METADATA, "")
        if (
            not isinstance(token, str)
            or not token
            or not secrets.compare_digest(hash_token(token), self._token_sha256)
        ):
            await context.abort_with_status(
                rich_status(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the admin API needs the host token in {TOKEN_METADATA!r} metadata",
                    None,
                )
            )

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        await self._authorize(context)
        try:
            return fn()
        except errors.HvError as err:
            await abort(context, err)

    async def CreatePartition(
        self, request: hvsock_pb2.CreatePartitionRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.CreatePartitionResponse:
        host = self.host

        def create() -> hvsock_pb2.CreatePartitionResponse:
            if request.personality not in _PERSONALITY_FROM_PB:
                raise errors.InvalidArgument(f"unknown personality {request.personality}")
            info, token, _ = host.call(
                host.core.create_partition,
                request.name,
                vm_id=request.vm_id or None,
                personality=_PERSONALITY_FROM_PB[request.personality],
            )
            if host.store is not None:
                host.store.put_partition(
                    PartitionRecord(
                        info.vm_id,
                        info.name,
                        info.personality.value,
                        info.state.value,
                        hash_token(token),
                    )
                )
            return hvsock_pb2.CreatePartitionResponse(
                partition=host.partition_pb(info), token=token
            )

        return await self._run(context, create)

    async def ListPartitions(
        self, request: hvsock_pb2.ListPartitionsRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.ListPartitionsResponse:
        host = self.host
        return await self._run(
            context,
            lambda: hvsock_pb2.ListPartitionsResponse(
                partitions=[host.partition_pb(p) for p in host.core.list_partitions()]
            ),
        )

    async def GetPartition(
        self, request: hvsock_pb2.GetPartitionRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.GetPartitionResponse:
        host = self.host
        return await self._run(
            context,
            lambda: hvsock_pb2.GetPartitionResponse(
                partition=host.partition_pb(host.core.get_partition(request.vm_id))
            ),
        )

    async def DeletePartition(
        self, request: hvsock_pb2.DeletePartitionRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.DeletePartitionResponse:
        host = self.host

        def delete() -> hvsock_pb2.DeletePartitionResponse:
            host.call(host.core.delete_partition, request.vm_id)
            return hvsock_pb2.DeletePartitionResponse()

        return await self._run(context, delete)

    def _power(self, method: Callable[..., list[Event]], vm_id: str) -> hvsock_pb2.Partition:
        self.host.call(method, vm_id)
        return self.host.partition_pb(self.host.core.get_partition(vm_id))

    async def PausePartition(
        self, request: hvsock_pb2.PausePartitionRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.PausePartitionResponse:
        core = self.host.core
        return await self._run(
            context,
            lambda: hvsock_pb2.PausePartitionResponse(
                partition=self._power(core.pause_partition, request.vm_id)
            ),
        )

    async def ResumePartition(
        self, request: hvsock_pb2.ResumePartitionRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.ResumePartitionResponse:
        core = self.host.core

        def resume() -> hvsock_pb2.ResumePartitionResponse:
            # A stopped VM is started again; a paused one resumes.
            info = core.get_partition(request.vm_id)
            method = (
                core.start_partition if info.state is PartitionState.OFF else core.resume_partition
            )
            return hvsock_pb2.ResumePartitionResponse(partition=self._power(method, request.vm_id))

        return await self._run(context, resume)

    async def StopPartition(
        self, request: hvsock_pb2.StopPartitionRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.StopPartitionResponse:
        core = self.host.core
        return await self._run(
            context,
            lambda: hvsock_pb2.StopPartitionResponse(
                partition=self._power(core.stop_partition, request.vm_id)
            ),
        )

    async def RegisterService(
        self, request: hvsock_pb2.RegisterServiceRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.RegisterServiceResponse:
        host = self.host

        def register() -> hvsock_pb2.RegisterServiceResponse:
            registration, _ = host.call(
                host.core.register_service, request.service_id, request.element_name
            )
            return hvsock_pb2.RegisterServiceResponse(
                service=hvsock_pb2.Service(
                    service_id=registration.service_id, element_name=registration.element_name
                )
            )

        return await self._run(context, register)

    async def ListServices(
        self, request: hvsock_pb2.ListServicesRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.ListServicesResponse:
        core = self.host.core
        return await self._run(
            context,
            lambda: hvsock_pb2.ListServicesResponse(
                services=[
                    hvsock_pb2.Service(service_id=s.service_id, element_name=s.element_name)
                    for s in core.list_services()
                ]
            ),
        )

    async def UnregisterService(
        self, request: hvsock_pb2.UnregisterServiceRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.UnregisterServiceResponse:
        host = self.host

        def unregister() -> hvsock_pb2.UnregisterServiceResponse:
            host.call(host.core.unregister_service, request.service_id)
            return hvsock_pb2.UnregisterServiceResponse()

        return await self._run(context, unregister)

    async def ListChannels(
        self, request: hvsock_pb2.ListChannelsRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.ListChannelsResponse:
        host = self.host
        return await self._run(
            context,
            lambda: hvsock_pb2.ListChannelsResponse(
                channels=[
                    host.channel_status_pb(c)
                    for c in host.core.list_channels(request.vm_id or None)
                ]
            ),
        )

    async def WatchEvents(
        self, request: hvsock_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[hvsock_pb2.WatchEventsResponse]:
        await self._authorize(context)
        host = self.host
        watcher = host.watch()
        try:
            if request.replay:
                for event in host.core.events_since(0)[-request.replay :]:
                    yield host.event_pb(event)
            while True:
                next_event = await watcher.queue.get()
                if next_event is None:
                    break
                yield host.event_pb(next_event)
        finally:
            host.unwatch(watcher)
        if watcher.behind is not None:
            await abort(
                context,
                errors.NoBuffers(
                    f"watcher fell {watcher.behind} events behind (the host holds at most "
                    f"{MAX_WATCH_BACKLOG} for a watcher); watch again, with replay to catch up"
                ),
            )

    async def RescindChannel(
        self, request: hvsock_pb2.RescindChannelRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.RescindChannelResponse:
        host = self.host

        def rescind() -> hvsock_pb2.RescindChannelResponse:
            host.call(
                host.core.rescind, request.channel_id, reason=request.reason or "fault injected"
            )
            return hvsock_pb2.RescindChannelResponse()

        return await self._run(context, rescind)

    async def StallRing(
        self, request: hvsock_pb2.StallRingRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.StallRingResponse:
        host = self.host

        def stall() -> hvsock_pb2.StallRingResponse:
            if not 1 <= request.duration_ms <= 600_000:
                raise errors.InvalidArgument("duration_ms must be between 1 and 600000")
            host.core.get_channel(request.channel_id)  # NOT_FOUND for an unknown channel
            directions = {
                hvsock_pb2.StallRingRequest.DIRECTION_TO_LISTENER: (Side.CONNECTOR,),
                hvsock_pb2.StallRingRequest.DIRECTION_TO_CONNECTOR: (Side.ACCEPTOR,),
            }.get(request.direction, (Side.CONNECTOR, Side.ACCEPTOR))
            for writer in directions:
                host.dataplane.stall(
                    request.channel_id, writer, duration=request.duration_ms / 1000
                )
            return hvsock_pb2.StallRingResponse()

        return await self._run(context, stall)


def new_core(config: Any, host_token: str, *, now: float | None = None) -> HostCore:
    """A core with real randomness for ids and tokens, created at ``now`` (default: the
    monotonic clock, which Host also uses unless given another)."""
    return HostCore(
        config=config,
        host_token=host_token,
        token_factory=new_token,
        guid_factory=lambda: str(uuid.uuid4()),
        now=time.monotonic() if now is None else now,
    )
