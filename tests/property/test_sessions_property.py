"""Property test of sessions: random attach/detach/listen/connect/accept/close/stop sequences
over a VM and the host, each with several sessions, keep the ownership invariants.

* every listener and every channel end belongs to a live session of its partition (a partition
  with no session has neither);
* the socket count of a partition is its listeners plus its channel ends, across its sessions;
* events go only to live sessions: a ``SessionEnded`` to a session the call ended, anything
  else to a session still live after the call -- an offer to the listener's session, a
  channel notice to the session holding that end;
* ``PartitionInfo.sessions``/``attached`` follow the sessions opened and ended.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_service.core import (
    HOST_VM_ID,
    LOOPBACK,
    PARENT,
    WILDCARD,
    ChannelRescinded,
    ChannelState,
    ConnectionEstablished,
    ConnectionOffered,
    Event,
    HostConfig,
    HostCore,
    HvError,
    PartitionEvent,
    PartitionState,
    PeerFinReceived,
    Session,
    SessionEnded,
    Side,
    service_id_for_port,
)

pytestmark = pytest.mark.property

HOST_TOKEN = "host-secret"
VM_ID = "11111111-2222-4333-8444-555555555555"
SERVICES = [service_id_for_port(p) for p in (5000,)]

#: Weighted by repetition: mostly socket work, sometimes a session or the VM's power changes.
KINDS = [
    *["attach"] * 2,
    *["listen"] * 3,
    *["connect"] * 4,
    *["accept"] * 4,
    *["close"] * 2,
    *["shutdown"] * 2,
    "unlisten",
    "detach",
    "power",
    "time",
]
POWER = ["stop_partition", "start_partition", "pause_partition", "resume_partition"]
#: (kind, a, b, c): the numbers pick a session, a service, a channel ... modulo what exists.
Op = tuple[str, int, int, int]
OPS = st.tuples(st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7))


@dataclass
class Model:
    core: HostCore
    vm_token: str
    now: float = 0.0
    #: The sessions the test believes live, by session id.
    live: dict[int, Session] = field(default_factory=dict)

    def session(self, index: int) -> Session | None:
        if not self.live:
            return None
        return list(self.live.values())[index % len(self.live)]

    def channel_id(self, index: int, *, offered: bool = False) -> int | None:
        channels = [
            channel
            for channel in self.core.list_channels()
            if not offered or channel.state is ChannelState.OFFERED
        ]
        return channels[index % len(channels)].channel_id if channels else None

    def listener_id(self, index: int) -> int | None:
        listeners = self.core.list_listeners()
        return listeners[index % len(listeners)].listener_id if listeners else None


def make_model() -> Model:
    tokens, guids = itertools.count(1), itertools.count(0x30000000)
    core = HostCore(
        config=HostConfig(max_socket_number=6, max_sessions_per_partition=3),
        host_token=HOST_TOKEN,
        token_factory=lambda: f"token-{next(tokens)}",
        guid_factory=lambda: f"{next(guids):08x}-2222-4333-8444-555555555555",
    )
    _, token, _ = core.create_partition("vm", 0.0, vm_id=VM_ID, personality="windows")
    model = Model(core=core, vm_token=token)
    for vm_id, secret in ((HOST_VM_ID, HOST_TOKEN), (VM_ID, token)):
        session, _ = core.attach(vm_id, secret, 0.0)
        model.live[session.session_id] = session
    return model


def run(model: Model, op: Op) -> list[Event]:
    core, now = model.core, model.now
    kind, a, b, c = op
    events: list[Event]
    if kind == "attach":
        vm_id, token = (HOST_VM_ID, HOST_TOKEN) if a % 2 else (VM_ID, model.vm_token)
        opened, events = core.attach(vm_id, token, now)
        model.live[opened.session_id] = opened
        return events
    if kind == "power":
        action = POWER[a % len(POWER)]
        events = getattr(core, action)(VM_ID, now)
        if action == "stop_partition":
            model.live = {k: s for k, s in model.live.items() if s.vm_id != VM_ID}
        return events
    if kind == "time":
        model.now += (0.5, 3.0, 10.0)[a % 3]
        return core.on_timer(model.now)
    session = model.session(a)
    if session is None:
        return []
    if kind == "detach":
        events = core.detach(session, now)
        del model.live[session.session_id]
        return events
    service = SERVICES[b % len(SERVICES)]
    if kind == "listen":
        scopes = [WILDCARD, LOOPBACK] if session.is_host else [WILDCARD, PARENT, LOOPBACK]
        _, events = core.listen(session, scopes[c % len(scopes)], service, now)
        return events
    if kind == "connect":
        targets = [VM_ID, LOOPBACK] if session.is_host else [PARENT, LOOPBACK]
        _, events = core.connect(session, targets[c % len(targets)], service, now)
        return events
    if kind == "unlisten":
        listener_id = model.listener_id(b)
        return [] if listener_id is None else core.unlisten(session, listener_id, now)
    channel_id = model.channel_id(b, offered=kind == "accept")
    if channel_id is None:
        return []
    if kind == "accept":
        acceptor = core.get_channel(channel_id).acceptor
        if c % 2 and acceptor is not None and acceptor.session_id in model.live:
            session = model.live[acceptor.session_id]  # half the time the owner
        return core.accept(session, channel_id, now)
    info = core.get_channel(channel_id)
    owners = [end.session_id for end in (info.connector, info.acceptor) if end is not None]
    # A session holding both ends of a loopback channel says which one it speaks for.
    side = (Side.CONNECTOR, Side.ACCEPTOR)[c % 2] if owners.count(session.session_id) == 2 else None
    method = core.close if kind == "close" else core.shutdown
    return method(session, channel_id, now, side=side)


def check(model: Model, before: set[tuple[str, int]], events: list[Event]) -> None:
    core = model.core
    after = {(s.vm_id, s.session_id) for s in model.live.values()}
    listener_by_id = {listener.listener_id: listener for listener in core.list_listeners()}
    channel_by_id = {channel.channel_id: channel for channel in core.list_channels()}
    for event in events:
        if isinstance(event, PartitionEvent):
            target = (event.partition, event.session_id)
            if isinstance(event, SessionEnded):
                assert target in before and target not in after, event
            else:
                assert target in after, event
        # Offers go to the listener's session, channel notices to the session holding the end.
        if isinstance(event, ConnectionOffered) and event.listener_id in listener_by_id:
            assert listener_by_id[event.listener_id].session_id == event.session_id, event
        if isinstance(event, ConnectionEstablished | PeerFinReceived | ChannelRescinded):
            channel = channel_by_id.get(event.channel_id)
            end = None
            if channel is not None:
                end = channel.connector if event.side is Side.CONNECTOR else channel.acceptor
            if end is not None:
                assert (end.vm_id, end.session_id) == (event.partition, event.session_id), event
    for vm_id in (HOST_VM_ID, VM_ID):
        sessions = {s.session_id for s in model.live.values() if s.vm_id == vm_id}
        info = core.get_partition(vm_id)
        assert info.sessions == len(sessions) and info.attached == bool(sessions)
        listeners = core.list_listeners(vm_id)
        assert {listener.session_id for listener in listeners} <= sessions
        ends = [
            end
            for channel in core.list_channels(vm_id)
            for end in (channel.connector, channel.acceptor)
            if end is not None and end.vm_id == vm_id
        ]
        assert {end.session_id for end in ends} <= sessions
        assert info.sockets == len(listeners) + len(ends)
        assert info.sockets <= core.config.max_socket_number
        if not sessions:
            assert listeners == [] and ends == []
        if vm_id == VM_ID and info.state is PartitionState.OFF:
            assert not sessions


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(OPS, min_size=5, max_size=60))
def test_random_session_sequences_keep_ownership_invariants(ops: list[Op]) -> None:
    model = make_model()
    for op in ops:
        before = {(s.vm_id, s.session_id) for s in model.live.values()}
        try:
            events = run(model, op)
        except HvError as error:
            events = list(error.events)
        check(model, before, events)
