"""Channel rings owned by the host service, and the relayed ends that cannot map them.

Every open channel has one shared-memory segment with two rings (``ring.shm.Channel``):
ring 0 carries connector -> acceptor, ring 1 acceptor -> connector, so the connector is end 0
and the acceptor end 1. The host creates the segment as a broker (``end=None``) and keeps it
mapped for the channel's whole life, so it can rescind (a flag in each ring's control page that
wakes every waiter in every process) and report ring fill. An end on the shared-memory path
maps it and moves bytes itself; for an end on the relay path the host maps that end and pumps
it to and from its session's SessionData stream (``sessiondata.RingRelay``).

When both ends are relayed there is no segment at all: the host forwards frames from one
session stream to the other (``forward.ForwardPair``). Which it is gets known when the second
end opens: the core tells both ends of an accepted channel in one dispatch, connector first, so
a relayed first end *waits* (``_ChannelRings.waiting``, no rings yet) for its peer. A peer on
shared memory, anything else done to the channel first, or the loop's next turn (the peer's
session was gone: it never opens) *settles* the waiting end on rings as before. An end on
shared memory whose descriptor cannot be handed over falls back to the relay after the
segment exists: that channel keeps its rings and pumps.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from hvsock.v1 import hvsock_pb2
from ring import ring_capacity, shm
from ring._constants import MAX_PAYLOAD, PAGE_SIZE

from .core.types import RingGeometry, Side
from .forward import EndSpec, ForwardPair, RelayOpening
from .sessiondata import RingRelay, SessionData

log = logging.getLogger("hvsock.host.dataplane")

_END_OF_SIDE = {Side.CONNECTOR: 0, Side.ACCEPTOR: 1}
_SIDES = (Side.CONNECTOR, Side.ACCEPTOR)  # by end number
_BOTH_OPEN = 0b11
_T = TypeVar("_T")
#: Map checks due this close are run together (seconds; the loop may fire a timer early by its
#: clock resolution).
_MAP_CHECK_SLACK = 0.001
#: Dead map checks (of removed channels) are pruned from the queue once there are more than
#: this many and they are more than half of it.
_MIN_PRUNED = 64
#: The most a byte count reported from a ring can be (what a Prometheus or int64 reader takes).
_MAX_REPORTED_BYTES = 2**63 - 1


class EndPath(StrEnum):
    SHARED_MEMORY = "shm"
    RELAY = "relay"


#: Per end (0 the connector, 1 the acceptor), before anything is set for either: a shared
#: tuple, replaced by a new one on each change (a channel sets each end once or twice), so an
#: idle channel carries no per-end dict (224 bytes with one entry) or list of its own.
_NOTHING_PER_END: tuple[None, None] = (None, None)
_ZERO_PER_END = (0, 0)


def _replaced(pair: tuple[_T, _T], end: int, value: _T) -> tuple[_T, _T]:
    """``pair`` with its item ``end`` replaced by ``value``."""
    return (value, pair[1]) if end == 0 else (pair[0], value)


class _ChannelRings:
    """The data plane's record of one open channel. Ten thousand idle channels each carry one,
    so it has slots, keeps per-end state in 2-tuples indexed by end number, and makes the
    containers that only pauses, stalls and map checks use when they are first needed."""

    __slots__ = (
        "broker",
        "forward",
        "geometry",
        "map_pending",
        "opened",
        "paused",
        "relays",
        "ring_stalls",
        "shm_bytes",
        "shm_ends",
        "stall_timers",
        "stalled_mask",
        "waiting",
    )

    def __init__(
        self, broker: shm.Channel | None, geometry: RingGeometry, waiting: EndSpec | None = None
    ) -> None:
        #: The segment (None while the first end waits for its peer, or when forwarding).
        self.broker = broker
        self.geometry = geometry  # the connector's view
        #: The first end, relayed, until its peer's path is known (see the module docstring).
        self.waiting = waiting
        #: Both ends relayed: the frames pass from stream to stream.
        self.forward: ForwardPair | None = None
        #: Per end: its relay (the host pumps it between its stream and the rings).
        self.relays: tuple[RingRelay | None, RingRelay | None] = _NOTHING_PER_END
        #: Per end on the shared-memory path: its VM id.
        self.shm_ends: tuple[str | None, str | None] = _NOTHING_PER_END
        #: Bit per end whose end is open (the broker's descriptor is dropped once both are).
        self.opened = 0
        self.stall_timers: list[asyncio.TimerHandle] | None = None
        #: Bit per end on shared memory whose map check is still to come (DataPlane._map_checks).
        self.map_pending = 0
        #: Paused VMs: their ends of this channel are stalled both ways.
        self.paused: set[str] | None = None
        #: Stalls in force per ring (StallRing): ring r stalls end r's sends and the peer's
        #: receives.
        self.ring_stalls: tuple[int, int] = _ZERO_PER_END
        self.stalled_mask = 0
        #: Last bytes_written reported per shared-memory end (the report never goes backwards).
        self.shm_bytes: tuple[int, int] = _ZERO_PER_END

    def open(self, side: Side) -> None:
        self.opened |= 1 << _END_OF_SIDE[side]

    def relay_items(self) -> list[tuple[Side, RingRelay]]:
        return [(side, r) for side, r in zip(_SIDES, self.relays, strict=True) if r is not None]


class DataPlane:
    """Creates, hands over, relays, stalls and reclaims the rings of every open channel."""

    max_payload = MAX_PAYLOAD

    def __init__(self, map_timeout: float, *, forward: bool = True) -> None:
        #: Seconds an end on shared memory has to map its segment once handed it.
        self.map_timeout = map_timeout
        #: Channels relayed at both ends are forwarded stream to stream (else: rings, pumps).
        self.forward = forward
        #: Set by the service: rescind a channel (an end never mapped its rings).
        self.on_unmapped: Callable[[int, str], None] = lambda channel_id, reason: None
        self._channels: dict[int, _ChannelRings] = {}
        # The map checks of ends on shared memory: (loop time due, channel id, its rings, end),
        # in due order (appended with one constant timeout), and one loop timer for the first.
        # Not a timer per end: ten thousand idle channels would each keep a TimerHandle (and
        # its arguments) in the loop's heap, and so many live timers there also keep the
        # loop's cancelled ones (the host re-arms its own timer on each connect) from being
        # purged. Entries of channels removed meanwhile are skipped when due, or pruned once
        # they are more than half of the queue.
        self._map_checks: collections.deque[tuple[float, int, _ChannelRings, int]] = (
            collections.deque()
        )
        self._dead_map_checks = 0
        self._map_timer: asyncio.TimerHandle | None = None

    def open_end(
        self,
        channel_id: int,
        side: Side,
        path: EndPath,
        connector_view: RingGeometry,
        vm_id: str,
        session_id: int,
        hand_over: Callable[[int], bool] | None = None,
        *,
        relays: SessionData | None = None,
        window: int = 0,
    ) -> tuple[EndPath, hvsock_pb2.SharedMemorySegment | RelayOpening, int]:
        """Set up one end of an opening channel (held by ``session_id`` of ``vm_id``); the
        segment is made for the first end not relayed. An end on shared memory gets the
        segment's descriptor through ``hand_over``; when that fails it goes on the relay
        instead, with ``window``, in the session's ``relays``. Returns the end's path, on
        shared memory where its rings are (on the relay what it is told: its first send limit
        and its receive window), and on the relay its first send limit."""
        rings = self._channels.get(channel_id)
        # Decided as the end opens, as it is told (Channel.relay_receive_credited).
        credited = relays is not None and relays.credits_new_ends
        # -- both ends relayed: forwarding (hook: forward.py) --
        if self.forward and path is EndPath.RELAY and relays is not None:
            if rings is None:
                # Told its limit now, opened with the rules once its peer's path is known.
                reserved = relays.rules.budget.take(window)
                spec = EndSpec(side, vm_id, session_id, relays, window, reserved, credited)
                rings = self._channels[channel_id] = _ChannelRings(None, connector_view, spec)
                rings.open(side)
                asyncio.get_running_loop().call_soon(self._settle, channel_id, rings)
                opening = self._relay_opening(connector_view, side, reserved, window, credited)
                return path, opening, opening.send_limit
            if rings.waiting is not None:
                first, rings.waiting = rings.waiting, None
                rings.forward = ForwardPair(
                    channel_id,
                    first,
                    EndSpec(side, vm_id, session_id, relays, window, credited=credited),
                    self._capacities(connector_view),
                )
                rings.open(side)
                self._apply_stalls(rings)
                opening = rings.forward.limits[side]
                return path, opening, opening.send_limit
        if rings is not None:
            self._settle(channel_id, rings)  # the peer is not relayed: rings after all
        # -- end of the forwarding hook --
        if rings is None:
            rings = self._channels[channel_id] = _ChannelRings(None, connector_view)
        broker = rings.broker
        if broker is None:
            broker = rings.broker = shm.Channel.create(
                connector_view.send_pages, connector_view.recv_pages, end=None
            )
        end = _END_OF_SIDE[side]
        if path is EndPath.SHARED_MEMORY and (hand_over is None or not hand_over(broker.fileno())):
            path = EndPath.RELAY
        rings.open(side)
        segment: hvsock_pb2.SharedMemorySegment | RelayOpening
        send_limit = 0
        if path is EndPath.RELAY:
            if relays is None:
                raise ValueError("a relayed end needs its session's SessionData")
            _, send_limit = self._ring_relay(
                rings,
                channel_id,
                EndSpec(side, vm_id, session_id, relays, window, credited=credited),
            )
            segment = RelayOpening(
                send_limit, self._receive_window(connector_view, side, window), credited
            )
        else:
            rings.shm_ends = _replaced(rings.shm_ends, end, vm_id)
            self._check_mapped_later(channel_id, rings, end)
            ring0 = PAGE_SIZE
            ring1 = ring0 + connector_view.send_pages * PAGE_SIZE
            segment = hvsock_pb2.SharedMemorySegment(
                size=ring1 + connector_view.recv_pages * PAGE_SIZE,
                send_ring_offset=ring0 if end == 0 else ring1,
                recv_ring_offset=ring1 if end == 0 else ring0,
                end=end,
            )
        if rings.opened == _BOTH_OPEN:
            broker.close_fd()  # every end has its own mapping or descriptor now
        self._apply_stalls(rings)
        return path, segment, send_limit

    def _ring_relay(
        self, rings: _ChannelRings, channel_id: int, spec: EndSpec
    ) -> tuple[RingRelay, int]:
        """Put a relayed end on the channel's rings: the host maps its side and pumps it."""
        assert rings.broker is not None
        # Over the broker's mapping: a second one would cost a descriptor per relayed end.
        attached = rings.broker.view_end(_END_OF_SIDE[spec.side])
        receive_credit = (
            self._receive_window(rings.geometry, spec.side, spec.window) if spec.credited else 0
        )
        try:
            relay, send_limit = spec.relays.open_end(
                attached,
                spec.side,
                spec.vm_id,
                channel_id,
                spec.window,
                spec.reserved,
                receive_credit,
            )
        except BaseException:
            attached.close()
            raise
        rings.relays = _replaced(rings.relays, _END_OF_SIDE[spec.side], relay)
        return relay, send_limit

    def _settle(self, channel_id: int, rings: _ChannelRings) -> None:
        """A first end still waiting for its peer goes on rings after all (its peer is not
        relayed, or never opens, or the channel is acted on first). It was told the limits
        of empty rings already: the same as the rings made now give."""
        spec = rings.waiting
        if spec is None:
            return
        if self._channels.get(channel_id) is not rings:
            rings.waiting = None
            spec.relays.rules.budget.give_back(spec.reserved or 0)  # it never opens
            return
        rings.waiting = None
        view = rings.geometry
        rings.broker = shm.Channel.create(view.send_pages, view.recv_pages, end=None)
        self._ring_relay(rings, channel_id, spec)
        self._apply_stalls(rings)

    def _settled(self, channel_id: int) -> _ChannelRings | None:
        rings = self._channels.get(channel_id)
        if rings is not None and rings.waiting is not None:
            self._settle(channel_id, rings)
        return rings

    def _capacities(self, connector_view: RingGeometry) -> tuple[int, int]:
        """Payload capacity of ring 0 (connector -> acceptor) and ring 1, empty."""
        return (
            ring_capacity(connector_view.send_pages, self.max_payload),
            ring_capacity(connector_view.recv_pages, self.max_payload),
        )

    def _receive_window(self, connector_view: RingGeometry, side: Side, window: int) -> int:
        """What a relayed end's (empty) receive ring holds, plus its window: from the
        geometry, as reading the ring's room is its writer's call (the peer may be writing)."""
        return self._capacities(connector_view)[1 - _END_OF_SIDE[side]] + window

    def _relay_opening(
        self,
        connector_view: RingGeometry,
        side: Side,
        reserved: int,
        window: int,
        credited: bool,
    ) -> RelayOpening:
        """What a relayed end is told: its send limit (its empty ring and the budget it got)
        and its receive window (its peer's ring and its own window: its client's memory)."""
        send_ring = self._capacities(connector_view)[_END_OF_SIDE[side]]
        return RelayOpening(
            send_ring + reserved, self._receive_window(connector_view, side, window), credited
        )

    def _check_mapped_later(self, channel_id: int, rings: _ChannelRings, end: int) -> None:
        """Check, ``map_timeout`` seconds from now, that ``end`` has mapped its segment."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.map_timeout
        rings.map_pending |= 1 << end
        self._map_checks.append((due, channel_id, rings, end))
        if self._map_timer is None:
            self._map_timer = loop.call_at(due, self._run_map_checks)

    def _run_map_checks(self) -> None:
        self._map_timer = None
        loop = asyncio.get_running_loop()
        # The loop may run a timer up to its clock resolution early.
        now = loop.time() + _MAP_CHECK_SLACK
        checks = self._map_checks
        while checks and checks[0][0] <= now:
            _, channel_id, rings, end = checks.popleft()
            if not rings.map_pending & (1 << end):
                self._dead_map_checks -= 1  # its channel was removed
                continue
            rings.map_pending &= ~(1 << end)
            self._check_mapped(channel_id, rings, end)  # may remove channels (and prune)
            checks = self._map_checks
        if checks and self._map_timer is None:
            self._map_timer = loop.call_at(checks[0][0], self._run_map_checks)

    def _drop_map_checks(self, rings: _ChannelRings) -> None:
        """``rings``' channel is gone: its map checks still queued are dead entries."""
        pending, rings.map_pending = rings.map_pending, 0
        self._dead_map_checks += pending.bit_count()
        if self._dead_map_checks > _MIN_PRUNED and 2 * self._dead_map_checks > len(
            self._map_checks
        ):
            self._map_checks = collections.deque(
                entry for entry in self._map_checks if entry[2].map_pending & (1 << entry[3])
            )
            self._dead_map_checks = 0

    def _check_mapped(self, channel_id: int, rings: _ChannelRings, end: int) -> None:
        """A segment handed over but never mapped would hold its memory (and the peer) for as
        long as the client likes: reset the channel instead."""
        if (
            self._channels.get(channel_id) is not rings
            or rings.broker is None
            or rings.broker.closed
        ):
            return
        if not rings.broker.mapped_mask & (1 << end):
            self.on_unmapped(
                channel_id, f"end {end} did not map its rings within {self.map_timeout:g} s"
            )

    def rescind(self, channel_id: int, reason: str = "rescinded") -> None:
        rings = self._settled(channel_id)
        if rings is None:
            return
        if rings.forward is not None:
            rings.forward.rescind(reason)
        if rings.broker is not None:
            rings.broker.rescind()  # wakes every pump first: the relays drain, then reset
        for _, relay in rings.relay_items():
            relay.owner.rescinded(relay, reason)

    def remove(self, channel_id: int) -> None:
        """The channel is gone: wake everything, then reclaim threads and mappings."""
        self._settled(channel_id)
        rings = self._channels.pop(channel_id, None)
        if rings is None:
            return
        if rings.broker is not None:
            rings.broker.rescind()
        for timer in rings.stall_timers or ():
            timer.cancel()
        self._drop_map_checks(rings)
        if rings.forward is not None:
            # A stall does not outlive the channel: what was forwarded goes, then the reset.
            rings.forward.stall(0)
            rings.forward.rescind("channel removed")
        # A relayed end may still be draining the rescinded ring to its client: it keeps its
        # own mapping until it is finished (sessiondata), whatever happens to the broker's.
        for _, relay in rings.relay_items():
            relay.owner.rescinded(relay, relay.reset or "channel removed")
        if rings.broker is not None:
            rings.broker.close()

    def forwarded(self, channel_id: int) -> bool:
        """Whether the channel's frames pass stream to stream (both ends relayed, no rings)."""
        rings = self._channels.get(channel_id)
        return rings is not None and rings.forward is not None

    def ring_used(self, channel_id: int) -> tuple[int, int] | None:
        rings = self._channels.get(channel_id)
        if rings is not None and rings.forward is not None:
            return rings.forward.ring_used()
        if rings is None or rings.broker is None or rings.broker.closed:
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
        if rings.forward is not None:
            return rings.forward.bytes_sent(side)
        end = _END_OF_SIDE[side]
        relay = rings.relays[end]
        if relay is not None:
            return relay.sent
        if rings.shm_ends[end] is None or rings.broker is None or rings.broker.closed:
            return 0
        counted = rings.broker.rings[end].bytes_written_total
        # The counter lives in memory the end writes: only reported, and kept sane for the
        # report (never above int64, never going backwards).
        last = rings.shm_bytes[end]
        if last <= counted <= _MAX_REPORTED_BYTES:
            rings.shm_bytes = _replaced(rings.shm_bytes, end, counted)
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
        rings = self._settled(channel_id)
        if rings is not None:
            if rings.paused is None:
                rings.paused = set()
            rings.paused.add(vm_id)
            self._apply_stalls(rings)

    def resume(self, channel_id: int, vm_id: str) -> None:
        rings = self._settled(channel_id)
        if rings is not None:
            if rings.paused is not None:
                rings.paused.discard(vm_id)
            self._apply_stalls(rings)

    def stall(self, channel_id: int, writer: Side | None, duration: float | None = None) -> None:
        """Stall the ring ``writer`` writes (both rings for None): its writer's sends and its
        reader's receives; for ``duration`` seconds, or until :meth:`unstall`."""
        rings = self._settled(channel_id)
        if rings is None:
            return
        ring_ids = (0, 1) if writer is None else (_END_OF_SIDE[writer],)
        for ring_id in ring_ids:
            held = rings.ring_stalls[ring_id] + 1
            rings.ring_stalls = _replaced(rings.ring_stalls, ring_id, held)
        self._apply_stalls(rings)
        if duration is not None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(duration, self._release, channel_id, rings, ring_ids)
            if rings.stall_timers is None:
                rings.stall_timers = [timer]
            else:
                rings.stall_timers.append(timer)

    def unstall(self, channel_id: int) -> None:
        """End every StallRing hold on the channel (pauses stay)."""
        rings = self._settled(channel_id)
        if rings is not None:
            for timer in rings.stall_timers or ():
                timer.cancel()
            rings.stall_timers = None
            rings.ring_stalls = _ZERO_PER_END
            self._apply_stalls(rings)

    def _release(self, channel_id: int, rings: _ChannelRings, ring_ids: tuple[int, ...]) -> None:
        if self._channels.get(channel_id) is not rings:
            return  # removed meanwhile
        for ring_id in ring_ids:
            held = max(rings.ring_stalls[ring_id] - 1, 0)
            rings.ring_stalls = _replaced(rings.ring_stalls, ring_id, held)
        self._apply_stalls(rings)

    def _apply_stalls(self, rings: _ChannelRings) -> None:
        mask = 0
        forward = rings.forward
        paused = rings.paused or ()
        for side, end in _END_OF_SIDE.items() if paused else ():
            relay = rings.relays[end]
            if forward is not None:
                vm_id: str | None = forward.vm_of(side)
            else:
                vm_id = relay.vm_id if relay is not None else rings.shm_ends[end]
            if vm_id is not None and vm_id in paused:
                mask |= shm.stall_bit(end, False) | shm.stall_bit(end, True)
        for ring_id in (0, 1):
            if rings.ring_stalls[ring_id]:
                mask |= shm.stall_bit(ring_id, False) | shm.stall_bit(1 - ring_id, True)
        for side, relay in rings.relay_items():
            end = _END_OF_SIDE[side]
            relay.set_running(
                not mask & shm.stall_bit(end, False), not mask & shm.stall_bit(end, True)
            )
        if forward is not None and mask != rings.stalled_mask:
            rings.stalled_mask = mask
            forward.stall(mask)
        if mask != rings.stalled_mask and rings.broker is not None and not rings.broker.closed:
            rings.stalled_mask = mask
            rings.broker.set_stalled(mask)

    def close_all(self) -> None:
        for channel_id in list(self._channels):
            self.remove(channel_id)
        if self._map_timer is not None:
            self._map_timer.cancel()
            self._map_timer = None
        self._map_checks.clear()
        self._dead_map_checks = 0
